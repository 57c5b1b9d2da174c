"""Models, their tokenizers and command queues: the SDK's handle on a served model.

A Model is looked up once per instance and holds that instance's id pools for
the model (KV pages, embed slots). A Queue is an ordered stream of model
commands; every Context has its own so that independent contexts run
concurrently and are batched together by the engine.

Each queue numbers what it submits (`seq`) and remembers the highest number
known to have run (`done_seq`): an awaited call on a queue answers only after
every earlier command of that queue ran. Contexts use this to make a fork wait
for its parent's pending prefill before reading the shared pages, and pools
use it to reuse ids safely across queues.
"""

from __future__ import annotations

import itertools
import json
from typing import TYPE_CHECKING, Any, NamedTuple

from pie.inferlet import _abi, _driver
from pie.inferlet.pool import IdPool

if TYPE_CHECKING:
    from pie.inferlet.context import Context


class TemplateError(Exception):
    """The model's chat template refused the messages or failed; the text is the host's reason."""


class NoChatTemplate(RuntimeError):
    """The model has no chat template (a base model such as Gemma 3 270M): chat
    helpers cannot turn messages into text, so the caller must fill plain text."""

    def __init__(self, model: str) -> None:
        super().__init__(
            f"model {model!r} has no chat template (a base model): fill the prompt as plain "
            "text with Context.fill(), as text_completion --raw does"
        )
        self.model = model


class Distribution(NamedTuple):
    """Top-k next-token distribution: ids and their probabilities, most likely first."""

    ids: list[int]
    probs: list[float]


class Tokenizer:
    """The model's tokenizer (runs on the host; special-token strings map to their ids)."""

    def __init__(self, service_id: int) -> None:
        self.service_id = service_id
        self._vocabs: tuple[list[int], list[bytes]] | None = None

    def tokenize(self, text: str) -> list[int]:
        return list(_abi.call("tokenize", self.service_id, text))

    encode = tokenize

    def detokenize(self, ids: list[int]) -> str:
        return _abi.call("detokenize", self.service_id, [int(i) for i in ids])

    decode = detokenize

    def get_vocabs(self) -> tuple[list[int], list[bytes]]:
        """Every regular token id and its bytes (fetched once, then cached).

        The host sends the bytes as one buffer plus end offsets, which cross
        the sandbox boundary in milliseconds; they are sliced here once.
        """
        if self._vocabs is None:
            ids, data, ends = _abi.call("get_vocabs", self.service_id)
            data = bytes(data)
            bounds = itertools.pairwise([0, *ends])
            self._vocabs = (list(ids), [data[start:end] for start, end in bounds])
        return self._vocabs


class Queue:
    """An ordered stream of commands to one model."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.id: int = _abi.call("create_queue", model.service_id)
        self.seq = 0
        self.done_seq = 0
        self._sync: Any = None  # the shared synchronize task of wait_for, while in flight

    def __repr__(self) -> str:
        return f"Queue({self.id}, seq={self.seq}, done={self.done_seq})"

    def command(self, name: str, *args: Any) -> int:
        """Submit a fire-and-forget model command; returns its sequence number."""
        self.seq += 1
        _abi.call(name, self.id, *args)
        return self.seq

    async def call(self, name: str, *args: Any) -> Any:
        """Submit a model call and wait for its result (everything before it has run then)."""
        self.seq += 1
        seq = self.seq
        result = await _abi.call_async(name, self.id, *args)
        self.done_seq = max(self.done_seq, seq)
        return result

    async def synchronize(self) -> bool:
        return bool(await self.call("synchronize"))

    async def wait_for(self, seq: int) -> None:
        """Return once command number `seq` of this queue has run (several
        waiters share one synchronize round trip)."""
        while self.done_seq < seq:
            if self._sync is None:
                self._sync = _abi.spawn(self._sync_once())
            await self._sync

    async def _sync_once(self) -> None:
        try:
            await self.synchronize()
        finally:
            self._sync = None

    def set_priority(self, priority: str) -> None:
        if priority not in ("low", "normal", "high"):
            raise ValueError(f"priority must be low, normal or high, not {priority!r}")
        _abi.call("set_priority", self.id, priority)

    async def debug_query(self, query: str) -> str:
        """A query for the model worker / service ('ping', 'stats', 'set_batching ...')."""
        return await self.call("queue_debug_query", query)

    def exported_kv_pages(self) -> list[tuple[str, int]]:
        return [(str(n), int(c)) for n, c in _abi.call("get_all_exported_kv_pages", self.id)]

    async def forward_text(
        self,
        last_page_len: int,
        pages: list[int],
        tokens: list[int],
        positions: list[int],
        masks: list[list[int]],
        output_indices: list[int],
    ) -> list[Distribution]:
        dists = await self.call(
            "forward_text", last_page_len, pages, tokens, positions, masks, output_indices
        )
        return [Distribution(list(ids), list(probs)) for ids, probs in dists]

    def forward_text_no_output(
        self,
        last_page_len: int,
        pages: list[int],
        tokens: list[int],
        positions: list[int],
        masks: list[list[int]],
    ) -> int:
        return self.command(
            "forward_text_no_output", last_page_len, pages, tokens, positions, masks
        )

    def copy_kv_page(self, src: int, dst: int, src_offset: int, dst_offset: int, size: int) -> int:
        return self.command("copy_kv_page", src, dst, src_offset, dst_offset, size)

    def mask_kv_page(self, page: int, mask: list[bool]) -> int:
        return self.command("mask_kv_page", page, mask)

    def embed_text(self, embeds: list[int], tokens: list[int], positions: list[int]) -> int:
        return self.command("embed_text", embeds, tokens, positions)

    def forward(
        self,
        last_page_len: int,
        pages: list[int],
        input_embeds: list[int],
        output_embeds: list[int],
    ) -> int:
        return self.command("forward", last_page_len, pages, input_embeds, output_embeds)

    async def get_next_token_distribution(self, embeds: list[int]) -> list[Distribution]:
        dists = await self.call("get_next_token_distribution", embeds)
        return [Distribution(list(ids), list(probs)) for ids, probs in dists]


class Model:
    """A served model as this instance sees it."""

    def __init__(self, service_id: int) -> None:
        self.service_id = service_id
        self.info: dict[str, str] = dict(_abi.call("model_info", service_id))
        self.name = self.info.get("name", "")
        self.description = self.info.get("description", "")
        self.version = self.info.get("version", "")
        self.license = self.info.get("license", "")
        self.traits = [t for t in self.info.get("traits", "").split(",") if t]
        self.chat_template = self.info.get("chat_template", "")
        self.eos_token_ids = [int(t) for t in self.info.get("eos_token_ids", "").split(",") if t]
        bos = self.info.get("bos_token_id", "")
        self.bos_token_id: int | None = int(bos) if bos else None  # a text's first token
        self.kv_page_size = int(self.info.get("kv_page_size", "16"))
        self.dist_size = int(self.info.get("dist_size", "64"))
        self.vocab_size = int(self.info.get("vocab_size", "0"))
        self.tokenizer = Tokenizer(service_id)
        self.kv_pages = IdPool("kv_pages")
        self.embeds = IdPool("embeds")
        self._eos_texts: list[str] | None = None

    def __repr__(self) -> str:
        return f"Model({self.name!r}, service={self.service_id})"

    def has_traits(self, traits: list[str]) -> bool:
        return all(t in self.traits for t in traits)

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def create_queue(self) -> Queue:
        return Queue(self)

    def create_context(self) -> Context:
        from pie.inferlet.context import Context

        return Context(self)

    @property
    def eos_tokens(self) -> list[str]:
        """The end-of-turn tokens as text."""
        if self._eos_texts is None:
            self._eos_texts = [self.tokenizer.detokenize([t]) for t in self.eos_token_ids]
        return self._eos_texts

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        *,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        **variables: Any,
    ) -> str:
        """The model's own chat template applied to messages, as transformers'
        `apply_chat_template(messages, tokenize=False, ...)` renders it.

        The host renders it with jinja2's sandbox (pie.runtime.chat_template),
        so any template works. The template sees the messages, tools,
        documents, add_generation_prompt, the model's bos_token and eos_token,
        and `variables` (e.g. `enable_thinking=False`; they win over the
        special tokens). Everything must be JSON-serialisable. Raises
        TemplateError with the reason if the template refuses the messages
        (e.g. roles out of order) or fails, NoChatTemplate if the model has none.
        """
        if not self.chat_template:
            raise NoChatTemplate(self.name)
        ok, text = _abi.call(
            "apply_chat_template",
            self.service_id,
            json.dumps(messages),
            bool(add_generation_prompt),
            None if tools is None else json.dumps(tools),
            None if documents is None else json.dumps(documents),
            json.dumps(variables) if variables else None,
        )
        if not ok:
            raise TemplateError(text)
        return text


def _instance_models() -> dict[int, Model]:
    """This instance's Model objects by service id.

    Kept on the instance's guest driver, so every instance (several share one
    process in dev mode) has its own id pools and nothing outlives it.
    """
    driver = _driver.current()
    models = getattr(driver, "_pie_models", None)
    if models is None:
        models = driver._pie_models = {}
    return models


def get_model(name: str) -> Model | None:
    """The served model called `name`, or None."""
    service_id = _abi.call("get_model", name)
    if service_id is None:
        return None
    models = _instance_models()
    model = models.get(int(service_id))
    if model is None:
        model = models[int(service_id)] = Model(int(service_id))
    return model


def get_all_models() -> list[str]:
    return list(_abi.call("get_all_models"))


def get_auto_model() -> Model:
    """The first served model (what most inferlets want)."""
    names = get_all_models()
    if not names:
        raise RuntimeError("no model is served")
    model = get_model(names[0])
    if model is None:
        raise RuntimeError(f"model {names[0]!r} disappeared")
    return model

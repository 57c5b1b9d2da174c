"""A host double for unit-testing inferlets and the SDK without a model or a server.

FakeWorld implements every host call of pie.runtime.hostcalls over a tiny,
deterministic fake model, and runs inferlets with the real guest driver
(pie.inferlet._abi.run), so SDK code runs exactly as it does under the dev
executor. It keeps real page bookkeeping (virtual -> physical ids, reference
counts, exports) and checks what a worker would check (BRLE lengths, written
KV slots, page ranges), so mistakes in page handling show up as errors or
wrong outputs.

The fake model: byte-level tokens (id = byte + 3; 0 = <|endoftext|>,
1 = <|im_start|>, 2 = <|im_end|>), the SmolLM2 chat template (rendered by the
host's own renderer, pie.runtime.chat_template, as a real host does), and a "forward
pass" whose top-k list is a hash of every (token, position) the row attends
to plus the row's own position: the same context always gives the same
distribution and any wrong mask, position or KV slot changes it.

Queues are adversarial on purpose: a queue's commands run only when something
on *that* queue is awaited (or at the end), never because another queue made
progress. Code that reads pages another queue has not finished writing reads
an unwritten slot and fails.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from pie.inferlet import _abi
from pie.inferlet.sampling import TopP
from pie.runtime import chat_template

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
BYTE_OFFSET = 3
ALPHABET = [ord(c) + BYTE_OFFSET for c in "etaoinshrdlucmfw ypvbgk"]


class FakeHostError(Exception):
    """What a real host would reject (terminating the instance)."""


class FakeModel:
    name = "fake-model"
    bos_token = ""
    eos_token = "<|im_end|>"

    def __init__(
        self,
        page_size: int = 4,
        dist_size: int = 8,
        eos_every: int = 0,
        chat_template: str = SMOLLM2_TEMPLATE,
        bos_token_id: int | None = None,
    ) -> None:
        self.page_size = page_size
        self.dist_size = dist_size
        self.eos_every = eos_every  # if > 0, EOS is the top token when hash % eos_every == 0
        self.chat_template = chat_template
        self.bos_token_id = bos_token_id  # e.g. 0 to make it ask for BOS as Gemma does

    def tokenize(self, text: str) -> list[int]:
        out: list[int] = []
        i = 0
        while i < len(text):
            for special, sid in SPECIALS.items():
                if text.startswith(special, i):
                    out.append(sid)
                    i += len(special)
                    break
            else:
                out.extend(b + BYTE_OFFSET for b in text[i].encode("utf-8"))
                i += 1
        return out

    def detokenize(self, ids: list[int]) -> str:
        names = {v: k.encode() for k, v in SPECIALS.items()}
        data = b"".join(names[i] if i in names else bytes([i - BYTE_OFFSET]) for i in ids)
        return data.decode("utf-8", "replace")

    def distribution(
        self, attended: list[tuple[int, int]], position: int
    ) -> tuple[list[int], list[float]]:
        h = (sum((tok + 1) * (pos + 3) for tok, pos in attended) + 7 * position) % 1000003
        ids = [ALPHABET[(h + 5 * j) % len(ALPHABET)] for j in range(self.dist_size)]
        if self.eos_every and h % self.eos_every == 0:
            ids = [2] + ids[:-1]
        weights = [0.5 ** (j + 1) * (1 + ((h >> j) & 1) * 0.1) for j in range(self.dist_size)]
        weights.sort(reverse=True)
        return ids, weights


class FakeWorld:
    """The host side: model resources, the KV store, pub/sub, a virtual clock."""

    def __init__(self, model: FakeModel | None = None) -> None:
        self.model = model or FakeModel()
        self.pages: dict[int, list[tuple[int, int] | None]] = {}  # physical page -> slots
        self.page_refs: dict[int, int] = {}
        self.page_valid: dict[int, list[bool]] = {}
        self._phys_ids = itertools.count()
        self.exports: dict[str, list[int]] = {}
        self.store: dict[str, str] = {}
        self.subscribers: dict[str, list[tuple[FakeInstance, int]]] = {}
        self.instances: list[FakeInstance] = []
        self.now_ms = 0
        self._sleepers: list[tuple[int, int, FakeInstance, int]] = []
        self._sleep_seq = itertools.count()
        self.ready: deque[tuple[FakeInstance, int, Any]] = deque()
        self.debug_log: list[str] = []
        self._queue_ids = itertools.count(1)
        self.web: dict[str, Callable[[str, str, bytes], tuple[int, list, bytes]]] = {}
        """URL (with or without its query) -> handler(url, method, body) -> (status, headers,
        body): what `fetch` reaches. Any other URL is refused, as by a daemon whose
        inferlet_http_allow does not list it."""

    # ------------------------------------------------------------------ running
    def spawn(
        self, main: Callable[[list[str]], Coroutine], args: list[str] | None = None
    ) -> FakeInstance:
        instance = FakeInstance(self, list(args or []))
        self.instances.append(instance)
        instance.driver, step = _abi.run(main, instance.args, instance)
        instance.on_step(step)
        return instance

    def finish(
        self, main: Callable[[list[str]], Coroutine], args: list[str] | None = None
    ) -> FakeInstance:
        """Start one inferlet and run until nothing can move; the instance (status, calls, sent)."""
        instance = self.spawn(main, args)
        self.run_until_idle()
        return instance

    def run(self, main: Callable[[list[str]], Coroutine], args: list[str] | None = None) -> Any:
        """Run one inferlet to the end; its return value (raises if it failed)."""
        return self.finish(main, args).outcome()

    def run_until_idle(self) -> None:
        """Deliver results (and advance the virtual clock) until nothing can move."""
        while True:
            if self.ready:
                instance, fut, value = self.ready.popleft()
                if instance.status == "parked":
                    instance.on_step(instance.driver.resume(fut, value))
            elif self._sleepers:
                wake, _, instance, fut = heapq.heappop(self._sleepers)
                self.now_ms = max(self.now_ms, wake)
                self.ready.append((instance, fut, None))
            else:
                break
        for instance in self.instances:
            instance.drain_all()

    # ------------------------------------------------------------------ physical pages
    def new_page(self) -> int:
        phys = next(self._phys_ids)
        self.pages[phys] = [None] * self.model.page_size
        self.page_refs[phys] = 0
        return phys

    def ref(self, phys: int) -> None:
        self.page_refs[phys] += 1

    def unref(self, phys: int) -> None:
        self.page_refs[phys] -= 1
        if self.page_refs[phys] == 0:
            del self.page_refs[phys], self.pages[phys]
            self.page_valid.pop(phys, None)

    @property
    def live_pages(self) -> int:
        return len(self.pages)


class FakeInstance:
    """One inferlet instance: the guest binding (call / call_async) and its state."""

    def __init__(self, world: FakeWorld, args: list[str]) -> None:
        self.world = world
        self.model = world.model
        self.args = args
        self.id = f"00000000-0000-4000-8000-{len(world.instances):012d}"
        self.kv: dict[int, int] = {}  # virtual page -> physical page
        self.kv_at_end: dict[int, int] = {}  # self.kv as it was when the instance ended
        self.embeds: dict[int, Any] = {}
        self.queues: dict[int, deque[tuple[str, tuple]]] = {}
        self.calls: list[tuple[str, tuple]] = []
        self.sent: list[str] = []
        self.inbox: deque[str] = deque()
        self.receivers: deque[int] = deque()
        self.subscriptions: dict[int, tuple[str, deque[str], deque[int]]] = {}
        self._sub_ids = itertools.count()
        self._futs = itertools.count(1)
        self.status = "starting"
        self.result: Any = None
        self.error: str | None = None
        self.driver: Any = None

    # ------------------------------------------------------------------ lifecycle
    def on_step(self, step: tuple) -> None:
        self.status = step[0]
        if step[0] == "done":
            self.result = step[1]
        elif step[0] == "failed":
            self.error = step[1]
        if step[0] != "parked":
            self.destroy()

    def destroy(self) -> None:
        """What the model service does when an instance ends: run what is queued,
        then drop every page reference the instance holds (exports keep theirs)."""
        self.drain_all()
        self.kv_at_end = dict(self.kv)
        for vid in list(self.kv):
            self.world.unref(self.kv.pop(vid))
        self.embeds.clear()

    def outcome(self) -> Any:
        if self.status == "failed":
            raise AssertionError(f"inferlet failed:\n{self.error}")
        if self.status != "done":
            raise AssertionError(f"inferlet did not finish (status {self.status})")
        return self.result

    def signal(self, message: str) -> None:
        """The client sends the instance a message (receive())."""
        if self.receivers:
            self.world.ready.append((self, self.receivers.popleft(), message))
        else:
            self.inbox.append(message)

    def drain_all(self) -> None:
        for queue in list(self.queues):
            self._drain(queue)

    @property
    def virtual_pages(self) -> set[int]:
        return set(self.kv)

    # ------------------------------------------------------------------ binding protocol
    def call(self, name: str, args: tuple) -> Any:
        self.calls.append((name, args))
        handler = getattr(self, "_" + name)
        if name in COMMANDS:
            queue = args[0]
            if queue not in self.queues:
                raise FakeHostError(f"unknown queue {queue}")
            self.queues[queue].append((name, args[1:]))
            return None
        return handler(*args)

    def call_async(self, name: str, args: tuple) -> int:
        self.calls.append((name, args))
        fut = next(self._futs)
        value = getattr(self, "_" + name)(fut, *args)
        if value is not _PENDING:
            self.world.ready.append((self, fut, value))
        return fut

    def _drain(self, queue: int) -> None:
        commands = self.queues.get(queue)
        while commands:
            name, args = commands.popleft()
            getattr(self, "_" + name)(*args)

    # ------------------------------------------------------------------ runtime
    def _get_version(self) -> str:
        return "fake"

    def _get_instance_id(self) -> str:
        return self.id

    def _get_arguments(self) -> list[str]:
        return list(self.args)

    def _set_return(self, value: str) -> None:
        self.result = value

    def _debug_query(self, query: str) -> str:
        self.world.debug_log.append(query)
        return "pong" if query == "ping" else f"Unknown query: {query}"

    def _time_ms(self) -> int:
        return self.world.now_ms

    def _sleep(self, fut: int, ms: int) -> Any:
        heapq.heappush(
            self.world._sleepers, (self.world.now_ms + ms, next(self.world._sleep_seq), self, fut)
        )
        return _PENDING

    # ------------------------------------------------------------------ models and queues
    def _get_all_models(self) -> list[str]:
        return [self.model.name]

    def _get_model(self, name: str) -> int | None:
        return 0 if name == self.model.name else None

    def _model_info(self, service: int) -> list[tuple[str, str]]:
        return [
            ("name", self.model.name),
            ("description", "a fake model"),
            ("version", "1"),
            ("license", "none"),
            ("traits", "input_text,tokenize,output_text"),
            ("chat_template", self.model.chat_template),
            ("eos_token_ids", "2"),
            ("bos_token", self.model.bos_token),
            (
                "bos_token_id",
                "" if self.model.bos_token_id is None else str(self.model.bos_token_id),
            ),
            ("kv_page_size", str(self.model.page_size)),
            ("dist_size", str(self.model.dist_size)),
            ("vocab_size", "259"),
        ]

    def _create_queue(self, service: int) -> int:
        queue = next(self.world._queue_ids)
        self.queues[queue] = deque()
        return queue

    def _set_priority(self, queue: int, priority: str) -> None:
        if priority not in ("low", "normal", "high"):
            raise FakeHostError(f"bad priority {priority}")

    def _synchronize(self, fut: int, queue: int) -> bool:
        self._drain(queue)
        return True

    def _queue_debug_query(self, fut: int, queue: int, query: str) -> str:
        self._drain(queue)
        self.world.debug_log.append(query)
        return "pong" if query == "ping" else f"ok: {query}"

    def _get_kv_page_size(self, queue: int) -> int:
        return self.model.page_size

    def _get_all_exported_kv_pages(self, queue: int) -> list[tuple[str, int]]:
        return [(name, len(pages)) for name, pages in self.world.exports.items()]

    # ------------------------------------------------------------------ pages (commands)
    def _allocate_kv_pages(self, ids: list[int]) -> None:
        for vid in ids:
            if vid in self.kv:
                raise FakeHostError(f"remap not allowed: kv page {vid}")
            phys = self.world.new_page()
            self.world.ref(phys)
            self.kv[vid] = phys

    def _deallocate_kv_pages(self, ids: list[int]) -> None:
        for vid in ids:
            phys = self.kv.pop(vid, None)
            if phys is not None:
                self.world.unref(phys)

    def _allocate_embeds(self, ids: list[int]) -> None:
        for vid in ids:
            self.embeds[vid] = None

    def _deallocate_embeds(self, ids: list[int]) -> None:
        for vid in ids:
            self.embeds.pop(vid, None)

    def _copy_kv_page(
        self, src: int, dst: int, src_offset: int, dst_offset: int, size: int
    ) -> None:
        ps = self.model.page_size
        if src_offset + size > ps or dst_offset + size > ps:
            raise FakeHostError("copy_kv_page out of range")
        source = self.world.pages[self._phys(src)]
        target = self.world.pages[self._phys(dst)]
        target[dst_offset : dst_offset + size] = source[src_offset : src_offset + size]

    def _mask_kv_page(self, page: int, mask: list[bool]) -> None:
        self.world.page_valid[self._phys(page)] = list(mask)

    def _export_kv_pages(self, ids: list[int], name: str, persistent: bool) -> None:
        phys = [self._phys(v) for v in ids]
        old = self.world.exports.pop(name, None)
        for p in phys:
            self.world.ref(p)
        for p in old or []:
            self.world.unref(p)
        self.world.exports[name] = phys

    def _unexport_kv_pages(self, name: str) -> None:
        if name not in self.world.exports:
            raise FakeHostError(f"no export named {name!r}")
        for p in self.world.exports.pop(name):
            self.world.unref(p)

    def _import_kv_pages(self, ids: list[int], name: str) -> None:
        pages = self.world.exports.get(name)
        if pages is None:
            raise FakeHostError(f"no export named {name!r}")
        if len(ids) != len(pages):
            raise FakeHostError(f"import of {len(pages)} pages into {len(ids)} ids")
        for vid, phys in zip(ids, pages, strict=True):
            if vid in self.kv:
                raise FakeHostError(f"remap not allowed: kv page {vid}")
            self.world.ref(phys)
            self.kv[vid] = phys

    def _phys(self, vid: int) -> int:
        try:
            return self.kv[vid]
        except KeyError:
            raise FakeHostError(f"kv page {vid} is not allocated") from None

    # ------------------------------------------------------------------ forward passes
    def _forward_text(
        self,
        fut: int,
        queue: int,
        last_page_len: int,
        pages: list[int],
        tokens: list[int],
        positions: list[int],
        masks: list[list[int]],
        output_indices: list[int],
    ) -> Any:
        self._drain(queue)
        return self._run_forward(last_page_len, pages, tokens, positions, masks, output_indices)

    def _forward_text_no_output(
        self,
        last_page_len: int,
        pages: list[int],
        tokens: list[int],
        positions: list[int],
        masks: list[list[int]],
    ) -> None:
        self._run_forward(last_page_len, pages, tokens, positions, masks, [])

    def _run_forward(
        self,
        last_page_len: int,
        pages: list[int],
        tokens: list[int],
        positions: list[int],
        masks: list[list[int]],
        output_indices: list[int],
    ) -> list[tuple[list[int], list[float]]]:
        ps = self.model.page_size
        n = len(tokens)
        if not pages or not 1 <= last_page_len <= ps:
            raise FakeHostError(f"bad last_page_len {last_page_len} for {len(pages)} pages")
        total = ps * (len(pages) - 1) + last_page_len
        if n == 0 or n > total or len(positions) != n:
            raise FakeHostError(f"{n} tokens, {len(positions)} positions, context {total}")
        if masks and len(masks) != n:
            raise FakeHostError(f"{len(masks)} masks for {n} tokens")
        slots = [self.world.pages[self._phys(v)] for v in pages]
        for i, (token, position) in enumerate(zip(tokens, positions, strict=True)):
            index = total - n + i
            slots[index // ps][index % ps] = (token, position)
        out = []
        for o in output_indices:
            if not 0 <= o < n:
                raise FakeHostError(f"output index {o} out of range")
            width = total - n + o + 1
            visible = _brle_visible(masks[o], width) if masks else [True] * width
            attended = []
            for index, seen in enumerate(visible):
                if seen:
                    slot = slots[index // ps][index % ps]
                    if slot is None:
                        raise FakeHostError(f"attended KV slot {index} was never written")
                    attended.append(slot)
            out.append(self.model.distribution(attended, positions[o]))
        if masks:
            for i in range(n):  # every row's mask must be well formed, not just outputs
                _brle_visible(masks[i], total - n + i + 1)
        return out

    def _embed_text(self, embeds: list[int], tokens: list[int], positions: list[int]) -> None:
        if not len(embeds) == len(tokens) == len(positions):
            raise FakeHostError("embed_text lists differ in length")
        for vid, token, position in zip(embeds, tokens, positions, strict=True):
            if vid not in self.embeds:
                raise FakeHostError(f"embed {vid} is not allocated")
            self.embeds[vid] = (token, position)

    def _forward(
        self,
        last_page_len: int,
        pages: list[int],
        input_embeds: list[int],
        output_embeds: list[int],
    ) -> None:
        inputs = [self.embeds[v] for v in input_embeds]
        tokens = [t for t, _ in inputs]
        positions = [p for _, p in inputs]
        first = len(inputs) - len(output_embeds)
        dists = self._run_forward(
            last_page_len, pages, tokens, positions, [], list(range(first, len(inputs)))
        )
        for vid, dist in zip(output_embeds, dists, strict=True):
            self.embeds[vid] = dist

    def _generate(
        self,
        fut: int,
        queue: int,
        last_page_len: int,
        pages: list[int],
        tokens: list[int],
        positions: list[int],
        spare_pages: list[int],
        temperature: float,
        top_k: int,
        top_p: float,
        seed: int | None,
        max_tokens: int,
        stop_tokens: list[int],
        grammar: int | None = None,
    ) -> list[int]:
        """The engine's fast path on the fake model: forward, sample, repeat (causal)."""
        if grammar is not None:
            raise FakeHostError("grammar matchers need the real host (pie.runtime.grammar)")
        self._drain(queue)
        ps = self.model.page_size
        every = list(pages) + list(spare_pages)
        total = ps * (len(pages) - 1) + last_page_len
        if total + max_tokens - 1 > ps * len(every):
            raise FakeHostError(f"generate: {len(every)} pages are too few for {max_tokens} tokens")
        sampler = TopP(top_p, temperature, seed)
        out: list[int] = []
        while True:
            used = -(-total // ps)
            ((ids, probs),) = self._run_forward(
                total - ps * (used - 1), every[:used], tokens, positions, [], [len(tokens) - 1]
            )
            cut = top_k or len(ids)
            token = sampler.sample(ids[:cut], probs[:cut])
            out.append(token)
            if token in stop_tokens or len(out) == max_tokens:
                return out
            tokens, positions, total = [token], [positions[-1] + 1], total + 1

    # ------------------------------------------------------------------ grammars
    # The fake model has no grammar engine: creating a matcher answers as a malformed
    # grammar would (GrammarError in the SDK), so no matcher id ever exists here.
    def _grammar_create(self, service: int, kind: str, source: str) -> tuple[int, str]:
        return 0, "grammar matchers need the real host (pie.runtime.grammar)"

    def _no_matcher(self, matcher: int, *_: Any) -> Any:
        raise FakeHostError(f"unknown grammar matcher {matcher}")

    _grammar_allowed = _grammar_consume = _grammar_is_accepting = _no_matcher
    _grammar_is_stopped = _grammar_rollback = _grammar_drop = _no_matcher

    def _get_next_token_distribution(self, fut: int, queue: int, embeds: list[int]) -> Any:
        self._drain(queue)
        return [self.embeds[v] for v in embeds]

    # ------------------------------------------------------------------ tokenizer
    def _tokenize(self, service: int, text: str) -> list[int]:
        return self.model.tokenize(text)

    def _detokenize(self, service: int, tokens: list[int]) -> str:
        return self.model.detokenize(tokens)

    def _apply_chat_template(
        self,
        service: int,
        messages: str,
        add_generation_prompt: bool,
        tools: str | None,
        documents: str | None,
        variables: str | None,
    ) -> tuple[bool, str]:
        return chat_template.render_json(
            self.model.chat_template,
            messages,
            add_generation_prompt,
            tools,
            documents,
            variables,
            bos_token=self.model.bos_token,
            eos_token=self.model.eos_token,
        )

    def _get_vocabs(self, service: int) -> tuple[list[int], bytes, list[int]]:
        """The byte tokens: ids, their bytes concatenated, end offsets (as the host sends them)."""
        return list(range(BYTE_OFFSET, 256 + BYTE_OFFSET)), bytes(range(256)), list(range(1, 257))

    # ------------------------------------------------------------------ messaging
    def _send(self, message: str) -> None:
        self.sent.append(message)

    def _receive(self, fut: int) -> Any:
        if self.inbox:
            return self.inbox.popleft()
        self.receivers.append(fut)
        return _PENDING

    def _broadcast(self, topic: str, message: str) -> None:
        for instance, sub in self.world.subscribers.get(topic, []):
            _topic, backlog, waiters = instance.subscriptions[sub]
            if waiters:
                self.world.ready.append((instance, waiters.popleft(), message))
            else:
                backlog.append(message)

    def _subscribe(self, topic: str) -> int:
        sub = next(self._sub_ids)
        self.subscriptions[sub] = (topic, deque(), deque())
        self.world.subscribers.setdefault(topic, []).append((self, sub))
        return sub

    def _subscription_next(self, fut: int, sub: int) -> Any:
        if sub not in self.subscriptions:
            raise FakeHostError(f"unknown subscription {sub}")
        _topic, backlog, waiters = self.subscriptions[sub]
        if backlog:
            return backlog.popleft()
        waiters.append(fut)
        return _PENDING

    def _unsubscribe(self, sub: int) -> None:
        topic, _, _ = self.subscriptions.pop(sub)
        self.world.subscribers[topic].remove((self, sub))

    # ------------------------------------------------------------------ key-value store
    def _store_get(self, fut: int, key: str) -> str | None:
        return self.world.store.get(key)

    def _store_set(self, fut: int, key: str, value: str) -> None:
        self.world.store[key] = value

    def _store_delete(self, fut: int, key: str) -> None:
        self.world.store.pop(key, None)

    def _store_exists(self, fut: int, key: str) -> bool:
        return key in self.world.store

    def _store_list_keys(self, fut: int) -> list[str]:
        return sorted(self.world.store)

    # ------------------------------------------------------------------ outgoing HTTP
    def _fetch(self, fut, url, method, headers, body, timeout_ms) -> tuple:
        web = self.world.web
        handler = web.get(url) or web.get(url.split("?", 1)[0])
        if handler is None:
            return (f"URL {url} is not allowed by inferlet_http_allow", 0, [], b"")
        status, got, content = handler(url, method, bytes(body))
        return ("", status, list(got), bytes(content))


_PENDING = object()

COMMANDS = frozenset(
    {
        "allocate_kv_pages",
        "deallocate_kv_pages",
        "allocate_embeds",
        "deallocate_embeds",
        "copy_kv_page",
        "mask_kv_page",
        "export_kv_pages",
        "unexport_kv_pages",
        "import_kv_pages",
        "forward_text_no_output",
        "embed_text",
        "forward",
    }
)


def _brle_visible(runs: list[int], width: int) -> list[bool]:
    """Decode a wire BRLE (first run attended) into per-slot visibility."""
    if sum(runs) != width or any(r < 0 for r in runs):
        raise FakeHostError(f"BRLE {runs} does not cover {width} slots")
    out: list[bool] = []
    for i, run in enumerate(runs):
        out.extend([i % 2 == 0] * run)
    return out


def reference_distribution(
    model: FakeModel, tokens: list[int], positions: list[int] | None = None
) -> tuple[list[int], list[float]]:
    """What a causal forward over exactly these tokens returns after the last one."""
    positions = list(range(len(tokens))) if positions is None else positions
    return model.distribution(list(zip(tokens, positions, strict=True)), positions[-1])


def greedy_reference(model: FakeModel, tokens: list[int], steps: int) -> list[int]:
    """Greedy continuation of `tokens` computed directly from the fake model."""
    seq = list(tokens)
    out: list[int] = []
    for _ in range(steps):
        ids, probs = reference_distribution(model, seq)
        best = ids[max(range(len(ids)), key=lambda i: probs[i])]
        out.append(best)
        seq.append(best)
    return out


def log_prob(prob: float) -> float:
    return math.log(max(prob, 1e-30))

"""The real host over a fake model, for unit-testing inferlets and the SDK without weights.

FakeWorld is pie's own host — the runtime (pie.runtime.runtime.Runtime), its
host-call table (pie.runtime.hostapi.HostApi), the model service
(pie.service.service.ModelService) with its resources and scheduler — with
only the model worker replaced by FakeWorker, which executes the plain-data
jobs of pie.engine.batch on a tiny deterministic model. Inferlets run with the
real guest driver through the dev executor's Execution, so SDK code runs as
it does under `--executor dev`, every argument is checked as a daemon checks
it, and a host call added to the table is served here with no change. The
reactor is a virtual clock (`sleep` and `time_ms` use it), so everything runs
synchronously inside `world.run(main)`.

The fake model: byte-level tokens (id = byte + 3; 0 = <|endoftext|>,
1 = <|im_start|>, 2 = <|im_end|>), the SmolLM2 chat template (rendered by the
host, as for a real model), and a "forward pass" whose top-k list is a hash
of every (token, position) the row attends to plus the row's own position:
the same context always gives the same distribution and any wrong mask,
position or KV slot changes it; attending to a slot nothing wrote fails.

Queues are adversarial on purpose: a queue's fire-and-forget commands reach
the model service only when something on *that* queue is awaited (or when
nothing else can move), never because another queue made progress. Code that
reads pages another queue has not finished writing reads an unwritten slot
and fails.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from pie.engine.batch import (
    CopyKv,
    EmbedText,
    Forward,
    ForwardItem,
    GetDistributions,
    MaskKv,
    Query,
    WorkerInfo,
    context_len,
)
from pie.inferlet.brle import Brle
from pie.inferlet.sampling import TopP
from pie.interfaces import IInferletExecutor, IInstanceOwner, IModelService, IModelWorker, PieError
from pie.runtime.executors.dev import DevExecution
from pie.runtime.hostcalls import HOST_CALLS
from pie.runtime.http import HTTP_REQUEST_ARGUMENT, Exchange
from pie.runtime.instances import NORMAL_FINISH, Instance
from pie.runtime.kvstore import KeyValueStore
from pie.runtime.runtime import Runtime
from pie.service.service import ModelService

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
VOCAB_SIZE = 256 + BYTE_OFFSET


class FakeModel:
    """The fake model's definition, and its tokenizer (pie.interfaces.ITokenizer)."""

    name = "fake-model"
    bos_token = ""
    eos_token = "<|im_end|>"
    eos_token_ids = [SPECIALS["<|im_end|>"]]

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
        bad = [i for i in ids if not 0 <= i < VOCAB_SIZE]
        if bad:
            raise PieError(f"unknown token ids {bad[:5]}")
        names = {v: k.encode() for k, v in SPECIALS.items()}
        data = b"".join(names[i] if i in names else bytes([i - BYTE_OFFSET]) for i in ids)
        return data.decode("utf-8", "replace")

    def vocabs(self) -> tuple[list[int], list[bytes]]:
        return list(range(BYTE_OFFSET, VOCAB_SIZE)), [bytes([b]) for b in range(256)]

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


@implementer(IModelWorker)
class FakeWorker:
    """Executes pie.engine.batch jobs on a FakeModel, as pie.engine.engine does on weights.

    `pages` holds what each physical KV page's slots hold ((token, position)
    or None: never written), `valid` which slots the embedding path attends
    (written, or set by mask_kv_page), `embeds` what each embed slot holds.
    """

    def __init__(self, model: FakeModel, num_pages: int = 4096, num_embeds: int = 1024) -> None:
        self.model = model
        self.tokenizer = model
        self.info = WorkerInfo(
            model_name=model.name,
            kv_page_size=model.page_size,
            dist_size=model.dist_size,
            num_kv_pages=num_pages,
            num_embeds=num_embeds,
            vocab_size=VOCAB_SIZE,
            max_positions=1 << 24,
            device="cpu",
            dtype="fake",
        )
        self.pages: dict[int, list[tuple[int, int] | None]] = {}
        self.valid: dict[int, list[bool]] = {}
        self.embeds: dict[int, Any] = {}

    def execute(self, job: object) -> Deferred:
        try:
            return succeed(self.run(job))
        except Exception as error:  # noqa: BLE001 - fails the job, as the engine thread does
            return fail(error)

    def close(self) -> Deferred:
        return succeed(None)

    def run(self, job: object) -> object:
        if isinstance(job, Forward):
            return [self._item(item) for item in job.items]
        if isinstance(job, EmbedText):
            for slot, token, position in zip(job.slots, job.tokens, job.positions, strict=True):
                self.embeds[slot] = (token, position)
            return None
        if isinstance(job, GetDistributions):
            return [self.embeds[slot] for slot in job.slots]
        if isinstance(job, CopyKv):
            for table in (self._page, self._valid):
                src, dst = table(job.src), table(job.dst)
                dst[job.dst_offset : job.dst_offset + job.size] = src[
                    job.src_offset : job.src_offset + job.size
                ]
            return None
        if isinstance(job, MaskKv):
            self._valid(job.page)[: len(job.mask)] = job.mask
            return None
        if isinstance(job, Query):
            if job.text == "ping":
                return "pong"
            raise PieError(f"unknown worker query {job.text!r} (known: ping)")
        raise TypeError(f"unknown job {job!r}")

    def forget(self, page: int) -> None:
        """The page was freed: it holds nothing now."""
        self.pages.pop(page, None)
        self.valid.pop(page, None)

    def _page(self, page: int) -> list:
        return self.pages.setdefault(page, [None] * self.model.page_size)

    def _valid(self, page: int) -> list[bool]:
        return self.valid.setdefault(page, [False] * self.model.page_size)

    def _item(self, item: ForwardItem) -> list:
        ps = self.model.page_size
        total = context_len(ps, len(item.pages), item.last_page_len)
        if item.input_embeds:
            new = [self.embeds[slot] for slot in item.input_embeds]
        else:
            new = list(zip(item.tokens, item.positions, strict=True))
        start = total - len(new)
        for i, value in enumerate(new):
            page, offset = item.pages[(start + i) // ps], (start + i) % ps
            self._page(page)[offset], self._valid(page)[offset] = value, True

        def read(index: int) -> tuple[tuple[int, int] | None, bool]:
            page, offset = item.pages[index // ps], index % ps
            return self._page(page)[offset], self._valid(page)[offset]

        def dist(row: int) -> tuple[list[int], list[float]]:
            position = new[row][1]
            if item.masks:
                seen = [not hidden for hidden in Brle.from_buffer(item.masks[row]).to_list()]
            elif item.input_embeds:  # the engine's rule: valid slots not after the row's position
                seen = [ok and (v is None or v[1] <= position) for v, ok in map(read, range(total))]
            else:
                seen = [True] * (start + row + 1)
            attended = []
            for index in (i for i, shown in enumerate(seen) if shown):
                value = read(index)[0]
                if value is None:
                    raise PieError(f"attended KV slot {index} was never written")
                attended.append(value)
            return self.model.distribution(attended, position)

        rows = range(len(new) - len(item.output_embeds), len(new))
        for slot, row in zip(item.output_embeds, rows, strict=True):
            self.embeds[slot] = dist(row)
        if item.sampling is None:
            return [dist(row) for row in item.output_indices]
        s = item.sampling
        out = []
        for row in item.output_indices:  # a seed is the draw's race key (pie.engine.draw):
            ids, probs = dist(row)  # a sampler's first draw is keyed by its seed itself
            cut = s.top_k or len(ids)
            out.append(TopP(s.top_p, s.temperature, s.seed).sample(ids[:cut], probs[:cut]))
        return out


@implementer(IModelService)
class HeldQueues:
    """The model service, with each queue's commands held until that queue is awaited.

    Everything else is the service's own (attributes are read and set on it).
    """

    def __init__(self, service: ModelService) -> None:
        vars(self).update(service=service, held={}, page_tables={})

    def __getattr__(self, name: str) -> Any:
        return getattr(self.service, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.service, name, value)

    def submit(self, instance_id: str, queue_id: int, op: str, *args) -> Deferred:
        if HOST_CALLS[op].mode == "command":
            d: Deferred = Deferred()
            self.held.setdefault(queue_id, []).append((instance_id, op, args, d))
            return d
        self.release(queue_id)
        return self.service.submit(instance_id, queue_id, op, *args)

    def release(self, queue_id: int) -> bool:
        """Submit what the queue holds, in order; False if it held nothing."""
        held = self.held.pop(queue_id, [])
        for instance_id, op, args, d in held:
            self.service.submit(instance_id, queue_id, op, *args).chainDeferred(d)
        return bool(held)

    def release_all(self) -> bool:
        return any([self.release(queue_id) for queue_id in list(self.held)])

    def destroy_instance(self, instance_id: str) -> None:
        """As the real service: what the ended instance still queued is dropped, not run."""
        for queue_id, held in list(self.held.items()):
            if held[0][0] == instance_id:
                del self.held[queue_id]
        self.page_tables[instance_id] = self.service.resources.pages_of(instance_id)
        self.service.destroy_instance(instance_id)


class _Reactor(Clock):
    """Virtual time; work sent to "threads" (the key-value store's) runs inline."""

    def callFromThread(self, f: Callable, *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)

    def getThreadPool(self) -> _InlinePool:
        return _InlinePool()


class _InlinePool:
    def callInThreadWithCallback(self, on_result: Callable, f: Callable, *args, **kwargs) -> None:
        try:
            result = f(*args, **kwargs)
        except BaseException:  # noqa: BLE001 - handed to the caller, as a thread pool does
            on_result(False, Failure())
        else:
            on_result(True, result)


class _Web:
    """What `fetch` reaches: the handlers in FakeWorld.web (in place of pie.runtime.outbound)."""

    def __init__(self, handlers: dict) -> None:
        self._handlers = handlers

    def fetch(self, instance, url, method, headers, body, timeout_ms) -> Deferred:
        handler = self._handlers.get(url) or self._handlers.get(url.split("?", 1)[0])
        if handler is None:
            return succeed((f"URL {url} is not allowed by inferlet_http_allow", 0, [], b""))
        status, got, content = handler(url, method, bytes(body))
        return succeed(("", status, list(got), bytes(content)))


class _Request:
    """The HTTP request a `--pie-http-request` instance answers, for pie.runtime.http.Exchange:
    what a streamed response sends is kept instead of going to a socket."""

    def __init__(self) -> None:
        self.code = 200
        self.responseHeaders = Headers()
        self.chunks: list[bytes] = []
        self.finished = False
        self.channel = self.transport = self  # end(normally=False) "drops the connection"

    def notifyFinish(self) -> Deferred:
        return Deferred()  # the client never goes away

    def setResponseCode(self, code: int) -> None:
        self.code = code

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.responseHeaders.setRawHeaders(name, [value])

    def registerProducer(self, producer: object, streaming: bool) -> None:
        """The fake client reads at once: the producer is never paused."""

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        if data:
            self.chunks.append(bytes(data))

    def finish(self) -> None:
        self.finished = True

    def loseConnection(self) -> None:
        self.channel = None


class _Requests:
    """Stands in runtime.servers for the instances given a request as `--pie-http-request`
    (a server instance's per-request instances): their HTTP exchanges."""

    id = "fakeworld-http-requests"

    def __init__(self) -> None:
        self.exchanges: dict[str, Exchange] = {}

    def exchange(self, instance: Instance) -> Exchange:
        return self.exchanges[instance.id]

    def stop(self, reason: str) -> Deferred:
        return succeed(None)


class _Execution(DevExecution):
    """The dev executor's execution of a given main (no program source to load)."""

    def __init__(self, main: Callable, arguments: list[str], host: Any) -> None:
        super().__init__({}, arguments, host)
        self._main = main

    def _load(self) -> Callable:
        return self._main


class _Recorder:
    """The instance's real host binding, noting each call in FakeInstance.calls."""

    def __init__(self, host: Any, calls: list) -> None:
        self._host = host
        self._calls = calls

    def call(self, name: str, args: tuple) -> Any:
        self._calls.append((name, args))
        return self._host.call(name, args)


@implementer(IInferletExecutor)
class _Executor:
    name = "fake"

    def check(self, program: object) -> object:
        return program

    def run(self, program: FakeInstance, arguments: list[str], host: Any) -> _Execution:
        execution = _Execution(program.main, arguments, _Recorder(host, program.calls))
        execution.start()
        return execution


class FakeWorld:
    """pie's runtime and model service on a FakeWorker and a virtual clock."""

    def __init__(self, model: FakeModel | None = None) -> None:
        self.model = model or FakeModel()
        self.reactor = _Reactor()
        self.worker = FakeWorker(self.model)
        self.service = HeldQueues(
            ModelService(self.worker, reactor=self.reactor, service_id=0, run_blocking=_run_inline)
        )
        pool = self.service.resources.pages
        release = pool.release

        def freed(page: int) -> None:
            """A freed page forgets what it held: one the host reused while something still
            read it shows up as never written."""
            self.worker.forget(page)
            release(page)

        pool.release = freed
        self.runtime = Runtime(
            "/nonexistent", {self.model.name: self.service}, _Executor(), reactor=self.reactor
        )
        self.runtime.hostapi.clock = self.reactor.seconds
        self.runtime.kvstore = KeyValueStore(":memory:", self.reactor)
        self.runtime.kvstore.start(pool=_InlinePool())
        self.web: dict[str, Callable[[str, str, bytes], tuple[int, list, bytes]]] = {}
        """URL (with or without its query) -> handler(url, method, body) -> (status, headers,
        body): what `fetch` reaches. Any other URL is refused, as by a daemon whose
        inferlet_http_allow does not list it."""
        self.runtime.http = _Web(self.web)
        self.requests = _Requests()
        self.instances: list[FakeInstance] = []

    # ------------------------------------------------------------------ running
    def spawn(
        self, main: Callable[[list[str]], Coroutine], args: list[str] | None = None
    ) -> FakeInstance:
        """Launch an inferlet; it starts at the next run_until_idle. With arguments
        [`--pie-http-request`, request JSON] it answers that request as a server instance's
        per-request instance does (and may stream its response: FakeInstance.streamed)."""
        args = list(args or [])
        instance = FakeInstance(self, main)
        answers = args[:1] == [HTTP_REQUEST_ARGUMENT]
        instance.instance = self.runtime.start_instance(
            "fake", instance, args, instance, self.requests.id if answers else None
        )
        if answers:
            self.runtime.servers.setdefault(self.requests.id, self.requests)
            self.requests.exchanges[instance.id] = Exchange(_Request(), instance.instance)
        self.instances.append(instance)
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
        """Run what is due, advance the virtual clock to the next timer, and release the
        held queues once nothing else can move; until nothing can."""
        while True:
            calls = self.reactor.getDelayedCalls()
            if calls:
                due = min(call.getTime() for call in calls)
                self.reactor.advance(max(0.0, due - self.reactor.seconds()))
            elif not self.service.release_all():
                return

    # ------------------------------------------------------------------ what there is to see
    @property
    def now_ms(self) -> int:
        return int(self.reactor.seconds() * 1000)

    @property
    def live_pages(self) -> int:
        """Physical KV pages in use (by instances or exports)."""
        pool = self.service.resources.pages
        return pool.capacity - pool.available

    @property
    def pages(self) -> dict[int, list[tuple[int, int] | None]]:
        """Physical page -> what its slots hold ((token, position), None if never written)."""
        return self.worker.pages

    @property
    def exports(self) -> dict[str, list[int]]:
        """Export name -> its physical pages."""
        return {name: list(e.pages) for name, e in self.service.resources.exports.items()}

    @property
    def store(self) -> dict[str, str]:
        """The key-value store's records."""
        store = self.runtime.kvstore
        return {key: _value(store.get(key)) for key in _value(store.list_keys())}


@implementer(IInstanceOwner)
class FakeInstance:
    """One launched inferlet, as its owner (a client connection) sees it, plus its host calls."""

    def __init__(self, world: FakeWorld, main: Callable) -> None:
        self.world = world
        self.main = main
        self.instance: Instance | None = None
        self.calls: list[tuple[str, tuple]] = []
        self.sent: list[str] = []
        self.reason: str | None = None

    @property
    def id(self) -> str:
        return self.instance.id

    @property
    def status(self) -> str:
        """'parked' while it runs, then 'done' or 'failed'."""
        if self.reason is None:
            return "parked"
        return "done" if self.reason == NORMAL_FINISH else "failed"

    @property
    def error(self) -> str | None:
        return self.reason if self.status == "failed" else None

    @property
    def result(self) -> str | None:
        return self.instance.return_value

    @property
    def streamed(self) -> dict[str, Any] | None:
        """The streamed HTTP response (status, headers, chunks, finished), once started."""
        exchange = self.world.requests.exchanges.get(self.instance.id)
        if exchange is None or not exchange.started:
            return None
        request = exchange.request
        headers = request.responseHeaders.getAllRawHeaders()
        return {
            "status": request.code,
            "headers": [(k.decode().lower(), v.decode()) for k, vs in headers for v in vs],
            "chunks": list(request.chunks),
            "finished": request.finished,
        }

    @property
    def kv_at_end(self) -> dict[int, int]:
        """The instance's page table (virtual -> physical) as it was when it ended."""
        return self.world.service.page_tables.get(self.instance.id, {})

    def signal(self, message: str) -> None:
        """The client sends the instance a message (receive())."""
        self.world.runtime.signal(self.instance.id, message)

    def outcome(self) -> Any:
        if self.status == "failed":
            raise AssertionError(f"inferlet failed:\n{self.error}")
        if self.status != "done":
            raise AssertionError(f"inferlet did not finish (status {self.status})")
        return self.result

    # ------------------------------------------------------------------ IInstanceOwner
    def instance_message(self, instance_id: str, message: str) -> None:
        self.sent.append(message)

    def instance_terminated(self, instance_id: str, reason: str) -> None:
        if reason == NORMAL_FINISH and self.result is not None:
            self.sent.pop()  # the runtime sends the return value last; it is `result` here
        self.reason = reason
        exchange = self.world.requests.exchanges.get(instance_id)
        if exchange is not None and exchange.started:  # as the server instance ends it
            exchange.end(normally=reason == NORMAL_FINISH)


def _run_inline(fn: Callable, *args: Any) -> Deferred:
    try:
        return succeed(fn(*args))
    except Exception:  # noqa: BLE001 - the caller's errback
        return fail()


def _value(d: Deferred) -> Any:
    """The result of a Deferred that has fired (the inline store's)."""
    out: list = []
    d.addBoth(out.append)
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


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

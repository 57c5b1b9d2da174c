"""The model service: one served model as inferlets see it (IModelService), on any IModelWorker.

It checks every command before anything reaches the worker, translates the
instance's virtual ids into physical ones (pie.service.resources), keeps each
queue's order and batches forward passes across queues (pie.service.scheduler),
applies the contention policy when pages run out, and keeps persistent KV
exports across restarts (pie.service.exportstore). All on the reactor thread;
only worker jobs and store writes leave it.

A failed command errbacks with InstanceFault; from then on every command of
that instance errbacks with the same reason until the runtime calls
destroy_instance, which frees everything the instance held.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

import pie
from pie.engine.batch import (
    CopyKv,
    EmbedText,
    ForwardItem,
    GetDistributions,
    MaskKv,
    Query,
    Sampling,
    check_sampling,
)
from pie.interfaces import IModelService, IModelWorker, InstanceFault, PieError
from pie.runtime.hostcalls import HOST_CALLS, MODEL_COMMANDS
from pie.service.exportstore import ExportStore
from pie.service.resources import HOLDS_DISTRIBUTION, HOLDS_TOKEN, Recipe, Resources
from pie.service.scheduler import FORWARD, LOCAL, SYNC, BatchingPolicy, Command, FollowUp, Scheduler

log = Logger()

_QUEUE_IDS = itertools.count(1)  # queue ids are unique in the process (Pie: a global counter)
_SERVICE_IDS = itertools.count(0)
_U32 = 1 << 32
# Positions past the model's trained window are allowed (RoPE extrapolates, and windowed or
# sink attention keeps counting); this cap keeps every position exact in fp32 on any worker.
_MAX_POSITION = 1 << 24

CONTENTION_REASON = "terminated by the system, due to resource contention"
CPU_BATCH_TOKENS = 256  # bench/prefill.py: a 2,000-token prompt's worst decode stall 3.8 -> 0.5 s
DEVICE_BATCH_TOKENS = 16384


def _u32(name: str, value: object) -> int:
    if type(value) is not int or not 0 <= value < _U32:
        raise InstanceFault(f"{name} must be an unsigned 32-bit integer, got {value!r}")
    return value


def _u32s(name: str, values: object) -> list[int]:
    if not isinstance(values, (list, tuple)):
        raise InstanceFault(f"{name} must be a list of integers, got {type(values).__name__}")
    values = list(values)
    # (set/min/max run in C: this is on every forward's path)
    if values and (set(map(type, values)) != {int} or min(values) < 0 or max(values) >= _U32):
        bad = next(v for v in values if type(v) is not int or not 0 <= v < _U32)
        raise InstanceFault(f"{name} must hold unsigned 32-bit integers, got {bad!r}")
    return values


def _text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise InstanceFault(f"{name} must be a string, got {type(value).__name__}")
    return value


def _dists(answer: object) -> list[tuple[list[int], list[float]]]:
    return [(list(ids), list(probs)) for ids, probs in answer]


@dataclass
class _Generation:
    """One host-side generation in progress (see ModelService.generate)."""

    instance: str
    pages: list[int]
    sampling: Sampling
    max_tokens: int
    stops: frozenset
    out: list[int] = field(default_factory=list)


@implementer(IModelService)
class ModelService:
    """One model on one worker. See the module docstring and docs/model-service.md.

    state_dir: where persistent KV exports are kept (None: they last until
    the daemon stops). instance_terminator(instance_id, reason): how the
    service ends an instance it evicts under contention (the runtime sets it;
    the evicted instance's later commands errback with the reason anyway).
    run_blocking(fn, *args) -> Deferred runs store I/O off the reactor thread.
    max_batch_tokens caps the new tokens of one Forward job (a longer text item is split into
    chunks that run beside the other queues' items: chunked prefill, see the scheduler).
    Default: CPU_BATCH_TOKENS on a CPU worker, where a long prompt in one pass would stall
    every decode step for seconds, else DEVICE_BATCH_TOKENS.
    """

    def __init__(
        self,
        worker: IModelWorker,
        *,
        reactor=None,
        service_id: int | None = None,
        state_dir: str | None = None,
        policy: str = "adaptive",
        max_batch_tokens: int | None = None,
        instance_terminator: Callable[[str, str], None] | None = None,
        run_blocking: Callable[..., Deferred] | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.worker = worker
        info = worker.info
        self.info = info
        self.name = info.model_name
        self.service_id = next(_SERVICE_IDS) if service_id is None else service_id
        self.kv_page_size = info.kv_page_size
        self.dist_size = info.dist_size
        self.tokenizer = worker.tokenizer
        self.instance_terminator = instance_terminator
        self.resources = Resources(info.num_kv_pages, info.num_embeds, info.kv_page_size)
        if max_batch_tokens is None:
            max_batch_tokens = CPU_BATCH_TOKENS if info.device == "cpu" else DEVICE_BATCH_TOKENS
        self.scheduler = Scheduler(
            reactor,
            worker.execute,
            info.kv_page_size,
            BatchingPolicy.parse(policy.split()),
            max_batch_tokens,
        )
        self.resources.busy = self.scheduler.page_staged
        self.scheduler.unstaged = self.resources.release_deferred
        self._run_blocking = run_blocking or (
            lambda fn, *a: deferToThreadPool(reactor, reactor.getThreadPool(), fn, *a)
        )
        self._store_chain: Deferred = succeed(None)
        self._store = self._open_store(state_dir) if state_dir else None

    def _open_store(self, state_dir: str) -> ExportStore | None:
        """The export store with its exports restored (dormant); None, logged, if it is unusable."""
        try:
            store = ExportStore(state_dir, self.name, self.kv_page_size)
            recipes = store.load()
        except (OSError, sqlite3.Error) as e:
            log.error(
                "KV export store in {dir} unusable, persistent exports will not be kept: {e}",
                dir=state_dir,
                e=e,
            )
            return None
        for name, recipe in recipes.items():
            self.resources.restore(name, recipe)
        return store

    # ------------------------------------------------------------------ IModelService

    def status(self) -> dict:
        return {
            "version": pie.__version__,
            "model_name": self.name,
            "kv_page_size": self.kv_page_size,
            "num_kv_pages": self.info.num_kv_pages,
            "num_embeddings": self.info.num_embeds,
            "num_distributions": self.info.num_embeds,  # distributions live in embed slots
            "free_kv_pages": self.resources.pages.available,
            "free_embeddings": self.resources.embeds.available,
            "vocab_size": self.info.vocab_size,
            "batching": self.scheduler.policy.describe(),
            "pending_commands": self.scheduler.pending(),
            "device": self.info.device,
        }

    def create_queue(self, instance_id: str) -> int:
        queue_id = next(_QUEUE_IDS)
        self.scheduler.add_queue(queue_id, instance_id)
        self.resources.register(instance_id)
        return queue_id

    def set_priority(self, instance_id: str, queue_id: int, priority: str) -> None:
        self._own_queue(instance_id, queue_id)
        self.scheduler.set_priority(queue_id, priority)

    def list_exports(self) -> list[tuple[str, int]]:
        return self.resources.list_exports()

    def destroy_instance(self, instance_id: str) -> None:
        self.scheduler.drop_instance(instance_id)
        self.resources.release_instance(instance_id)

    def submit(self, instance_id: str, queue_id: int, op: str, *args) -> Deferred:
        def build() -> Command:
            if op not in MODEL_COMMANDS:
                raise InstanceFault(f"{op!r} is not a model command")
            params = [name for name, _ in HOST_CALLS[op].params[1:]]
            if len(args) != len(params):
                raise InstanceFault(
                    f"{op} takes {len(params)} arguments ({', '.join(params)}), got {len(args)}"
                )
            return getattr(self, "_op_" + op)(instance_id, *args)

        return self._enqueue(instance_id, queue_id, build)

    def _enqueue(self, instance_id: str, queue_id: int, build: Callable[[], Command]) -> Deferred:
        """Queue the command build() makes after the checks every command gets."""
        try:
            self._own_queue(instance_id, queue_id)
            reason = self.scheduler.fault_reason(instance_id)
            if reason is not None:
                raise InstanceFault(reason)
            command = build()
        except Exception as e:  # noqa: BLE001 - a bad argument ends the instance, never the caller
            if not isinstance(e, InstanceFault):
                log.failure("unexpected error checking a model command", Failure(e))
                e = InstanceFault(f"bad arguments: {e!r}")
            self.scheduler.fault(instance_id, str(e))
            return fail(e)
        return self.scheduler.submit(queue_id, command)

    def _own_queue(self, instance_id: str, queue_id: int) -> None:
        if self.scheduler.queue_instance(queue_id) != instance_id:
            raise InstanceFault(f"queue {queue_id} is not a queue of this instance on {self.name}")

    # ------------------------------------------------------------------ batching policy

    def set_batching(self, policy: str) -> str:
        """Switch the batching policy at run time ('adaptive', 'k 8', 't 16' ms, 'kort 8 16')."""
        self.scheduler.set_policy(BatchingPolicy.parse(policy.split()))
        return self.scheduler.policy.describe()

    def get_batching(self) -> str:
        return self.scheduler.policy.describe()

    def _service_query(self, query: str) -> str | None:
        """Answer the queries the service itself handles, None for the worker's."""
        words = query.split()
        if query.startswith("batching_algo:"):  # Pie's debugger: batching_algo:<algo>:<k>:<t>
            try:
                policy = BatchingPolicy.parse_pie([w for w in query.split(":")[1:] if w])
            except ValueError as e:
                return f"error: {e}"
            self.scheduler.set_policy(policy)
            return policy.describe()
        if not words or words[0] not in ("set_batching", "get_batching", "service_stats"):
            return None
        if words[0] == "get_batching":
            return self.get_batching()
        if words[0] == "service_stats":
            return repr(dict(self.scheduler.stats, **self.status()))
        try:
            return self.set_batching(" ".join(words[1:]))
        except ValueError as e:
            return f"error: {e}"

    # ------------------------------------------------------------------ resources (local commands)

    def _op_allocate_kv_pages(self, inst: str, ids) -> Command:
        ids = _u32s("ids", ids)
        return Command(LOCAL, lambda: self._allocate(inst, "kv", ids))

    def _op_allocate_embeds(self, inst: str, ids) -> Command:
        ids = _u32s("ids", ids)
        return Command(LOCAL, lambda: self._allocate(inst, "embed", ids))

    def _op_deallocate_kv_pages(self, inst: str, ids) -> Command:
        ids = _u32s("ids", ids)
        return Command(LOCAL, lambda: self.resources.deallocate_pages(inst, ids))

    def _op_deallocate_embeds(self, inst: str, ids) -> Command:
        ids = _u32s("ids", ids)
        return Command(LOCAL, lambda: self.resources.deallocate_embeds(inst, ids))

    def _allocate(self, inst: str, kind: str, ids: list[int]) -> None:
        """Make room under the contention policy, then map fresh pages or embed slots."""
        if kind == "kv":
            self.resources.check_allocate_pages(inst, ids)
        victims = self.resources.eviction_victims(inst, kind, len(ids))
        if victims is None:
            pool = self.resources.pages if kind == "kv" else self.resources.embeds
            what = "KV pages" if kind == "kv" else "embed slots"
            raise InstanceFault(
                f"out of {what}: {len(ids)} requested, {pool.available} free, "
                f"and evicting every newer instance would not free enough"
            )
        for victim in victims:
            self._evict(victim)
        if kind == "kv":
            self.resources.allocate_pages(inst, ids)
        else:
            self.resources.allocate_embeds(inst, ids)

    def _evict(self, victim: str) -> None:
        pages, embeds = self.resources.holds(victim)
        log.info(
            "evicting instance {victim} ({pages} KV pages, {embeds} embeds): resource contention",
            victim=victim,
            pages=pages,
            embeds=embeds,
        )
        self.scheduler.fault(victim, CONTENTION_REASON)
        self.resources.release_instance(victim)
        if self.instance_terminator is not None:
            self._reactor.callLater(0, self.instance_terminator, victim, CONTENTION_REASON)

    # ------------------------------------------------------------------ exports

    def _op_export_kv_pages(self, inst: str, ids, name, persistent) -> Command:
        ids, name = _u32s("ids", ids), _text("name", name)
        if not isinstance(persistent, bool):
            raise InstanceFault(f"persistent must be a bool, got {persistent!r}")
        return Command(LOCAL, lambda: self._export(inst, ids, name, persistent))

    def _export(self, inst: str, ids: list[int], name: str, persistent: bool) -> None:
        old = self.resources.exports.get(name)
        stored = self._store is not None and old is not None and old.owner is None
        entry = self.resources.export(
            inst, ids, name, persistent, with_recipe=self._store is not None
        )
        if entry.recipe is not None:
            self._persist(self._store.save, name, entry.recipe)
            return
        if persistent and self._store is not None:
            log.warn(
                "persistent export {name!r} cannot be replayed from tokens; it will not survive a "
                "restart",
                name=name,
            )
        if stored:
            self._persist(self._store.remove, name)

    def _op_unexport_kv_pages(self, inst: str, name) -> Command:
        name = _text("name", name)

        def unexport() -> None:
            if self.resources.unexport(inst, name).owner is None and self._store is not None:
                self._persist(self._store.remove, name)

        return Command(LOCAL, unexport)

    def _op_import_kv_pages(self, inst: str, ids, name) -> Command:
        ids, name = _u32s("ids", ids), _text("name", name)
        return Command(LOCAL, lambda: self._import(inst, ids, name))

    def _import(self, inst: str, ids: list[int], name: str) -> FollowUp | None:
        entry = self.resources.lookup_export(inst, ids, name)
        if not entry.dormant:
            self.resources.import_pages(inst, ids, name)
            return None
        # First import since a restart: the importer gets fresh pages, the export shares them,
        # and a forward over the recorded tokens refills them before the importer's next command.
        self._allocate(inst, "kv", ids)
        physical = self.resources.translate_pages(inst, ids)
        self.resources.revive(name, physical)
        recipe = entry.recipe
        item = ForwardItem(
            pages=physical,
            last_page_len=recipe.last_page_len,
            positions=recipe.positions,
            tokens=recipe.tokens,
            masks=recipe.masks,
        )
        command = Command(
            FORWARD, lambda: item, finish=lambda _: None, dispatched=self._track_forward
        )
        command.deferred.addErrback(self._recompute_failed, name, physical)
        return FollowUp(command)

    def _recompute_failed(self, failure, name: str, physical: list[int]):
        entry = self.resources.exports.get(name)
        if entry is not None and entry.pages == physical:  # the pages hold garbage: dormant again
            self.resources.unrevive(name)
        return failure

    def _persist(self, fn: Callable, *args) -> None:
        """Run a store write off the reactor thread, after every earlier one."""
        self._store_chain.addCallback(lambda _: self._run_blocking(fn, *args))
        self._store_chain.addErrback(lambda f: log.failure("KV export store write failed", f))

    def flush_store(self) -> Deferred:
        """Fires once every store write issued so far is on disk."""
        done = Deferred()
        self._store_chain.addBoth(lambda r: (done.callback(None), r)[1])
        return done

    def close(self) -> Deferred:
        """Finish the store writes and close the store (the worker belongs to whoever made it)."""
        d = self.flush_store()
        if self._store is not None:
            d.addCallback(lambda _: self._store.close())
        return d

    # ------------------------------------------------------------------ worker commands

    def _op_copy_kv_page(self, inst: str, src, dst, src_offset, dst_offset, size) -> Command:
        src, dst = _u32("src", src), _u32("dst", dst)
        src_offset, dst_offset, size = (
            _u32("src_offset", src_offset),
            _u32("dst_offset", dst_offset),
            _u32("size", size),
        )
        ps = self.kv_page_size
        if size < 1 or src_offset + size > ps or dst_offset + size > ps:
            raise InstanceFault(
                f"copy_kv_page: size {size} at offsets {src_offset}->{dst_offset} does not fit a page of {ps}"
            )

        def prepare() -> CopyKv:
            s, d = self.resources.translate_pages(inst, [src, dst])
            return CopyKv(s, d, src_offset, dst_offset, size)

        return Command("CopyKv", prepare, dispatched=self._track_copy if self._store else None)

    def _op_mask_kv_page(self, inst: str, page, mask) -> Command:
        page = _u32("page", page)
        if not isinstance(mask, (list, tuple)) or not all(isinstance(m, bool) for m in mask):
            raise InstanceFault("mask_kv_page: mask must be a list of bools")
        if len(mask) > self.kv_page_size:
            raise InstanceFault(
                f"mask_kv_page: {len(mask)} flags for a page of {self.kv_page_size}"
            )
        mask = list(mask)
        return Command(
            "MaskKv", lambda: MaskKv(self.resources.translate_pages(inst, [page])[0], mask)
        )

    def _op_embed_text(self, inst: str, embeds, tokens, positions) -> Command:
        embeds, tokens = _u32s("embeds", embeds), self._tokens(tokens)
        positions = self._positions(positions)
        if not len(embeds) == len(tokens) == len(positions):
            raise InstanceFault(
                f"embed_text: {len(embeds)} embeds, {len(tokens)} tokens and {len(positions)} positions "
                f"(the three lists must have the same length)"
            )
        return Command(
            "EmbedText",
            lambda: EmbedText(self.resources.translate_embeds(inst, embeds), tokens, positions),
            dispatched=lambda job: self.resources.mark_embeds(job.slots, HOLDS_TOKEN),
        )

    def _op_get_next_token_distribution(self, inst: str, embeds) -> Command:
        embeds = _u32s("embeds", embeds)

        def prepare() -> GetDistributions:
            slots = self.resources.translate_embeds(inst, embeds)
            self.resources.check_embeds(
                slots,
                HOLDS_DISTRIBUTION,
                "get_next_token_distribution: no forward wrote these embeds",
            )
            return GetDistributions(slots)

        return Command("GetDistributions", prepare, finish=_dists)

    def _op_queue_debug_query(self, inst: str, query) -> Command:
        query = _text("query", query)
        if self._service_query(query) is not None:
            return Command(LOCAL, lambda: self._service_query(query))
        return Command(
            "Query", lambda: Query(query), recover=lambda f: f"error: {f.getErrorMessage()}"
        )

    def _op_synchronize(self, inst: str) -> Command:
        return Command(SYNC, lambda: None)

    # ------------------------------------------------------------------ forward passes

    def _op_forward_text(
        self, inst: str, last_page_len, pages, tokens, positions, masks, output_indices
    ) -> Command:
        outputs = _u32s("output_indices", output_indices)
        command = self._forward_text(inst, last_page_len, pages, tokens, positions, masks, outputs)
        command.finish = lambda answer: self._outputs(answer, len(outputs))
        return command

    def _op_forward_text_no_output(
        self, inst: str, last_page_len, pages, tokens, positions, masks
    ) -> Command:
        command = self._forward_text(inst, last_page_len, pages, tokens, positions, masks, [])
        command.finish = lambda _: None
        return command

    def _forward_text(
        self, inst, last_page_len, pages, tokens, positions, masks, outputs
    ) -> Command:
        pages, tokens, positions = (
            _u32s("pages", pages),
            self._tokens(tokens),
            self._positions(positions),
        )
        if len(tokens) != len(positions):
            raise InstanceFault(
                f"forward_text: {len(tokens)} tokens but {len(positions)} positions"
            )
        total = self._check_layout("forward_text", last_page_len, pages, len(tokens))
        masks = self._check_masks(masks, total, len(tokens))
        bad = [i for i in outputs if i >= len(tokens)]
        if bad:
            raise InstanceFault(
                f"forward_text: output indices {bad} out of range for {len(tokens)} tokens"
            )

        def prepare() -> ForwardItem:
            return ForwardItem(
                pages=self.resources.translate_pages(inst, pages),
                last_page_len=last_page_len,
                positions=positions,
                tokens=tokens,
                masks=masks,
                output_indices=outputs,
            )

        return Command(FORWARD, prepare, dispatched=self._track_forward if self._store else None)

    def _op_forward(self, inst: str, last_page_len, pages, input_embeds, output_embeds) -> Command:
        pages = _u32s("pages", pages)
        inputs, outputs = _u32s("input_embeds", input_embeds), _u32s("output_embeds", output_embeds)
        self._check_layout("forward", last_page_len, pages, len(inputs))
        if len(outputs) > len(inputs):
            raise InstanceFault(
                f"forward: {len(outputs)} output embeds for {len(inputs)} input embeds"
            )

        def prepare() -> ForwardItem:
            embeds = self.resources.translate_embeds(inst, inputs + outputs)
            self.resources.check_embeds(
                embeds[: len(inputs)],
                HOLDS_TOKEN,
                "forward: input embeds never filled by embed_text",
            )
            return ForwardItem(
                pages=self.resources.translate_pages(inst, pages),
                last_page_len=last_page_len,
                positions=[],
                input_embeds=embeds[: len(inputs)],
                output_embeds=embeds[len(inputs) :],
            )

        def dispatched(item: ForwardItem) -> None:
            self.resources.mark_embeds(item.output_embeds, HOLDS_DISTRIBUTION)
            if self._store is not None:
                self.resources.record_opaque(item.pages, item.last_page_len, len(item.input_embeds))

        return Command(FORWARD, prepare, finish=lambda _: None, dispatched=dispatched)

    def _check_layout(self, op: str, last_page_len, pages: list[int], count: int) -> int:
        """Total slots of the pages after the call; the new tokens must fit in them."""
        last_page_len = _u32("last_page_len", last_page_len)
        ps = self.kv_page_size
        if not pages:
            raise InstanceFault(f"{op}: no KV pages given")
        if not 1 <= last_page_len <= ps:
            raise InstanceFault(f"{op}: last_page_len {last_page_len} is not in 1..{ps}")
        if count == 0:
            raise InstanceFault(f"{op}: no tokens to forward")
        total = ps * (len(pages) - 1) + last_page_len
        if count > total:
            raise InstanceFault(
                f"{op}: {count} new tokens do not fit in {len(pages)} pages with last_page_len "
                f"{last_page_len} ({total} slots)"
            )
        return total

    def _check_masks(self, masks, total: int, count: int) -> list[list[int]]:
        """BRLE row i must cover exactly the total - count + i + 1 slots token i can see."""
        if not isinstance(masks, (list, tuple)):
            raise InstanceFault("forward_text: masks must be a list of BRLE lists")
        if not masks:
            return []
        if len(masks) != count:
            raise InstanceFault(
                f"forward_text: {len(masks)} masks for {count} tokens (give one per token, or none)"
            )
        rows = []
        for i, row in enumerate(masks):
            row = _u32s(f"masks[{i}]", row)
            want = total - count + i + 1
            if sum(row) != want:
                raise InstanceFault(
                    f"forward_text: masks[{i}] covers {sum(row)} slots, token {i} sees {want}"
                )
            if not sum(row[0::2]):
                raise InstanceFault(f"forward_text: masks[{i}] attends to no slot at all")
            rows.append(row)
        return rows

    def _tokens(self, tokens) -> list[int]:
        tokens = _u32s("tokens", tokens)
        vocab = self.info.vocab_size
        bad = [t for t in tokens if t >= vocab]
        if bad:
            raise InstanceFault(f"token ids {bad[:5]} are outside the vocabulary (size {vocab})")
        return tokens

    def _positions(self, positions) -> list[int]:
        positions = _u32s("positions", positions)
        if positions and max(positions) >= _MAX_POSITION:
            raise InstanceFault(f"positions must be below {_MAX_POSITION}")
        return positions

    @staticmethod
    def _outputs(answer: object, count: int) -> list[tuple[list[int], list[float]]]:
        dists = _dists(answer)
        if len(dists) != count:
            raise InstanceFault(
                f"the worker returned {len(dists)} distributions for {count} output indices"
            )
        return dists

    # ------------------------------------------------------------------ host-side generation

    def generate(
        self,
        instance_id: str,
        queue_id: int,
        pages: list[int],
        filled: int,
        tokens: list[int],
        positions: list[int],
        sampling: Sampling,
        max_tokens: int,
        stop_tokens: list[int] = (),
    ) -> Deferred:
        """Generate up to max_tokens tokens in the engine, with no guest round trip per token.

        The context holds `filled` slots of `pages`; `tokens` (at `positions`)
        are forwarded first, then each sampled token is forwarded to sample the
        next, causally, until a stop token or max_tokens. Fires with the sampled
        ids; the last one is not forwarded yet (it is the context's next pending
        token, as after the SDK's generate). `pages` must have room for
        filled + len(tokens) + max_tokens - 1 slots. The queue holds later
        commands until the generation ends, so its order is kept.
        """

        return self._enqueue(
            instance_id,
            queue_id,
            lambda: self._generation(
                instance_id, pages, filled, tokens, positions, sampling, max_tokens, stop_tokens
            ),
        )

    def _op_generate(
        self,
        inst: str,
        last_page_len,
        pages,
        tokens,
        positions,
        spare_pages,
        temperature,
        top_k,
        top_p,
        seed,
        max_tokens,
        stop_tokens,
    ) -> Command:
        """The `generate` host call: the context is laid out as for forward_text; the
        generated tokens continue into spare_pages."""
        pages, spare = _u32s("pages", pages), _u32s("spare_pages", spare_pages)
        total = self._check_layout("generate", last_page_len, pages, len(_u32s("tokens", tokens)))
        for name, value in (("temperature", temperature), ("top_p", top_p)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InstanceFault(f"generate: {name} must be a number, got {value!r}")
        if seed is not None and (type(seed) is not int or not 0 <= seed < 1 << 64):
            raise InstanceFault(f"generate: seed must be an unsigned 64-bit integer, got {seed!r}")
        sampling = Sampling(float(temperature), _u32("top_k", top_k), float(top_p), seed)
        return self._generation(
            inst, pages + spare, total - len(tokens), tokens, positions, sampling, max_tokens,
            stop_tokens,
        )  # fmt: skip

    def _generation(
        self, inst, pages, filled, tokens, positions, sampling, max_tokens, stop_tokens
    ) -> Command:
        """The first step of a checked host-side generation (see generate)."""
        page_ids = _u32s("pages", pages)
        new, at = self._tokens(tokens), self._positions(positions)
        stops = frozenset(_u32s("stop_tokens", stop_tokens))
        if not new or len(new) != len(at):
            raise InstanceFault(f"generate: {len(new)} tokens and {len(at)} positions")
        if type(max_tokens) is not int or max_tokens < 1:
            raise InstanceFault(f"generate: max_tokens must be at least 1, got {max_tokens!r}")
        if not isinstance(sampling, Sampling):
            raise InstanceFault("generate: sampling must be a pie.engine.batch.Sampling")

        try:
            check_sampling(sampling)
        except PieError as e:
            raise InstanceFault(f"generate: {e}") from None
        need = _u32("filled", filled) + len(new) + max_tokens - 1
        if need > self.kv_page_size * len(page_ids):
            raise InstanceFault(
                f"generate: {len(page_ids)} pages hold {self.kv_page_size * len(page_ids)} slots, "
                f"{need} are needed"
            )
        run = _Generation(inst, page_ids, sampling, max_tokens, stops)
        return self._generation_step(run, filled, new, at)

    def _generation_step(
        self, run: _Generation, filled: int, tokens: list[int], positions: list[int]
    ) -> Command:
        ps = self.kv_page_size
        total = filled + len(tokens)
        used = -(-total // ps)

        def prepare() -> ForwardItem:
            return ForwardItem(
                pages=self.resources.translate_pages(run.instance, run.pages[:used]),
                last_page_len=total - ps * (used - 1),
                positions=positions,
                tokens=tokens,
                output_indices=[len(tokens) - 1],
                sampling=run.sampling,
            )

        def finish(answer: list[int]) -> list[int] | FollowUp:
            (token,) = answer
            run.out.append(token)
            if token in run.stops or len(run.out) >= run.max_tokens:
                return run.out
            return FollowUp(self._generation_step(run, total, [token], [positions[-1] + 1]))

        return Command(
            FORWARD,
            prepare,
            finish=finish,
            holds_queue=True,
            dispatched=self._track_forward if self._store else None,
        )

    # ------------------------------------------------------------------ what the slots hold

    def _track_forward(self, item: ForwardItem) -> None:
        self.resources.record_forward(
            item.pages, item.last_page_len, item.tokens, item.positions, item.masks
        )

    def _track_copy(self, job: CopyKv) -> None:
        self.resources.record_copy(job.src, job.dst, job.src_offset, job.dst_offset, job.size)


__all__ = ["ModelService", "CONTENTION_REASON", "Recipe"]

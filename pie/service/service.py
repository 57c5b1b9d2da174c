"""The model service: one served model as inferlets see it (IModelService), on any IModelWorker.

It checks what only it knows of every command (the host binding checked the
argument types) before anything reaches the worker, translates the instance's
virtual ids into physical ones (pie.service.resources), keeps each
queue's order and batches forward passes across queues (pie.service.scheduler),
applies the contention policy when pages run out, and keeps persistent KV
exports across restarts (pie.service.exportstore). All on the reactor thread;
only worker jobs and store writes leave it.

A failed command errbacks with InstanceFault; from then on every command of
that instance errbacks with the same reason until the runtime calls
destroy_instance, which frees everything the instance held.
"""

from __future__ import annotations

import functools
import itertools
import sqlite3
from collections.abc import Callable

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
    context_len,
    layout_of,
)
from pie.interfaces import IModelService, IModelWorker, InstanceFault, PieError
from pie.metrics import ModelMetrics
from pie.service.commands import (
    AllocateEmbeds,
    AllocatePages,
    CopyPage,
    DeallocateEmbeds,
    DeallocatePages,
    EmbedTokens,
    ExportPages,
    ForwardEmbeds,
    ForwardText,
    Generate,
    GrammarMatcher,
    ImportPages,
    MaskPage,
    ReadDistributions,
    Recompute,
    ServiceQuery,
    Synchronize,
    UnexportPages,
    WorkerQuery,
)
from pie.service.exportstore import ExportStore
from pie.service.resources import HOLDS_DISTRIBUTION, HOLDS_TOKEN, Recipe, Resources
from pie.service.scheduler import (
    AGAIN,
    BatchingPolicy,
    Command,
    FollowUp,
    Scheduler,
)

log = Logger()

_QUEUE_IDS = itertools.count(1)  # queue ids are unique in the process (Pie: a global counter)
_SERVICE_IDS = itertools.count(0)
# Positions past the model's trained window are allowed (RoPE extrapolates, and windowed or
# sink attention keeps counting); this cap keeps every position exact in fp32 on any worker.
_MAX_POSITION = 1 << 24

CONTENTION_REASON = "terminated by the system, due to resource contention"
CPU_BATCH_TOKENS = 256  # bench/prefill.py: a 2,000-token prompt's worst decode stall 3.8 -> 0.5 s
DEVICE_BATCH_TOKENS = 16384


def _dists(answer: object) -> list[tuple[list[int], list[float]]]:
    return [(list(ids), list(probs)) for ids, probs in answer]


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
    instance_pages caps the KV pages one instance may map (None: the whole pool), user_pages
    those one user's instances may map together, export_pages those one user's exports
    (persistent or not) may hold together (None: no cap).
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
        instance_pages: int | None = None,
        user_pages: int | None = None,
        export_pages: int | None = None,
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
        self.resources = Resources(
            info.num_kv_pages,
            info.num_embeds,
            info.kv_page_size,
            instance_cap=instance_pages,
            user_cap=user_pages,
            export_cap=export_pages,
        )
        if max_batch_tokens is None:
            max_batch_tokens = CPU_BATCH_TOKENS if info.device == "cpu" else DEVICE_BATCH_TOKENS
        self.scheduler = Scheduler(
            reactor,
            worker.execute,
            self.resources,
            self,
            BatchingPolicy.parse(policy.split()),
            max_batch_tokens,
        )
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
        for name, (recipe, user) in recipes.items():
            self.resources.restore(name, recipe, user)
        return store

    # ------------------------------------------------------------------ IModelService

    @property
    def metrics(self) -> ModelMetrics:
        """What the scheduler reports to (pie.metrics; the runtime sets it when it adds us)."""
        return self.scheduler.metrics

    @metrics.setter
    def metrics(self, metrics: ModelMetrics) -> None:
        self.scheduler.metrics = metrics

    def status(self) -> dict:
        return {
            "version": pie.__version__,
            "model_name": self.name,
            "kv_page_size": self.kv_page_size,
            "num_kv_pages": self.info.num_kv_pages,
            "kv_sizing": self.info.kv_sizing,
            "num_embeddings": self.info.num_embeds,
            "num_distributions": self.info.num_embeds,  # distributions live in embed slots
            "free_kv_pages": self.resources.pages.available,
            "free_embeddings": self.resources.embeds.available,
            "vocab_size": self.info.vocab_size,
            "batching": self.scheduler.policy.describe(),
            "pending_commands": self.scheduler.pending(),
            "device": self.info.device,
            "compute": dict(self.info.compute),
            "memory": dict(self.info.memory),
        }

    def create_queue(self, instance_id: str, user: str | None = None) -> int:
        queue_id = next(_QUEUE_IDS)
        self.scheduler.add_queue(queue_id, instance_id)
        self.resources.register(instance_id, user)
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
        """Queue model command `op` (a MODEL_COMMANDS row); its arguments are of its WIT types
        (pie.runtime.hostapi checked them), so only what the service knows is checked here.

        synchronize also waits for the export store: once it answers, every persistent
        export made before it is on disk (and survives a kill -9)."""
        d = self._enqueue(
            instance_id, queue_id, lambda: getattr(self, "_op_" + op)(instance_id, *args)
        )
        if op == "synchronize":
            d.addCallback(lambda result: self.flush_store().addCallback(lambda _: result))
        return d

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

    _op_allocate_kv_pages = staticmethod(AllocatePages)
    _op_allocate_embeds = staticmethod(AllocateEmbeds)
    _op_deallocate_kv_pages = staticmethod(DeallocatePages)
    _op_deallocate_embeds = staticmethod(DeallocateEmbeds)
    _op_export_kv_pages = staticmethod(ExportPages)
    _op_unexport_kv_pages = staticmethod(UnexportPages)
    _op_import_kv_pages = staticmethod(ImportPages)

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
                f"and evicting the instances beyond their fair share or newer than this one "
                f"would not free enough"
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

    def _export(self, inst: str, ids: list[int], name: str, persistent: bool) -> None:
        old = self.resources.exports.get(name)
        stored = self._store is not None and old is not None and old.owner is None
        entry = self.resources.export(
            inst, ids, name, persistent, with_recipe=self._store is not None
        )
        if entry.recipe is not None:
            self._persist(self._store.save, name, entry.recipe, entry.user)
            return
        if persistent and self._store is not None:
            log.warn(
                "persistent export {name!r} cannot be replayed from tokens; it will not survive a "
                "restart",
                name=name,
            )
        if stored:
            self._persist(self._store.remove, name)

    def remove_export(self, name: str) -> bool:
        entry = self.resources.exports.get(name)
        if entry is None:
            return False
        self.resources.unexport(entry.owner, name)
        if entry.owner is None and self._store is not None:
            self._persist(self._store.remove, name)
        return True

    def _unexport(self, inst: str, name: str) -> None:
        if self.resources.unexport(inst, name).owner is None and self._store is not None:
            self._persist(self._store.remove, name)

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
        command = Recompute(name, item)
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
        ps = self.kv_page_size
        if size < 1 or src_offset + size > ps or dst_offset + size > ps:
            raise InstanceFault(
                f"copy_kv_page: size {size} at offsets {src_offset}->{dst_offset} does not fit a page of {ps}"
            )
        return CopyPage(inst, src, dst, src_offset, dst_offset, size)

    def _op_mask_kv_page(self, inst: str, page, mask) -> Command:
        if len(mask) > self.kv_page_size:
            raise InstanceFault(
                f"mask_kv_page: {len(mask)} flags for a page of {self.kv_page_size}"
            )
        return MaskPage(inst, page, mask)

    def _op_embed_text(self, inst: str, embeds, tokens, positions) -> Command:
        self._check_tokens(tokens, positions)
        if not len(embeds) == len(tokens) == len(positions):
            raise InstanceFault(
                f"embed_text: {len(embeds)} embeds, {len(tokens)} tokens and {len(positions)} positions "
                f"(the three lists must have the same length)"
            )
        return EmbedTokens(inst, embeds, tokens, positions)

    _op_get_next_token_distribution = staticmethod(ReadDistributions)

    def _op_queue_debug_query(self, inst: str, query: str) -> Command:
        if self._service_query(query) is not None:
            return ServiceQuery(query)
        return WorkerQuery(query)

    def _op_synchronize(self, inst: str) -> Command:
        return Synchronize()

    # ------------------------------------------------------------------ forward passes

    def _op_forward_text(
        self, inst: str, last_page_len, pages, tokens, positions, masks, output_indices
    ) -> Command:
        return self._forward_text(
            inst, last_page_len, pages, tokens, positions, masks, output_indices
        )

    def _op_forward_text_no_output(
        self, inst: str, last_page_len, pages, tokens, positions, masks
    ) -> Command:
        return self._forward_text(inst, last_page_len, pages, tokens, positions, masks, None)

    def _forward_text(
        self, inst, last_page_len, pages, tokens, positions, masks, outputs
    ) -> Command:
        self._check_tokens(tokens, positions)
        if len(tokens) != len(positions):
            raise InstanceFault(
                f"forward_text: {len(tokens)} tokens but {len(positions)} positions"
            )
        total = self._check_layout("forward_text", last_page_len, pages, len(tokens))
        masks = self._check_masks(masks, total, len(tokens))
        bad = [i for i in outputs or () if i >= len(tokens)]
        if bad:
            raise InstanceFault(
                f"forward_text: output indices {bad} out of range for {len(tokens)} tokens"
            )
        return ForwardText(inst, last_page_len, pages, tokens, positions, masks, outputs)

    def _op_forward(self, inst: str, last_page_len, pages, input_embeds, output_embeds) -> Command:
        inputs, outputs = input_embeds, output_embeds
        self._check_layout("forward", last_page_len, pages, len(inputs))
        if len(outputs) > len(inputs):
            raise InstanceFault(
                f"forward: {len(outputs)} output embeds for {len(inputs)} input embeds"
            )
        return ForwardEmbeds(inst, last_page_len, pages, inputs, outputs)

    def _check_layout(self, op: str, last_page_len, pages: list[int], count: int) -> int:
        """Total slots of the pages after the call; the new tokens must fit in them."""
        ps = self.kv_page_size
        if not pages:
            raise InstanceFault(f"{op}: no KV pages given")
        if not 1 <= last_page_len <= ps:
            raise InstanceFault(f"{op}: last_page_len {last_page_len} is not in 1..{ps}")
        if count == 0:
            raise InstanceFault(f"{op}: no tokens to forward")
        total = context_len(ps, len(pages), last_page_len)
        if count > total:
            raise InstanceFault(
                f"{op}: {count} new tokens do not fit in {len(pages)} pages with last_page_len "
                f"{last_page_len} ({total} slots)"
            )
        return total

    def _check_masks(self, masks: list[list[int]], total: int, count: int) -> list[list[int]]:
        """BRLE row i must cover exactly the total - count + i + 1 slots token i can see."""
        if not masks:
            return []
        if len(masks) != count:
            raise InstanceFault(
                f"forward_text: {len(masks)} masks for {count} tokens (give one per token, or none)"
            )
        for i, row in enumerate(masks):
            want = total - count + i + 1
            if sum(row) != want:
                raise InstanceFault(
                    f"forward_text: masks[{i}] covers {sum(row)} slots, token {i} sees {want}"
                )
            if not sum(row[0::2]):
                raise InstanceFault(f"forward_text: masks[{i}] attends to no slot at all")
        return masks

    def _check_tokens(self, tokens: list[int], positions: list[int]) -> None:
        """Token ids in the vocabulary, positions under _MAX_POSITION (what the service knows)."""
        vocab = self.info.vocab_size
        if tokens and max(tokens) >= vocab:
            bad = [t for t in tokens if t >= vocab]
            raise InstanceFault(f"token ids {bad[:5]} are outside the vocabulary (size {vocab})")
        if positions and max(positions) >= _MAX_POSITION:
            raise InstanceFault(f"positions must be below {_MAX_POSITION}")

    @staticmethod
    def _outputs(answer: object, count: int) -> list[tuple[list[int], list[float]]]:
        dists = _dists(answer)
        if len(dists) != count:
            raise InstanceFault(
                f"the worker returned {len(dists)} distributions for {count} output indices"
            )
        return dists

    # ------------------------------------------------------------------ host-side generation

    def _op_generate(
        self,
        inst: str,
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
        grammar: GrammarMatcher | None = None,
    ) -> Command:
        """Generate up to max_tokens tokens in the engine, with no guest round trip per token.

        The context is laid out as for forward_text; `tokens` are forwarded
        first, then each sampled token is forwarded to sample the next, writing
        on into spare_pages, until a stop token or max_tokens. Fires with the
        sampled ids; the last one is not forwarded yet (it is the context's next
        pending token, as after the SDK's generate). The queue holds later
        commands until the generation ends, so its order is kept. With a
        grammar (the runtime resolves the guest's matcher id), each step
        carries the matcher's mask to the engine as plain bytes, the sampled
        token advances the matcher, and a stopped matcher ends the generation.
        """
        total = self._check_layout("generate", last_page_len, pages, len(tokens))
        self._check_tokens(tokens, positions)
        if len(tokens) != len(positions):
            raise InstanceFault(f"generate: {len(tokens)} tokens and {len(positions)} positions")
        if max_tokens < 1:
            raise InstanceFault(f"generate: max_tokens must be at least 1, got {max_tokens}")
        sampling = Sampling(temperature, top_k, top_p, seed)
        try:
            check_sampling(sampling)
        except PieError as e:
            raise InstanceFault(f"generate: {e}") from None
        page_ids = pages + spare_pages
        need = total + max_tokens - 1
        if need > self.kv_page_size * len(page_ids):
            raise InstanceFault(
                f"generate: {len(page_ids)} pages hold {self.kv_page_size * len(page_ids)} slots, "
                f"{need} are needed"
            )
        return Generate(
            inst, page_ids, sampling, max_tokens, frozenset(stop_tokens), total - len(tokens),
            tokens, positions, grammar=grammar,
        )  # fmt: skip

    # ------------------------------------------------------------------ CommandHandler

    @functools.singledispatchmethod
    def prepare(self, command: Command) -> object:
        """See pie.service.scheduler.CommandHandler (one registration per command type)."""
        raise TypeError(f"no prepare for {type(command).__name__}")

    @prepare.register
    def _(self, c: AllocatePages) -> None:
        self._allocate(c.instance, "kv", c.ids)

    @prepare.register
    def _(self, c: AllocateEmbeds) -> None:
        self._allocate(c.instance, "embed", c.ids)

    @prepare.register
    def _(self, c: DeallocatePages) -> None:
        self.resources.deallocate_pages(c.instance, c.ids)

    @prepare.register
    def _(self, c: DeallocateEmbeds) -> None:
        self.resources.deallocate_embeds(c.instance, c.ids)

    @prepare.register
    def _(self, c: ExportPages) -> None:
        self._export(c.instance, c.ids, c.name, c.persistent)

    @prepare.register
    def _(self, c: UnexportPages) -> None:
        self._unexport(c.instance, c.name)

    @prepare.register
    def _(self, c: ImportPages) -> FollowUp | None:
        return self._import(c.instance, c.ids, c.name)

    @prepare.register
    def _(self, c: ServiceQuery) -> str | None:
        return self._service_query(c.query)

    @prepare.register
    def _(self, c: WorkerQuery) -> Query:
        return Query(c.query)

    @prepare.register
    def _(self, c: CopyPage) -> CopyKv:
        src, dst = self.resources.translate_pages(c.instance, [c.src, c.dst])
        return CopyKv(src, dst, c.src_offset, c.dst_offset, c.size)

    @prepare.register
    def _(self, c: MaskPage) -> MaskKv:
        return MaskKv(self.resources.translate_pages(c.instance, [c.page])[0], c.mask)

    @prepare.register
    def _(self, c: EmbedTokens) -> EmbedText:
        return EmbedText(
            self.resources.translate_embeds(c.instance, c.embeds), c.tokens, c.positions
        )

    @prepare.register
    def _(self, c: ReadDistributions) -> GetDistributions:
        slots = self.resources.translate_embeds(c.instance, c.embeds)
        self.resources.check_embeds(
            slots, HOLDS_DISTRIBUTION, "get_next_token_distribution: no forward wrote these embeds"
        )
        return GetDistributions(slots)

    @prepare.register
    def _(self, c: ForwardText) -> ForwardItem:
        return ForwardItem(
            pages=self.resources.translate_pages(c.instance, c.pages),
            last_page_len=c.last_page_len,
            positions=c.positions,
            tokens=c.tokens,
            masks=c.masks,
            output_indices=c.outputs or [],
        )

    @prepare.register
    def _(self, c: ForwardEmbeds) -> ForwardItem:
        embeds = self.resources.translate_embeds(c.instance, c.inputs + c.outputs)
        n = len(c.inputs)
        self.resources.check_embeds(
            embeds[:n], HOLDS_TOKEN, "forward: input embeds never filled by embed_text"
        )
        return ForwardItem(
            pages=self.resources.translate_pages(c.instance, c.pages),
            last_page_len=c.last_page_len,
            positions=[],
            input_embeds=embeds[:n],
            output_embeds=embeds[n:],
        )

    @prepare.register
    def _(self, c: Recompute) -> ForwardItem:
        return c.item

    @prepare.register
    def _(self, c: Generate) -> ForwardItem:
        used, last_page_len = layout_of(self.kv_page_size, c.filled + len(c.tokens))
        return ForwardItem(
            pages=self.resources.translate_pages(c.instance, c.pages[:used]),
            last_page_len=last_page_len,
            positions=c.positions,
            tokens=c.tokens,
            output_indices=[len(c.tokens) - 1],
            sampling=c.step_sampling(),
        )

    def finish(self, command: Command, answer: object) -> object:
        """See pie.service.scheduler.CommandHandler."""
        if isinstance(command, Generate):
            (token,) = answer
            return command.out if command.advance(token) else AGAIN
        if isinstance(command, ForwardText) and command.outputs is not None:
            return self._outputs(answer, len(command.outputs))
        if isinstance(command, ReadDistributions):
            return _dists(answer)
        if isinstance(command, WorkerQuery):
            return answer
        return None

    def dispatched(self, command: Command, job: object) -> None:
        """See pie.service.scheduler.CommandHandler: what the slots and embeds now hold."""
        if isinstance(command, EmbedTokens):
            self.resources.mark_embeds(job.slots, HOLDS_TOKEN)
        elif isinstance(command, ForwardEmbeds):
            self.resources.mark_embeds(job.output_embeds, HOLDS_DISTRIBUTION)
            if self._store is not None:
                self.resources.record_opaque(job.pages, job.last_page_len, len(job.input_embeds))
        elif self._store is None:
            return
        elif isinstance(command, ForwardText | Generate | Recompute):
            self.resources.record_forward(
                job.pages, job.last_page_len, job.tokens, job.positions, job.masks
            )
        elif isinstance(command, CopyPage):
            self.resources.record_copy(job.src, job.dst, job.src_offset, job.dst_offset, job.size)


__all__ = ["ModelService", "CONTENTION_REASON", "Recipe"]

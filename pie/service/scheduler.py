"""Command order and batching for one model: per-queue FIFO, cross-queue batches (Pie §6.5).

Every queue is a FIFO of commands. A command only starts once every earlier
command of its queue has been *dispatched* to the worker (which runs jobs in
order), so one queue's effects are always seen in submission order, across
command types. Forward-type commands of different queues (and consecutive
ones of the same queue) are staged into one open `Forward` batch that the
batching policy releases; other worker jobs are sent at once (EmbedText and
GetDistributions of different queues that are ready together share one job).
Bookkeeping commands (allocate, export, ...) run on the reactor thread when
they reach their queue's head.

Event driven (Pie §11): the scheduler pumps once per reactor turn after a
submit, after a job completes, and on a `callLater` timer for the t policies.
A pump repeats `step()` (advance the queues; decide the eager jobs and the
forward batch the policy releases under the token budget) and sends each step,
until a step moves nothing.

Two items that touch the same KV page, one of them writing it, never share a
batch: the second waits for the next one, so a worker is free to write the
new K/V of all items before or after attending. A batch holds at most
max_batch_tokens new tokens, and a batch that is full is released by every
policy but adaptive's one-in-flight rule.

Chunked prefill: a text item with more new tokens than the batch has room for
is split; its first tokens fill the room (at least MIN_CHUNK of them, or a
whole empty batch) and the rest waits at the head of its queue for the next
batch, and so on. So a long prompt goes through in slices of at most
max_batch_tokens, each batched with the running decodes, instead of one pass
that every decode step waits behind. The command answers once, when its last
chunk is done, with the outputs of all chunks.

Results and failures are fired only after the scheduler's own state is
settled, because a caller may react synchronously (submit again, or end the
instance).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from pie.engine.batch import (
    EmbedText,
    Forward,
    ForwardItem,
    GetDistributions,
    context_len,
    layout_of,
)
from pie.interfaces import InstanceFault, PieError
from pie.metrics import NO_MODEL_METRICS, ModelMetrics
from pie.runtime.hostcalls import PRIORITIES
from pie.service.resources import Resources

_RANK = {p: -i for i, p in enumerate(PRIORITIES)}  # lower ranks are served first


class Local:
    """Kind of a bookkeeping command: it runs on the reactor thread at its queue's head."""


class Sync:
    """Kind of synchronize: it answers once every job its queue dispatched is done."""


_MERGEABLE = {EmbedText, GetDistributions}  # kinds whose jobs of one pass share one job
MIN_CHUNK = 32  # fewer free tokens than this in a batch: a long item waits for the next one

log = Logger()


@dataclass(frozen=True)
class BatchingPolicy:
    """When the open forward batch is released.

    adaptive: at once when no Forward job is in flight (one batch in flight,
        Pie's default: everything that arrives meanwhile joins the next one).
    k: when k items are staged; releases exactly k (never fewer: with fewer
        than k runnable queues nothing runs, as in Pie).
    t: everything, once the oldest staged item was submitted t seconds ago.
    kort: at most k, when k are staged or the oldest waited t.
    """

    name: str = "adaptive"
    k: int = 8
    t: float = 0.016

    NAMES = ("adaptive", "k", "t", "kort")

    @classmethod
    def parse(cls, words: list[str]) -> BatchingPolicy:
        """From ['k', '8'], ['t', '16'] (ms), ['kort', '8', '16'] or ['adaptive']; ValueError if bad."""
        if not words:
            raise ValueError("no policy given")
        name = {"k-or-t": "kort", "k_or_t": "kort"}.get(words[0].lower(), words[0].lower())
        if name not in cls.NAMES:
            raise ValueError(f"unknown batching policy {words[0]!r} (adaptive, k, t, kort)")
        args = words[1:]
        wanted = {"adaptive": 0, "k": 1, "t": 1, "kort": 2}[name]
        if len(args) > wanted:
            raise ValueError(f"policy {name} takes {wanted} parameter(s)")
        policy = cls(name)
        try:
            if name in ("k", "kort") and args:
                policy = cls(name, k=int(args[0]), t=policy.t)
            t_args = {"t": args, "kort": args[1:]}.get(name, [])
            if t_args:
                policy = cls(name, k=policy.k, t=float(t_args[0]) / 1000.0)
        except ValueError:
            raise ValueError(f"bad parameter in {' '.join(words)!r}") from None
        if policy.k < 1 or policy.t < 0:
            raise ValueError("k must be >= 1 and t >= 0")
        return policy

    @classmethod
    def parse_pie(cls, fields: list[str]) -> BatchingPolicy:
        """From the fields of Pie's debugger string `batching_algo:<algo>:<k>:<t>`.

        Pie's form gives every policy both k and t; each keeps the ones it has
        (adaptive none, k its k, t its t, kort both), so `t:8:16` is `t 16`. A
        single number is the policy's own first parameter (`t:16` is `t 16`).
        """
        if not fields:
            raise ValueError("no policy given")
        values = fields[1:]
        if len(values) > 2:
            raise ValueError("batching_algo takes <algo>:<k>:<t>")
        name = fields[0]
        if len(values) == 2:
            k, t = values
            kind = cls.parse([name]).name  # validates and normalises the name
            values = {"adaptive": [], "k": [k], "t": [t], "kort": [k, t]}[kind]
        elif values and cls.parse([name]).name == "adaptive":
            values = []
        return cls.parse([name, *values])

    def describe(self) -> str:
        ms = f"{self.t * 1000:g}"
        return {
            "adaptive": "adaptive",
            "k": f"k {self.k}",
            "t": f"t {ms}",
            "kort": f"kort {self.k} {ms}",
        }[self.name]


AGAIN = object()
"""Returned by the handler's finish for a command: the command has work left (a generation's next step);
it goes back to the head of its queue and answers when a later finish returns a value."""


class FollowUp:
    """Returned by a local command: run `command` next on the same queue, answering the original."""

    def __init__(self, command: Command) -> None:
        self.command = command


@dataclass(eq=False, kw_only=True)
class Command:
    """One queued model command: data, one subclass per operation (pie.service.commands).

    Its `kind` says how it is scheduled: Local (run on the reactor thread at
    the queue head), Sync, or the batch job class it becomes. The handler
    (CommandHandler) gives it behaviour. A command that holds_queue keeps the
    rest of its queue waiting until its answer is in; its finish may then
    return AGAIN to run again (the next step of a host-side generation).
    """

    kind: ClassVar[type] = Local
    answers_errors: ClassVar[bool] = False  # a worker PieError is its answer ("error: ...")
    holds_queue: bool = False
    deferred: Deferred = field(default_factory=Deferred)
    seq: int = 0
    submitted: float = 0.0
    cancelled: bool = False


class CommandHandler(Protocol):
    """What the scheduler asks of the model service about a command."""

    def prepare(self, command: Command) -> object:
        """At the queue head, on the reactor thread: a Local command does its work and returns
        its result (or a FollowUp); others translate to physical ids and return the
        ForwardItem or batch job. Raises InstanceFault on bad input; no side effect for
        non-local commands (it may run again if the item waits for the next batch)."""

    def finish(self, command: Command, answer: object) -> object:
        """The command's result from the worker's answer (or AGAIN)."""

    def dispatched(self, command: Command, job: object) -> None:
        """The job (or forward item) prepared for the command was sent."""


@dataclass(eq=False)
class _Chunk(Command):
    """A slice of a split forward item (chunked prefill), for the command it belongs to."""

    kind: ClassVar[type] = Forward
    origin: Command
    item: ForwardItem
    earlier: list  # outputs of the slices that ran, shared by the slices of one item
    last: bool  # the last slice: it answers for origin


@dataclass(eq=False)
class _Queue:
    id: int
    instance: str
    priority: int = _RANK["normal"]
    items: deque = field(default_factory=deque)
    staged: int = 0  # commands of this queue in the open forward batch
    holding: int = 0  # dispatched commands that hold the queue until answered
    outstanding: list = field(default_factory=list)  # completion Deferreds of its dispatched jobs
    dead: bool = False


@dataclass(eq=False)
class _Entry:
    queue: _Queue
    command: Command
    prepared: object
    reads: frozenset = frozenset()
    writes: frozenset = frozenset()


@dataclass(eq=False)
class Step:
    """What one scheduling pass hands the worker (Scheduler.step).

    eager: the other worker jobs, by kind in queue order (EmbedText and
    GetDistributions of one kind are merged into one job); batch: the forward
    items the batching policy releases now, at most max_batch_tokens new tokens
    in all. Both stay visible to a fault until they are sent, so a command
    cancelled meanwhile is skipped.
    """

    moved: bool = False  # a command advanced: staged, grouped, or run on the reactor
    eager: dict[type, list[_Entry]] = field(default_factory=dict)
    batch: list[_Entry] = field(default_factory=list)


def _size(item: ForwardItem) -> int:
    """New tokens of a forward item."""
    return len(item.tokens) or len(item.input_embeds)


def _splittable(item: ForwardItem) -> bool:
    """Text items can be cut into chunks (outputs in order, so their answers concatenate)."""
    return not item.input_embeds and item.output_indices == sorted(item.output_indices)


def _footprint(item: ForwardItem, page_size: int) -> tuple[frozenset, frozenset]:
    """(pages read, pages written) by a forward item: it writes the pages of its last n slots."""
    count = _size(item)
    total = context_len(page_size, len(item.pages), item.last_page_len)
    first, last = (total - count) // page_size, (total - 1) // page_size
    return frozenset(item.pages), frozenset(item.pages[first : last + 1])


class Scheduler:
    """Queues, the open forward batch and the policy for one model worker."""

    def __init__(
        self,
        reactor,
        execute: Callable[[object], Deferred],
        resources: Resources,
        handler: CommandHandler,
        policy: BatchingPolicy | None = None,
        max_batch_tokens: int = 16384,
    ) -> None:
        self._reactor = reactor
        self._execute = execute
        self._handler = handler
        self._resources = resources  # told which pages staged work names (it frees them late)
        self._page_size = resources.page_size
        self.max_batch_tokens = max_batch_tokens
        self.policy = policy or BatchingPolicy()
        self._queues: dict[int, _Queue] = {}
        self._faults: dict[str, str] = {}  # instance -> reason of its first failure
        self._open: list[_Entry] = []  # the open forward batch
        self._open_reads: set = set()
        self._open_writes: set = set()
        self._open_tokens = 0
        self._full = False  # an item waits because the open batch has no room for its tokens
        self._chunk_pages: dict[int, frozenset] = {}  # id(rest of a split item) -> its pages
        self._step = Step()  # the pass being decided or sent
        self._seq = itertools.count()
        self._forwards_in_flight = 0
        self._pump_call = None
        self._timer = None
        self._to_fire: list[tuple[Deferred, object]] = []
        self._pumping = False
        self.stats = {"forward_jobs": 0, "forward_items": 0, "other_jobs": 0, "max_batch": 0}
        self.metrics: ModelMetrics = NO_MODEL_METRICS  # the runtime sets the daemon's (pie.metrics)

    # ------------------------------------------------------------------ queues

    def add_queue(self, queue_id: int, instance: str) -> None:
        self._queues[queue_id] = _Queue(queue_id, instance)
        self.metrics.queue_added(instance, self._reactor.seconds())

    def queue_instance(self, queue_id: int) -> str | None:
        q = self._queues.get(queue_id)
        return q.instance if q else None

    def set_priority(self, queue_id: int, priority: str) -> None:
        self._queues[queue_id].priority = _RANK[priority]

    def fault_reason(self, instance: str) -> str | None:
        return self._faults.get(instance)

    def set_policy(self, policy: BatchingPolicy) -> None:
        self.policy = policy
        self._schedule_pump()

    def pending(self) -> int:
        """Commands queued or staged, not yet dispatched."""
        return sum(len(q.items) for q in self._queues.values()) + len(self._open)

    # ------------------------------------------------------------------ submit, fault, drop

    def submit(self, queue_id: int, command: Command) -> Deferred:
        q = self._queues.get(queue_id)
        if q is None:
            return fail(InstanceFault(f"unknown queue {queue_id}"))
        reason = self._faults.get(q.instance)
        if reason is not None:
            return fail(InstanceFault(reason))
        command.seq = next(self._seq)
        command.submitted = self._reactor.seconds()
        q.items.append(command)
        self._schedule_pump()
        return command.deferred

    def fault(self, instance: str, reason: str) -> None:
        """The instance failed: its queued commands and any later submit errback with reason."""
        if instance in self._faults:
            return
        self._faults[instance] = reason
        self._cancel(instance, reason)
        self._flush()

    def drop_instance(self, instance: str) -> None:
        """The instance ended: cancel what it still has queued and forget its queues."""
        self._cancel(instance, self._faults.pop(instance, "the instance ended"))
        for queue_id in [i for i, q in self._queues.items() if q.instance == instance]:
            self._queues.pop(queue_id).dead = True
        self.metrics.instance_dropped(instance)
        self._flush()

    def _cancel(self, instance: str, reason: str) -> None:
        cancelled = []
        for q in self._queues.values():
            if q.instance == instance:
                cancelled.extend(q.items)
                q.items.clear()
                q.staged = 0
        keep = [e for e in self._open if e.queue.instance != instance]
        if len(keep) != len(self._open):
            cancelled.extend(e.command for e in self._open if e.queue.instance == instance)
            self._set_open(keep)
        for entries in [*self._step.eager.values(), self._step.batch]:
            cancelled.extend(e.command for e in entries if e.queue.instance == instance)
        for command in cancelled:
            self._resources.unstage(self._chunk_pages.pop(id(command), ()))
            if not command.cancelled:
                command.cancelled = True
                self._fire(command.deferred, Failure(InstanceFault(reason)))

    def _fail(self, q: _Queue, command: Command, reason: str) -> None:
        command.cancelled = True
        self._fire(command.deferred, Failure(InstanceFault(reason)))
        if q.instance not in self._faults:
            self._faults[q.instance] = reason
            self._cancel(q.instance, reason)

    # ------------------------------------------------------------------ firing results late

    def _fire(self, deferred: Deferred, result: object) -> None:
        self._to_fire.append((deferred, result))

    def _flush(self) -> None:
        if self._pumping:  # the pump flushes when its state is settled
            return
        while self._to_fire:
            batch, self._to_fire = self._to_fire, []
            for deferred, result in batch:
                if isinstance(result, Failure):
                    deferred.errback(result)
                else:
                    deferred.callback(result)

    # ------------------------------------------------------------------ the pump

    def _schedule_pump(self) -> None:
        if self._pump_call is None:
            self._pump_call = self._reactor.callLater(0, self._pump)

    def _pump(self) -> None:
        self._pump_call = None
        self._pumping = True
        try:
            while self._pass():
                pass
        finally:
            self._pumping = False
            self._step = Step()
            self._flush()

    def step(self) -> Step:
        """Advance every queue as far as order allows (local commands run here, in order) and
        decide what goes to the worker now: the eager jobs and the forward batch. Nothing is
        sent; the step stays current until the pump has sent it."""
        self._step = step = Step()
        order = sorted(
            (q for q in self._queues.values() if q.items),
            key=lambda q: (q.priority, q.items[0].seq),
        )
        oversize: list[_Queue] = []  # long items take the room the others leave (split last)
        for q in order:
            step.moved |= self._advance(q, oversize)
        for q in oversize:
            step.moved |= self._advance(q, None)
        step.batch = self._release_forwards()
        return step

    def _pass(self) -> bool:
        """One step, sent; True if anything moved."""
        step = self.step()
        progress = step.moved
        for kind, entries in step.eager.items():
            if kind in _MERGEABLE:
                live = [e for e in entries if not e.command.cancelled]
                if live:
                    self._dispatch(_merge(kind, [e.prepared for e in live]), live)
                    progress = True
                continue
            for entry in entries:
                if not entry.command.cancelled:  # (an earlier job's failure may fault it)
                    self._dispatch(entry.prepared, [entry])
                    progress = True
        live = [e for e in step.batch if not e.command.cancelled]
        if live:
            self._dispatch(Forward(items=[e.prepared for e in live]), live)
        return progress or bool(step.batch)

    def _advance(self, q: _Queue, oversize: list[_Queue] | None) -> bool:
        """Move q's head commands into the open batch / job groups as far as order allows.
        An item that needs splitting is split only when `oversize` is None; otherwise q
        is added to it and waits for the end of the pass."""
        current = None  # the kind this queue contributes in this pass
        moved = False
        while q.items and not q.dead and not q.holding:
            command = q.items[0]
            kind = command.kind
            if kind in (Local, Sync):
                if current is not None or q.staged:
                    break
                q.items.popleft()
                if kind is Sync:
                    self._synchronize(q, command)
                else:
                    self._run_local(q, command)
                moved = True
                continue
            if current not in (None, kind) or (kind is not Forward and q.staged):
                break
            prepared = self._prepare(q, command)
            if prepared is None:
                return True
            if kind is Forward:
                reads, writes = _footprint(prepared, self._page_size)
                if not (
                    writes.isdisjoint(self._open_reads)
                    and writes.isdisjoint(self._open_writes)
                    and reads.isdisjoint(self._open_writes)
                ):
                    break
                size = _size(prepared)
                room = self.max_batch_tokens - self._open_tokens
                if size > room and _splittable(prepared) and (not self._open or room >= MIN_CHUNK):
                    if oversize is not None:
                        oversize.append(q)
                        break
                    if self.policy.name == "adaptive" and self._forwards_in_flight:
                        break  # split when the batch goes: the decodes answered by then come first
                    command, prepared = self._split(q, command, prepared, max(room, 1))
                    reads, writes = _footprint(prepared, self._page_size)
                    size = _size(prepared)
                if self._open and self._open_tokens + size > self.max_batch_tokens:
                    self._full = True
                    break
                q.items.popleft()
                q.staged += 1
                self._open.append(_Entry(q, command, prepared, reads, writes))
                self._resources.stage(reads)
                # (a waiting rest is staged now: the open batch names its pages)
                self._resources.unstage(self._chunk_pages.pop(id(command), ()))
                self._open_reads |= reads
                self._open_writes |= writes
                self._open_tokens += size
            else:
                q.items.popleft()
                self._step.eager.setdefault(kind, []).append(_Entry(q, command, prepared))
            current = kind
            moved = True
        return moved

    def _split(
        self, q: _Queue, command: Command, item: ForwardItem, head: int
    ) -> tuple[Command, ForwardItem]:
        """Split a text item after its first `head` tokens: (the first chunk's command and
        item, to stage now); the rest replaces the command at the queue head."""
        ps, n = self._page_size, len(item.tokens)
        total = context_len(ps, len(item.pages), item.last_page_len)
        written = total - n + head  # slots filled once the first chunk has run
        used, last_page_len = layout_of(ps, written)
        first_outputs = [i for i in item.output_indices if i < head]
        first = ForwardItem(
            pages=item.pages[:used],
            last_page_len=last_page_len,
            positions=item.positions[:head],
            tokens=item.tokens[:head],
            masks=item.masks[:head],
            output_indices=first_outputs,
            sampling=item.sampling if first_outputs else None,
        )
        rest = dataclasses.replace(
            item,
            positions=item.positions[head:],
            tokens=item.tokens[head:],
            masks=item.masks[head:],
            output_indices=[i - head for i in item.output_indices if i >= head],
        )
        origin = _origin(command)
        earlier = command.earlier if isinstance(command, _Chunk) else []
        chunk = _Chunk(
            origin, first, earlier, False, holds_queue=True, seq=command.seq,
            submitted=command.submitted,
        )  # fmt: skip
        chunk.deferred.addErrback(lambda _: None)  # a failure reaches the rest's Deferred too
        remainder = _Chunk(
            origin, rest, earlier, True, holds_queue=origin.holds_queue, seq=command.seq,
            submitted=command.submitted,
        )  # fmt: skip
        remainder.deferred.chainDeferred(command.deferred)
        q.items[0] = chunk
        q.items.insert(1, remainder)
        self._chunk_pages[id(remainder)] = frozenset(item.pages)
        self._resources.stage(item.pages)
        # (a rest split again: the new rest names its pages now)
        self._resources.unstage(self._chunk_pages.pop(id(command), ()))
        return chunk, first

    def _prepare(self, q: _Queue, command: Command) -> object | None:
        """The command's job (the handler's prepare); None, the command failed (popped), if
        that raised."""
        try:
            return self._prepare_job(command)
        except Exception as e:  # noqa: BLE001 - any failure ends the instance, never the scheduler
            q.items.popleft()
            self._fail(q, command, _reason(e))
            return None

    def _prepare_job(self, command: Command) -> object:
        return command.item if isinstance(command, _Chunk) else self._handler.prepare(command)

    def _finish(self, command: Command, answer: object) -> object:
        if not isinstance(command, _Chunk):
            return self._handler.finish(command, answer)
        if not command.last:
            command.earlier.extend(answer)
            return None
        return self._handler.finish(command.origin, command.earlier + list(answer))

    def _run_local(self, q: _Queue, command: Command) -> None:
        try:
            result = self._handler.prepare(command)
        except Exception as e:  # noqa: BLE001
            self._fail(q, command, _reason(e))
            return
        if isinstance(result, FollowUp):
            self._follow_up(q, command, result)
        else:
            self._fire(command.deferred, result)

    def _follow_up(self, q: _Queue, command: Command, follow: FollowUp) -> None:
        """Run follow.command next on q, in command's place (it answers command's Deferred)."""
        nxt = follow.command
        nxt.deferred.chainDeferred(command.deferred)
        nxt.seq, nxt.submitted = command.seq, command.submitted
        reason = self._faults.get(q.instance)
        if q.dead or reason is not None:
            nxt.cancelled = True
            self._fire(nxt.deferred, Failure(InstanceFault(reason or "the instance ended")))
            return
        q.items.appendleft(nxt)
        self._schedule_pump()

    def _again(self, q: _Queue, command: Command) -> None:
        """Put a command with work left back at the head of its queue."""
        reason = self._faults.get(q.instance)
        if q.dead or reason is not None:
            if not command.cancelled:
                command.cancelled = True
                self._fire(command.deferred, Failure(InstanceFault(reason or "the instance ended")))
            return
        q.items.appendleft(command)
        self._schedule_pump()

    def _synchronize(self, q: _Queue, command: Command) -> None:
        """True once every job this queue has dispatched so far has completed."""
        if not q.outstanding:
            self._fire(command.deferred, True)
            return
        waiting = DeferredList(list(q.outstanding))
        waiting.addCallback(lambda _: self._fire(command.deferred, True))

    # ------------------------------------------------------------------ forward batches

    def _set_open(self, entries: list[_Entry]) -> None:
        """The open batch is now `entries` (a subset of it): the others were sent or dropped."""
        kept = {id(e) for e in entries}
        for e in self._open:
            if id(e) not in kept:
                self._resources.unstage(e.reads)
        self._open = entries
        self._open_reads = set().union(*(e.reads for e in entries))
        self._open_writes = set().union(*(e.writes for e in entries))
        self._open_tokens = sum(_size(e.prepared) for e in entries)
        self._full = False

    def _release_forwards(self) -> list[_Entry]:
        """Take the entries the policy releases now out of the open batch."""
        count, wake = self._release_count()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if wake is not None:
            self._timer = self._reactor.callLater(max(wake, 0.0), self._on_timer)
        if not count:
            return []
        ranked = sorted(range(len(self._open)), key=lambda i: (self._open[i].queue.priority, i))
        chosen = set(ranked[:count])
        released = [e for i, e in enumerate(self._open) if i in chosen]
        self._set_open([e for i, e in enumerate(self._open) if i not in chosen])
        for entry in released:
            entry.queue.staged -= 1
        return released

    def _release_count(self) -> tuple[int, float | None]:
        """(items to release now, seconds until the policy should be asked again or None)."""
        staged = len(self._open)
        if not staged:
            return 0, None
        policy = self.policy
        if policy.name == "adaptive":
            return (staged if self._forwards_in_flight == 0 else 0), None
        if self._full:  # no policy waits for items that cannot join anyway
            return staged, None
        if policy.name == "k":
            return (policy.k if staged >= policy.k else 0), None
        # (a microsecond of slack so that a timer firing at t on the dot counts as "waited t")
        age = self._reactor.seconds() - min(e.command.submitted for e in self._open) + 1e-6
        if policy.name == "t":
            return (staged, None) if age >= policy.t else (0, policy.t - age)
        if staged >= policy.k or age >= policy.t:
            return min(staged, policy.k), None
        return 0, policy.t - age

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    # ------------------------------------------------------------------ dispatch and completion

    def _dispatch(self, job: object, entries: list[_Entry]) -> None:
        for entry in entries:
            self._handler.dispatched(_origin(entry.command), entry.prepared)
            entry.queue.holding += entry.command.holds_queue
        is_forward = isinstance(job, Forward)
        if is_forward:
            self._forwards_in_flight += 1
            self.stats["forward_jobs"] += 1
            self.stats["forward_items"] += len(entries)
            self.stats["max_batch"] = max(self.stats["max_batch"], len(entries))
            self.metrics.forward_sent(job)
        else:
            self.stats["other_jobs"] += 1
        done = Deferred()
        queues = list({id(e.queue): e.queue for e in entries}.values())
        for q in queues:
            q.outstanding.append(done)
        result = maybeDeferred(self._execute, job)
        result.addCallback(self._answer, job, entries)
        result.addErrback(self._job_failed, entries)
        result.addBoth(self._completed, done, queues, is_forward, self._reactor.seconds())

    def _answer(self, result: object, job: object, entries: list[_Entry]) -> None:
        answers = _split(job, result, entries)
        now, forward = self._reactor.seconds(), isinstance(job, Forward)
        for entry, answer in zip(entries, answers, strict=True):
            entry.queue.holding -= entry.command.holds_queue
            if forward:
                self.metrics.item_answered(entry.queue.instance, entry.prepared, now)
            try:
                value = self._finish(entry.command, answer)
            except Exception as e:  # noqa: BLE001
                self._fail(entry.queue, entry.command, _reason(e))
                continue
            if value is AGAIN:
                self._again(entry.queue, _origin(entry.command))
            elif isinstance(value, FollowUp):
                self._follow_up(entry.queue, entry.command, value)
            else:
                self._fire(entry.command.deferred, value)

    def _job_failed(self, failure: Failure, entries: list[_Entry]) -> None:
        if failure.check(PieError):  # the worker refused the job with a reason
            log.warn("model worker job failed: {reason}", reason=failure.getErrorMessage())
        else:
            log.failure("model worker job failed", failure)
        reason = f"model worker failed: {failure.getErrorMessage()}"
        for entry in entries:
            command = entry.command
            entry.queue.holding = max(0, entry.queue.holding - command.holds_queue)
            if command.cancelled:
                continue
            if _origin(command).answers_errors and failure.check(PieError):
                self._fire(command.deferred, f"error: {failure.getErrorMessage()}")
            else:
                self._fail(entry.queue, command, reason)

    def _completed(
        self, _: object, done: Deferred, queues: list[_Queue], is_forward: bool, sent: float
    ) -> None:
        for q in queues:
            q.outstanding.remove(done)
        if is_forward:
            self._forwards_in_flight -= 1
            self.metrics.forward_done(self._reactor.seconds() - sent)
        done.callback(None)
        self._schedule_pump()
        self._flush()


def _origin(command: Command) -> Command:
    """The command a slice belongs to (a command is its own)."""
    return command.origin if isinstance(command, _Chunk) else command


def _reason(error: Exception) -> str:
    if isinstance(error, InstanceFault):
        return str(error)
    log.failure("internal error in a model command", Failure(error))
    return f"internal error: {error!r}"


def _merge(kind: type, jobs: list) -> object:
    """One job standing for several jobs of a mergeable kind, in order."""
    if kind is EmbedText:
        return EmbedText(
            slots=[s for j in jobs for s in j.slots],
            tokens=[t for j in jobs for t in j.tokens],
            positions=[p for j in jobs for p in j.positions],
        )
    return GetDistributions(slots=[s for j in jobs for s in j.slots])


def _split(job: object, result: object, entries: list[_Entry]) -> list:
    """The share of a job's result that belongs to each command, checking its shape."""
    if isinstance(job, Forward):
        if not isinstance(result, list) or len(result) != len(entries):
            raise ValueError(
                f"worker answered {type(result).__name__} for {len(entries)} forward items"
            )
        return result
    if isinstance(job, GetDistributions):
        if not isinstance(result, list) or len(result) != len(job.slots):
            raise ValueError("worker answered the wrong number of distributions")
        out, at = [], 0
        for entry in entries:
            n = len(entry.prepared.slots)
            out.append(result[at : at + n])
            at += n
        return out
    if isinstance(job, EmbedText):
        return [None] * len(entries)
    return [result]

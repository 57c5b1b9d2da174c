"""Who runs guest steps, and on which thread: inline (dev mode) or preemptively (the sandbox).

A step (pie.runtime.executors.base) is `start` or one `resume`: the guest runs
until every task is parked on a host future. A step that computes for long, or
never parks, must not keep the reactor from its sockets and timers. The reactor
thread can only get control back from a running wasm guest if the guest runs
on *another* thread and that thread blocks: wasmtime-py has no async
(stack-switching) calls for components, so a paused guest is a blocked thread.

GuestScheduler therefore runs every step on a guest thread, with a baton:

- Only the holder of the baton runs pie code. The reactor thread hands the
  baton to a guest thread and waits for it to come back; host calls made by
  the guest therefore run on the guest thread with the reactor stopped, exactly
  as if on the reactor (no locks, no thread hop per host call).
- A turn lasts at most `slice_s`. The guest thread runs the queued steps one
  after another until the turn is over. A guest still computing then is paused
  inside wasmtime's epoch-deadline callback (`pause`): its thread blocks there,
  keeping its stack, and the baton goes back to the reactor, which polls I/O
  and runs timers before the next turn continues that step where it stopped.
- Fairness: steps that are due because a result arrived (or a launch) run
  first, in order; paused steps share what is left of a turn, round robin. So
  an instance that parks often is not slowed by one that computes, and a paused
  step still gets the baton at least every other slice. A paused step goes on
  in quanta of a fifth of a slice, so that while it computes the reactor gets
  the baton back every 10 ms or so (by default) and what arrives there runs.
- Each execution has a CPU budget (a token bucket: `cpu_share` of a core,
  bursts up to `cpu_share * cpu_window_s` seconds); one that spent it is
  throttled (not run until the bucket refills) or, with policy "end", ended
  with the reason.
- At most `max_paused` steps may be paused at once (each holds a thread); past
  that, the one with the least CPU budget left is ended.

Work submitted from the reactor thread outside a turn runs a turn at once, so a
step that parks quickly behaves as it did when it ran on the reactor (a launch
or a resume finishes before `submit` returns). Work submitted during a turn
(a host call of one instance firing another's future) is queued for that turn.

InlineScheduler runs steps on the calling thread, to completion: dev mode,
whose guests are plain Python on the reactor and cannot be paused.

A scheduler needs of an execution (pie.runtime.executors.base.Execution):
`sched` (its SchedState), `ended`, `has_work()`, `step_once()` and `kill(reason)`.
"""

from __future__ import annotations

import _thread
import math
import threading
import time
from collections import deque
from typing import Any

from twisted.logger import Logger

from pie.config import CPU_POLICIES
from pie.interfaces import InstanceFault

log = Logger()

DEFAULT_SLICE_MS = 50
DEFAULT_CPU_PERCENT = 50
DEFAULT_CPU_WINDOW_S = 10
DEFAULT_MAX_PAUSED = 256
PAUSED_QUANTA = 5
"""A paused step goes on for slice/PAUSED_QUANTA per turn (10 ms of the default 50)."""
GUEST_STACK_BYTES = 16 * 1024 * 1024
"""Native stack of a guest thread: wasm frames run on it (wasmtime's 512 KiB wasm stack
limit, plus the host calls' Python frames)."""


class InlineScheduler:
    """Runs an execution's steps now, on the calling thread, until it has none left."""

    def state(self) -> SchedState:
        return SchedState()

    def submit(self, execution: Any) -> None:
        if execution.sched.running:
            return  # called from inside one of its own steps: the loop below takes it
        execution.sched.running = True
        try:
            while execution.has_work():
                execution.step_once()
        finally:
            execution.sched.running = False

    def ended(self, execution: Any) -> None:
        pass


INLINE = InlineScheduler()


class SchedState:
    """A scheduler's bookkeeping for one execution."""

    __slots__ = (
        "running", "queued", "paused_on", "credit", "refilled", "cpu_mark", "call_mark",
        "throttle", "interrupt",
    )  # fmt: skip

    def __init__(self, credit: float = 0.0) -> None:
        self.running = False  # a step of it is on some thread's stack (running or paused)
        self.queued = False
        self.paused_on: _GuestThread | None = None
        self.credit = credit  # CPU seconds it may still use before it is over its share
        self.refilled = time.monotonic()
        self.cpu_mark = 0.0  # when its current segment started to hold the baton
        self.call_mark = 0.0  # when it last made a host call (paused time excluded)
        self.throttle = None  # the delayed call that queues it again once under its share
        self.interrupt: InstanceFault | None = None  # why the epoch callback trapped it


class _GuestThread(threading.Thread):
    """A thread that runs steps while it holds the baton; blocks on `go` otherwise."""

    def __init__(self, scheduler: GuestScheduler, number: int) -> None:
        super().__init__(name=f"pie-guest-{number}", daemon=True)
        self.scheduler = scheduler
        self.go = _thread.allocate_lock()
        self.go.acquire()
        self.job: Any = None

    def run(self) -> None:
        scheduler = self.scheduler
        while True:
            self.go.acquire()
            job, self.job = self.job, None
            try:
                handoff = scheduler._serve(job)
            except BaseException:  # noqa: BLE001 - the baton must go on, whatever happened
                log.failure("the guest scheduler failed")
                handoff = None
            scheduler._idle.append(self)
            if handoff is None:
                scheduler._back.release()
            else:
                handoff.go.release()


class GuestScheduler:
    """Preemptive: guests run on guest threads, one at a time, at most `slice_s` per turn."""

    def __init__(
        self,
        reactor: Any = None,
        slice_ms: int = DEFAULT_SLICE_MS,
        cpu_percent: int = DEFAULT_CPU_PERCENT,
        cpu_window_s: float = DEFAULT_CPU_WINDOW_S,
        cpu_policy: str = "throttle",
        max_paused: int = DEFAULT_MAX_PAUSED,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        if cpu_policy not in CPU_POLICIES:
            raise ValueError(f"cpu_policy must be one of {', '.join(CPU_POLICIES)}")
        self.reactor = reactor
        self.slice_s = slice_ms / 1000
        self.cpu_share = cpu_percent / 100
        self.cpu_window_s = cpu_window_s
        self.cpu_policy = cpu_policy
        self.max_paused = max_paused
        self._fresh: deque[Any] = deque()  # due because of a result or a launch
        self._paused_line: deque[Any] = deque()  # paused steps waiting to go on
        self._unwind: deque[Any] = deque()  # paused steps of killed executions
        self._paused: set[Any] = set()  # every paused execution (in a line or throttled)
        self._paused_served = 0.0  # when a paused step last had the baton
        self._paused_first = False
        self._idle: list[_GuestThread] = []
        self._threads = 0
        self._back = _thread.allocate_lock()  # released when the baton comes back
        self._back.acquire()
        self._in_turn = False
        self._turn_ends = 0.0
        self._later = None  # the delayed call of the next turn

    # ------------------------------------------------------------------ the executor's side

    def state(self) -> SchedState:
        """Bookkeeping for a new execution: it starts with a full CPU bucket."""
        return SchedState(self.cpu_share * self.cpu_window_s)

    def submit(self, execution: Any) -> None:
        """`execution` has a step to run (a start, or a result to resume with)."""
        state = execution.sched
        if state.queued or state.throttle is not None:
            return  # in line already, or it will be once back under its CPU share
        if state.paused_on is not None:
            self._line_up(execution, self._paused_line)
        elif state.running:
            return  # its running step's end lines it up again
        else:
            self._line_up(execution, self._fresh)
        if not self._in_turn:
            self._turn()

    def ended(self, execution: Any) -> None:
        """`execution` was killed: a paused step of it unwinds first thing (on its thread)."""
        state = execution.sched
        if state.throttle is not None:
            if state.throttle.active():
                state.throttle.cancel()
            state.throttle = None
        if state.paused_on is None:
            return
        for line in (self._paused_line, self._fresh):
            if execution in line:
                line.remove(execution)
        state.queued = False
        self._line_up(execution, self._unwind)
        if not self._in_turn:
            self._turn()

    def ticks(self, execution: Any, tick_s: float, deadline_s: float) -> int:
        """Epoch ticks until the running step must be looked at: the turn's end, or its
        CPU deadline (`deadline_s` without a host call)."""
        now = time.monotonic()
        left = min(self._turn_ends - now, execution.sched.call_mark + deadline_s - now)
        return max(1, math.ceil(left / tick_s))

    def pause(self, execution: Any, deadline_s: float) -> InstanceFault | None:
        """The epoch callback of the running step (on its guest thread).

        Returns None to let it go on (after pausing it, if the turn is over), or the
        fault to trap it with.
        """
        state = execution.sched
        now = time.monotonic()
        if execution.ended:
            return InstanceFault("instance killed")
        if now - state.call_mark > deadline_s:
            ms = round(deadline_s * 1000)
            return InstanceFault(f"CPU deadline exceeded (over {ms} ms without a host call)")
        if now < self._turn_ends or not isinstance(threading.current_thread(), _GuestThread):
            return None
        self._account(execution)
        if self.cpu_policy == "end" and state.credit < 0:
            return InstanceFault(self._over_share_reason())
        if len(self._paused) >= self.max_paused:
            victim = min(self._paused | {execution}, key=lambda e: e.sched.credit)
            reason = (
                f"more than {self.max_paused} inferlets were computing at once; "
                "this one had used the most CPU"
            )
            if victim is execution:
                return InstanceFault(reason)
            victim.kill(reason)
        thread = threading.current_thread()
        state.paused_on = thread
        self._paused.add(execution)
        self._line_up(execution, self._paused_line)
        self._paused_served = paused_at = time.monotonic()
        self._back.release()  # the turn is over: the reactor runs
        thread.go.acquire()  # ... until a later turn goes on with this step
        state.paused_on = None
        self._paused.discard(execution)
        state.cpu_mark = time.monotonic()
        state.call_mark += state.cpu_mark - paused_at
        return InstanceFault("instance killed") if execution.ended else None

    # ------------------------------------------------------------------ turns

    def _line_up(self, execution: Any, line: deque) -> None:
        execution.sched.queued = True
        line.append(execution)

    def _turn(self) -> None:
        """On the reactor thread: hand the baton to a guest thread for one turn, and wait."""
        self._in_turn = True
        try:
            now = time.monotonic()
            self._turn_ends = now + self.slice_s
            # paused steps go first if they have waited a whole slice (fresh work kept coming)
            self._paused_first = now - self._paused_served >= self.slice_s
            execution = self._next()
            if execution is not None:
                self._hand(execution)
                self._back.acquire()
        finally:
            self._in_turn = False
        if (self._fresh or self._paused_line or self._unwind) and self._later is None:
            self._later = self.reactor.callLater(0, self._delayed_turn)

    def _delayed_turn(self) -> None:
        self._later = None
        self._turn()

    def _next(self) -> Any:
        """The next execution to run this turn, or None (nothing runnable, or the turn is over).

        Killed paused steps come first, even after the turn is over: unwinding is quick.
        """
        while True:
            if self._unwind:
                execution = self._unwind.popleft()
                execution.sched.queued = False
                return execution
            if time.monotonic() >= self._turn_ends:
                return None
            if self._paused_line and (self._paused_first or not self._fresh):
                self._paused_first = False
                execution = self._paused_line.popleft()
                now = self._paused_served = time.monotonic()
                # a step that outlasted a slice goes on in short quanta: the reactor (and
                # whatever result arrives there) gets the baton back often meanwhile
                self._turn_ends = min(self._turn_ends, now + self.slice_s / PAUSED_QUANTA)
            elif self._fresh:
                execution = self._fresh.popleft()
            else:
                return None
            state = execution.sched
            state.queued = False
            if execution.ended or (state.paused_on is None and not execution.has_work()):
                continue  # (a killed paused step is in the unwind line instead)
            if state.credit < 0:  # (a refill can only bring it back)
                self._refill(execution)
                if state.credit < 0:
                    self._over_share(execution)
                    continue
            return execution

    def _hand(self, execution: Any) -> None:
        """Give the baton to the thread that runs `execution` next (its own, if paused)."""
        paused_on = execution.sched.paused_on
        if paused_on is not None:
            paused_on.go.release()
            return
        thread = self._idle.pop() if self._idle else self._new_thread()
        thread.job = execution
        thread.go.release()

    def _serve(self, execution: Any) -> _GuestThread | None:
        """On a guest thread holding the baton: run steps until the turn is over.

        Returns the paused thread to pass the baton to, or None to give it back to the reactor.
        """
        while True:
            self._run_step(execution)
            execution = self._next()
            if execution is None:
                return None
            if execution.sched.paused_on is not None:
                return execution.sched.paused_on

    def _run_step(self, execution: Any) -> None:
        state = execution.sched
        state.running = True
        state.call_mark = state.cpu_mark = time.monotonic()
        try:
            execution.step_once()
        except BaseException:  # noqa: BLE001 - a broken step ends its instance, not the thread
            log.failure("a guest step failed")
            if not execution.ended:
                execution.kill("internal error while running the instance")
        finally:
            state.running = False
        self._account(execution)
        if not execution.ended and execution.has_work() and not state.queued:
            self._line_up(execution, self._fresh)

    def _new_thread(self) -> _GuestThread:
        self._threads += 1
        previous = threading.stack_size(GUEST_STACK_BYTES)
        try:
            thread = _GuestThread(self, self._threads)
            thread.start()
        finally:
            threading.stack_size(previous)
        return thread

    # ------------------------------------------------------------------ CPU share

    def _account(self, execution: Any) -> None:
        """Charge the time its running segment held the baton.

        Wall time, not the thread's CPU time: while it holds the baton nothing else of
        pie runs, and reading the clock costs nothing (a thread CPU clock is a system call).
        """
        state = execution.sched
        now = time.monotonic()
        self._refill(execution, now)
        state.credit -= now - state.cpu_mark
        state.cpu_mark = now

    def _refill(self, execution: Any, now: float | None = None) -> None:
        state = execution.sched
        now = time.monotonic() if now is None else now
        burst = self.cpu_share * self.cpu_window_s
        state.credit = min(burst, state.credit + (now - state.refilled) * self.cpu_share)
        state.refilled = now

    def _over_share(self, execution: Any) -> None:
        """A due execution is over its CPU share: end it, or line it up once back under."""
        if self.cpu_policy == "end":
            execution.kill(self._over_share_reason())
            return
        state = execution.sched
        wait = -state.credit / self.cpu_share
        state.throttle = self.reactor.callLater(wait, self._unthrottle, execution)

    def _unthrottle(self, execution: Any) -> None:
        execution.sched.throttle = None
        if not execution.ended:
            self.submit(execution)

    def _over_share_reason(self) -> str:
        return (
            f"CPU share exceeded: used more than {round(self.cpu_share * 100)}% of a core "
            f"over {self.cpu_window_s:g} s"
        )

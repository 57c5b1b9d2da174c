"""The host side of one running instance, shared by the wasm and dev executors.

The guest (pie.inferlet._driver) runs in *steps*: `start`, then one `resume`
per host future that became ready. Between steps the instance holds no thread
and no stack: it is parked on the futures it asked for. This class owns those
futures, turns their results into resume steps, and turns a step's outcome
(or a fault of any kind) into the `finished` Deferred. Subclasses only say how
to run a step (`_enter_start`, `_enter_resume`) and how to let go of the guest
(`_release`).

Steps are run by a scheduler (pie.runtime.executors.scheduler): in dev mode
inline, on the reactor thread; in the sandbox on guest threads that hold the
reactor's baton, so that a long step can be paused and the reactor runs in
between. Either way one thread at a time runs this code, and results that
arrive while a step of this instance runs wait in `_ready`: the guest is
never entered twice, and a chain of already-fired Deferreds never recurses.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from pie.interfaces import IExecution, InstanceFault, PieError
from pie.runtime.executors.scheduler import INLINE, SchedState

Step = tuple


class Killed(BaseException):
    """Raised into a guest that calls the host after it was killed (unwinds it fast)."""


@implementer(IExecution)
class Execution:
    def __init__(self, host: Any, scheduler: Any = INLINE) -> None:
        self.finished: Deferred = Deferred()
        self.host = host
        self.ended = False
        self.scheduler = scheduler
        self.sched: SchedState = scheduler.state()
        self._stepping = False
        self._next_fut = 1
        self._new: list[tuple[int, str, Deferred]] = []
        self._ready: deque[tuple[int, str, Any]] = deque()
        self._start_pending = False
        self._fault: PieError | None = None

    # ---------------------------------------------------------------- subclass hooks

    def _enter_start(self) -> Step:
        raise NotImplementedError

    def _enter_resume(self, fut: int, name: str, value: Any) -> Step:
        raise NotImplementedError

    def _release(self) -> None:
        """Drop the guest (never called while a step runs)."""

    def _describe(self, error: BaseException) -> InstanceFault:
        """A step raised instead of returning a Step: why the instance ends."""
        return InstanceFault(f"{type(error).__name__}: {error}")

    # ---------------------------------------------------------------- called by the guest binding

    def call(self, name: str, args: tuple) -> Any:
        """A "sync" or "command" host call made by the guest during a step."""
        if self.ended:
            raise Killed(name)
        try:
            return self.host.call(name, args)
        except Exception as error:
            self._fault = self._fault or self._as_pie_error(error, name)
            raise

    def call_async(self, name: str, args: tuple) -> int:
        """An "async" host call; returns the future id the guest parks on."""
        if self.ended:
            raise Killed(name)
        try:
            result = self.host.call(name, args)
        except Exception as error:
            self._fault = self._fault or self._as_pie_error(error, name)
            raise
        fut, self._next_fut = self._next_fut, self._next_fut + 1
        self._new.append((fut, name, result if isinstance(result, Deferred) else succeed(result)))
        return fut

    # ---------------------------------------------------------------- IExecution

    def kill(self, reason: str) -> None:
        self._end(Failure(InstanceFault(reason)))

    def fail(self, error: PieError) -> None:
        """End with `error` (e.g. the executor could not start the instance)."""
        self._end(Failure(error))

    # ---------------------------------------------------------------- driving steps

    def start(self) -> None:
        """Run main until it parks (call on the reactor thread, once)."""
        self._start_pending = True
        self.scheduler.submit(self)

    # ---------------------------------------------------------------- called by the scheduler

    def has_work(self) -> bool:
        """A step is due: the start, or a result to resume with."""
        return not self.ended and (self._start_pending or bool(self._ready))

    def step_once(self) -> None:
        """Run the due step (the start first, then one resume per result, in order)."""
        if self._start_pending:
            self._start_pending = False
            self._advance(self._enter_start)
        elif self._ready and not self.ended:
            self._advance(self._enter_resume, *self._ready.popleft())

    def _advance(self, enter, *args: Any) -> None:
        if self.ended:
            return
        self._stepping = True
        error = None
        try:
            step = enter(*args)
        except BaseException as raised:  # traps, guest faults: they end this instance only
            step, error = None, raised
        finally:
            self._stepping = False
        new, self._new = self._new, []
        if self.ended:
            self._release()
        elif self._fault is not None:
            self._end(Failure(self._fault))
        elif step is None:
            self._end(Failure(self._describe(error)))
        elif step[0] == "parked":
            for fut, name, deferred in new:
                deferred.addCallbacks(self._resolved, self._rejected, (fut, name), None, (name,))
        elif step[0] == "done":
            self._end(step[1])
        else:
            self._end(Failure(InstanceFault(step[1])))

    def _resolved(self, value: Any, fut: int, name: str) -> None:
        if not self.ended:
            self._ready.append((fut, name, value))
            self.scheduler.submit(self)

    def _rejected(self, failure: Failure, name: str) -> None:
        if not self.ended:
            self._end(Failure(self._as_pie_error(failure.value, name)))

    def _end(self, outcome: Any) -> None:
        """Finish once: a value (str/None) or a Failure. The guest is dropped now or after its step."""
        if self.ended:
            return
        self.ended = True
        self._ready.clear()
        self._start_pending = False
        if not self._stepping:
            self._release()
        self.scheduler.ended(self)
        if isinstance(outcome, Failure):
            self.finished.errback(outcome)
        else:
            self.finished.callback(outcome)

    @staticmethod
    def _as_pie_error(error: BaseException, name: str = "") -> PieError:
        if isinstance(error, PieError):
            return error
        where = f"host call {name} failed: " if name else "host call failed: "
        return InstanceFault(f"{where}{type(error).__name__}: {error}")

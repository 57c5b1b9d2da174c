"""The host side of one running instance, shared by the wasm and dev executors.

The guest (pie.inferlet._driver) runs in *steps*: `start`, then one `resume`
per host future that became ready. Between steps the instance holds no thread
and no stack: it is parked on the futures it asked for. This class owns those
futures, turns their results into resume steps, and turns a step's outcome
(or a fault of any kind) into the `finished` Deferred. Subclasses only say how
to run a step (`_enter_start`, `_enter_resume`) and how to let go of the guest
(`_release`).

Results that arrive while another resume is running are queued and delivered
by one loop (`_drain`), so a chain of already-fired Deferreds never recurses.
Everything here runs on the reactor thread.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from pie.interfaces import IExecution, InstanceFault, PieError

Step = tuple


class Killed(BaseException):
    """Raised into a guest that calls the host after it was killed (unwinds it fast)."""


@implementer(IExecution)
class Execution:
    def __init__(self, host: Any) -> None:
        self.finished: Deferred = Deferred()
        self.host = host
        self.ended = False
        self._stepping = False
        self._next_fut = 1
        self._new: list[tuple[int, str, Deferred]] = []
        self._ready: deque[tuple[int, str, Any]] = deque()
        self._draining = False
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
        self._advance(self._enter_start)

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
            self._drain()

    def _rejected(self, failure: Failure, name: str) -> None:
        if not self.ended:
            self._end(Failure(self._as_pie_error(failure.value, name)))

    def _drain(self) -> None:
        # Resume steps run only from here, so a result that arrives during one (a sync host
        # call of this instance firing one of its own pending Deferreds, e.g. a broadcast to
        # its own subscription) waits in _ready: the guest is never entered twice.
        if self._draining:
            return
        self._draining = True
        try:
            while self._ready and not self.ended:
                self._advance(self._enter_resume, *self._ready.popleft())
        finally:
            self._draining = False

    def _end(self, outcome: Any) -> None:
        """Finish once: a value (str/None) or a Failure. The guest is dropped now or after its step."""
        if self.ended:
            return
        self.ended = True
        self._ready.clear()
        if not self._stepping:
            self._release()
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

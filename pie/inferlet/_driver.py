"""The guest-side task scheduler, shared by the sandbox and the dev executor.

An inferlet is plain `async def` code. It never blocks: every host call that
must wait (a forward pass, a receive, a sleep) hands back a future id at once,
and the coroutine that awaited it is *parked* on that id. The driver steps
every runnable task until all of them are parked (or main has ended) and then
returns to the host, which calls `resume(fut, value)` when a result is ready.
No thread is held per instance, so every parked instance is in the same batch.

This module is pure Python with no imports from the host: it is bundled into
the WebAssembly runtime component as well as used in-process by dev mode.

Steps are plain tuples: ("parked",), ("done", value) or ("failed", text).
"""

from __future__ import annotations

import traceback
from collections import deque
from collections.abc import Coroutine
from contextvars import ContextVar
from typing import Any, Protocol

Step = tuple

PARKED: Step = ("parked",)
TRACEBACK_FRAMES = 6
"""Frames of a failing inferlet's traceback kept in the failure text (the innermost)."""
_MACHINERY = ("pie/inferlet/_driver.py", "pie/inferlet/_abi.py", "pie/runtime/sandbox/")
"""Frames of these files are left out of failure texts: they are ours, not the program's."""


class Binding(Protocol):
    """How the driver reaches the host: the WIT imports, or the dev host directly."""

    def call(self, name: str, args: tuple) -> Any:
        """A "sync" or "command" host call: its value (None for commands)."""

    def call_async(self, name: str, args: tuple) -> int:
        """Start an "async" host call; the future id its result will be resumed with."""


_current: ContextVar[Driver] = ContextVar("pie_inferlet_driver")


def current() -> Driver:
    """The driver of the inferlet whose code is running now."""
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError(
            "pie.inferlet host calls only work inside a running inferlet "
            "(launch it with the pie server, or the dev executor)"
        ) from None


class Park:
    """Awaitable that parks the awaiting task on a host future id."""

    __slots__ = ("fut",)

    def __init__(self, fut: int) -> None:
        self.fut = fut

    def __await__(self):
        return (yield self.fut)


class Task:
    """A coroutine scheduled by the driver; awaiting it waits for its result."""

    __slots__ = ("coro", "done", "result", "error", "joiners")

    def __init__(self, coro: Coroutine) -> None:
        self.coro = coro
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.joiners: list[Task] = []

    def __await__(self):
        while not self.done:
            yield self
        if self.error is not None:
            raise self.error
        return self.result


class _Throw:
    """A value that is thrown into the task instead of sent."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Driver:
    """Runs the tasks of one inferlet instance between host round trips."""

    def __init__(self, binding: Binding) -> None:
        self.binding = binding
        self.main: Task | None = None
        self._ready: deque[tuple[Task, Any]] = deque()
        self._parked: dict[int, Task] = {}
        self._live: set[Task] = set()

    def start(self, main: Coroutine) -> Step:
        """Run main until every task is parked or main has ended."""
        self.main = self.spawn(main)
        return self._run()

    def resume(self, fut: int, value: Any) -> Step:
        """Deliver the result of host future `fut` and run until parked again."""
        task = self._parked.pop(fut, None)
        if task is None:
            return ("failed", f"host resumed unknown future {fut}")
        self._ready.append((task, value))
        return self._run()

    def spawn(self, coro: Coroutine) -> Task:
        """Schedule a coroutine to run concurrently; await the Task for its result."""
        if not isinstance(coro, Coroutine):
            raise TypeError(f"spawn() needs a coroutine, got {type(coro).__name__}")
        task = Task(coro)
        self._live.add(task)
        self._ready.append((task, None))
        return task

    def close(self) -> None:
        """Abandon every unfinished task (their `finally` blocks run); used when killed."""
        live, self._live = self._live, set()
        self._ready.clear()
        self._parked.clear()
        for task in live:
            try:
                task.coro.close()
            except BaseException:  # noqa: S110 - a dying task's cleanup may fail; it is gone anyway
                pass

    def _run(self) -> Step:
        token = _current.set(self)
        try:
            main = self.main
            while self._ready and not main.done:
                self._step(*self._ready.popleft())
        finally:
            _current.reset(token)
        if main.done:
            if main.error is not None:
                return ("failed", format_failure(main.error))
            value = main.result
            return ("done", None if value is None else str(value))
        if not self._parked:
            return ("failed", "main(args) is waiting on nothing that can finish (deadlock)")
        return PARKED

    def _step(self, task: Task, value: Any) -> None:
        try:
            if type(value) is _Throw:
                awaited = task.coro.throw(value.error)
            else:
                awaited = task.coro.send(value)
        except StopIteration as stop:
            self._finish(task, stop.value, None)
            return
        except BaseException as error:  # the inferlet's own failure, reported not raised
            self._finish(task, None, error)
            return
        if type(awaited) is int:
            self._parked[awaited] = task
        elif type(awaited) is Task:
            if awaited.done:
                self._ready.append((task, None))
            else:
                awaited.joiners.append(task)
        elif awaited is None:  # a bare yield: let the other tasks run first
            self._ready.append((task, None))
        else:
            error = TypeError(
                f"an inferlet can only await pie.inferlet calls and tasks, not {awaited!r} "
                "(asyncio does not run inside an inferlet)"
            )
            self._ready.append((task, _Throw(error)))

    def _finish(self, task: Task, result: Any, error: BaseException | None) -> None:
        task.done, task.result, task.error = True, result, error
        self._live.discard(task)
        for joiner in task.joiners:
            self._ready.append((joiner, None))
        task.joiners.clear()


def format_failure(error: BaseException) -> str:
    """The error text plus the innermost frames of the program's traceback."""
    if isinstance(error, SystemExit):
        return _exit_text(error)
    everything = traceback.StackSummary.extract(
        traceback.walk_tb(error.__traceback__), lookup_lines=False
    )  # source lines are read below only for the frames that are kept
    frames = [f for f in everything if not any(part in f.filename for part in _MACHINERY)]
    frames = frames[-TRACEBACK_FRAMES:]
    lines = ["Traceback (most recent call last):\n"] if frames else []
    lines += traceback.format_list(frames) + traceback.format_exception_only(type(error), error)
    return "".join(lines).rstrip()


def _exit_text(error: SystemExit) -> str:
    """main(args) called sys.exit; argparse does so on bad arguments, with a message on stderr.

    The message would only reach the server log, so it is taken from argparse's
    `exit(status, message)` frame for the failure text the client sees.
    """
    message = None
    tb = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "exit" and frame.f_code.co_filename.endswith("argparse.py"):
            message = frame.f_locals.get("message")
        tb = tb.tb_next
    text = f"main(args) exited with status {error.code}"
    return text + (f": {message.strip()}" if message else "")

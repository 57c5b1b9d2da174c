"""The guest-side ABI: the only way the SDK reaches the host.

Every host call is named as in the host-call table (pie/runtime/hostcalls.py):

    tokens = call("tokenize", service, "hello")          # "sync" and "command" calls
    dists = await call_async("forward_text", queue, ...)  # "async" calls park the task

Inside the sandbox the calls go to the WIT imports of the runtime component;
in dev mode they go straight to the host binding of the instance. Which one is
decided by whoever starts the program (`run`), so SDK code is the same in both.

Concurrency inside one inferlet: `spawn(coro)` starts a task, `await gather(...)`
waits for several; every task parked on a host call is resumed independently.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from pie.inferlet._driver import Binding, Driver, Park, Step, Task, current

__all__ = ["call", "call_async", "spawn", "gather", "run", "Task"]


def call(name: str, *args: Any) -> Any:
    """Make a "sync" or "command" host call and return its value (None for commands)."""
    return current().binding.call(name, args)


async def call_async(name: str, *args: Any) -> Any:
    """Make an "async" host call; the task parks until the host has the result."""
    return await Park(current().binding.call_async(name, args))


def spawn(coro: Coroutine) -> Task:
    """Run a coroutine concurrently with the caller; await the returned Task for its result."""
    return current().spawn(coro)


async def gather(*awaitables: Awaitable) -> list:
    """Run coroutines (or wait for Tasks) concurrently; their results in order.

    The first exception is raised once every task has ended (none is abandoned).
    """
    tasks = [a if isinstance(a, Task) else spawn(a) for a in awaitables]
    results, first_error = [], None
    for task in tasks:
        try:
            results.append(await task)
        except Exception as error:
            first_error = first_error or error
            results.append(None)
    if first_error is not None:
        raise first_error
    return results


class WitBinding:
    """Host calls through the componentize-py bindings of the WIT `host` interface."""

    def __init__(self) -> None:
        from wit_world.imports import host  # only exists inside the runtime component

        from pie.runtime.sandbox.guard import refuse

        self._refuse = refuse
        self._imports = {
            name: value
            for name, value in vars(host).items()
            if callable(value) and getattr(value, "__module__", None) == host.__name__
        }

    def call(self, name: str, args: tuple) -> Any:
        return self._lookup(name)(*args)

    def call_async(self, name: str, args: tuple) -> int:
        return self._lookup(name)(*args)

    def _lookup(self, name: str) -> Callable:
        try:
            return self._imports[name]
        except (KeyError, TypeError):
            self._refuse(f"unknown host call {name!r}")


def run(
    main: Callable[[list[str]], Coroutine], args: list[str], binding: Binding | None = None
) -> tuple[Driver, Step]:
    """Start `main(args)` under a new driver; the driver and its first step.

    `binding` defaults to the WIT imports (inside the sandbox). The host later
    calls `driver.resume(fut, value)` for each future the step left parked.
    """
    driver = Driver(binding if binding is not None else WitBinding())
    coro = main(args)
    if not isinstance(coro, Coroutine):
        raise TypeError("main(args) must be an `async def` function")
    return driver, driver.start(coro)

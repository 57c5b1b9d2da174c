"""This instance's view of the runtime: arguments, ids, time, concurrency, debug queries.

Concurrency inside an inferlet is cooperative, as in Pie: many contexts each
await their own forward pass and the engine batches them. `spawn` and
`gather` come from the guest ABI (pie.inferlet._abi) because asyncio does not
run inside the sandbox; they work the same in dev mode.
"""

from __future__ import annotations

from collections.abc import Awaitable, Coroutine
from typing import Any

from pie.inferlet import _abi


def get_arguments() -> list[str]:
    """The launch arguments, argv style (parse them with argparse)."""
    return list(_abi.call("get_arguments"))


def get_instance_id() -> str:
    return _abi.call("get_instance_id")


def get_version() -> str:
    return _abi.call("get_version")


def set_return(value: str) -> None:
    """The instance's result text (also what a server instance answers with)."""
    _abi.call("set_return", str(value))


def debug_query(query: str) -> str:
    """A runtime debug query ('ping' -> 'pong', 'get_instance_count', ...)."""
    return _abi.call("debug_query", query)


def time_ms() -> int:
    """Monotonic milliseconds (the sandbox has no other clock)."""
    return _abi.call("time_ms")


async def sleep(ms: float) -> None:
    """Park this coroutine for `ms` milliseconds; other coroutines keep running."""
    await _abi.call_async("sleep", max(0, int(ms)))


def spawn(coro: Coroutine[Any, Any, Any]) -> Any:
    """Start a coroutine concurrently; await the returned handle for its result."""
    return _abi.spawn(coro)


async def gather(*awaitables: Awaitable[Any]) -> list[Any]:
    """Await several coroutines concurrently; results in argument order."""
    return list(await _abi.gather(*awaitables))

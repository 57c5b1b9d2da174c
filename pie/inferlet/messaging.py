"""Messages with the client and between instances, and the persistent key-value store.

- `send(text)` reaches the owning client as an instance event; it is how an
  inferlet's output gets out. `await send(text)` also waits while the client
  reads more slowly than the inferlet sends (backpressure); a send that is not
  awaited is delivered all the same, but a client that falls too far behind is
  disconnected (max_outbound).
- `receive()` waits for the next message the client signalled (FIFO).
- `broadcast(topic, text)` / `subscribe(topic)`: pub/sub between instances. A
  Subscription is an async iterator of *every* message published after it was
  created (Pie 0.1.1 delivered only the first one).
- `store_*`: one global string->string store shared by all instances, durable.
"""

from __future__ import annotations

from pie.inferlet import _abi


class Sent:
    """What send() returns: awaiting it waits while the client's connection is backed up.

    The message is on its way either way; only a program that awaits lets the
    daemon slow it down to its client's pace. Not awaiting costs nothing: the
    host future is made only when awaited, and only if the connection was full.
    """

    __slots__ = ("backed_up",)

    def __init__(self, backed_up: bool) -> None:
        self.backed_up = backed_up

    def __await__(self):
        if self.backed_up:
            yield from _abi.call_async("outbound_drained").__await__()


def send(message: str) -> Sent:
    return Sent(bool(_abi.call("send", str(message))))


async def receive() -> str:
    return await _abi.call_async("receive")


def broadcast(topic: str, message: str) -> None:
    _abi.call("broadcast", topic, str(message))


class Subscription:
    """Messages on a topic, in order, from the moment of subscribing.

    `async for message in subscription:` runs until `close()`; `await next()`
    reads one.
    """

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.id: int = _abi.call("subscribe", topic)
        self.closed = False

    async def next(self) -> str:
        if self.closed:
            raise RuntimeError(f"subscription to {self.topic!r} is closed")
        return await _abi.call_async("subscription_next", self.id)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> str:
        if self.closed:
            raise StopAsyncIteration
        return await self.next()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            _abi.call("unsubscribe", self.id)

    unsubscribe = close


def subscribe(topic: str) -> Subscription:
    return Subscription(topic)


async def store_get(key: str) -> str | None:
    return await _abi.call_async("store_get", key)


async def store_set(key: str, value: str) -> None:
    await _abi.call_async("store_set", key, str(value))


async def store_delete(key: str) -> None:
    await _abi.call_async("store_delete", key)


async def store_exists(key: str) -> bool:
    return bool(await _abi.call_async("store_exists", key))


async def store_list_keys() -> list[str]:
    return list(await _abi.call_async("store_list_keys"))

"""A raw HTTP/1.1 client on a real loopback socket, for what a polite client never does.

It sends exactly the bytes a test gives (half a request head, a body longer
than its Content-Length promised, nothing at all), shows the bytes that came
back, and can stop reading or drop the connection mid-response.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater


class RawHttp(Protocol):
    def __init__(self) -> None:
        self._buffer = bytearray()  # appends are amortised O(1): tests receive megabytes
        self.closed: Deferred[None] = Deferred()
        self._waiting: list[tuple[bytes, Deferred]] = []

    @property
    def received(self) -> bytes:
        return bytes(self._buffer)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        for entry in list(self._waiting):
            marker, d = entry
            if marker in self._buffer:
                self._waiting.remove(entry)
                d.callback(self.received)

    def connectionLost(self, reason=None) -> None:
        for marker, d in self._waiting:
            d.errback(AssertionError(f"connection closed before {marker!r}: {self.received!r}"))
        self._waiting = []
        self.closed.callback(None)

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def seen(self, marker: bytes) -> Deferred:
        """Fires with everything received once `marker` is among it."""
        if marker in self._buffer:
            d: Deferred = Deferred()
            d.callback(self.received)
            return d
        d = Deferred()
        self._waiting.append((marker, d))
        return d

    async def response(self) -> bytes:
        """All the bytes received by the time the server closed the connection."""
        await self.closed
        return self.received


async def connect(port: int) -> RawHttp:
    return await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), RawHttp())


async def until(predicate: Callable[[], bool], what: str, deadline_s: float = 10.0) -> None:
    """Poll (every 10 ms) until predicate() holds; fail after deadline_s."""
    waited = 0.0
    while not predicate():
        if waited > deadline_s:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)
        waited += 0.01

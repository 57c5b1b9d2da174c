"""An independent Pie 0.1.1 wire client: hand-written RFC 6455 framing and raw msgpack.

It shares no code with pie.client nor with autobahn, so the server tests that
use it check the wire format itself: what a client written against Pie
0.1.1's server.rs sends and expects. It can also misbehave on purpose (text
frames, bad msgpack, oversized frames, not reading).
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from typing import Any

import msgpack
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 1, 2, 8, 9, 10


class RawClient(Protocol):
    def __init__(self) -> None:
        self.opened: Deferred[None] = Deferred()
        self.closed: Deferred[int | None] = Deferred()
        self.messages: DeferredQueue = DeferredQueue()
        self.close_code: int | None = None
        self._key = base64.b64encode(os.urandom(16))
        self._buffer = b""
        self._handshaken = False

    # -- connection
    def connectionMade(self) -> None:
        self.transport.write(
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + self._key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )

    def connectionLost(self, reason: Any = None) -> None:
        if not self.opened.called:
            self.opened.errback(reason)
        if not self.closed.called:
            self.closed.callback(self.close_code)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if not self._handshaken:
            head, sep, rest = self._buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            accept = base64.b64encode(hashlib.sha1(self._key + _GUID).digest())
            if not head.startswith(b"HTTP/1.1 101") or accept not in head:
                self.transport.loseConnection()
                return
            self._handshaken, self._buffer = True, rest
            self.opened.callback(None)
        while self._parse_frame():
            pass

    def _parse_frame(self) -> bool:
        buf = self._buffer
        if len(buf) < 2:
            return False
        opcode, length, offset = buf[0] & 0x0F, buf[1] & 0x7F, 2
        if length == 126:
            if len(buf) < 4:
                return False
            (length,), offset = struct.unpack("!H", buf[2:4]), 4
        elif length == 127:
            if len(buf) < 10:
                return False
            (length,), offset = struct.unpack("!Q", buf[2:10]), 10
        if len(buf) < offset + length:
            return False
        payload, self._buffer = buf[offset : offset + length], buf[offset + length :]
        if opcode == OP_BINARY:
            self.messages.put(msgpack.unpackb(payload, raw=False))
        elif opcode == OP_TEXT:
            self.messages.put(("text", payload.decode()))
        elif opcode == OP_PING:
            self.send_frame(OP_PONG, payload)
        elif opcode == OP_CLOSE:
            self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
            self.send_frame(OP_CLOSE, payload[:2])
            self.transport.loseConnection()
        return True

    # -- sending
    def send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        key = (mask * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
        self.transport.write(header + mask + masked)

    def send(self, message: dict[str, Any]) -> None:
        """One msgpack map in one binary frame, as Pie's clients pack it."""
        self.send_frame(OP_BINARY, msgpack.packb(message, use_bin_type=True))

    def send_bytes(self, payload: bytes) -> None:
        self.send_frame(OP_BINARY, payload)

    def send_text(self, text: str) -> None:
        self.send_frame(OP_TEXT, text.encode())

    def close(self) -> None:
        self.send_frame(OP_CLOSE, struct.pack("!H", 1000))

    # -- receiving
    def next(self) -> Deferred:
        """The next message from the server (decoded map, or ("text", str))."""
        return self.messages.get()

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a request and return the next message, which must be its response."""
        self.send(message)
        reply = await self.next()
        assert reply["type"] == "response" and reply["corr_id"] == message["corr_id"], reply
        return reply


async def connect(port: int, reactor: Any = None) -> RawClient:
    if reactor is None:
        from twisted.internet import reactor
    client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), RawClient())
    await client.opened
    return client

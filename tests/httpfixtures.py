"""A loopback twisted.web server for the tests of outgoing HTTP (inferlets' `fetch`).

Routes:
    /hello            "hello" (text/plain)
    /echo             JSON of the method, body, x-test header and query
    /big?n=N          N bytes with a Content-Length
    /stream?n=N       N bytes in 1000-byte chunks, no Content-Length
    /slow             never answers (kept in `slow`; `next_slow()` fires on the next one,
                      `ends[request]` fails once the client has cut the connection)
    /drip             like /slow, after the headers and 10 bytes of the body
    /redirect?to=URL  302 to URL
    /image.png        `png` (a PNG made by make_png)
    /tool/search?q=Q  JSON {"q": Q, "result": ...} from FACTS (the agents' search tool)
    /tool/docs?id=N   a long document (the agents' retrieval tool)
                      (both after `ms` milliseconds; see ToolServer.tool)
"""

from __future__ import annotations

import json
import struct
import zlib

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.web import resource, server

FACTS = {
    "paris": "Paris is the capital of France; about 2.1 million people live there.",
    "france": "France is a country in Western Europe; its capital is Paris.",
    "tokyo": "Tokyo is the capital of Japan; about 14 million people live there.",
}


def make_png(width: int, height: int) -> bytes:
    """A valid RGB PNG of the given size (grey), built with zlib and struct on the host."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = b"".join(b"\x00" + b"\x80" * (3 * width) for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"tEXt", b"Comment\x00made by tests/httpfixtures.py")
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _arg(request, name: str, default: str = "") -> str:
    return request.args.get(name.encode(), [default.encode()])[0].decode()


class _Routes(resource.Resource):
    isLeaf = True

    def __init__(self, owner: ToolServer) -> None:
        super().__init__()
        self._owner = owner

    def render(self, request):
        path = request.path.decode()
        owner = self._owner
        owner.paths.append(path)
        if path == "/hello":
            request.setHeader(b"content-type", b"text/plain")
            return b"hello"
        if path == "/echo":
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(
                {
                    "method": request.method.decode(),
                    "body": request.content.read().decode(),
                    "x_test": (request.getHeader(b"x-test") or b"").decode(),
                    "q": _arg(request, "q"),
                }
            ).encode()
        if path == "/big":
            return b"x" * int(_arg(request, "n", "0"))
        if path == "/stream":
            left = int(_arg(request, "n", "0"))
            while left > 0:
                request.write(b"y" * min(1000, left))
                left -= 1000
            request.finish()
            return server.NOT_DONE_YET
        if path in ("/slow", "/drip"):
            if path == "/drip":
                request.write(b"z" * 10)  # the headers and a first piece; then nothing
            owner.slow.append(request)
            owner.ends[request] = request.notifyFinish()
            if owner._slow_waiters:
                owner._slow_waiters.pop(0).callback(request)
            return server.NOT_DONE_YET
        if path == "/redirect":
            request.redirect(_arg(request, "to").encode())
            return b""
        if path == "/image.png":
            request.setHeader(b"content-type", b"image/png")
            return owner.png
        if path == "/tool/search":
            q = _arg(request, "q").lower()
            found = next((fact for key, fact in FACTS.items() if key in q), "No results.")
            request.setHeader(b"content-type", b"application/json")
            return owner.tool(request, json.dumps({"q": q, "result": found}).encode())
        if path == "/tool/docs":
            n = _arg(request, "id", "0")
            text = f"Document {n}. " + " ".join(f"Fact {n}.{i} is filler text." for i in range(8))
            return owner.tool(request, text.encode())
        request.setResponseCode(404)
        return b"not found"


class ToolServer:
    """The server on 127.0.0.1 (an ephemeral port), closed at the test's cleanup."""

    def __init__(self, png: bytes = b"") -> None:
        self.png = png or make_png(7, 5)
        self.paths: list[str] = []
        self.slow: list = []
        self.calls: dict[str, int] = {}  # tool calls per `run`
        self.peak: dict[str, int] = {}  # most tool calls of a `run` in flight at once
        self._open: dict[str, int] = {}
        self.ends: dict = {}  # /slow request -> its notifyFinish() (fails when the client cuts)
        self._slow_waiters: list[Deferred] = []
        self.port = 0
        self._listening = None

    def start(self, testcase) -> ToolServer:
        site = server.Site(_Routes(self))
        site.noisy = False
        self._listening = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.port = self._listening.getHost().port
        testcase.addCleanup(self._stop)
        return self

    def tool(self, request, body: bytes):
        """Answer a tool call after `ms` milliseconds (a remote API's latency), counting the
        calls of each `run` (a query parameter) in flight at once in `peak[run]`."""
        run = _arg(request, "run")
        self.calls[run] = self.calls.get(run, 0) + 1
        self._open[run] = self._open.get(run, 0) + 1
        self.peak[run] = max(self.peak.get(run, 0), self._open[run])

        def answer():
            self._open[run] -= 1
            request.write(body)
            request.finish()

        def gone(_):
            self._open[run] -= 1
            if delayed.active():
                delayed.cancel()

        delayed = reactor.callLater(int(_arg(request, "ms", "0")) / 1000.0, answer)
        request.notifyFinish().addErrback(gone)
        return server.NOT_DONE_YET

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def next_slow(self) -> Deferred:
        """Fires with the next /slow request to arrive (ask before it is sent; one per call)."""
        d: Deferred = Deferred()
        self._slow_waiters.append(d)
        return d

    def _stop(self):
        for end in self.ends.values():
            end.addErrback(lambda _: None)  # requests the test did not ask about
        for request in self.slow:
            if not request.finished and request.channel is not None:
                request.channel.transport.abortConnection()
        return self._listening.stopListening()

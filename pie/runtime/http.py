"""Server instances: an inferlet serving HTTP on 127.0.0.1:<port> (twisted.web).

Every HTTP request runs the program in a fresh instance, as in Pie. The
program defines `async def handle(request) -> response`; the executor finds
it from the instance's arguments, which for a request are exactly

    [HTTP_REQUEST_ARGUMENT, <request as a JSON object text>]

with the request object

    {"method": "POST", "path": "/v1/x", "query": "a=1", "headers": {"name": "value", ...},
     "body": "<text>", "arguments": [<the arguments given at launch_server>]}

(header names lowercased, repeated headers joined with ", ", the body decoded
as UTF-8 with invalid bytes replaced). The instance's return value is the
response, a JSON object text {"status": 200, "headers": {...}, "body": "<text>"};
every key is optional (200, no headers, empty body). Anything else — an
exception, a kill, no return value, a malformed response — becomes an HTTP 500
whose body says why, and is logged. Per-request instances have no owner
(their send() output is dropped, as in Pie) but are ordinary instances
otherwise: they are in the running table while they run and the model
services free what they held when they end.

A handler may instead stream: the host calls http_response_start(status,
headers), http_response_write(bytes) (parks while the client's socket buffer is
full: backpressure) and http_response_finish() send the head at once, each
chunk as it is written (chunked transfer encoding; every write is flushed, so
`text/event-stream` works) and the end. Once a response is started the
instance's return value is ignored; an instance that ends normally without
finishing is finished for it, one that fails has its connection dropped
without the last chunk (the client sees a truncated body, never a complete
one). A client that disconnects ends its request's instance (and so frees its
KV pages).

Per-server limits (HttpLimits, from the inferlet_server_* settings): requests
at once (429), body size (413: Content-Length is checked before any body is
read, a chunked body is counted as it arrives and never kept past the limit),
time to send the request head and silence while sending a request (408).
Connections open at once, to all server instances together and from one
client address (503 and closed at once, before anything is read): a slowloris
holds descriptors only until the head timeout, and never more than the cap,
which is set below what the client listener leaves free (pie.server.connections).

The owner of the server gets `instance_terminated(server_id, reason)` when it
stops (terminate with the server id, a closed socket, runtime shutdown).

A server the daemon launches itself (`--openai`) may listen on any endpoint
(not only 127.0.0.1:<port>) and have a `gate`: a check of each request before
any instance starts (the API key), whose refusal is answered as it is.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IPushProducer, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from pie.interfaces import IInstanceOwner, PieError
from pie.runtime.instances import NORMAL_FINISH, Instance
from pie.server.connections import AUTO_MAX_CONNECTIONS, ConnectionCounter, server_instance_caps

HTTP_REQUEST_ARGUMENT = "--pie-http-request"
"""First argument of a per-request instance; the second is the request JSON."""


@dataclass(frozen=True)
class HttpLimits:
    """What one server instance accepts (settings inferlet_server_*; docs/limits.md)."""

    max_requests: int = 64  # requests in flight at once; more get 429
    max_body: int = 16 * 2**20  # request body bytes; more get 413
    header_timeout_ms: int = 30_000  # to send the request head (line and headers); then 408
    idle_timeout_ms: int = 60_000  # silence while a request is being sent; then 408
    max_connections: int = AUTO_MAX_CONNECTIONS  # open at once, all servers together; then 503
    max_connections_per_address: int = AUTO_MAX_CONNECTIONS  # the same, from one address

    @classmethod
    def from_settings(cls, settings: dict[str, Any], fd_limit: int) -> HttpLimits:
        """The limits the settings give, automatic connection caps sized for `fd_limit`."""
        max_connections, per_address = server_instance_caps(settings, fd_limit)
        return cls(
            max_requests=settings["inferlet_server_max_requests"],
            max_body=settings["inferlet_server_max_body"],
            header_timeout_ms=settings["inferlet_server_header_timeout_ms"],
            idle_timeout_ms=settings["inferlet_server_idle_timeout_ms"],
            max_connections=max_connections,
            max_connections_per_address=per_address,
        )

    def connection_counter(self) -> ConnectionCounter:
        """A counter for the connections of every server instance sharing these limits."""
        return ConnectionCounter(self.max_connections, self.max_connections_per_address)


Refusal = tuple[int, dict[str, str], bytes]
Gate = Callable[[Request], Refusal | None]
"""Checks a request before its instance starts: None to let it through, else the answer."""


def parse_response(value: str | None) -> tuple[int, list[tuple[str, str]], bytes]:
    """A handler's return value → (status, headers, body bytes); PieError if malformed."""
    if value is None:
        raise PieError("the handler returned no response")
    try:
        response = json.loads(value)
    except ValueError as e:
        raise PieError(f"the handler's response is not JSON: {e}") from None
    if not isinstance(response, dict):
        raise PieError("the handler's response must be a JSON object {status, headers, body}")
    status = response.get("status", 200)
    if type(status) is not int or not 100 <= status <= 599:
        raise PieError(f"response status must be an integer 100..599, not {status!r}")
    headers = response.get("headers", {})
    if isinstance(headers, dict):
        headers = list(headers.items())
    if not isinstance(headers, list) or not all(
        isinstance(h, list | tuple) and len(h) == 2 and all(isinstance(x, str) for x in h)
        for h in headers
    ):
        raise PieError("response headers must map strings to strings")
    body = response.get("body", "")
    if not isinstance(body, str):
        raise PieError(f"response body must be a string, not {type(body).__name__}")
    return status, [(k, v) for k, v in headers], body.encode("utf-8")


def request_object(request: Request, arguments: list[str]) -> dict:
    """The JSON-able request a handler receives."""
    headers: dict[str, str] = {}
    for name, values in request.requestHeaders.getAllRawHeaders():
        headers[name.decode("latin-1").lower()] = ", ".join(v.decode("latin-1") for v in values)
    uri = request.uri.decode("utf-8", "replace")
    return {
        "method": request.method.decode("latin-1"),
        "path": request.path.decode("utf-8", "replace"),
        "query": uri.partition("?")[2],
        "headers": headers,
        "body": request.content.read().decode("utf-8", "replace") if request.content else "",
        "arguments": list(arguments),
    }


class ServerInstance:
    """One `launch_server_instance`: a listening port and the requests in flight."""

    log = Logger()

    def __init__(
        self,
        runtime,
        program_hash: str,
        program: bytes,
        arguments: list[str],
        owner: IInstanceOwner | None,
        port: int,
        limits: HttpLimits | None = None,
        endpoint: IStreamServerEndpoint | None = None,
        gate: Gate | None = None,
    ) -> None:
        self.id = str(uuid.uuid4())
        self.program_hash = program_hash
        self.arguments = list(arguments)
        self.owner = owner
        self.requested_port = port
        self.limits = limits or HttpLimits()
        self.in_flight: set[Instance] = set()
        self.exchanges: dict[str, Exchange] = {}  # by per-request instance id
        self.stopped = False
        self._runtime = runtime
        self._program = program
        self._listening = None
        self._connections: _Connections | None = None
        self._endpoint = endpoint
        self._gate = gate
        self.closed: Deferred = Deferred()  # fires once the port is closed after stop()

    @property
    def port(self) -> int:
        """The bound port (differs from the requested one when that was 0)."""
        return self._listening.getHost().port if self._listening else self.requested_port

    @property
    def address(self):
        """The bound address (an IAddress), None before listen()."""
        return self._listening.getHost() if self._listening else None

    async def listen(self) -> None:
        endpoint = self._endpoint or TCP4ServerEndpoint(
            self._runtime.reactor, self.requested_port, backlog=100, interface="127.0.0.1"
        )
        site = _LimitedSite(
            _RequestHandler(self),
            self.limits,
            self._runtime.http_connections,
            reactor=self._runtime.reactor,
        )
        site.displayTracebacks = False
        self._connections = _Connections(site)
        try:
            self._listening = await endpoint.listen(self._connections)
        except Exception as e:
            where = endpoint if self._endpoint else f"127.0.0.1:{self.requested_port}"
            raise PieError(f"cannot serve on {where}: {e}") from None

    def stop(self, reason: str) -> Deferred:
        """Stop listening, end the requests in flight, tell the owner; `closed` fires when done."""
        if self.stopped:
            return self.closed
        self.stopped = True
        for instance in list(self.in_flight):
            self._runtime.terminate(instance.id, reason)
        d = maybeDeferred(self._listening.stopListening) if self._listening else succeed(None)
        if self._connections is not None:  # and the kept-alive connections too
            d.addCallback(lambda _: self._connections.close_all())
        d.addBoth(self._closed)
        if self.owner is not None:
            try:
                self.owner.instance_terminated(self.id, reason)
            except Exception:
                self.log.failure("instance_terminated failed for server {id}", id=self.id)
        return self.closed

    def _closed(self, result) -> None:
        if isinstance(result, Failure):
            self.log.failure("closing server {id}", result, id=self.id)
        self.closed.callback(None)

    # ------------------------------------------------------------------ one request

    def handle(self, request: Request):
        self._runtime.metrics.http_request(request)
        if self.stopped:
            return _error(request, 503, "server instance stopped")
        refusal = self._gate(request) if self._gate is not None else None
        if refusal is not None:
            status, headers, body = refusal
            request.setResponseCode(status)
            for name, value in headers.items():
                request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
            return body
        if len(self.in_flight) >= self.limits.max_requests:
            request.setHeader(b"retry-after", b"1")
            return _error(
                request, 429, f"too many requests in flight (limit {self.limits.max_requests})"
            )
        arguments = [HTTP_REQUEST_ARGUMENT, json.dumps(request_object(request, self.arguments))]
        instance = self._runtime.start_instance(
            self.program_hash, self._program, arguments, owner=None, server_id=self.id
        )
        self.in_flight.add(instance)
        self.exchanges[instance.id] = Exchange(request, instance)
        request.notifyFinish().addErrback(
            lambda _: self._runtime.terminate(instance.id, "HTTP client disconnected")
        )
        instance.when_ended().addCallback(self._respond, request, instance)
        return NOT_DONE_YET

    def exchange(self, instance: Instance) -> Exchange:
        """The HTTP exchange a per-request instance answers (PieError for other instances)."""
        exchange = self.exchanges.get(instance.id)
        if exchange is None:
            raise PieError("this instance is not handling an HTTP request")
        return exchange

    def _respond(
        self, outcome: tuple[str, str | None], request: Request, instance: Instance
    ) -> None:
        self.in_flight.discard(instance)
        exchange = self.exchanges.pop(instance.id)
        reason, value = outcome
        if request.finished or request.channel is None:
            return
        if exchange.started:
            exchange.end(normally=reason == NORMAL_FINISH)
            if reason != NORMAL_FINISH:
                self._log_failure(request, reason)
            return
        if reason != NORMAL_FINISH:
            self._fail(request, instance, reason)
            return
        try:
            status, headers, body = parse_response(value)
        except PieError as e:
            self._fail(request, instance, str(e))
            return
        _start(request, status, headers)
        request.write(body)
        request.finish()

    def _log_failure(self, request: Request, reason: str) -> None:
        self.log.warn(
            "server {server} request {method} {path} failed: {reason}",
            server=self.id,
            method=request.method.decode("latin-1"),
            path=request.path.decode("utf-8", "replace"),
            reason=reason,
        )

    def _fail(self, request: Request, instance: Instance, reason: str) -> None:
        self._log_failure(request, reason)
        request.write(_error(request, 500, f"instance {instance.id}: {reason}"))
        request.finish()


def _start(request: Request, status: int, headers: list[tuple[str, str]]) -> None:
    """Set a response's status and headers (text/plain unless the handler said otherwise)."""
    request.setResponseCode(status)
    for name, header_value in headers:
        request.responseHeaders.addRawHeader(name, header_value)
    if not request.responseHeaders.hasHeader(b"content-type"):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")


@implementer(IPushProducer)
class Exchange:
    """A streamed response: the host side of http_response_start/write/finish.

    Registered as the request's push producer, so twisted pauses it when the
    socket's buffer is full; write() then returns a Deferred that fires when
    it drains (the guest parks on it: backpressure). Nothing is buffered here
    beyond the chunks being written: one per guest task that writes (an OpenAI
    reply with n choices has n), and all of them resume when the socket drains.
    """

    def __init__(self, request: Request, instance: Instance) -> None:
        self.request = request
        self.instance = instance
        self.started = False
        self.finished = False
        self.disconnected = False
        self._paused = False
        self._drained: list[Deferred] = []
        request.notifyFinish().addErrback(self._gone)

    def _gone(self, failure) -> None:
        self.disconnected = True

    def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        if self.started:
            raise PieError("the response is already started")
        self._check_connected()
        if not 100 <= status <= 599:
            raise PieError(f"response status must be 100..599, not {status}")
        self.started = True
        _start(self.request, status, headers)
        if self.request.responseHeaders.getRawHeaders(b"content-type", [b""])[0].startswith(
            b"text/event-stream"
        ) and not self.request.responseHeaders.hasHeader(b"cache-control"):
            self.request.setHeader(b"cache-control", b"no-cache")
        self.request.registerProducer(self, True)
        self.request.write(b"")  # sends the head now, before the first chunk

    def write(self, data: bytes) -> Deferred:
        """Send one chunk; the Deferred fires once more may be written."""
        self._check_open()
        if data:
            self.request.write(data)
        if not self._paused:
            return succeed(None)
        drained: Deferred = Deferred()
        self._drained.append(drained)
        return self.instance.add_timer(drained)

    def finish(self) -> None:
        self._check_open()
        self.end(normally=True)

    def end(self, normally: bool) -> None:
        """Finish the response, or (normally=False) drop the connection so it reads as cut short."""
        if self.finished or self.request.finished or self.request.channel is None:
            return
        self.finished = True
        self.request.unregisterProducer()
        if normally:
            self.request.finish()
        else:
            self.request.channel.transport.loseConnection()  # what is written goes, not the end

    def _check_open(self) -> None:
        if not self.started:
            raise PieError("http_response_start first")
        if self.finished:
            raise PieError("the response is finished")
        self._check_connected()

    def _check_connected(self) -> None:
        if self.disconnected:
            raise PieError("the HTTP client has disconnected")

    # IPushProducer (called by twisted.web for the socket)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        drained, self._drained = self._drained, []
        for d in drained:
            if not d.called:
                d.callback(None)

    def stopProducing(self) -> None:
        self._paused = True  # the client is gone; notifyFinish ends the instance


class _Connections(WrappingFactory):
    """The site's open connections, so that a stopped server closes its kept-alive ones."""

    def __init__(self, site: Site) -> None:
        super().__init__(site)
        self._lost: dict = {}

    def registerProtocol(self, protocol) -> None:
        super().registerProtocol(protocol)
        self._lost[protocol] = Deferred()

    def unregisterProtocol(self, protocol) -> None:
        super().unregisterProtocol(protocol)
        lost = self._lost.pop(protocol, None)
        if lost is not None:
            lost.callback(None)

    def close_all(self) -> Deferred:
        """Close every connection; fires once all are gone."""
        waiting = list(self._lost.values())
        for protocol in list(self.protocols):
            protocol.transport.loseConnection()
        return gatherResults(waiting)


class _RequestHandler(Resource):
    isLeaf = True

    def __init__(self, server: ServerInstance) -> None:
        super().__init__()
        self._server = server

    def render(self, request: Request):
        return self._server.handle(request)


class _LimitedRequest(Request):
    """Counts the body as it arrives and keeps it in memory (it is bounded by max_body)."""

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()
        self._received = 0

    def handleContentChunk(self, data: bytes) -> None:
        channel = self.channel
        if channel is None or channel.rejected:
            return
        self._received += len(data)
        if self._received > channel.limits.max_body:
            channel.reject(413, f"request body over {channel.limits.max_body} bytes")
            return
        self.content.write(data)


class _LimitedChannel(HTTPChannel):
    """An HTTPChannel that answers 413 and 408 itself, before any handler runs.

    timeOut (twisted's idle timeout, reset by every byte received and off
    while a request is being handled) is idle_timeout_ms; a second timer
    bounds the time from the connection (or the previous response) to the end
    of the request head.
    """

    limits: HttpLimits
    connections: ConnectionCounter
    rejected = False
    _head_timer = None
    _address = ""
    _admitted = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._address = getattr(self.transport.getPeer(), "host", "local")
        refusal = self.connections.admit(self._address)
        if refusal is not None:
            self.reject(503, refusal)
            return
        self._admitted = True
        self._arm_head_timer()

    def allHeadersReceived(self) -> None:
        self._cancel_head_timer()
        if self.length is not None and self.length > self.limits.max_body:
            self.reject(413, f"request body over {self.limits.max_body} bytes")
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if not self.rejected:
            super().allContentReceived()

    def requestDone(self, request) -> None:
        if self.persistent:  # first: the next request may already be buffered, and parsed now
            self._arm_head_timer()
        super().requestDone(request)

    def timeoutConnection(self) -> None:
        if self._handlingRequest:
            super().timeoutConnection()
            return
        self.reject(408, f"no data for {self.limits.idle_timeout_ms} ms")

    def connectionLost(self, reason) -> None:
        self._cancel_head_timer()
        if self._admitted:
            self._admitted = False
            self.connections.release(self._address)
        super().connectionLost(reason)

    def reject(self, status: int, text: str) -> None:
        """Answer a request that never reaches a handler, and close the connection."""
        if self.rejected:
            return
        self.rejected = True
        self._cancel_head_timer()
        self.setTimeout(None)
        self.dataReceived = lambda data: None  # as twisted does for data after the last request
        body = (text + "\n").encode("utf-8")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, RESPONSES.get(status, b"Error"), len(body), body)
        )
        self.transport.loseConnection()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.callLater(
            self.limits.header_timeout_ms / 1000,
            self.reject,
            408,
            f"request head not received within {self.limits.header_timeout_ms} ms",
        )

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None and self._head_timer.active():
            self._head_timer.cancel()
        self._head_timer = None


class _LimitedSite(Site):
    requestFactory = _LimitedRequest

    def __init__(
        self, resource: Resource, limits: HttpLimits, connections: ConnectionCounter, reactor
    ) -> None:
        super().__init__(resource, timeout=limits.idle_timeout_ms / 1000, reactor=reactor)
        self.limits = limits
        self.connections = connections

    def protocol(self) -> _LimitedChannel:  # HTTPFactory calls self.protocol() for a channel
        channel = _LimitedChannel()
        channel.limits = self.limits
        channel.connections = self.connections
        return channel


def _error(request: Request, status: int, text: str) -> bytes:
    """Set an error status; the body to write (or to return from render)."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return (text + "\n").encode("utf-8")

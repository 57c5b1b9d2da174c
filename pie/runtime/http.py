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

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from pie.interfaces import IInstanceOwner, PieError
from pie.runtime.instances import NORMAL_FINISH, Instance

HTTP_REQUEST_ARGUMENT = "--pie-http-request"
"""First argument of a per-request instance; the second is the request JSON."""

MAX_REQUEST_BODY = 16 * 2**20
MAX_CONCURRENT_REQUESTS = 64

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
        endpoint: IStreamServerEndpoint | None = None,
        gate: Gate | None = None,
    ) -> None:
        self.id = str(uuid.uuid4())
        self.program_hash = program_hash
        self.arguments = list(arguments)
        self.owner = owner
        self.requested_port = port
        self.in_flight: set[Instance] = set()
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
        site = Site(_RequestHandler(self))
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
        if self.stopped:
            return _error(request, 503, "server instance stopped")
        refusal = self._gate(request) if self._gate is not None else None
        if refusal is not None:
            status, headers, body = refusal
            request.setResponseCode(status)
            for name, value in headers.items():
                request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
            return body
        if len(self.in_flight) >= MAX_CONCURRENT_REQUESTS:
            return _error(
                request, 503, f"too many requests in flight (limit {MAX_CONCURRENT_REQUESTS})"
            )
        if request.content is not None:
            request.content.seek(0, 2)
            size = request.content.tell()
            request.content.seek(0)
            if size > MAX_REQUEST_BODY:
                return _error(request, 413, f"request body over {MAX_REQUEST_BODY} bytes")
        arguments = [HTTP_REQUEST_ARGUMENT, json.dumps(request_object(request, self.arguments))]
        instance = self._runtime.start_instance(
            self.program_hash, self._program, arguments, owner=None, server_id=self.id
        )
        self.in_flight.add(instance)
        request.notifyFinish().addErrback(
            lambda _: self._runtime.terminate(instance.id, "HTTP client disconnected")
        )
        instance.when_ended().addCallback(self._respond, request, instance)
        return NOT_DONE_YET

    def _respond(
        self, outcome: tuple[str, str | None], request: Request, instance: Instance
    ) -> None:
        self.in_flight.discard(instance)
        reason, value = outcome
        if request.finished or request.channel is None:
            return
        if reason != NORMAL_FINISH:
            self._fail(request, instance, reason)
            return
        try:
            status, headers, body = parse_response(value)
        except PieError as e:
            self._fail(request, instance, str(e))
            return
        request.setResponseCode(status)
        for name, header_value in headers:
            request.responseHeaders.addRawHeader(name, header_value)
        if not request.responseHeaders.hasHeader(b"content-type"):
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.write(body)
        request.finish()

    def _fail(self, request: Request, instance: Instance, reason: str) -> None:
        self.log.warn(
            "server {server} request {method} {path} failed: {reason}",
            server=self.id,
            method=request.method.decode("latin-1"),
            path=request.path.decode("utf-8", "replace"),
            reason=reason,
        )
        request.write(_error(request, 500, f"instance {instance.id}: {reason}"))
        request.finish()


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


def _error(request: Request, status: int, text: str) -> bytes:
    """Set an error status; the body to write (or to return from render)."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return (text + "\n").encode("utf-8")

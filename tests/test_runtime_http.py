"""Server instances: HTTP on a real loopback port, one instance per request (issue 4 point 4; spec §3.5, §10.7)."""

from __future__ import annotations

import json
from io import BytesIO

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from pie.interfaces import PieError
from pie.runtime.http import HTTP_REQUEST_ARGUMENT, HttpLimits, _LimitedSite, parse_response
from tests.rawhttp import connect
from tests.runtime_doubles import FakeModelService, RecordingOwner, make_runtime

PARKED = Deferred()  # a test sets a fresh one; fired when a /park request is inside handle()


async def handler(host, args):
    """What an executor does for a server program: handle(request) → response JSON."""
    assert args[0] == HTTP_REQUEST_ARGUMENT
    request = json.loads(args[1])
    if request["path"] == "/fail":
        raise RuntimeError("handler exploded")
    if request["path"] == "/garbage":
        return "not json"
    if request["path"] == "/park":
        PARKED.callback(request["path"])
        await host.call("receive", ())
    if request["path"] == "/alloc":
        queue = host.call("create_queue", (0,))
        host.call("allocate_kv_pages", (queue, [1, 2]))
    await host.call("store_set", ("last-path", request["path"]))
    body = json.dumps(
        {k: request[k] for k in ("method", "path", "query", "body", "arguments")}
        | {"agent": request["headers"].get("x-test"), "id": host.call("get_instance_id", ())}
    )
    return json.dumps({"status": 201, "headers": {"x-pie": "yes"}, "body": body})


class ServerInstanceTests(unittest.TestCase):
    def setUp(self):
        self.model = FakeModelService()
        self.runtime = make_runtime(self, services={"fake": self.model})
        self.owner = RecordingOwner()

    async def serve(self, arguments=("--mode", "test")) -> tuple[str, int]:
        digest = await self.runtime.add_program(self.runtime.executor.program(handler))
        server_id = await self.runtime.launch_server(digest, 0, list(arguments), self.owner)
        return server_id, self.runtime.servers[server_id].port

    async def request(self, port: int, path: str, method=b"GET", body: bytes | None = None):

        producer = FileBodyProducer(BytesIO(body)) if body is not None else None
        response = await Agent(reactor).request(
            method,
            f"http://127.0.0.1:{port}{path}".encode(),
            Headers({b"x-test": [b"trial"]}),
            producer,
        )
        return response, (await readBody(response)).decode()

    async def test_each_request_runs_a_fresh_instance(self):
        server_id, port = await self.serve()
        response, text = await self.request(port, "/echo?x=1", b"POST", b"payload")
        self.assertEqual(response.code, 201)
        self.assertEqual(response.headers.getRawHeaders(b"x-pie"), [b"yes"])
        first = json.loads(text)
        self.assertEqual(
            {k: v for k, v in first.items() if k != "id"},
            {
                "method": "POST",
                "path": "/echo",
                "query": "x=1",
                "body": "payload",
                "arguments": ["--mode", "test"],
                "agent": "trial",
            },
        )
        _, text = await self.request(port, "/again")
        self.assertNotEqual(json.loads(text)["id"], first["id"])
        self.assertEqual(await self.runtime.kvstore.get("last-path"), "/again")
        self.assertEqual(self.runtime.debug_query("get_server_instance_count"), "1")
        self.assertEqual(self.owner.events, [])  # per-request instances have no owner

    async def test_failing_handler_is_a_500_with_the_reason(self):
        _, port = await self.serve()
        response, text = await self.request(port, "/fail")
        self.assertEqual(response.code, 500)
        self.assertIn("Runtime error: RuntimeError: handler exploded", text)
        response, text = await self.request(port, "/garbage")
        self.assertEqual(response.code, 500)
        self.assertIn("not JSON", text)
        response, _ = await self.request(port, "/fine")
        self.assertEqual(response.code, 201)
        self.flushLoggedErrors(RuntimeError)

    async def test_per_request_instances_free_model_resources(self):
        _, port = await self.serve()
        response, text = await self.request(port, "/alloc")
        self.assertEqual(response.code, 201)
        request_instance = json.loads(text)["id"]
        self.assertIn(request_instance, self.model.destroyed)
        self.assertEqual(self.model.pages, {})
        self.assertEqual(self.runtime.instances.running, {})

    async def test_owner_stops_the_server(self):
        server_id, port = await self.serve()
        closed = self.runtime.servers[server_id].closed
        self.runtime.terminate(server_id, "user terminated the program")
        await closed
        self.assertEqual(self.owner.terminations(server_id), ["user terminated the program"])
        self.assertEqual(self.runtime.servers, {})
        with self.assertRaises(ConnectionRefusedError):
            await self.request(port, "/gone")

    async def park(self, port: int):
        """Open a raw connection with a request that parks in the handler; (transport, instance)."""
        global PARKED
        PARKED = Deferred()
        client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
            Factory.forProtocol(Protocol)
        )
        client.transport.write(b"GET /park HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await PARKED
        [instance] = self.runtime.servers[self.server_id].in_flight
        return client.transport, instance

    async def test_client_disconnect_ends_the_request_instance(self):
        self.server_id, port = await self.serve()
        transport, instance = await self.park(port)
        transport.loseConnection()
        reason, _ = await instance.when_ended()
        self.assertEqual(reason, "HTTP client disconnected")
        self.assertIn(instance.id, self.model.destroyed)

    async def test_port_in_use_is_reported(self):
        taken = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(Protocol)
        )
        self.addCleanup(taken.stopListening)
        digest = await self.runtime.add_program(self.runtime.executor.program(handler))
        with self.assertRaises(PieError) as caught:
            await self.runtime.launch_server(digest, taken.getHost().port, [], self.owner)
        self.assertIn(f"cannot serve on 127.0.0.1:{taken.getHost().port}", str(caught.exception))

    async def test_unknown_program_and_bad_port(self):
        with self.assertRaises(PieError):
            await self.runtime.launch_server("0" * 64, 0, [], self.owner)
        with self.assertRaises(PieError):
            await self.runtime.launch_server("0" * 64, 70000, [], self.owner)


class LimitTests(unittest.TestCase):
    """Per-server limits (HttpLimits, the inferlet_server_* settings) answer, never go silent."""

    async def serve(self, **limits) -> int:
        self.runtime = make_runtime(
            self, services={"fake": FakeModelService()}, http_limits=HttpLimits(**limits)
        )
        digest = await self.runtime.add_program(self.runtime.executor.program(handler))
        self.server_id = await self.runtime.launch_server(digest, 0, [], RecordingOwner())
        return self.runtime.servers[self.server_id].port

    async def raw(self, port: int, data: bytes) -> bytes:
        client = await connect(port)
        client.send(data)
        return await client.response()

    async def test_too_many_requests_at_once_is_429(self):
        global PARKED
        port = await self.serve(max_requests=1)
        PARKED = Deferred()
        parked = await connect(port)
        parked.send(b"GET /park HTTP/1.1\r\nHost: x\r\n\r\n")
        await PARKED
        answer = await self.raw(port, b"GET /second HTTP/1.1\r\nConnection: close\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 429 "), answer)
        self.assertIn(b"too many requests in flight (limit 1)", answer)
        self.assertIn(b"Retry-After: 1", answer)
        [instance] = self.runtime.servers[self.server_id].in_flight
        self.runtime.signal(instance.id, "go on")
        await parked.seen(b"HTTP/1.1 201")
        parked.transport.loseConnection()
        answer = await self.raw(port, b"GET /third HTTP/1.1\r\nConnection: close\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 201 "), answer)

    async def test_content_length_over_the_limit_is_413_before_any_body(self):
        port = await self.serve(max_body=10)
        client = await connect(port)
        client.send(b"POST /big HTTP/1.1\r\nContent-Length: 11\r\n\r\n")  # no body sent
        answer = await client.response()
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertIn(b"request body over 10 bytes", answer)
        self.assertIsNone(await self.runtime.kvstore.get("last-path"))  # no handler ran
        answer = await self.raw(
            port,
            b"POST /fits HTTP/1.1\r\nContent-Length: 10\r\nConnection: close\r\n\r\n" + b"x" * 10,
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 201 "), answer)
        self.assertIn(b'"body": "xxxxxxxxxx"', answer)

    async def test_chunked_body_is_counted_as_it_arrives(self):
        port = await self.serve(max_body=10)
        client = await connect(port)
        client.send(b"POST /big HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        client.send(b"6\r\nxxxxxx\r\n")
        client.send(b"6\r\nxxxxxx\r\n")  # 12 bytes so far, and the body is not over yet
        answer = await client.response()
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertIsNone(await self.runtime.kvstore.get("last-path"))

    async def test_slow_request_head_is_408(self):
        port = await self.serve(header_timeout_ms=200)
        client = await connect(port)
        client.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        answer = await client.response()
        self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer)
        self.assertIn(b"request head not received within 200 ms", answer)

    async def test_idle_request_body_is_408(self):
        port = await self.serve(idle_timeout_ms=200)
        client = await connect(port)
        client.send(b"POST /idle HTTP/1.1\r\nContent-Length: 5\r\n\r\nab")
        answer = await client.response()
        self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer)
        self.assertIn(b"no data for 200 ms", answer)
        self.assertIsNone(await self.runtime.kvstore.get("last-path"))


class _Parking(Resource):
    """Answers nothing itself (handlers still running): the requests wait in `pending`."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: list = []

    def render(self, request):
        self.pending.append(request)
        return NOT_DONE_YET


class ChannelTimerTests(unittest.TestCase):
    """The 408 timers on a Clock: never while a handler runs, pipelined requests included."""

    def connect(self) -> tuple[Clock, StringTransport, object]:
        clock = Clock()
        limits = HttpLimits(header_timeout_ms=1000, idle_timeout_ms=2000)
        self.resource = _Parking()
        site = _LimitedSite(self.resource, limits, limits.connection_counter(), reactor=clock)
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, None)
        return clock, transport, channel

    def test_a_pipelined_request_being_handled_is_not_timed_out(self):
        clock, transport, channel = self.connect()
        channel.dataReceived(b"GET /a HTTP/1.1\r\n\r\nGET /park HTTP/1.1\r\n\r\n")
        [first] = self.resource.pending  # the second waits in the channel's buffer
        first.write(b"ok")
        first.finish()  # the channel now parses /park, and hands it on
        self.assertIn(b"200 OK", transport.value())
        self.assertEqual(len(self.resource.pending), 2)
        clock.advance(10)  # past both timeouts, while /park is being handled
        self.assertNotIn(b"408", transport.value())
        self.assertFalse(transport.disconnecting)

    def test_a_head_that_never_ends_is_timed_out(self):
        clock, transport, channel = self.connect()
        channel.dataReceived(b"GET /a HTTP/1.1\r\n")
        clock.advance(0.9)
        channel.dataReceived(b"Host: x\r\n")  # trickling bytes do not help
        clock.advance(0.2)
        self.assertIn(b"HTTP/1.1 408 ", transport.value())
        self.assertTrue(transport.disconnecting)


class ConnectionCapTests(unittest.TestCase):
    """Connections to all server instances together are capped, in total and per address."""

    def test_over_a_cap_is_answered_503_and_closed_until_one_is_gone(self):
        limits = HttpLimits(max_connections=2, max_connections_per_address=1)
        counter = limits.connection_counter()
        sites = [_LimitedSite(_Parking(), limits, counter, reactor=Clock()) for _ in range(2)]

        def connect(site, host: str) -> tuple[StringTransport, object]:
            channel = site.buildProtocol(IPv4Address("TCP", host, 1))
            transport = StringTransport(peerAddress=IPv4Address("TCP", host, 1))
            channel.makeConnection(transport)
            return transport, channel

        first, first_channel = connect(sites[0], "127.0.0.1")
        again, _ = connect(sites[1], "127.0.0.1")  # another server, the same address
        self.assertTrue(again.value().startswith(b"HTTP/1.1 503 "), again.value())
        self.assertIn(b"too many connections from 127.0.0.1: 1 open", again.value())
        self.assertTrue(again.disconnecting)
        other, _ = connect(sites[1], "127.0.0.2")
        self.assertEqual(other.value(), b"")
        third, _ = connect(sites[0], "127.0.0.3")
        self.assertIn(b"too many connections: the server has 2 open", third.value())
        first_channel.connectionLost(None)  # one admitted is gone: its place is free
        self.assertFalse(first.disconnecting)
        later, _ = connect(sites[0], "127.0.0.3")
        self.assertEqual(later.value(), b"")
        self.assertEqual(
            (counter.total, dict(counter.by_address)), (2, {"127.0.0.2": 1, "127.0.0.3": 1})
        )


class ParseResponseTests(unittest.TestCase):
    def test_defaults_and_errors(self):
        self.assertEqual(parse_response("{}"), (200, [], b""))
        self.assertEqual(
            parse_response('{"status": 404, "headers": [["a", "b"]], "body": "é"}'),
            (404, [("a", "b")], "é".encode()),
        )
        for bad in (
            None,
            "[]",
            '{"status": 99}',
            '{"status": "200"}',
            '{"body": 3}',
            '{"headers": {"a": 1}}',
        ):
            self.assertRaises(PieError, parse_response, bad)

"""Connections under pressure, over real loopback sockets: closing clients, slow readers.

Each case runs the real runtime (dev executor, no model) behind the real
protocol, so the instance's `send()` goes through the host API as in the daemon.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from socket import SO_RCVBUF, SO_SNDBUF, SOL_SOCKET

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    UNIXClientEndpoint,
    UNIXServerEndpoint,
    connectProtocol,
)
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from pie.runtime.executors import build
from pie.runtime.executors.dev import DevExecutor
from pie.runtime.executors.wasm import WasmExecutor
from pie.runtime.runtime import Runtime
from pie.server.connections import AUTO_MAX_CONNECTIONS, auto_max_connections, connection_caps
from pie.server.uploads import hash_program
from pie.tap import Options, makeService
from tests import rawclient
from tests.fakeruntime import FakeRuntime
from tests.pieserver import ROOT, LiveServer
from tests.protocol_helpers import launch, upload

CHATTY = b"""
from pie.inferlet import send, sleep

async def main(args):
    while True:
        send("tick " * 20)
        await sleep(1)
"""


STREAM = b"""
from pie.inferlet import send

async def main(args):
    count, size = int(args[0]), int(args[1])
    for i in range(count):
        await send(f"{i:08d}" + "x" * (size - 8))
    return "done"
"""


def when(condition, timeout: float = 10.0, step: float = 0.01) -> Deferred:
    """Fires once condition() is true (polled); fails after timeout seconds."""
    done: Deferred = Deferred()
    deadline = reactor.seconds() + timeout

    def poll() -> None:
        if condition():
            done.callback(None)
        elif reactor.seconds() > deadline:
            done.errback(AssertionError(f"condition not met within {timeout} s"))
        else:
            reactor.callLater(step, poll)

    poll()
    return done


class LogCapture:
    """Every log event's text while the test runs (failures with their traceback)."""

    def __init__(self, testcase: unittest.TestCase) -> None:
        self.lines: list[str] = []
        globalLogPublisher.addObserver(self)
        testcase.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict) -> None:
        text = formatEvent(event) or ""
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        self.lines.append(text)

    def text(self) -> str:
        return "\n".join(self.lines)


class Collect(Protocol):
    """Everything the server sends until it closes the connection."""

    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object = None) -> None:
        self.done.callback(self.data)


async def refused_from(port: int, source: str) -> bytes:
    """What the server answers a WebSocket handshake from `source` before it closes."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0))
    return await (await connectProtocol(endpoint, Collect())).done


async def connect_from(server: LiveServer, source: str) -> rawclient.RawClient:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port_number, bindAddress=(source, 0))
    client = await connectProtocol(endpoint, rawclient.RawClient())
    await client.opened
    server.clients.append(client)
    return client


PING = {"type": "query", "corr_id": 7, "subject": "model_status", "record": ""}


class ConnectionCapTests(unittest.TestCase):
    async def test_per_address_cap_refuses_with_503_while_others_are_served(self):
        server = await LiveServer(self, max_connections=10, max_connections_per_address=3).start()
        mine = [await server.connect() for _ in range(3)]
        for _ in range(2):  # past the cap: refused at once, with the reason, every time
            answer = await refused_from(server.port_number, "127.0.0.1")
            self.assertTrue(answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer)
            self.assertIn(
                b"too many connections from 127.0.0.1: 3 open (max_connections_per_address = 3)",
                answer,
            )
        other = await connect_from(server, "127.0.0.2")  # another address is still served
        self.assertTrue((await other.request(PING))["successful"])
        for client in mine:  # and so are the connections already open
            self.assertTrue((await client.request(PING))["successful"])
        self.assertEqual(
            dict(server.factory.connections.by_address), {"127.0.0.1": 3, "127.0.0.2": 1}
        )

        mine[0].transport.loseConnection()
        await mine[0].closed
        await when(lambda: server.factory.connections.by_address["127.0.0.1"] == 2)
        again = await server.connect()  # a slot came free
        self.assertTrue((await again.request(PING))["successful"])

    async def test_listener_cap_counts_every_address(self):
        server = await LiveServer(self, max_connections=2, max_connections_per_address=2).start()
        await server.connect()
        await connect_from(server, "127.0.0.2")
        answer = await refused_from(server.port_number, "127.0.0.3")
        self.assertIn(b"503", answer.split(b"\r\n")[0])
        self.assertIn(b"too many connections: the server has 2 open (max_connections = 2)", answer)

    async def test_unix_socket_clients_count_as_one_local_address(self):
        factory = LiveServer(self, max_connections=4, max_connections_per_address=1).factory
        folder = tempfile.mkdtemp(prefix="pie-")  # short: a socket path has at most 107 bytes
        self.addCleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, "s")
        port = await UNIXServerEndpoint(reactor, path).listen(factory)
        self.addCleanup(port.stopListening)
        client = await connectProtocol(UNIXClientEndpoint(reactor, path), rawclient.RawClient())
        await client.opened
        self.addCleanup(client.transport.loseConnection)
        self.assertTrue((await client.request(PING))["successful"])
        self.assertEqual(dict(factory.connections.by_address), {"local": 1})
        refused = await (await connectProtocol(UNIXClientEndpoint(reactor, path), Collect())).done
        self.assertIn(b"too many connections from local", refused)
        client.transport.loseConnection()
        await client.closed
        await when(lambda: not factory.connections.by_address)


class ConnectionTests(unittest.TestCase):
    async def daemon(self, **limits):
        runtime = Runtime(os.path.abspath(self.mktemp()), {}, DevExecutor(), reactor=reactor)
        runtime.startService()
        self.addCleanup(lambda: runtime.stopService() if runtime.running else None)
        server = await LiveServer(self, runtime=runtime, **limits).start()
        return runtime, server

    async def chatty_session(self):
        """A daemon, a client, and an instance of CHATTY that has sent its first message."""
        log = LogCapture(self)
        runtime, server = await self.daemon()
        client = await server.connect()
        self.assertTrue((await upload(client, CHATTY))["successful"])
        instance_id = await launch(client, hash_program(CHATTY))
        self.assertEqual((await client.next())["event"], "message")
        session = next(iter(server.factory.sessions))
        return log, runtime, server, client, session, runtime.instances.running[instance_id]

    async def test_closing_connection_is_never_written_to(self):
        """The session is closing (its close frame unanswered) while the instance sends: no traceback.

        The client stops reading, so the session stays in the closing state for the
        close handshake timeout while the instance goes on sending every millisecond.
        """
        log, runtime, server, client, session, instance = await self.chatty_session()
        session.factory.setProtocolOptions(closeHandshakeTimeout=0.5)
        client.transport.pauseProducing()
        session.sendClose(1000, "bye")
        self.assertEqual(session.state, session.STATE_CLOSING)
        await session.closed
        self.assertTrue(instance.ended)
        self.assertNotIn(instance.id, runtime.instances.running)
        self.assertNotIn("closed protocol", log.text())
        self.assertNotIn("Traceback", log.text())

    async def test_client_closing_while_its_instance_sends(self):
        """The client's close frame ends the session; the instance ends, nothing is logged."""
        log, runtime, server, client, session, instance = await self.chatty_session()
        client.transport.pauseProducing()
        client.close()
        await session.closed
        self.assertTrue(instance.ended)
        self.assertNotIn("Traceback", log.text())


class DaemonSettingsTests(unittest.SynchronousTestCase):
    def test_fd_limit_is_raised_to_the_hard_limit(self):
        """In a child whose soft limit was lowered: raise_fd_limit lifts it back and says so."""
        script = (
            "import resource, sys\n"
            "from twisted.logger import globalLogBeginner, textFileLogObserver\n"
            "globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])\n"
            "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
            "from pie.server.connections import raise_fd_limit\n"
            "print('RESULT', raise_fd_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script],
            env=dict(os.environ, PYTHONPATH=ROOT),
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        returned, soft, hard = done.stdout.split("RESULT ")[1].split()
        self.assertEqual((returned, soft), (hard, hard))
        self.assertIn(f"file descriptor limit raised from 256 to {hard}", done.stdout)

    def test_automatic_caps_leave_headroom(self):
        self.assertEqual(auto_max_connections(1024), 768)
        self.assertEqual(auto_max_connections(300), 44)  # at least 256 descriptors stay free
        self.assertEqual(auto_max_connections(1 << 20), AUTO_MAX_CONNECTIONS)
        auto = {"max_connections": 0, "max_connections_per_address": 0}
        self.assertEqual(connection_caps(auto, 1024), (768, 384))
        given = {"max_connections": 100, "max_connections_per_address": 500}
        self.assertEqual(connection_caps(given, 1024), (100, 100))

    def test_daemon_uses_the_settings(self):
        """makeService: the caps reach the factory, the backlog the endpoint (unless it has one)."""
        for port, backlog in (
            ("tcp:9123:interface=127.0.0.1", 77),
            ("tcp:9123:interface=127.0.0.1:backlog=5", 5),
        ):
            memory = MemoryReactor()
            options = Options()
            options.parseOptions(
                ["--port", port, "--home", self.mktemp(), "--no-auth", "--listen-backlog", "77"]
                + ["--max-connections", "40", "--max-connections-per-address", "8"]
            )
            makeService(options, reactor=memory, runtime=FakeRuntime()).privilegedStartService()
            _, factory, listened_backlog, _ = memory.tcpServers[0]
            self.assertEqual(listened_backlog, backlog)
            counter = factory.connections
            self.assertEqual((counter.max_connections, counter.max_per_address), (40, 8))


class BackpressureTests(unittest.TestCase):
    def make_executor(self):
        return DevExecutor()

    async def test_awaited_send_waits_for_a_slow_reader_instead_of_losing_it(self):
        """An instance sends twice max_outbound to a client that does not read: nothing lost.

        Socket buffers are made small so that the daemon's own queue fills; the
        instance then parks in `await send()` and the connection stays up. Once
        the client reads, it gets every message, in order.
        """
        max_outbound, size = 512 * 1024, 16 * 1024
        count = 2 * max_outbound // size
        runtime = Runtime(os.path.abspath(self.mktemp()), {}, self.make_executor(), reactor=reactor)
        runtime.startService()
        self.addCleanup(lambda: runtime.stopService() if runtime.running else None)
        server = await LiveServer(
            self, runtime=runtime, max_outbound=max_outbound, max_message_size=1024 * 1024
        ).start()
        client = await server.connect()
        session = next(iter(server.factory.sessions))
        for sock, option in (
            (client.transport.socket, SO_RCVBUF),
            (session.transport.socket, SO_SNDBUF),
        ):
            sock.setsockopt(SOL_SOCKET, option, 16 * 1024)
        self.assertTrue((await upload(client, STREAM))["successful"])
        client.transport.pauseProducing()  # the client stops reading
        client.send(
            {
                "type": "launch_instance",
                "corr_id": 5,
                "program_hash": hash_program(STREAM),
                "arguments": [str(count), str(size)],
            }
        )
        await when(lambda: session._drain_waiters)  # the instance waits in send()
        queued = session._backlog_bytes
        self.assertGreaterEqual(queued, server.factory.outbound_high_water)
        self.assertLess(queued, max_outbound)
        self.assertIn(session, server.factory.sessions)

        client.transport.resumeProducing()
        self.assertTrue((await client.next())["successful"])  # the launch response
        numbers = []
        while True:
            event = await client.next()
            self.assertEqual(event["type"], "instance_event", event)
            if event["event"] != "message" or event["message"] == "done":
                break
            self.assertEqual(len(event["message"]), size)
            numbers.append(int(event["message"][:8]))
        self.assertEqual(numbers, list(range(count)))
        self.assertEqual((await client.next())["event"], "terminated")


class SandboxedBackpressureTests(BackpressureTests):
    """The same through the wasm sandbox: the SDK's awaitable and the WIT's outbound-drained."""

    @classmethod
    def setUpClass(cls):
        build.build()  # cached; outside the test's timeout when the guest sources changed

    def make_executor(self):
        return WasmExecutor()

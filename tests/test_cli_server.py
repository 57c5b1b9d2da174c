"""`pie run --server PORT PROGRAM` (issue 12 point 4): a real runtime behind the real protocol
server, the bundled http_server inferlet, real loopback HTTP; Ctrl-C as the process gets it."""

from __future__ import annotations

import io
import os
import socket

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest
from twisted.web.client import Agent, readBody

from pie import cli
from pie.client import RequestFailed
from pie.runtime.executors.dev import DevExecutor
from tests.pieserver import LiveServer, spawn_module
from tests.rawhttp import until
from tests.runtime_doubles import FakeModelService, make_runtime

HTTP_SERVER = os.path.join(os.path.dirname(__file__), os.pardir, "inferlets", "http_server.py")
GREETING = b"Hello from a pie server instance!"


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick for a socket closed at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def get(url: str) -> tuple[int, bytes]:
    response = await Agent(reactor).request(b"GET", url.encode())
    return response.code, await readBody(response)


class ServeTests(unittest.TestCase):
    async def daemon(self) -> LiveServer:
        self.runtime = make_runtime(
            self,
            home=os.path.abspath(self.mktemp()),
            executor=DevExecutor(),
            services={"fake": FakeModelService()},
        )
        return await LiveServer(self, runtime=self.runtime).start()

    async def test_serves_until_interrupted_then_stops_the_server(self):
        server = await self.daemon()
        port = free_port()
        args = cli.parse_args(
            [
                "run",
                "--server",
                str(port),
                HTTP_SERVER,
                "--url",
                f"ws://127.0.0.1:{server.port_number}",
                "--",
                "--flag",
            ]
        )
        out, err = io.StringIO(), io.StringIO()
        interrupted: Deferred = Deferred()
        running = Deferred.fromCoroutine(cli.run_program(args, reactor, out, err, interrupted))
        await until(lambda: out.getvalue() or running.called, "the URL")
        url = f"http://127.0.0.1:{port}/"
        self.assertEqual(out.getvalue(), url + "\n")
        self.assertEqual(await get(url), (200, GREETING))
        [served] = self.runtime.servers.values()
        self.assertEqual(served.arguments, ["--flag"])
        self.assertEqual(await get(url + "nowhere"), (404, b"no route /nowhere"))
        self.assertEqual(
            await get(url + "events?n=2"),
            (200, b'data: {"event": 0}\n\ndata: {"event": 1}\n\ndata: [DONE]\n\n'),
        )
        interrupted.callback(None)  # what Ctrl-C does
        self.assertEqual(await running, 0)
        self.assertIn("terminated:", err.getvalue())
        self.assertEqual(self.runtime.servers, {})
        with self.assertRaises(ConnectionRefusedError):
            await get(url)

    async def test_a_port_in_use_is_refused(self):
        server = await self.daemon()
        taken = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(Protocol)
        )
        self.addCleanup(taken.stopListening)
        port = taken.getHost().port
        args = cli.parse_args(
            [
                "run",
                "--server",
                str(port),
                HTTP_SERVER,
                "--url",
                f"ws://127.0.0.1:{server.port_number}",
            ]
        )
        with self.assertRaises(RequestFailed) as refused:  # `pie run` prints it, status 2
            await cli.run_program(args, reactor, io.StringIO(), io.StringIO(), Deferred())
        self.assertIn(f"cannot serve on 127.0.0.1:{port}", str(refused.exception))

    def test_port_must_be_given_and_valid(self):
        for bad in ("0", "70000", "http"):
            with self.assertRaises(SystemExit):
                cli.parse_args(["run", "--server", bad, HTTP_SERVER])

    @pytest.mark.slow
    async def test_the_console_command_stops_cleanly_on_ctrl_c(self):
        server = await self.daemon()
        port = free_port()
        home = os.path.abspath(self.mktemp())
        child, process = spawn_module(
            "pie.cli",
            "run",
            "--server",
            str(port),
            HTTP_SERVER,
            "--url",
            f"ws://127.0.0.1:{server.port_number}",
            "--home",
            home,
        )
        await child.when_output(rb"http://127\.0\.0\.1:\d+/\n")
        self.assertEqual(await get(f"http://127.0.0.1:{port}/"), (200, GREETING))
        process.signalProcess("INT")
        status = await child.ended
        self.assertEqual(status, 0, child.output.decode())
        self.assertIn(b"terminated:", child.output)
        self.assertEqual(self.runtime.servers, {})
        with self.assertRaises(ConnectionRefusedError):
            await get(f"http://127.0.0.1:{port}/")

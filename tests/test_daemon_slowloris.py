"""Slowloris against an HTTP server instance of a real daemon (issue 17 point 5).

1,100 slow connections (a partial request head, then nothing) used up the
daemon's 1,024 descriptors: a legitimate HTTP request got no answer and new
WebSocket clients could not connect. Here the daemon starts with the soft
limit of 1,024 the issue saw (it raises its own), 1,100 slow connections are
held, and while they are a legitimate request is answered and a new client
connects, authenticates and runs a program; then the header timeout closes
every slow one.
"""

from __future__ import annotations

import os
import re
import resource
import socket
import time

import pytest
import treq
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.trial import unittest

from pie.server.connections import auto_server_instance_connections
from pie.server.uploads import hash_program
from tests import rawhttp
from tests.pied import Daemon
from tests.pieserver import token
from tests.protocol_helpers import launch, upload
from tests.test_daemon_hostile import ECHO, events_of

pytestmark = pytest.mark.slow

SLOW = 1_100
HEADER_TIMEOUT_MS = 6_000  # longer than opening 1,100 connections takes on 2 loaded cores
ISSUE_SOFT_LIMIT = 1_024
OWN_DESCRIPTORS = SLOW + 400  # the test's slow sockets, its clients, pytest's own files

SERVER = b"""
from pie.inferlet.server import http_main


async def handle(request):
    return "hello " + request.path


main = http_main(handle)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class SlowlorisDaemonTests(unittest.TestCase):
    timeout = 240  # a first run may build the sandbox runtime (pinned_artifact)

    def setUp(self):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < OWN_DESCRIPTORS:
            raise unittest.SkipTest(f"the descriptor hard limit {hard} is below {OWN_DESCRIPTORS}")
        self.limits = (soft, hard)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, self.limits)

    async def start_daemon(self) -> Daemon:
        """The daemon starts with the issue's soft limit of 1,024; the test then raises its own."""
        soft, hard = self.limits
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(ISSUE_SOFT_LIMIT, hard), hard))
        try:  # the child is spawned before start() first waits
            starting = ensureDeferred(
                Daemon(self).start(
                    "--inferlet-server-header-timeout-ms", str(HEADER_TIMEOUT_MS), auth=True
                )
            )
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, OWN_DESCRIPTORS), hard))
        return await starting

    async def serve(self, daemon: Daemon) -> int:
        """An HTTP server instance of SERVER, launched by its own authenticated client."""
        owner = await daemon.connect()
        reply = await owner.request({"type": "authenticate", "corr_id": 1, "token": token()})
        self.assertTrue(reply["successful"], reply)
        self.assertTrue((await upload(owner, SERVER, corr_id=2))["successful"])
        port = free_port()
        reply = await owner.request(
            {
                "type": "launch_server_instance",
                "corr_id": 3,
                "port": port,
                "program_hash": hash_program(SERVER),
                "arguments": [],
            }
        )
        self.assertTrue(reply["successful"], reply)
        return port

    async def open_slow(self, port: int) -> list[rawhttp.RawHttp]:
        """SLOW connections, each with a request head that never ends (in batches: backlog 100)."""
        slow: list[rawhttp.RawHttp] = []
        while len(slow) < SLOW:
            batch = await gatherResults(
                [ensureDeferred(rawhttp.connect(port)) for _ in range(min(100, SLOW - len(slow)))]
            )
            for connection in batch:
                connection.send(b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                self.addCleanup(connection.transport.abortConnection)
            slow.extend(batch)
        return slow

    async def test_slow_connections_starve_neither_http_nor_websocket_clients(self):
        daemon = await self.start_daemon()
        raised = rb"file descriptor limit raised from 1024 to (\d+)"
        fd_limit = int(re.search(raised, daemon.child.output).group(1))
        caps = auto_server_instance_connections(fd_limit)
        self.assertIn(
            b"server instance connections: at most %d, %d per address" % (caps, caps),
            daemon.child.output,
        )
        self.assertGreater(caps, SLOW)  # else the cap, not the timeout, would refuse some
        port = await self.serve(daemon)
        baseline = open_descriptors(daemon.process.pid)

        slow = await self.open_slow(port)
        opened = time.monotonic()
        await rawhttp.until(
            lambda: open_descriptors(daemon.process.pid) >= baseline + SLOW,
            "the daemon to accept every slow connection",
        )

        response = await treq.get(f"http://127.0.0.1:{port}/legit", timeout=10, persistent=False)
        self.assertEqual((response.code, await response.text()), (200, "hello /legit"))

        client = await daemon.connect()
        reply = await client.request({"type": "authenticate", "corr_id": 5, "token": token()})
        self.assertTrue(reply["successful"], reply)
        self.assertTrue((await upload(client, ECHO, corr_id=6))["successful"])
        echo = await launch(client, hash_program(ECHO), ["1"], corr_id=7)
        client.send({"type": "signal_instance", "instance_id": echo, "message": "hi"})
        self.assertEqual(
            await events_of(client, echo, 3),
            [
                ("message", "echo hi"),
                ("message", "echo done"),
                ("terminated", "instance normally finished"),
            ],
        )
        served = time.monotonic()
        self.assertEqual([c for c in slow if c.closed.called], [], "a slow one closed early")
        self.assertLess(served - opened, HEADER_TIMEOUT_MS / 1000, "served after the timeout")

        await gatherResults([c.closed for c in slow])  # the header timeout closes every one
        for connection in slow:
            self.assertIn(b"HTTP/1.1 408 ", connection.received)
            self.assertIn(b"request head not received within 6000 ms", connection.received)
        await rawhttp.until(
            lambda: open_descriptors(daemon.process.pid) < baseline + 10,
            "the daemon to close the slow connections' descriptors",
        )

"""Refusals around authentication: non-numeric `exp`, failure rate per address, bad worker tokens."""

from __future__ import annotations

import contextlib
import io
import os
import time
from unittest import mock

import jwt
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.trial import unittest

from pie.interfaces import PieError
from pie.remote import wire, worker
from pie.server.auth import AuthError, validate_token
from tests import rawclient
from tests.pieserver import SECRET, LiveServer, token
from tests.runtime_doubles import make_runtime


class ExpTests(unittest.SynchronousTestCase):
    def test_string_exp_is_refused(self):
        """PyJWT takes "exp": "9999999999" through int(); a NumericDate must be a number."""
        bad = jwt.encode({"sub": "x", "exp": str(int(time.time()) + 3600)}, SECRET)
        error = self.assertRaises(AuthError, validate_token, SECRET, bad)
        self.assertIn("'exp' claim must be a number", str(error))
        bad = jwt.encode({"sub": "x", "exp": "soon"}, SECRET)
        error = self.assertRaises(AuthError, validate_token, SECRET, bad)
        self.assertIn("must be an integer", str(error))

    def test_numeric_exp_still_passes(self):
        for exp in (int(time.time()) + 3600, time.time() + 3600.5):
            good = jwt.encode({"sub": "x", "exp": exp}, SECRET, algorithm="HS256")
            self.assertEqual(validate_token(SECRET, good).subject, "x")


async def connect_from(port: int, source: str) -> rawclient.RawClient:
    """A raw client whose socket is bound to the loopback address `source` (e.g. 127.0.0.2)."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0))
    client = await connectProtocol(endpoint, rawclient.RawClient())
    await client.opened
    return client


class FailureRateTests(unittest.TestCase):
    async def test_failures_are_limited_per_address_until_the_window_passes(self):
        clock = Clock()
        server = await LiveServer(self, auth=True, auth_failures_per_minute=3, clock=clock).start()
        guesser = await server.connect()
        for corr_id in range(1, 4):
            clock.advance(5)
            reply = await guesser.request(
                {"type": "authenticate", "corr_id": corr_id, "token": "guess"}
            )
            self.assertIn("Invalid token", reply["result"])
        refused = await guesser.request(
            {"type": "authenticate", "corr_id": 4, "token": token()}
        )  # even a good token: the address is refused without looking at it
        self.assertFalse(refused["successful"])
        self.assertIn("too many failed authentications from 127.0.0.1: 3", refused["result"])
        self.assertIn("try again in 50 s", refused["result"])

        again = await server.connect()  # a new connection from the same address: still refused
        reply = await again.request({"type": "authenticate", "corr_id": 1, "token": token()})
        self.assertIn("too many failed authentications", reply["result"])

        neighbour = await connect_from(server.port_number, "127.0.0.2")
        server.clients.append(neighbour)
        reply = await neighbour.request({"type": "authenticate", "corr_id": 1, "token": token()})
        self.assertEqual((reply["successful"], reply["result"]), (True, "tester"))

        clock.advance(50)  # the first failure (t=5) leaves the window at t=65
        reply = await guesser.request({"type": "authenticate", "corr_id": 5, "token": token()})
        self.assertEqual((reply["successful"], reply["result"]), (True, "tester"))


class WorkerTokenFileTests(unittest.TestCase):
    def write(self, content: bytes) -> str:
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        with open(os.path.join(home, wire.WORKER_TOKEN_FILE), "wb") as f:
            f.write(content)
        return home

    def setUp(self):
        patcher = mock.patch.dict(os.environ)
        patcher.start()
        self.addCleanup(patcher.stop)
        os.environ.pop(wire.WORKER_TOKEN_ENV, None)

    def test_file_contents(self):
        self.assertEqual(wire.worker_token(self.write(b" abc\n")), b"abc")
        error = self.assertRaises(PieError, wire.worker_token, self.write(b"\xff\xfe\x00"))
        self.assertIn("is not UTF-8 text", str(error))
        error = self.assertRaises(PieError, wire.worker_token, self.write(b"\n \n"))
        self.assertIn("is empty", str(error))

    async def test_daemon_refuses_to_attach_with_a_bad_token_file(self):
        """attach_remote_service answers with the file's trouble, not UnicodeDecodeError."""
        home = self.write(b"\xc3\x28 not utf-8")
        runtime = make_runtime(self, home=home, services={})
        with self.assertRaises(PieError) as refused:
            await runtime.attach_remote_service("ws://127.0.0.1:9", "l4m", "w")
        self.assertIn(f"{wire.WORKER_TOKEN_FILE} is not UTF-8 text", str(refused.exception))

    def test_pie_worker_says_what_is_wrong_with_the_token_file(self):
        """`pie worker --token-file BAD` exits 2 with one line, before loading any model."""
        home = self.write(b"\x80\x81")
        path = os.path.join(home, wire.WORKER_TOKEN_FILE)
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            status = worker.run(["--token-file", path, "--model", "/no/such/model"])
        self.assertEqual(status, 2)
        self.assertIn(
            f"pie worker: the worker token file {path} is not UTF-8 text", stderr.getvalue()
        )

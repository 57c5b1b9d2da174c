"""pie.client under asyncio, in a child process (txaio allows one framework per process)."""

from __future__ import annotations

import os
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.trial import unittest

from tests.pieserver import LiveServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred = Deferred()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value.exitCode)


class AsyncioClientTests(unittest.TestCase):
    async def test_asyncio_client_round_trip(self):
        server = await LiveServer(self).start()
        child = _Collect()
        url = f"ws://127.0.0.1:{server.port_number}"
        reactor.spawnProcess(
            child,
            sys.executable,
            [sys.executable, "-m", "tests.aioclientchild", url],
            env=dict(os.environ, PYTHONPATH=ROOT),
            path=ROOT,
        )
        instance = await server.runtime.next_launch()
        self.assertEqual(instance.arguments, ["--n", "1"])
        instance.send("hello")
        while instance.inbox != ["hi back"]:  # the child answers the message with a signal
            await server.runtime.next_signal()
        instance.finish()
        self.assertEqual(await child.ended, 0, child.output)
        lines = child.output.decode().splitlines()
        self.assertEqual(
            lines,
            [
                "refused: Unknown query subject: 'weather' (known: program_exists, model_status)",
                "exists: True",
                "message: hello",
                "terminated: instance normally finished",
            ],
        )

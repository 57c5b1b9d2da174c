"""pie.client under asyncio, in a child process (txaio allows one framework per process)."""

from __future__ import annotations

import pytest
from twisted.trial import unittest

from tests.pieserver import LiveServer, spawn_module

pytestmark = pytest.mark.slow


class AsyncioClientTests(unittest.TestCase):
    async def test_asyncio_client_round_trip(self):
        server = await LiveServer(self).start()
        child, _ = spawn_module("tests.aioclientchild", f"ws://127.0.0.1:{server.port_number}")
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
                "refused: Unknown query subject: 'weather' (known: program_exists, model_status, kv_exports, kv_unexport)",
                "exists: True",
                "message: hello",
                "terminated: instance normally finished",
            ],
        )

"""The daemon's protocol on the real runtime (pie.runtime.Runtime, dev executor, no model).

The other server tests use a runtime double; this one checks that the real
runtime and the protocol agree: program validation at upload, arguments,
signals, messages and the one terminated event, disconnects, and a restart
that finds the uploaded program in the runtime's own program store.
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.trial import unittest

from pie.client import RequestFailed
from pie.client.tx import connect
from pie.runtime.executors.dev import DevExecutor
from pie.runtime.runtime import Runtime
from pie.server.uploads import hash_program
from tests.pieserver import LiveServer

ECHO = b"""
from pie.inferlet import receive, send

async def main(args):
    send("hi " + " ".join(args))
    send("got " + await receive())
    return "done"
"""


class RealRuntimeTests(unittest.TestCase):
    async def daemon(self, home: str):
        runtime = Runtime(home, {}, DevExecutor(), reactor=reactor)
        runtime.startService()
        self.addCleanup(lambda: runtime.stopService() if runtime.running else None)
        server = await LiveServer(self, runtime=runtime).start()
        client = await connect(f"ws://127.0.0.1:{server.port_number}")
        self.addCleanup(lambda: client.close() if client.state == client.STATE_OPEN else None)
        return runtime, client, server

    async def test_session_on_the_real_runtime(self):
        runtime, client, server = await self.daemon(os.path.abspath(self.mktemp()))
        with self.assertRaises(RequestFailed) as refused:
            await client.upload_program(b"def broken(:\n")
        self.assertIn("SyntaxError", str(refused.exception))
        instance = await client.launch_instance(await client.upload_program(ECHO), ["a", "b"])
        self.assertEqual(await instance.recv(), ("message", "hi a b"))
        instance.send("x")
        events = [event async for event in instance]
        self.assertEqual(
            events,
            [
                ("message", "got x"),
                ("message", "done"),
                ("terminated", "instance normally finished"),
            ],
        )

    async def test_disconnect_ends_the_instance(self):
        runtime, client, server = await self.daemon(os.path.abspath(self.mktemp()))
        instance = await client.launch_instance(await client.upload_program(ECHO))
        await instance.recv()  # running, parked in receive()
        self.assertIn(instance.instance_id, runtime.instances.running)
        session = next(iter(server.factory.sessions))
        await client.close()
        await session.closed
        self.assertNotIn(instance.instance_id, runtime.instances.running)

    async def test_restart_finds_the_program(self):
        home = os.path.abspath(self.mktemp())
        runtime, client, server = await self.daemon(home)
        program_hash = await client.upload_program(ECHO)
        await client.close()
        await runtime.stopService()

        runtime, client, server = await self.daemon(home)
        self.assertTrue(await client.program_exists(program_hash))
        self.assertEqual(program_hash, hash_program(ECHO))
        instance = await client.launch_instance(program_hash, ["again"])
        self.assertEqual(await instance.recv(), ("message", "hi again"))

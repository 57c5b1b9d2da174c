"""pie.client under Twisted, against a real loopback server with the runtime double."""

from __future__ import annotations

from twisted.trial import unittest

from pie.client import ConnectionClosed, RequestFailed
from pie.client.tx import connect
from pie.server.uploads import hash_program
from tests.pieserver import LiveServer, token
from tests.protocol_helpers import PROGRAM


class TwistedClientTests(unittest.TestCase):
    async def start(self, **kwargs):
        server = await LiveServer(self, **kwargs).start()
        client = await connect(f"ws://127.0.0.1:{server.port_number}")
        self.addCleanup(lambda: client.close() if client.state == client.STATE_OPEN else None)
        return server, client

    async def test_whole_protocol(self):
        server, client = await self.start(auth=True)
        with self.assertRaises(RequestFailed) as refused:
            await client.query("program_exists", "0" * 64)
        self.assertIn("Not authenticated", str(refused.exception))
        self.assertEqual(await client.authenticate(token("Admin", subject="carol")), "carol")

        data = PROGRAM * 20000  # ~600 KB: three chunks
        self.assertFalse(await client.program_exists(hash_program(data)))
        self.assertEqual(await client.upload_program(data), hash_program(data))
        self.assertTrue(await client.program_exists(hash_program(data)))
        self.assertEqual(await client.model_status(), server.runtime.status)

        started = server.runtime.next_launch()
        instance = await client.launch_instance(hash_program(data), ["a", "b"])
        fake = await started
        self.assertEqual((fake.instance_id, fake.arguments), (instance.instance_id, ["a", "b"]))
        instance.send("ping")
        await client.model_status()  # a round trip: the signal has been handled
        self.assertEqual(fake.inbox, ["ping"])
        fake.send("one")
        fake.send("two")
        self.assertEqual(await instance.recv(), ("message", "one"))
        instance.terminate()
        events = [event async for event in instance]
        self.assertEqual(
            events, [("message", "two"), ("terminated", "user terminated the program")]
        )

        server_instance = await client.launch_server_instance(hash_program(data), 8123)
        self.assertEqual(server.runtime.instances[server_instance.instance_id].server_port, 8123)
        self.assertEqual(await client.attach_remote_service("tcp://w:1", "l4m", "w"), "attached w")

    async def test_failures_and_server_events(self):
        server, client = await self.start()
        with self.assertRaises(RequestFailed) as unknown:
            await client.query("weather")
        self.assertIn("Unknown query subject", str(unknown.exception))
        with self.assertRaises(RequestFailed):
            await client.launch_instance("ab" * 32)
        client.signal_instance("3b241101-e2bb-4255-8caf-4136c566a962", "x")
        self.assertIn("no running instance", await client.server_events.get())

    async def test_events_right_after_the_launch_response_are_kept(self):
        server, client = await self.start()
        program_hash = await client.upload_program(PROGRAM)

        def quick(instance):
            instance.send("early")
            instance.finish()

        server.runtime.on_start = quick
        instance = await client.launch_instance(program_hash)
        events = [event async for event in instance]
        self.assertEqual(
            events, [("message", "early"), ("terminated", "instance normally finished")]
        )

    async def test_connection_loss_fails_waiters(self):
        server, client = await self.start()
        instance = await client.launch_instance(await client.upload_program(PROGRAM))
        waiting = instance.recv()
        await client.close()
        with self.assertRaises(ConnectionClosed):
            await waiting
        self.assertEqual(server.runtime.all_instances[0].ended, "socket terminated")

"""Clients cannot touch each other's instances, and one client's flood does not hurt another."""

from __future__ import annotations

from twisted.trial import unittest

from tests.pieserver import LiveServer
from tests.protocol_helpers import PING, PROGRAM, launch, upload


class OwnershipTests(unittest.TestCase):
    async def test_two_clients_cannot_touch_each_others_instances(self):
        server = await LiveServer(self).start()
        alice, bob = await server.connect(), await server.connect()
        digest = (await upload(alice, PROGRAM))["result"]
        alice_id = await launch(alice, digest)
        bob_id = await launch(bob, digest)
        instances = server.runtime.instances

        bob.send({"type": "signal_instance", "instance_id": alice_id, "message": "hijack"})
        bob.send({"type": "terminate_instance", "instance_id": alice_id})
        for kind in ("signal_instance", "terminate_instance"):
            event = await bob.next()
            self.assertEqual(event["type"], "server_event")
            self.assertIn(
                f"{kind}: no running instance {alice_id!r} owned by this connection",
                event["message"],
            )
        self.assertEqual(instances[alice_id].inbox, [])
        self.assertIsNone(instances[alice_id].ended)

        # each owner sees only its own instance's events
        instances[alice_id].send("for alice")
        instances[bob_id].send("for bob")
        self.assertEqual((await alice.next())["message"], "for alice")
        self.assertEqual((await bob.next())["message"], "for bob")

        # bob leaving ends bob's instance only
        bob_session = next(s for s in server.factory.sessions if bob_id in s.owned)
        bob_instance = instances[bob_id]
        bob.transport.loseConnection()
        await bob_session.closed
        self.assertIn(alice_id, instances)
        alice.send({"type": "terminate_instance", "instance_id": alice_id})
        self.assertEqual((await alice.next())["message"], "user terminated the program")
        self.assertEqual(bob_instance.ended, "socket terminated")


class FloodTests(unittest.TestCase):
    async def test_slow_reader_is_dropped_beyond_the_outbound_cap(self):
        """An instance flooding a client that does not read: that client is cut off, alone."""
        server = await LiveServer(self, max_outbound=2 * 1024 * 1024).start()
        bystander = await server.connect()
        slow = await server.connect()
        instance_id = await launch(slow, (await upload(slow, PROGRAM))["result"])
        slow.transport.pauseProducing()  # stop reading
        session = next(s for s in server.factory.sessions if instance_id in s.owned)
        instance = server.runtime.instances[instance_id]
        for _ in range(40):  # 4 MB of events, twice the cap
            instance.send("y" * 100_000)
        await session.closed
        self.assertEqual(instance.ended, "socket terminated")
        self.assertTrue((await bystander.request(PING))["successful"])
        slow.transport.resumeProducing()
        await slow.closed

    async def test_a_full_send_buffer_queues_in_order(self):
        """Below the cap, events that outrun the socket are queued and all arrive, in order."""
        server = await LiveServer(self).start()
        client = await server.connect()
        instance_id = await launch(client, (await upload(client, PROGRAM))["result"])
        instance = server.runtime.instances[instance_id]
        session = next(iter(server.factory.sessions))
        for n in range(30):
            instance.send(f"{n:03d}" + "z" * 100_000)
        self.assertTrue(session._write_paused, "the transport should have paused the session")
        self.assertTrue(session._reading_paused, "a paused writer also stops reading requests")
        received = [(await client.next())["message"][:3] for _ in range(30)]
        self.assertEqual(received, [f"{n:03d}" for n in range(30)])
        self.assertTrue((await client.request(PING))["successful"])
        self.assertFalse(session._reading_paused)

    async def test_request_flood_without_reading(self):
        """A client that floods requests and reads nothing does not delay another client;
        when it reads again it gets every answer, in order."""
        server = await LiveServer(self).start()
        flooder, other = await server.connect(), await server.connect()
        flooder.transport.pauseProducing()
        count = 3000
        for n in range(count):
            flooder.send(dict(PING, corr_id=n))
        for n in range(5):
            self.assertTrue((await other.request(dict(PING, corr_id=n)))["successful"])
        flooder.transport.resumeProducing()
        answers = [(await flooder.next())["corr_id"] for _ in range(count)]
        self.assertEqual(answers, list(range(count)))

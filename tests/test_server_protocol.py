"""Every client message type over a real loopback WebSocket, spoken with the raw client."""

from __future__ import annotations

import json

from twisted.trial import unittest

from pie.server.uploads import hash_program
from tests.pieserver import LiveServer
from tests.protocol_helpers import PROGRAM, launch, upload


class SessionTests(unittest.TestCase):
    async def test_typical_session(self):
        """The seed's typical session (spec §2.9) works message for message."""
        server = await LiveServer(self).start()
        client = await server.connect()
        digest = hash_program(PROGRAM)

        reply = await client.request(
            {"type": "query", "corr_id": 2, "subject": "program_exists", "record": digest}
        )
        self.assertEqual(
            reply, {"type": "response", "corr_id": 2, "successful": True, "result": "false"}
        )

        reply = await upload(client, PROGRAM, corr_id=3)
        self.assertEqual(
            reply, {"type": "response", "corr_id": 3, "successful": True, "result": digest}
        )
        reply = await client.request(
            {"type": "query", "corr_id": 4, "subject": "program_exists", "record": digest}
        )
        self.assertEqual(reply["result"], "true")

        started = server.runtime.next_launch()
        instance_id = await launch(client, digest, ["--prompt", "Hi"], corr_id=5)
        instance = await started
        self.assertEqual(
            (instance.instance_id, instance.arguments), (instance_id, ["--prompt", "Hi"])
        )
        self.assertIs(instance.owner, list(server.factory.sessions)[0])

        client.send({"type": "signal_instance", "instance_id": instance_id, "message": "hello"})
        await client.request(
            {"type": "query", "corr_id": 6, "subject": "model_status", "record": ""}
        )
        self.assertEqual(instance.inbox, ["hello"])
        instance.send("a reply")
        event = await client.next()
        self.assertEqual(
            event,
            {
                "type": "instance_event",
                "instance_id": instance_id,
                "event": "message",
                "message": "a reply",
            },
        )
        instance.finish()
        event = await client.next()
        self.assertEqual(
            (event["event"], event["message"]), ("terminated", "instance normally finished")
        )

    async def test_multi_chunk_upload(self):
        """A program of several 256 KiB chunks is assembled in order and stored whole."""
        server = await LiveServer(self).start()
        client = await server.connect()
        data = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes: 5 chunks
        reply = await upload(client, data)
        self.assertTrue(reply["successful"], reply)
        self.assertEqual(server.runtime.programs[hash_program(data)], data)

    async def test_model_status_is_json(self):
        server = await LiveServer(self).start()
        client = await server.connect()
        reply = await client.request(
            {"type": "query", "corr_id": 1, "subject": "model_status", "record": ""}
        )
        self.assertTrue(reply["successful"])
        self.assertEqual(json.loads(reply["result"]), server.runtime.status)

    async def test_unknown_query_subject_fails(self):
        """Pie 0.1.1 never answered an unknown subject; here it gets a failure response."""
        server = await LiveServer(self).start()
        client = await server.connect()
        reply = await client.request(
            {"type": "query", "corr_id": 7, "subject": "weather", "record": "x"}
        )
        self.assertFalse(reply["successful"])
        self.assertIn("Unknown query subject: 'weather'", reply["result"])

    async def test_terminate_instance(self):
        server = await LiveServer(self).start()
        client = await server.connect()
        digest = (await upload(client, PROGRAM))["result"]
        instance_id = await launch(client, digest)
        client.send({"type": "terminate_instance", "instance_id": instance_id})
        event = await client.next()
        self.assertEqual(
            event,
            {
                "type": "instance_event",
                "instance_id": instance_id,
                "event": "terminated",
                "message": "user terminated the program",
            },
        )
        self.assertEqual(server.runtime.instances, {})

    async def test_launch_unknown_program_fails(self):
        server = await LiveServer(self).start()
        client = await server.connect()
        reply = await client.request(
            {"type": "launch_instance", "corr_id": 1, "program_hash": "ab" * 32, "arguments": []}
        )
        self.assertEqual(reply["successful"], False)
        self.assertEqual(reply["result"], f"No such program with hash={'ab' * 32}")

    async def test_launch_server_instance(self):
        """launch_server_instance reaches IRuntime.launch_server; the server id is owned."""
        server = await LiveServer(self).start()
        client = await server.connect()
        digest = (await upload(client, PROGRAM))["result"]
        reply = await client.request(
            {
                "type": "launch_server_instance",
                "corr_id": 4,
                "port": 8089,
                "program_hash": digest,
                "arguments": ["-v"],
            }
        )
        self.assertTrue(reply["successful"], reply)
        instance = server.runtime.instances[reply["result"]]
        self.assertEqual((instance.server_port, instance.arguments), (8089, ["-v"]))
        reply = await client.request(
            {
                "type": "launch_server_instance",
                "corr_id": 5,
                "port": 70000,
                "program_hash": digest,
                "arguments": [],
            }
        )
        self.assertEqual(reply["result"], "port 70000 is not in 0..65535")

    async def test_attach_remote_service_without_auth(self):
        """With auth disabled attach_remote_service is allowed and reaches the runtime."""
        server = await LiveServer(self).start()
        client = await server.connect()
        frame = {
            "type": "attach_remote_service",
            "corr_id": 8,
            "endpoint": "tcp://127.0.0.1:9999",
            "service_type": "l4m",
            "service_name": "gpu1",
        }
        reply = await client.request(frame)
        self.assertEqual((reply["successful"], reply["result"]), (True, "attached gpu1"))
        self.assertEqual(server.runtime.attached, [("tcp://127.0.0.1:9999", "l4m", "gpu1")])
        reply = await client.request(dict(frame, corr_id=9, service_type="nope"))
        self.assertEqual(
            (reply["successful"], reply["result"]), (False, "Unknown service type: nope")
        )

    async def test_authenticate_without_auth(self):
        server = await LiveServer(self).start()
        client = await server.connect()
        reply = await client.request({"type": "authenticate", "corr_id": 1, "token": "whatever"})
        self.assertEqual((reply["successful"], reply["result"]), (True, "Already authenticated"))


class EventTests(unittest.TestCase):
    async def test_early_events_follow_the_launch_response(self):
        """An instance that sends and ends before launch answers loses nothing (seed race fixed)."""
        server = await LiveServer(self).start()
        client = await server.connect()
        digest = (await upload(client, PROGRAM))["result"]

        def quick(instance):
            instance.send("first")
            instance.finish()

        server.runtime.on_start = quick
        server.runtime.hold_launches = True
        client.send(
            {"type": "launch_instance", "corr_id": 5, "program_hash": digest, "arguments": []}
        )
        await server.runtime.next_launch()
        server.runtime.release_launches()
        reply, first, last = await client.next(), await client.next(), await client.next()
        self.assertEqual((reply["type"], reply["successful"]), ("response", True))
        instance_id = reply["result"]
        self.assertEqual(
            (first["instance_id"], first["event"], first["message"]),
            (instance_id, "message", "first"),
        )
        self.assertEqual(
            (last["event"], last["message"]), ("terminated", "instance normally finished")
        )

    async def test_exactly_one_terminated(self):
        """A runtime that reports an end twice still yields one terminated event."""
        server = await LiveServer(self).start()
        client = await server.connect()
        digest = (await upload(client, PROGRAM))["result"]
        instance_id = await launch(client, digest)
        session = list(server.factory.sessions)[0]
        session.instance_terminated(instance_id, "first end")
        session.instance_terminated(instance_id, "second end")
        session.instance_message(instance_id, "late message")
        client.send({"type": "query", "corr_id": 50, "subject": "model_status", "record": ""})
        event, reply = await client.next(), await client.next()
        self.assertEqual((event["event"], event["message"]), ("terminated", "first end"))
        self.assertEqual(reply["corr_id"], 50)
        self.assertEqual(client.messages.pending, [])

    async def test_disconnect_terminates_owned_instances(self):
        server = await LiveServer(self).start()
        client = await server.connect()
        digest = (await upload(client, PROGRAM))["result"]
        ids = [await launch(client, digest, corr_id=n) for n in (1, 2)]
        instances = {i.instance_id: i for i in server.runtime.all_instances}
        session = list(server.factory.sessions)[0]
        client.transport.loseConnection()
        await session.closed
        self.assertEqual({instances[i].ended for i in ids}, {"socket terminated"})
        self.assertEqual(server.runtime.instances, {})

    async def test_disconnect_while_launching(self):
        """An instance whose launch completes after its client left is terminated at once."""
        server = await LiveServer(self).start()
        client = await server.connect()
        digest = (await upload(client, PROGRAM))["result"]
        server.runtime.hold_launches = True
        client.send(
            {"type": "launch_instance", "corr_id": 5, "program_hash": digest, "arguments": []}
        )
        instance = await server.runtime.next_launch()
        session = list(server.factory.sessions)[0]
        client.transport.loseConnection()
        await session.closed
        self.assertIsNone(instance.ended)
        server.runtime.release_launches()
        self.assertEqual(instance.ended, "socket terminated")

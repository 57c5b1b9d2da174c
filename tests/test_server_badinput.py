"""Bad input never hurts: each defect gets a clear answer and the session stays usable."""

from __future__ import annotations

import msgpack
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial import unittest

from pie.server.uploads import hash_program
from tests.pieserver import LiveServer
from tests.protocol_helpers import PING, PROGRAM, launch, upload


class _Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object = None) -> None:
        self.done.callback(self.data)


class MalformedFrameTests(unittest.TestCase):
    async def assertAnswer(self, client, expected_type: str, text: str, corr_id=None):
        """The next message answers the bad frame; then a normal request still works."""
        reply = await client.next()
        self.assertEqual(reply["type"], expected_type, reply)
        body = reply["result"] if expected_type == "response" else reply["message"]
        self.assertIn(text, body)
        if corr_id is not None:
            self.assertEqual((reply["corr_id"], reply["successful"]), (corr_id, False))
        self.assertTrue((await client.request(PING))["successful"])

    async def test_each_defect_is_answered(self):
        server = await LiveServer(self).start()
        client = await server.connect()
        cases = [
            (b"\xc1\xff", "server_event", "malformed msgpack", None),
            (msgpack.packb([1, 2, 3]), "server_event", "must be a msgpack map, got list", None),
            (msgpack.packb({"corr_id": 4}), "response", "missing or non-string 'type'", 4),
            (
                msgpack.packb({"type": "fly", "corr_id": 5}),
                "response",
                "unknown message type 'fly'",
                5,
            ),
            (msgpack.packb({"type": "fly"}), "server_event", "unknown message type 'fly'", None),
            (
                msgpack.packb({"type": "query", "corr_id": 6, "subject": "x"}),
                "response",
                "query: missing field 'record'",
                6,
            ),
            (
                msgpack.packb({"type": "query", "corr_id": "7", "subject": "x", "record": "y"}),
                "server_event",
                "field 'corr_id' must be an integer",
                None,
            ),
            (
                msgpack.packb({"type": "query", "corr_id": 2**32, "subject": "x", "record": "y"}),
                "server_event",
                "corr_id",
                None,
            ),
            (
                msgpack.packb({"type": "query", "corr_id": True, "subject": "x", "record": "y"}),
                "server_event",
                "corr_id",
                None,
            ),
            (
                msgpack.packb(
                    {
                        "type": "launch_instance",
                        "corr_id": 8,
                        "program_hash": "a" * 64,
                        "arguments": ["ok", 3],
                    }
                ),
                "response",
                "'arguments' must be an array of strings",
                8,
            ),
            (
                msgpack.packb({"type": "signal_instance", "instance_id": 12, "message": "m"}),
                "server_event",
                "field 'instance_id' must be a string",
                None,
            ),
            (
                msgpack.packb(
                    {
                        "type": "upload_program",
                        "corr_id": 9,
                        "program_hash": "a",
                        "chunk_index": -1,
                        "total_chunks": 1,
                        "chunk_data": b"",
                    }
                ),
                "response",
                "'chunk_index' must be a non-negative integer",
                9,
            ),
            (
                msgpack.packb(
                    {
                        "type": "upload_program",
                        "corr_id": 10,
                        "program_hash": "a",
                        "chunk_index": 0,
                        "total_chunks": 1,
                        "chunk_data": "text",
                    }
                ),
                "response",
                "'chunk_data' must be binary data",
                10,
            ),
            (
                msgpack.packb(
                    {
                        "type": "query",
                        "corr_id": 11,
                        "subject": "program_exists",
                        "record": "../../etc/passwd",
                    }
                ),
                "response",
                "invalid program hash",
                11,
            ),
            (
                msgpack.packb(
                    {
                        "type": "launch_instance",
                        "corr_id": 12,
                        "program_hash": "zz",
                        "arguments": [],
                    }
                ),
                "response",
                "invalid program hash",
                12,
            ),
        ]
        for payload, kind, text, corr_id in cases:
            client.send_bytes(payload)
            await self.assertAnswer(client, kind, text, corr_id)

    async def test_text_frame(self):
        server = await LiveServer(self).start()
        client = await server.connect()
        client.send_text('{"type": "query"}')
        await self.assertAnswer(client, "server_event", "text frames are not supported")

    async def test_extra_keys_and_byte_arrays_are_accepted(self):
        """Like the seed: unknown keys are ignored and chunk_data may be an array of ints."""
        server = await LiveServer(self).start()
        client = await server.connect()
        client.send(
            {
                "type": "upload_program",
                "corr_id": 1,
                "program_hash": hash_program(PROGRAM),
                "chunk_index": 0,
                "total_chunks": 1,
                "chunk_data": list(PROGRAM),
                "note": "extra",
            }
        )
        reply = await client.next()
        self.assertEqual((reply["successful"], reply["result"]), (True, hash_program(PROGRAM)))

    async def test_oversized_message_closes_only_that_session(self):
        """Over max_message_size autobahn closes with 1009; other clients do not notice."""
        server = await LiveServer(self, max_message_size=400 * 1024).start()
        bystander = await server.connect()
        offender = await server.connect()
        offender.send_bytes(b"\x00" * (500 * 1024))
        self.assertEqual(await offender.closed, 1009)
        self.assertTrue((await bystander.request(PING))["successful"])

    async def test_non_websocket_traffic_is_turned_away(self):
        """Plain HTTP or garbage on the port gets an HTTP error and a close; nothing else notices."""
        server = await LiveServer(self).start()
        bystander = await server.connect()
        for request in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01garbage\r\n\r\n"):
            peer = await connectProtocol(
                TCP4ClientEndpoint(reactor, "127.0.0.1", server.port_number), _Collect()
            )
            peer.transport.write(request)
            answer = await peer.done
            self.assertTrue(answer.startswith(b"HTTP/1.1 4"), answer[:80])
        self.assertTrue((await bystander.request(PING))["successful"])

    async def test_foreign_and_unknown_ids_get_server_events(self):
        server = await LiveServer(self).start()
        client = await server.connect()
        for frame in (
            {
                "type": "signal_instance",
                "instance_id": "3b241101-e2bb-4255-8caf-4136c566a962",
                "message": "m",
            },
            {"type": "terminate_instance", "instance_id": "not-a-uuid"},
        ):
            client.send(frame)
            event = await client.next()
            self.assertEqual(event["type"], "server_event")
            self.assertIn(
                f"no running instance {frame['instance_id']!r} owned by this connection",
                event["message"],
            )
            self.assertIn(frame["type"], event["message"])

    async def test_runtime_errors_on_signal_are_reported(self):
        server = await LiveServer(self).start()
        client = await server.connect()
        instance_id = await launch(client, (await upload(client, PROGRAM))["result"])
        client.send({"type": "signal_instance", "instance_id": instance_id, "message": "overflow"})
        event = await client.next()
        self.assertEqual(
            event, {"type": "server_event", "message": "signal_instance failed: inbox full"}
        )

    async def test_internal_errors_answer_and_do_not_kill_the_session(self):
        server = await LiveServer(self).start()

        def broken():
            raise RuntimeError("boom")

        server.runtime.model_status = broken
        client = await server.connect()
        reply = await client.request(
            {"type": "query", "corr_id": 3, "subject": "model_status", "record": ""}
        )
        self.assertEqual(
            reply["result"], "internal server error (RuntimeError); see the daemon log"
        )
        self.assertTrue((await client.request(PING))["successful"])
        self.flushLoggedErrors(RuntimeError)

    async def test_oversized_instance_message_becomes_server_event(self):
        server = await LiveServer(self, max_message_size=400 * 1024).start()
        client = await server.connect()
        instance_id = await launch(client, (await upload(client, PROGRAM))["result"])
        server.runtime.instances[instance_id].send("x" * (500 * 1024))
        event = await client.next()
        self.assertEqual(event["type"], "server_event")
        self.assertIn(f"instance {instance_id}: message of", event["message"])
        self.assertIn("over the message size limit 409600", event["message"])

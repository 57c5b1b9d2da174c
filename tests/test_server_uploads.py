"""Upload validation: size, order, consistent totals, hash, limit; one failure, nothing kept."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest

from pie.server.uploads import (
    CHUNK_SIZE_BYTES,
    UploadAssembler,
    UploadBudget,
    UploadError,
    hash_program,
)
from tests.pieserver import LiveServer
from tests.protocol_helpers import PROGRAM, upload_frames

BIG = bytes(range(256)) * 2048 + b"!"  # 512 KiB + 1: three chunks
H = hash_program(BIG)


def chunks(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK_SIZE_BYTES] for i in range(0, len(data), CHUNK_SIZE_BYTES)]


class AssemblerTests(unittest.SynchronousTestCase):
    def feed(self, assembler, items):
        result = None
        for corr_id, digest, index, total, data in items:
            result = assembler.add_chunk(corr_id, digest, index, total, data)
        return result

    def refused(self, items, text, assembler=None):
        assembler = assembler or UploadAssembler()
        error = self.assertRaises(UploadError, self.feed, assembler, items)
        self.assertIn(text, str(error))
        self.assertIsNone(assembler.current)
        return assembler

    def test_in_order_upload(self):
        parts = chunks(BIG)
        items = [(1, H.upper(), i, len(parts), c) for i, c in enumerate(parts)]
        self.assertEqual(self.feed(UploadAssembler(), items), BIG)

    def test_violations(self):
        a, b, c = chunks(BIG)
        self.refused([(1, H, 0, 3, a), (1, H, 2, 3, c)], "out-of-order chunk: expected 1, got 2")
        self.refused([(1, H, 1, 3, b)], "expected chunk 0 to start an upload, got 1")
        self.refused([(1, H, 0, 3, a), (1, H, 1, 4, b)], "mismatch in total_chunks: was 3, now 4")
        self.refused(
            [(1, H, 0, 3, a), (1, "f" * 64, 1, 3, b)], "program_hash changed during upload"
        )
        self.refused([(1, H, 0, 1, a + b"x")], f"chunk size {CHUNK_SIZE_BYTES + 1} exceeds limit")
        self.refused([(1, H, 0, 0, b"")], "total_chunks must be at least 1")
        self.refused([(1, "xyz", 0, 1, b"")], "invalid program hash")
        self.refused(
            [(1, H, 0, 3, a), (1, H, 1, 3, b), (1, H, 2, 3, c + b"?")],
            f"hash mismatch: expected {H}, got",
        )

    def test_size_limit(self):
        a, b, c = chunks(BIG)
        small = UploadAssembler(max_program_size=CHUNK_SIZE_BYTES + 10)
        self.refused([(1, H, 0, 3, a)], "would exceed the program size limit", small)
        self.refused(
            [(1, H, 0, 2, a), (1, H, 1, 2, b)],
            f"program exceeds the size limit of {CHUNK_SIZE_BYTES + 10}",
            small,
        )

    def test_leftover_chunks_of_a_refused_upload_are_recognised(self):
        a, b, c = chunks(BIG)
        assembler = self.refused([(7, H, 0, 3, a), (7, H, 1, 4, b)], "mismatch")
        self.assertTrue(assembler.is_leftover(7, H, 2))
        self.assertFalse(assembler.is_leftover(8, H, 2))
        self.assertFalse(assembler.is_leftover(7, H, 0))

    def test_budget_is_shared_and_given_back(self):
        """Unfinished uploads on all connections together stay within upload_bytes_in_flight."""
        a, b, c = chunks(BIG)
        budget = UploadBudget(limit=3 * CHUNK_SIZE_BYTES)
        first, second = UploadAssembler(budget=budget), UploadAssembler(budget=budget)
        self.assertIsNone(first.add_chunk(1, H, 0, 3, a))
        self.assertIsNone(second.add_chunk(2, H, 0, 3, a))
        self.assertIsNone(second.add_chunk(2, H, 1, 3, b))
        self.assertEqual(budget.held, 3 * CHUNK_SIZE_BYTES)
        error = self.assertRaises(UploadError, first.add_chunk, 1, H, 1, 3, b)
        self.assertIn("upload_bytes_in_flight", str(error))
        self.assertEqual(budget.held, 2 * CHUNK_SIZE_BYTES)  # first's upload was dropped
        second.abandon()
        self.assertEqual(budget.held, 0)
        self.assertEqual(self.feed(first, [(3, H, i, 3, p) for i, p in enumerate((a, b, c))]), BIG)
        self.assertEqual(budget.held, 0)  # a finished upload holds nothing

    def test_superseded_upload_gives_its_bytes_back(self):
        a, b, c = chunks(BIG)
        budget = UploadBudget()
        assembler = UploadAssembler(budget=budget)
        assembler.add_chunk(1, H, 0, 3, a)
        assembler.add_chunk(2, H, 0, 3, a)
        self.assertEqual(budget.held, CHUNK_SIZE_BYTES)


class WireTests(unittest.TestCase):
    async def test_one_failure_response_and_nothing_stored(self):
        """Out-of-order chunks: exactly one failure; later chunks are ignored; session usable."""
        server = await LiveServer(self).start()
        client = await server.connect()
        frames = upload_frames(BIG, corr_id=4)
        for frame in [frames[0], frames[2], frames[1]]:
            client.send(frame)
        reply = await client.next()
        self.assertEqual((reply["corr_id"], reply["successful"]), (4, False))
        self.assertEqual(reply["result"], "out-of-order chunk: expected 1, got 2")
        ok = await client.request(
            {"type": "query", "corr_id": 5, "subject": "program_exists", "record": H}
        )
        self.assertEqual(ok["result"], "false")
        self.assertEqual(server.runtime.programs, {})
        self.assertEqual(await self.upload(client, BIG, 6), (True, H))

    async def upload(self, client, data, corr_id):
        for frame in upload_frames(data, corr_id):
            client.send(frame)
        reply = await client.next()
        self.assertEqual(reply["corr_id"], corr_id)
        return reply["successful"], reply["result"]

    async def test_size_limit_on_the_wire(self):
        server = await LiveServer(self, max_program_size=1000).start()
        client = await server.connect()
        self.assertEqual(
            await self.upload(client, b"x" * 1001, 1),
            (False, "program exceeds the size limit of 1000 bytes"),
        )
        self.assertEqual(await self.upload(client, PROGRAM, 2), (True, hash_program(PROGRAM)))

    async def test_runtime_refusal_is_reported(self):
        """A program the runtime rejects (e.g. a syntax error) is not reported as uploaded."""
        server = await LiveServer(self).start()
        client = await server.connect()
        self.assertEqual(
            await self.upload(client, b"invalid python", 1),
            (False, "program does not compile: invalid syntax"),
        )

    async def test_new_upload_supersedes_an_unfinished_one(self):
        """Both corr_ids get an answer: the abandoned one a failure, the new one its hash."""
        server = await LiveServer(self).start()
        client = await server.connect()
        client.send(upload_frames(BIG, corr_id=1)[0])
        for frame in upload_frames(PROGRAM, corr_id=2):
            client.send(frame)
        first, second = await client.next(), await client.next()
        self.assertEqual((first["corr_id"], first["successful"]), (1, False))
        self.assertIn("abandoned", first["result"])
        self.assertEqual((second["corr_id"], second["result"]), (2, hash_program(PROGRAM)))

    async def test_idle_upload_is_dropped_and_answered(self):
        """No chunk for upload_idle_timeout_s: the upload fails once and its bytes come back."""
        clock = Clock()
        server = await LiveServer(self, clock=clock, upload_idle_timeout_s=30).start()
        client = await server.connect()
        frames = upload_frames(BIG, corr_id=8)
        client.send(frames[0])
        ok = await client.request(
            {"type": "query", "corr_id": 9, "subject": "program_exists", "record": H}
        )  # answered after chunk 0 was taken in order
        self.assertEqual(ok["result"], "false")
        budget = server.factory.upload_budget
        self.assertEqual(budget.held, CHUNK_SIZE_BYTES)
        clock.advance(29)
        client.send(frames[1])  # a chunk restarts the timer
        await client.request(
            {"type": "query", "corr_id": 10, "subject": "program_exists", "record": H}
        )
        clock.advance(29)
        self.assertEqual(budget.held, 2 * CHUNK_SIZE_BYTES)
        clock.advance(1)
        reply = await client.next()
        self.assertEqual((reply["corr_id"], reply["successful"]), (8, False))
        self.assertEqual(
            reply["result"], "upload abandoned: no chunk for 30 s (upload_idle_timeout_s)"
        )
        self.assertEqual(budget.held, 0)
        client.send(frames[2])  # the rest of the dropped upload is ignored, not answered again
        self.assertEqual(await self.upload(client, PROGRAM, 11), (True, hash_program(PROGRAM)))

    async def test_connection_close_gives_upload_bytes_back(self):
        server = await LiveServer(self).start()
        client = await server.connect()
        client.send(upload_frames(BIG, corr_id=1)[0])
        await client.request(
            {"type": "query", "corr_id": 2, "subject": "program_exists", "record": H}
        )
        [session] = server.factory.sessions
        client.transport.loseConnection()
        await session.closed
        self.assertEqual(server.factory.upload_budget.held, 0)

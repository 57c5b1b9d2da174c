"""Crash safety: kill -9 the real daemon mid-upload and mid key-value writes, then restart it.

On the same home the restarted daemon has every program and every key-value
write it acknowledged, nothing of the upload it was killed in (no program, no
temp file), and it serves as before.
"""

from __future__ import annotations

import os

import pytest
from twisted.trial import unittest

from pie.server.uploads import CHUNK_SIZE_BYTES, hash_program
from tests.pied import Daemon
from tests.protocol_helpers import launch, upload, upload_frames

pytestmark = pytest.mark.slow

WRITER = b"""
from pie.inferlet import send, store_set

async def main(args):
    i = 0
    while True:
        await store_set(f"key {i}", f"value {i}")
        send(f"stored {i}")
        i += 1
"""

READER = b"""
from pie.inferlet import store_get


async def main(args):
    found = [await store_get(f"key {i}") for i in range(int(args[0]))]
    return "|".join(value or "MISSING" for value in found)
"""


class CrashSafetyTests(unittest.TestCase):
    timeout = 240  # a first run may build the sandbox runtime

    async def test_kill_9_during_an_upload_and_writes_loses_nothing_acknowledged(self):
        daemon = await Daemon(self).start()
        client = await daemon.connect()
        self.assertTrue((await upload(client, READER, corr_id=1))["successful"])
        self.assertTrue((await upload(client, WRITER, corr_id=2))["successful"])
        writer = await launch(client, hash_program(WRITER), corr_id=3)
        acknowledged = 0
        while acknowledged < 20:  # stored (committed) writes the instance reported
            message = await client.next()
            if message.get("instance_id") == writer and message["event"] == "message":
                acknowledged = int(message["message"].split()[1]) + 1
        big = b"# padding\n" * (CHUNK_SIZE_BYTES // 5) + b"async def main(args):\n    pass\n"
        frames = upload_frames(big, corr_id=4)
        self.assertGreater(len(frames), 2)
        for frame in frames[:-1]:  # the upload is in flight: its last chunk never comes
            client.send(frame)
        await daemon.kill()  # SIGKILL, while the writer writes and the upload is half done

        restarted = await Daemon(self, daemon.home).start()
        programs = os.path.join(daemon.home, "programs")
        self.assertEqual(
            sorted(os.listdir(programs)), sorted([hash_program(READER), hash_program(WRITER)])
        )
        client = await restarted.connect()
        exists = await client.request(
            {
                "type": "query",
                "corr_id": 5,
                "subject": "program_exists",
                "record": hash_program(big),
            }
        )
        self.assertEqual(exists["result"], "false")
        reader = await launch(client, hash_program(READER), [str(acknowledged)], corr_id=6)
        events = []
        while not events or events[-1][0] != "terminated":
            message = await client.next()
            if message.get("instance_id") == reader:
                events.append((message["event"], message["message"]))
        values = "|".join(f"value {i}" for i in range(acknowledged))
        self.assertEqual(
            events, [("message", values), ("terminated", "instance normally finished")]
        )

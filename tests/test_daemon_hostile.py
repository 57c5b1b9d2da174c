"""Hostile programs against a real daemon (`pie serve` in a child process) over loopback.

Issue 17 point 1: a program calling a sync host call in a tight loop froze the
whole daemon (guests ran on the reactor thread and the deadline was measured
between host calls): no launch answer, neighbours frozen, SIGTERM ignored.
Here a well-behaved neighbour client runs while the hog does, and the test
asserts its progress; then the hog is ended (by its CPU share, or SIGTERM).
"""

from __future__ import annotations

import time

import pytest
from twisted.trial import unittest

from pie.server.uploads import hash_program
from tests.pied import Daemon
from tests.protocol_helpers import launch, upload

pytestmark = pytest.mark.slow

HOG = b"""
from pie.inferlet import _abi

async def main(args):
    while True:
        _abi.call("get_instance_id")
"""

ECHO = b"""
from pie.inferlet import receive, send


async def main(args):
    for _ in range(int(args[0])):
        send("echo " + await receive())
    return "echo done"
"""


async def events_of(client, instance_id: str, count: int) -> list[tuple[str, str]]:
    """The next `count` instance events of one instance (others' events are skipped)."""
    seen = []
    while len(seen) < count:
        message = await client.next()
        if message.get("type") == "instance_event" and message["instance_id"] == instance_id:
            seen.append((message["event"], message["message"]))
    return seen


class HostileProgramDaemonTests(unittest.TestCase):
    timeout = 240  # a first run may build the sandbox runtime (pinned_artifact)

    async def start_hog(self, daemon: Daemon):
        hog_client = await daemon.connect()
        reply = await upload(hog_client, HOG)
        self.assertTrue(reply["successful"], reply)
        hog = await launch(hog_client, hash_program(HOG))
        return hog_client, hog

    async def assertNeighbourServed(self, daemon: Daemon) -> None:
        """A client connecting now uploads, launches and has 5 round trips with its instance."""
        client = await daemon.connect()
        self.assertTrue((await upload(client, ECHO, corr_id=7))["successful"])
        echo = await launch(client, hash_program(ECHO), ["5"], corr_id=8)
        for i in range(5):
            client.send({"type": "signal_instance", "instance_id": echo, "message": str(i)})
            self.assertEqual(await events_of(client, echo, 1), [("message", f"echo {i}")])
        self.assertEqual(
            await events_of(client, echo, 2),
            [("message", "echo done"), ("terminated", "instance normally finished")],
        )

    async def test_sync_call_loop_neither_freezes_the_daemon_nor_stops_sigterm(self):
        daemon = await Daemon(self).start("--shutdown-timeout-s", "5")
        hog_client, hog = await self.start_hog(daemon)
        await self.assertNeighbourServed(daemon)
        status = await hog_client.request(
            {"type": "query", "corr_id": 3, "subject": "model_status", "record": ""}
        )
        self.assertTrue(status["successful"], status)  # the hog's own session answers too
        signalled = time.monotonic()
        daemon.signal()
        # twistd ends a clean shutdown on SIGTERM by re-raising the signal (its exit status)
        self.assertEqual(await daemon.child.ended, "signal 15")
        self.assertLess(time.monotonic() - signalled, 5 + 2)
        self.assertIn(b"Server Shut Down.", daemon.child.output)
        self.assertNotIn(b"did not stop within", daemon.child.output)
        self.assertEqual(await hog_client.closed, 1000)  # closed by the daemon, properly

    async def test_hog_over_its_cpu_share_is_ended_with_the_reason(self):
        daemon = await Daemon(self).start(
            "--inferlet-cpu-policy", "end", "--inferlet-cpu-percent", "10",
            "--inferlet-cpu-window-s", "1",
        )  # fmt: skip
        hog_client, hog = await self.start_hog(daemon)
        await self.assertNeighbourServed(daemon)
        self.assertEqual(
            await events_of(hog_client, hog, 1),
            [
                (
                    "terminated",
                    "Runtime error: CPU share exceeded: used more than 10% of a core over 1 s",
                )
            ],
        )

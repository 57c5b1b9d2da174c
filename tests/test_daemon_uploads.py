"""Heavy uploads against a real daemon do not stall its reactor (issue 17 point 4).

A 2 MB source, or a small zip that inflates to 1 MB of source, stalled the
reactor 5-9 s while it was parsed, and peaked the daemon at +1.2 GB. Here a
neighbour client pings (`query`) throughout each upload's check, and the test
asserts that every ping is answered promptly while the check takes far longer;
it also reports the daemon's peak RSS growth (VmHWM) during the upload.
"""

from __future__ import annotations

import io
import time
import zipfile

import pytest
from twisted.internet.defer import ensureDeferred
from twisted.trial import unittest

from pie.server.uploads import hash_program
from tests.pied import Daemon
from tests.protocol_helpers import PING, launch, upload
from tests.test_daemon_hostile import events_of

pytestmark = pytest.mark.slow

MAX_PING_S = 1.0
DEFAULT_MEMORY_LIMIT_MIB = 256  # inferlet_memory_limit: the compile's memory is the guest's
PEAK_SLACK_MIB = 128  # the upload's chunks, the source, the hashing, allocator slack

HEAD = b"async def main(args):\n    return str(len(globals()))\n"


def big_source(size: int) -> bytes:
    """main.py of about `size` bytes: HEAD, then one small assignment a line."""
    lines = [HEAD]
    total, i = len(HEAD), 0
    while total < size:
        line = b"V%d = [%d, 'x', {'k': %d}]\n" % (i, i, i)
        lines.append(line)
        total, i = total + len(line), i + 1
    return b"".join(lines)


def inflating_zip(source_size: int) -> bytes:
    """A zip whose main.py is HEAD and `source_size` bytes of one repeated line."""
    main = HEAD + b"x = 1\n" * (source_size // 6)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("main.py", main)
    return buffer.getvalue()


def reset_peak(pid: int) -> None:
    """Start VmHWM afresh at the current RSS (Linux: clear_refs 5)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def status_kib(pid: int, field: str) -> int:
    """A `VmRSS:`-style line of /proc/PID/status, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class HeavyUploadDaemonTests(unittest.TestCase):
    timeout = 240  # a first run may build the sandbox runtime (pinned_artifact)

    async def check_while_pinged(
        self, program: bytes, *flags: str, refusal: str | None = None
    ) -> dict[str, float]:
        """Upload `program` to a daemon with `flags` while a neighbour pings; the figures.

        The upload then succeeds and the program runs, or it fails with `refusal`.
        """
        daemon = self.daemon = await Daemon(self).start(*flags)
        neighbour = await daemon.connect()
        uploader = await daemon.connect()
        pid = daemon.process.pid
        self.assertTrue((await neighbour.request(PING))["successful"])  # both sessions are up
        reset_peak(pid)
        rss_before = status_kib(pid, "VmRSS")

        started = time.monotonic()
        checked = ensureDeferred(upload(uploader, program))
        round_trips: list[float] = []
        while not checked.called:
            sent = time.monotonic()
            self.assertTrue((await neighbour.request(PING))["successful"])
            round_trips.append(time.monotonic() - sent)
        reply = await checked
        check_s = time.monotonic() - started
        peak_after = status_kib(pid, "VmHWM")
        if refusal is None:
            self.assertTrue(reply["successful"], reply)
            instance = await launch(uploader, hash_program(program))
            [(event, _)] = await events_of(uploader, instance, 1)
            self.assertEqual(event, "message")  # it runs: the checked program is usable
        else:
            self.assertEqual((reply["successful"], reply["result"]), (False, refusal))
        figures = {
            "check_s": check_s,
            "pings": len(round_trips),
            "max_ping_s": max(round_trips),
            "rss_mib": rss_before / 1024,
            "peak_growth_mib": (peak_after - rss_before) / 1024,
            "rss_after_mib": status_kib(pid, "VmRSS") / 1024,
        }
        print(f"\n{len(program)} bytes uploaded: {figures}")
        self.assertLess(figures["max_ping_s"], MAX_PING_S, figures)
        self.assertLess(figures["max_ping_s"], check_s / 2, figures)  # never held for the check
        self.assertGreater(len(round_trips), 2, figures)  # the reactor turned throughout
        return figures

    def assertPeakWithinTheMemoryLimit(self, figures: dict[str, float]) -> None:
        """The issue saw +1.2 GB; the check's memory is now bounded by the guest's limit."""
        self.assertLess(figures["peak_growth_mib"], DEFAULT_MEMORY_LIMIT_MIB + PEAK_SLACK_MIB)

    async def test_a_2_mb_source_is_compiled_while_the_neighbour_is_served(self):
        """With room to compile it (1 GiB), as when the issue saw the 5-9 s stall."""
        await self.check_while_pinged(big_source(2 * 2**20), "--inferlet-memory-limit", str(2**30))

    async def test_a_2_mb_source_over_the_memory_limit_is_refused_without_a_stall(self):
        await self.check_while_pinged(
            big_source(2 * 2**20),
            refusal="the program is too big to compile within the memory limit",
        )

    async def test_a_small_zip_inflating_to_1_mb_is_checked_while_the_neighbour_is_served(self):
        archive = inflating_zip(2**20)
        self.assertLess(len(archive), 4096)
        self.assertPeakWithinTheMemoryLimit(await self.check_while_pinged(archive))

        bomb = inflating_zip(64 * 2**20)  # refused from the sizes it declares: nothing inflates
        pid = self.daemon.process.pid
        reset_peak(pid)
        rss_before = status_kib(pid, "VmRSS")
        reply = await upload(await self.daemon.connect(), bomb)
        self.assertEqual(reply["result"], "the program's sources exceed 4194304 bytes")
        grown_mib = (status_kib(pid, "VmHWM") - rss_before) / 1024
        self.assertLess(grown_mib, 16, "the bomb was inflated")

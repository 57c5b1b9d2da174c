"""Crash safety of persistent KV exports: kill -9 the real daemon while it exports, restart it.

On the same home every export the program saw acknowledged is listed again and
imports: the imported context predicts what a freshly prefilled one does.
"""

from __future__ import annotations

import os

import pytest
from twisted.trial import unittest

from pie.server.uploads import hash_program
from tests.model_fixtures import write_tiny_model
from tests.pied import Daemon
from tests.protocol_helpers import launch, upload

pytestmark = pytest.mark.slow  # starts real daemons and kills them

TEXT = (
    "The hardware store keeps paint in aisle one, screws and bolts in aisle two, power tools "
    "in aisle three, garden supplies in aisle four and plumbing parts in aisle five. Number "
)

EXPORTER = (
    b"""
from pie.inferlet import get_auto_model, send

TEXT = %r

async def main(args):
    model = get_auto_model()
    i = 0
    while True:
        ctx = model.create_context()
        ctx.fill(TEXT + str(i))
        await ctx.save(f"crash/{i}")  # persistent; returns once the export is visible
        send(f"exported {i}")
        i += 1
"""
    % TEXT
)

IMPORTER = (
    b"""
from pie.inferlet import Context, get_auto_model

TEXT = %r

async def main(args):
    model = get_auto_model()
    names = sorted(name for name, _ in model.create_queue().exported_kv_pages() if name.startswith("crash/"))
    same = []
    for i in range(int(args[0])):
        imported = await Context.open(model, f"crash/{i}")
        imported.fill(".")
        fresh = model.create_context()
        fresh.fill(TEXT + str(i) + ".")
        a, b = await imported.decode_step(), await fresh.decode_step()
        same.append(a.ids[0] == b.ids[0])
    return f"{len(names)} {sum(same)}"
"""
    % TEXT
)

FLAGS = ("--device", "cpu", "--dtype", "float32", "--num-pages", "256")


class ExportCrashTests(unittest.TestCase):
    timeout = 300

    async def test_kill_9_during_persistent_exports_keeps_the_acknowledged_ones(self):
        model = os.path.abspath(self.mktemp())
        write_tiny_model(model)  # random weights: the agreement shows the recompute is exact
        flags = ("--model", model, *FLAGS)
        daemon = await Daemon(self).start(*flags)
        client = await daemon.connect()
        self.assertTrue((await upload(client, EXPORTER, corr_id=1))["successful"])
        self.assertTrue((await upload(client, IMPORTER, corr_id=2))["successful"])
        exporter = await launch(client, hash_program(EXPORTER), corr_id=3)
        acknowledged = 0
        while acknowledged < 3:
            message = await client.next()
            if message.get("instance_id") == exporter:
                self.assertEqual(message["event"], "message", message)
                acknowledged = int(message["message"].split()[1]) + 1
        await daemon.kill()  # SIGKILL while the exporter goes on exporting

        restarted = await Daemon(self, daemon.home).start(*flags)
        client = await restarted.connect()
        importer = await launch(client, hash_program(IMPORTER), [str(acknowledged)], corr_id=4)
        events = []
        while not events or events[-1][0] != "terminated":
            message = await client.next()
            if message.get("instance_id") == importer:
                events.append((message["event"], message["message"]))
        self.assertEqual(events[-1], ("terminated", "instance normally finished"), events)
        listed, agreeing = map(int, events[0][1].split())
        self.assertGreaterEqual(listed, acknowledged, "an acknowledged export was lost")
        self.assertEqual(agreeing, acknowledged, "an imported export predicts differently")

"""The daemon as twistd builds it: makeService with nothing injected.

The other daemon tests hand makeService a runtime; this one lets it build the
production tree (runtime, executor, LocalModelService loading a model from
--model, the listener gated on the load) and runs a real inferlet through it
over a loopback WebSocket with the independent raw client.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from pie.engine.cpu_path import usable_cores
from pie.server.uploads import hash_program
from pie.service.local import LocalModelService
from pie.tap import Options, makeService
from tests import rawclient
from tests.model_fixtures import write_tiny_model
from tests.protocol_helpers import launch, upload

pytestmark = pytest.mark.slow

PROGRAM = b"""
from pie.inferlet import get_auto_model, send


async def main(args):
    model = get_auto_model()
    ctx = model.create_context()
    ctx.fill_tokens([1, 2, 3, 4])
    dist = await ctx.decode_step()
    send(f"{model.name} {len(dist[0])}")
"""


class ComposedDaemonTests(unittest.TestCase):
    timeout = 120

    async def start(self, *argv: str):
        """makeService from these flags, started as twistd would; the listening port."""
        options = Options()
        options.parseOptions(["--no-auth", "--home", self.mktemp(), *argv])
        top = makeService(options, reactor=reactor)
        top.privilegedStartService()
        top.startService()
        self.addCleanup(top.stopService)
        self.top = top
        return await top.getServiceNamed("clients").whenListening()

    async def test_without_a_local_model(self):
        """--model none: a daemon for attached workers only, listening at once."""
        port = await self.start("--model", "none", "--executor", "dev", "--port", "tcp:0")
        client = await rawclient.connect(port.getHost().port)
        self.addCleanup(client.close)
        status = await client.request(
            {"type": "query", "corr_id": 1, "subject": "model_status", "record": ""}
        )
        self.assertEqual((status["successful"], json.loads(status["result"])), (True, []))

    async def test_builds_and_serves_a_real_model(self):
        model_dir = self.mktemp()
        write_tiny_model(model_dir)
        logged: list[str] = []
        observer = lambda event: logged.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        port = await self.start(
            "--model",
            model_dir,
            "--executor",
            "dev",
            "--port",
            "tcp:0:interface=127.0.0.1",
            "--dist-size",
            "8",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--num-pages",
            "32",
            "--max-batch-tokens",
            "64",
        )
        client = await rawclient.connect(port.getHost().port)
        self.addCleanup(client.close)
        status = await client.request(
            {"type": "query", "corr_id": 1, "subject": "model_status", "record": ""}
        )
        self.assertTrue(status["successful"], status)
        [model] = json.loads(status["result"])
        self.assertEqual((model["kv_page_size"], model["num_kv_pages"]), (16, 32))
        # the compute path dtype auto chose (no Q4_1 weights here: dense), reported and logged
        compute = model["compute"]
        self.assertEqual(compute["weight_kernel"], "dense")
        self.assertEqual(compute["threads"], str(usable_cores()))
        self.assertIn(compute["dtype"], ("float32", "bfloat16"))
        [line] = [m for m in logged if "compute path" in m]
        self.assertIn(f"{compute['dtype']} activations, dense weight kernel", line)
        self.assertIn(f"{usable_cores()} torch threads", line)
        [local] = [s for s in self.top if isinstance(s, LocalModelService)]
        self.assertEqual(local.model_service.scheduler.max_batch_tokens, 64)

        uploaded = await upload(client, PROGRAM)
        self.assertEqual(uploaded["result"], hash_program(PROGRAM))
        instance_id = await launch(client, hash_program(PROGRAM))
        events = [await client.next(), await client.next()]
        self.assertEqual({e["instance_id"] for e in events}, {instance_id})
        self.assertEqual(
            [(e["event"], e["message"]) for e in events],
            [("message", f"{model['model_name']} 8"), ("terminated", "instance normally finished")],
        )

    async def test_shutdown_order(self):
        """Stop goes listener -> runtime (ends instances) -> model service close -> worker close."""
        model_dir = self.mktemp()
        write_tiny_model(model_dir)
        port = await self.start(
            "--model",
            model_dir,
            "--executor",
            "dev",
            "--port",
            "tcp:0:interface=127.0.0.1",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--num-pages",
            "16",
        )
        [local] = [s for s in self.top if isinstance(s, LocalModelService)]
        runtime = next(s for s in self.top if type(s).__name__ == "Runtime")
        listener = self.top.getServiceNamed("clients")
        order: list[str] = []

        def spy(obj: object, method: str, label: str) -> None:
            real = getattr(obj, method)
            self.patch(obj, method, lambda *a: (order.append(label), real(*a))[1])

        spy(listener, "stopService", "listener")
        spy(runtime, "stopService", "runtime")
        spy(local.model_service, "close", "model service")
        spy(local.worker, "close", "worker")
        client = await rawclient.connect(port.getHost().port)
        await self.top.stopService()
        await client.closed
        self.assertEqual(order, ["listener", "runtime", "model service", "worker"])

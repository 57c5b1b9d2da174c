"""Prometheus metrics (issue 12 point 5): a daemon with --metrics, scraped after real traffic.

The daemon is the production tree (makeService, a tiny random model on the
CPU, the dev executor) with --metrics on a loopback port. Inferlets generate
a known number of tokens from a known prompt, one holds KV pages while it
waits for a message, a server instance answers HTTP requests; /metrics is
then scraped with treq and read with prometheus_client's own parser, and each
counter must have moved by exactly what the traffic implies.
"""

from __future__ import annotations

import math

import pytest
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.trial import unittest

from pie.metrics import NO_METRICS
from pie.server.uploads import hash_program
from pie.tap import Options, makeService
from tests import rawclient
from tests.model_fixtures import write_tiny_model
from tests.protocol_helpers import launch, upload

pytestmark = pytest.mark.slow

PROMPT = 20  # tokens: two KV pages of 16
GENERATE = 6
NUM_PAGES = 32

ENGINE_GENERATION = b"""
from pie.inferlet import Greedy, Length, get_auto_model, send


async def main(args):
    ctx = get_auto_model().create_context()
    ctx.fill_tokens(list(range(1, %d)))
    send(str(len(await ctx.generate_tokens(Greedy(), Length(%d)))))
""" % (PROMPT + 1, GENERATE)

GUEST_GENERATION = b"""
from pie.inferlet import get_auto_model, send


async def main(args):
    ctx = get_auto_model().create_context()
    ctx.fill_tokens(list(range(1, %d)))
    generated = []
    for _ in range(%d):
        ids, probs = await ctx.decode_step()
        generated.append(ids[0])
        ctx.fill_token(ids[0])
    send(str(len(generated)))
""" % (PROMPT + 1, GENERATE)

HOLDS_PAGES = b"""
from pie.inferlet import get_auto_model, receive, send


async def main(args):
    ctx = get_auto_model().create_context()
    ctx.fill_tokens(list(range(1, %d)))
    await ctx.flush()
    await ctx.queue.synchronize()  # the prefill is done (flush only queues it)
    send("holding")
    await receive()
""" % (PROMPT + 1)

SERVER = b"""
from pie.inferlet.server import http_main


async def handle(request):
    if request.path == "/":
        return "hello"
    return {"status": 404, "body": "no route"}


main = http_main(handle)
"""


def sample(families: dict, name: str, **labels: str) -> float:
    """The value of the sample `name` with exactly these labels (KeyError if absent)."""
    for family in families.values():
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise KeyError(f"{name} {labels} not in the scrape")


class MetricsDaemonTests(unittest.TestCase):
    timeout = 120

    async def start(self, *argv: str):
        options = Options()
        options.parseOptions(["--no-auth", "--home", self.mktemp(), *argv])
        top = makeService(options, reactor=reactor)
        top.privilegedStartService()
        top.startService()
        self.addCleanup(top.stopService)
        self.top = top
        return top

    async def scrape(self, path: str = "/metrics") -> dict:
        port = (await self.top.getServiceNamed("metrics").whenListening()).getHost().port
        response = await treq.get(f"http://127.0.0.1:{port}{path}", persistent=False)
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders("content-type")[0].startswith("text/plain"))
        return {f.name: f for f in text_string_to_metric_families(await response.text())}

    async def test_counters_follow_the_traffic(self):
        model_dir = self.mktemp()
        write_tiny_model(model_dir)
        await self.start(
            "--model", model_dir, "--executor", "dev", "--port", "tcp:0:interface=127.0.0.1",
            "--metrics", "tcp:0:interface=127.0.0.1", "--device", "cpu", "--dtype", "float32",
            "--dist-size", "8", "--num-pages", str(NUM_PAGES),
        )  # fmt: skip
        port = await self.top.getServiceNamed("clients").whenListening()
        client = await rawclient.connect(port.getHost().port)
        self.addCleanup(client.close)
        runtime = next(s for s in self.top if type(s).__name__ == "Runtime")
        [model] = [s.name for s in runtime.model_services()]

        # two generations of GENERATE tokens from PROMPT tokens: in the engine, in the guest
        for corr_id, program in ((10, ENGINE_GENERATION), (20, GUEST_GENERATION)):
            await upload(client, program, corr_id)
            instance = await launch(client, hash_program(program), corr_id=corr_id + 1)
            events = [await client.next(), await client.next()]
            self.assertEqual(
                [(e["instance_id"], e["event"], e["message"]) for e in events],
                [
                    (instance, "message", str(GENERATE)),
                    (instance, "terminated", "instance normally finished"),
                ],
            )
        # an instance holding two pages, seen while it waits
        await upload(client, HOLDS_PAGES, 30)
        holder = await launch(client, hash_program(HOLDS_PAGES), corr_id=31)
        self.assertEqual((await client.next())["message"], "holding")
        families = await self.scrape()
        self.assertEqual(sample(families, "pie_instances_running"), 1)
        pages = math.ceil(PROMPT / 16)
        self.assertEqual(sample(families, "pie_kv_pages_used", model=model), pages)
        self.assertEqual(sample(families, "pie_kv_pages_free", model=model), NUM_PAGES - pages)
        self.assertEqual(sample(families, "pie_scheduler_pending_commands", model=model), 0)
        client.send({"type": "signal_instance", "instance_id": holder, "message": "go"})
        self.assertEqual((await client.next())["event"], "terminated")
        # a server instance: one request answered 200, one 404
        await upload(client, SERVER, 40)
        reply = await client.request(
            {
                "type": "launch_server_instance",
                "corr_id": 41,
                "port": 0,
                "program_hash": hash_program(SERVER),
                "arguments": [],
            }
        )
        http_port = runtime.servers[reply["result"]].port
        for path, code in (("/", 200), ("/nowhere", 404)):
            response = await treq.get(f"http://127.0.0.1:{http_port}{path}", persistent=False)
            self.assertEqual((response.code, path), (code, path))
            await response.content()
        # a request that fails
        failed = await client.request(
            {"type": "query", "corr_id": 50, "subject": "no_such_subject", "record": ""}
        )
        self.assertFalse(failed["successful"])

        families = await self.scrape()
        self.assertEqual(sample(families, "pie_instances_running"), 0)
        self.assertEqual(sample(families, "pie_server_instances"), 1)
        self.assertEqual(sample(families, "pie_kv_pages_used", model=model), 0)
        self.assertEqual(sample(families, "pie_kv_pages_free", model=model), NUM_PAGES)
        self.assertEqual(sample(families, "pie_tokens_generated_total", model=model), 2 * GENERATE)
        # each generation prefills its prompt, the holder all of its but the pending last one;
        # decode steps are not prefill
        prefilled = 3 * PROMPT - 1
        self.assertEqual(sample(families, "pie_tokens_prefilled_total", model=model), prefilled)
        # every new token went through a batch: the prompts, and each token fed back
        self.assertEqual(
            sample(families, "pie_forward_batch_tokens_sum", model=model),
            prefilled + 2 * (GENERATE - 1),
        )
        batches = sample(families, "pie_forward_batch_items_count", model=model)
        self.assertGreaterEqual(batches, 2 * GENERATE + 1)
        self.assertEqual(
            sample(families, "pie_forward_duration_seconds_count", model=model), batches
        )
        self.assertEqual(
            sample(families, "pie_forward_batch_items_sum", model=model), 2 * GENERATE + 1
        )
        self.assertEqual(sample(families, "pie_time_to_first_token_seconds_count", model=model), 2)
        self.assertEqual(
            sample(families, "pie_time_per_output_token_seconds_count", model=model),
            2 * (GENERATE - 1),
        )
        self.assertGreater(sample(families, "pie_time_to_first_token_seconds_sum", model=model), 0)
        requests = {
            (s.labels["endpoint"], s.labels["status"]): s.value
            for s in families["pie_requests"].samples
            if s.name == "pie_requests_total"
        }
        self.assertEqual(
            requests,
            {
                ("upload_program", "ok"): 4,
                ("launch_instance", "ok"): 3,
                ("signal_instance", "ok"): 1,
                ("launch_server_instance", "ok"): 1,
                ("query", "error"): 1,
                ("http", "200"): 1,
                ("http", "404"): 1,
            },
        )

    async def test_other_paths_and_formats(self):
        await self.start(
            "--model", "none", "--executor", "dev", "--port", "tcp:0",
            "--metrics", "tcp:0:interface=127.0.0.1",
        )  # fmt: skip
        port = (await self.top.getServiceNamed("metrics").whenListening()).getHost().port
        response = await treq.get(f"http://127.0.0.1:{port}/", persistent=False)
        self.assertEqual(response.code, 404)
        await response.content()
        families = await self.scrape()
        self.assertEqual(sample(families, "pie_instances_running"), 0)
        self.assertEqual(families["pie_kv_pages_free"].samples, [])  # no model, no samples
        # a scraper asking for OpenMetrics gets it
        response = await treq.get(
            f"http://127.0.0.1:{port}/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
            persistent=False,
        )
        content_type = response.headers.getRawHeaders("content-type")[0]
        self.assertTrue(content_type.startswith("application/openmetrics-text"), content_type)
        self.assertTrue((await response.text()).endswith("# EOF\n"))

    async def test_off_by_default(self):
        top = await self.start("--model", "none", "--executor", "dev", "--port", "tcp:0")
        self.assertNotIn("metrics", [s.name for s in top])
        runtime = next(s for s in top if type(s).__name__ == "Runtime")
        self.assertIs(runtime.metrics, NO_METRICS)
        self.assertIs(top.getServiceNamed("clients").factory.metrics, NO_METRICS)

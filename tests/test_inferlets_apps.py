"""Pie's example apps (inferlets/*.py) on SmolLM2-135M through the real protocol.

Every test uploads an app's source over a loopback WebSocket with the raw
wire client (tests/rawclient.py), launches it, and checks what the instance
sends back. Behind the socket is the real daemon: pie.server's protocol, the
runtime with the dev executor, the model service and the SmolLM2 worker
thread. The worker (the weights, ~20 s to load on 2 cores) is loaded once per
module; the light parts (service, runtime, listener) are fresh for each test
so that trial's reactor checks stay clean. After every app, every KV page
must be back in the model service (except those held by persistent exports).

Generation is greedy and short. The model computes in bfloat16, so the
assertions check behaviour (structure, invariants, facts a 135M model gets
right) rather than comparing texts produced by differently shaped forward
passes, which may flip near-ties; exact equality of those paths is checked
on the fake model in tests/test_sdk_context.py.
"""

from __future__ import annotations

import ast
import json
import os
import re
import time

import jsonschema
import pytest
from twisted.internet import reactor
from twisted.trial import unittest
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

import pie
import pie.bundled
from pie.runtime.executors.dev import DevExecutor
from pie.runtime.outbound import HttpPolicy, parse_patterns
from pie.runtime.runtime import Runtime
from pie.server.uploads import CHUNK_SIZE_BYTES, hash_program
from tests.httpfixtures import ToolServer, make_png
from tests.model_fixtures import model_path, shared_worker
from tests.pieserver import LiveServer

pytestmark = pytest.mark.slow


APPS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "inferlets")
NORMAL = "instance normally finished"


def source(app: str) -> bytes:
    """An example app's source; "openai" is the daemon's bundled OpenAI server inferlet."""
    if app == "openai":
        return pie.bundled.source("openai")
    with open(os.path.join(APPS, app + ".py"), "rb") as f:
        return f.read()


class Run:
    """What one instance said: its messages and its termination reason."""

    def __init__(self, instance_id: str) -> None:
        self.id = instance_id
        self.messages: list[str] = []
        self.reason: str | None = None

    def line(self, prefix: str) -> str:
        for message in self.messages:
            if message.startswith(prefix):
                return message[len(prefix) :]
        raise AssertionError(f"no message starting with {prefix!r} in {self.messages}")


class AppTestCase(unittest.TestCase):
    timeout = 240

    async def setUp(self) -> None:
        if model_path() is None:
            raise unittest.SkipTest(
                "SmolLM2 is not in $PIE_HOME/models (run `pie model add smollm2-135m-instruct`)"
            )
        from pie.service.service import ModelService

        self.service = ModelService(shared_worker(), reactor=reactor)
        self.tools = ToolServer(make_png(123, 45)).start(self)  # what the apps' fetch may reach
        self.runtime = Runtime(
            os.path.abspath(self.mktemp()),
            {"smollm2": self.service},
            self.make_executor(),
            reactor,
            http_policy=HttpPolicy(parse_patterns(self.tools.url("/"))),
        )
        self.runtime.startService()
        self.addCleanup(self.runtime.stopService)
        self.server = await LiveServer(self, runtime=self.runtime).start()
        self.client = await self.server.connect()
        self.runs: dict[str, Run] = {}
        self._corr = 100
        self._hashes: dict[str, str] = {}

    def make_executor(self):
        return DevExecutor()

    # ------------------------------------------------------------------ protocol helpers
    def corr(self) -> int:
        self._corr += 1
        return self._corr

    async def upload(self, app: str) -> str:
        if app in self._hashes:
            return self._hashes[app]
        data = source(app)
        chunks = [data[i : i + CHUNK_SIZE_BYTES] for i in range(0, len(data), CHUNK_SIZE_BYTES)]
        corr = self.corr()
        for index, chunk in enumerate(chunks):
            self.client.send(
                {
                    "type": "upload_program",
                    "corr_id": corr,
                    "program_hash": hash_program(data),
                    "chunk_index": index,
                    "total_chunks": len(chunks),
                    "chunk_data": chunk,
                }
            )
        reply = await self.next_response(corr)
        self.assertTrue(reply["successful"], reply)
        self._hashes[app] = reply["result"]
        return reply["result"]

    async def next_response(self, corr: int) -> dict:
        while True:
            message = await self.client.next()
            if message.get("type") == "response" and message.get("corr_id") == corr:
                return message
            self.record(message)

    def record(self, message: dict) -> None:
        if message.get("type") != "instance_event":
            return
        run = self.runs.setdefault(message["instance_id"], Run(message["instance_id"]))
        if message["event"] == "message":
            run.messages.append(message["message"])
        elif message["event"] == "terminated":
            run.reason = message["message"]

    async def launch(self, app: str, *arguments: str) -> Run:
        digest = await self.upload(app)
        corr = self.corr()
        self.client.send(
            {
                "type": "launch_instance",
                "corr_id": corr,
                "program_hash": digest,
                "arguments": list(arguments),
            }
        )
        reply = await self.next_response(corr)
        self.assertTrue(reply["successful"], reply)
        return self.runs.setdefault(reply["result"], Run(reply["result"]))

    def signal(self, run: Run, message: str) -> None:
        self.client.send({"type": "signal_instance", "instance_id": run.id, "message": message})

    async def wait(self, *runs: Run) -> None:
        while any(run.reason is None for run in runs):
            self.record(await self.client.next())

    async def wait_for_message(self, run: Run, count: int = 1) -> None:
        while len(run.messages) < count and run.reason is None:
            self.record(await self.client.next())

    async def run_app(self, app: str, *arguments: str) -> Run:
        run = await self.launch(app, *arguments)
        await self.wait(run)
        self.assertEqual(run.reason, NORMAL, run.messages)
        return run

    def assertPagesReturned(self, held: int = 0) -> None:
        """Every KV page is free again except `held` (persistent exports)."""
        info = self.service.info
        self.assertEqual(self.service.resources.pages.available, info.num_kv_pages - held)

    async def http(self, port: int, path: str, body: bytes | None = None) -> tuple[int, str]:
        producer = FileBodyProducer(__import__("io").BytesIO(body)) if body is not None else None
        response = await Agent(reactor).request(
            b"POST" if body is not None else b"GET",
            f"http://127.0.0.1:{port}{path}".encode(),
            Headers({b"x-test": [b"yes"]}),
            producer,
        )
        return response.code, (await readBody(response)).decode()

    async def serve(self, app: str) -> int:
        digest = await self.upload(app)
        corr = self.corr()
        self.client.send(
            {
                "type": "launch_server_instance",
                "corr_id": corr,
                "port": 0,
                "program_hash": digest,
                "arguments": [],
            }
        )
        reply = await self.next_response(corr)
        self.assertTrue(reply["successful"], reply)
        return self.runtime.servers[reply["result"]].port  # port 0 -> the one bound


class BasicAppTests(AppTestCase):
    async def test_helloworld(self):
        run = await self.run_app("helloworld")
        self.assertEqual(
            run.messages,
            [f"Hello World!! I am instance {run.id}, running on pie {pie.__version__}"],
        )

    async def test_text_completion(self):
        run = await self.run_app(
            "text_completion", "--prompt", "What is 2+2?", "--max-tokens", "16"
        )
        self.assertIn("4", run.messages[0])
        self.assertNotIn("<|im_end|>", run.messages[0])
        tokens = int(re.match(r"tokens=(\d+)", run.messages[1]).group(1))
        self.assertTrue(1 <= tokens <= 16)
        self.assertPagesReturned()

    async def test_messaging(self):
        run = await self.launch("messaging")
        for word in ("one", "two", "three"):
            self.signal(run, word)
        await self.wait(run)
        self.assertEqual(run.messages, ["reply 1: ONE", "reply 2: TWO", "reply 3: THREE"])

    async def test_kvs_persists_across_instances(self):
        first = await self.run_app("kvs")
        self.assertEqual(first.messages[-1], "runs=1")
        self.assertEqual(len([m for m in first.messages if m.startswith("ok ")]), 6)
        second = await self.run_app("kvs")
        self.assertEqual(second.messages[-1], "runs=2")

    async def test_debugger_switches_the_batching_policy(self):
        run = await self.run_app("debugger", "--policy", "kort 4 20")
        self.assertEqual(
            run.messages, ["before: adaptive", "after: kort 4 20", "runtime ping: pong"]
        )
        self.assertEqual(self.service.get_batching(), "kort 4 20")
        for pie_form, policy in (("batching_algo:t:8:16", "t 16"), ("batching_algo:k:8:16", "k 8")):
            run = await self.run_app("debugger", "--policy", pie_form)
            self.assertEqual(run.messages[1], f"after: {policy}")
        self.service.set_batching("adaptive")
        bad = await self.launch("debugger", "--policy", "fastest")
        await self.wait(bad)
        self.assertIn("unknown batching policy", bad.reason)

    async def test_bench_spawn_time(self):
        start = time.monotonic()
        run = await self.launch("bench_spawn_time")
        await self.wait_for_message(run)
        spawn_ms = (time.monotonic() - start) * 1000
        await self.wait(run)
        self.assertEqual(run.messages, ["spawned"])
        self.assertLess(spawn_ms, 5000)

    async def test_bench_host_call(self):
        """Its figures are latencies of round trips that really ran: together they fit
        in the time the run took, and the async round trips (a queue message through
        the model service, a store lookup) take measurable time."""
        start = time.monotonic()
        run = await self.run_app("bench_host_call", "--iterations", "50")
        wall_us = (time.monotonic() - start) * 1e6
        figures = json.loads(run.messages[0])
        self.assertEqual(figures["iterations"], 50)
        metrics = ("runtime_ping_us", "queue_ping_us", "async_call_us")
        for key in metrics:
            self.assertGreaterEqual(figures[key], 0)
        # time_ms has 1 ms steps: each loop's total is rounded down by at most 1 ms
        measured_us = sum(figures[key] * 50 for key in metrics)
        self.assertLessEqual(measured_us, wall_us)
        self.assertGreater(figures["queue_ping_us"] + figures["async_call_us"], 0)

    async def test_bench_host_call_aggregates_its_kept_samples(self):
        runs = [await self.run_app("bench_host_call", "--reset", "--iterations", "20")]
        runs.append(await self.run_app("bench_host_call", "--iterations", "20"))
        samples = [json.loads(run.messages[0]) for run in runs]
        aggregate = json.loads((await self.run_app("bench_host_call", "--aggregate")).messages[0])
        self.assertEqual(aggregate["samples"], 2)
        for metric in ("runtime_ping_us", "queue_ping_us", "async_call_us"):
            a, b = (sample[metric] for sample in samples)
            figures = aggregate[metric]
            self.assertAlmostEqual(figures["mean"], (a + b) / 2)
            self.assertAlmostEqual(figures["median"], (a + b) / 2)
            self.assertAlmostEqual(figures["stdev"], abs(a - b) / 2**0.5)
        await self.run_app("bench_host_call", "--reset", "--aggregate")
        empty = await self.run_app("bench_host_call", "--aggregate")
        self.assertEqual(json.loads(empty.messages[0]), {"samples": 0})

    async def test_helloworld_plain_is_helloworld_on_the_bare_abi(self):
        run = await self.run_app("helloworld_plain")
        self.assertEqual(
            run.messages,
            [f"Hello World!! I am instance {run.id}, running on pie {pie.__version__}"],
        )
        imported = {
            node.module if isinstance(node, ast.ImportFrom) else alias.name
            for node in ast.walk(ast.parse(source("helloworld_plain")))
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        }
        self.assertEqual(imported, {"pie.inferlet"})  # only `from pie.inferlet import _abi`
        self.assertIn("from pie.inferlet import _abi\n", source("helloworld_plain").decode())


class ToolAppTests(AppTestCase):
    """The apps that reach the world through `fetch`, against the loopback ToolServer."""

    async def test_image_fetch_reports_the_served_pngs_size_and_dimensions(self):
        run = await self.run_app("image_fetch", "--url", self.tools.url("/image.png"))
        self.assertEqual(
            json.loads(run.messages[0]),
            {
                "url": self.tools.url("/image.png"),
                "bytes": len(self.tools.png),
                "width": 123,
                "height": 45,
                "bit_depth": 8,
                "colour": "rgb",
                "chunks": ["IHDR", "tEXt", "IDAT", "IEND"],
            },
        )
        corrupt = bytearray(self.tools.png)
        corrupt[-20] ^= 0xFF  # inside the IDAT data
        self.tools.png = bytes(corrupt)
        run = await self.run_app("image_fetch", "--url", self.tools.url("/image.png"))
        self.assertEqual(run.messages, ["error: chunk IDAT has a bad CRC"])
        run = await self.run_app("image_fetch", "--url", "http://example.com/image.png")
        self.assertEqual(
            run.messages,
            ["error: URL http://example.com/image.png is not allowed by inferlet_http_allow"],
        )

    async def test_agent_codeact_runs_the_models_code_in_its_own_namespace(self):
        replies = [
            "```python\nsquares = [i * i for i in range(1, 11)]\nprint(sum(squares))\n```",
            "```python\nprint(len(squares), max(squares))\n```",
            "```python\nimport os\nprint(os.listdir('/'))\n```",
            "```python\nprint(main)\n```",
            "```python\nwhile True:\n    pass\n```",
            "Final answer: 385",
        ]
        run = await self.run_app(
            "agent_codeact",
            "--canned",
            json.dumps(replies),
            "--turns",
            "8",
            "--step-budget",
            "1000",
            "--show-context",
        )
        observations = [run.line(f"observation {i}: ") for i in range(5)]
        self.assertEqual(
            observations,
            [
                "385",
                "10 100",  # variables persist from one action to the next
                "ImportError: import of 'os' is not allowed here",
                "NameError: name 'main' is not defined",  # the inferlet's globals are not there
                "step budget exceeded (1000 lines)",
            ],
        )
        self.assertEqual(run.line("answer: "), "385")
        transcript = run.line("transcript: ")
        for observation in observations:
            self.assertIn(f"Observation:\n{observation}", transcript)
        self.assertGreater(int(run.line("context: ").split()[0]), 100)
        self.assertPagesReturned()

    async def test_agent_react_bench_measures_its_three_optimisations(self):
        run = await self.run_app(
            "agent_react_bench",
            "--tools",
            self.tools.url("/tool"),
            "--rounds",
            "2",
            "--max-tokens",
            "2",
            "--tool-ms",
            "50",
            "--compare",
        )
        runs = {r["config"]: r for r in map(json.loads, run.messages[:4])}
        self.assertEqual(
            list(runs), ["baseline", "prefix_cache", "drop_documents", "overlap_tools"]
        )
        self.assertEqual(
            {config: r["prefix"] for config, r in runs.items()},
            {
                "baseline": "off",
                "prefix_cache": "hit",
                "drop_documents": "off",
                "overlap_tools": "off",
            },
        )
        self.assertGreater(runs["drop_documents"]["pages_dropped"], 0)
        self.assertEqual(runs["baseline"]["pages_dropped"], 0)
        self.assertLess(runs["drop_documents"]["pages_held"], runs["baseline"]["pages_held"])
        self.assertEqual(self.tools.calls, {config: 6 for config in runs})  # real HTTP calls
        self.assertEqual(self.tools.peak["overlap_tools"], 3)  # a round's calls in flight together
        self.assertEqual(
            {config: self.tools.peak[config] for config in ("baseline", "prefix_cache")},
            {"baseline": 1, "prefix_cache": 1},
        )
        self.assertTrue(run.messages[4].startswith("prefix cache saves "))
        self.assertTrue(run.messages[5].startswith("dropping documents saves "))
        self.assertTrue(run.messages[6].startswith("overlapping tool calls saves "))
        saved = json.loads(run.messages[7])["saved_ms"]
        self.assertEqual(set(saved), {"prefix_cache", "drop_documents", "overlap_tools"})
        self.assertGreater(saved["overlap_tools"], 0)  # 3 x 50 ms in a row vs at once, per round
        held = self.service.info.num_kv_pages - self.service.resources.pages.available
        self.assertGreater(held, 0)  # the persistent export of the tool documentation
        self.assertPagesReturned(held)


class ForkingAppTests(AppTestCase):
    async def test_beam_search(self):
        """The best beam scores at least the greedy continuation of its length; a beam of one
        is greedy (its score is greedy's). Scores are summed log-probs in the fp32 worker."""
        beams = []
        for size in ("1", "3"):
            argv = ("--beam-size", size, "--max-tokens", "10", "--compare-greedy")
            beams.append(json.loads((await self.run_app("beam_search", *argv)).messages[0]))
        one, three = beams
        for beam in beams:
            self.assertTrue(beam["text"].strip())
            self.assertEqual(beam["tokens"], 10)
            self.assertLess(beam["score"], 0)
        self.assertLess(abs(one["score"] - one["greedy_score"]), 1e-4)
        self.assertGreaterEqual(three["score"], three["greedy_score"] - 1e-4)
        self.assertPagesReturned()

    async def test_parallel_generation(self):
        run = await self.run_app(
            "parallel_generation",
            "--max-tokens",
            "12",
            "--prompts",
            "What is the capital of France?|Name a fruit.",
        )
        self.assertIn("Paris", run.line("0: "))
        self.assertTrue(run.line("1: ").strip())
        self.assertPagesReturned()

    async def test_tree_of_thought(self):
        run = await self.run_app("tree_of_thought", "--branches", "2", "--max-tokens", "3")
        leaves = [m for m in run.messages if m.startswith("leaf ")]
        self.assertEqual(len(leaves), 8)
        self.assertPagesReturned()

    async def test_skeleton_of_thought(self):
        run = await self.run_app("skeleton_of_thought", "--points", "3", "--max-tokens", "8")
        points = run.line("skeleton: ").split(" | ")
        self.assertTrue(1 <= len(points) <= 3)
        expanded = [m for m in run.messages if m.startswith("point ")]
        self.assertEqual(len(expanded), len(points))
        self.assertPagesReturned()

    async def test_graph_of_thought_merges_each_pair_after_its_proposals(self):
        run = await self.run_app("graph_of_thought", "--budgets", "3,4,5,6")
        order = [m.split(":")[0] for m in run.messages]
        self.assertEqual(
            sorted(order),
            sorted(
                [
                    "proposal 0",
                    "proposal 1",
                    "proposal 2",
                    "proposal 3",
                    "merge 0+1",
                    "merge 2+3",
                    "merge final",
                ]
            ),
        )
        for merge, inputs in (("merge 0+1", (0, 1)), ("merge 2+3", (2, 3))):
            for i in inputs:
                self.assertLess(order.index(f"proposal {i}"), order.index(merge))
        self.assertEqual(order[-1], "merge final")
        self.assertPagesReturned()

    async def test_recursion_of_thought(self):
        run = await self.run_app("recursion_of_thought", "--depth", "1", "--max-tokens", "10")
        nodes = [m for m in run.messages if m.startswith("node ")]
        self.assertTrue(nodes)
        self.assertTrue(run.messages[-1].startswith("answer: "))
        self.assertPagesReturned()

    async def test_prefix_tree(self):
        run = await self.run_app("prefix_tree", "--max-tokens", "3")
        self.assertEqual([m.split(":")[0] for m in run.messages], [str(i) for i in range(8)])
        self.assertPagesReturned()

    async def test_output_validation(self):
        run = await self.run_app("output_validation")
        self.assertEqual(run.messages[-1], "best: Paris")
        probs = [float(m.split("\t")[1]) for m in run.messages[:-1]]
        self.assertAlmostEqual(sum(probs), 1.0, places=3)
        self.assertPagesReturned()

    async def test_watermarking(self):
        run = await self.run_app("watermarking", "--max-tokens", "24")
        z = {m.split(":")[0]: float(m.rsplit("z=", 1)[1]) for m in run.messages[1:]}
        self.assertGreater(z["watermarked"], 2.0)
        self.assertGreater(z["watermarked"], z["plain"])
        self.assertPagesReturned()


class DecodingAppTests(AppTestCase):
    async def test_speculative_decoding_accepts_drafts(self):
        prompt = "Repeat this sentence: the quick brown fox jumps over the lazy dog."
        run = await self.run_app("speculative_decoding", "--max-tokens", "24", "--prompt", prompt)
        steps, accepted = map(int, re.findall(r"\d+", run.messages[1]))
        self.assertIn("lazy dog", run.messages[0])
        self.assertGreater(accepted, 0)
        self.assertLess(steps, 24)
        self.assertPagesReturned()

    async def test_jacobi_decoding(self):
        prompt = "Write the alphabet: A B C"
        run = await self.run_app("jacobi_decoding", "--prompt", prompt, "--max-tokens", "12")
        iterations, tokens = map(int, re.findall(r"\d+", run.messages[1]))
        greedy = await self.run_app("text_completion", "--prompt", prompt, "--max-tokens", "12")
        greedy_tokens = int(re.search(r"tokens=(\d+)", greedy.messages[1]).group(1))
        # Jacobi decoding only accepts drafts greedy decoding would have produced.
        self.assertEqual(tokens, greedy_tokens)
        self.assertEqual(run.messages[0].replace("<|im_end|>", ""), greedy.messages[0])
        self.assertLessEqual(iterations, tokens)
        self.assertPagesReturned()

    async def test_constrained_decoding_writes_json_under_the_schema(self):
        schema = {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 8},
                "age": {"type": "integer", "minimum": 0, "maximum": 40},
            },
            "required": ["name", "age"],
            "additionalProperties": False,
        }
        run = await self.run_app(
            "constrained_decoding", "--max-tokens", "32", "--schema", json.dumps(schema)
        )
        jsonschema.validate(json.loads(run.messages[0]), schema)
        self.assertPagesReturned()
        run = await self.run_app("constrained_decoding", "--schema", '{"type": 3}')
        self.assertTrue(run.messages[0].startswith("GrammarError: "), run.messages)

    async def test_attention_sink_keeps_memory_bounded(self):
        run = await self.run_app(
            "attention_sink", "--max-tokens", "40", "--sink", "4", "--window", "16"
        )
        figures = dict(p.split("=") for p in run.messages[1].split())
        self.assertGreater(int(figures["pages_freed"]), 0)
        self.assertLessEqual(int(figures["max_pages"]), 3)  # sink page + 16-token window
        self.assertPagesReturned()

    async def test_windowed_attention(self):
        run = await self.run_app("windowed_attention", "--max-tokens", "24", "--window", "16")
        figures = dict(p.split("=") for p in run.messages[1].split())
        self.assertGreater(int(figures["pages_freed"]), 0)
        self.assertLessEqual(int(figures["max_pages"]), 3)
        self.assertPagesReturned()

    async def test_hierarchical_attention(self):
        run = await self.run_app("hierarchical_attention", "--max-tokens", "12")
        self.assertRegex(run.messages[0], r"nodes=8 tokens=\d+")
        self.assertTrue(run.messages[1].strip())
        self.assertPagesReturned()

    async def test_prefix_caching_hits_on_the_second_run(self):
        first = await self.run_app("prefix_caching", "--max-tokens", "12")
        self.assertEqual(first.messages[0], "cache miss")
        held = self.service.info.num_kv_pages - self.service.resources.pages.available
        self.assertGreater(held, 0)  # the persistent export keeps its pages
        second = await self.run_app("prefix_caching", "--max-tokens", "12")
        self.assertEqual(second.messages[0], "cache hit")
        self.assertIn("light", second.messages[1].lower())
        self.assertPagesReturned(held)
        third = await self.run_app("prefix_caching", "-i", "--max-tokens", "4")
        self.assertEqual(third.messages[0], "cache miss")


class AgentAppTests(AppTestCase):
    async def test_agent_react(self):
        run = await self.run_app(
            "agent_react", "--rounds", "2", "--max-tokens", "8", "--tool-ms", "20"
        )
        kinds = [m.split(":")[0] for m in run.messages]
        self.assertEqual(kinds, ["round 0", "observation 0", "round 1", "observation 1", "answer"])
        self.assertPagesReturned()

    async def test_agent_swarm_pipeline_across_instances(self):
        roles = ["idea", "plot", "characters", "dialogue"]
        runs = {}
        for role in reversed(roles):  # later stages subscribe before earlier ones publish
            runs[role] = await self.launch("agent_swarm", "--role", role, "--max-tokens", "8")
            if role != "idea":
                await self.wait_for_message(runs[role])
                self.assertEqual(runs[role].messages[0], f"{role}: waiting")
        self.signal(runs["idea"], "a lighthouse keeper")
        await self.wait(*runs.values())
        for role in roles:
            self.assertEqual(runs[role].reason, NORMAL)
            self.assertTrue(runs[role].messages[-1].startswith(f"{role}: "))
        self.assertPagesReturned()


class ServerAppTests(AppTestCase):
    async def test_http_server_routes(self):
        port = await self.serve("http_server")
        self.assertEqual(await self.http(port, "/"), (200, "Hello from a pie server instance!"))
        self.assertEqual(await self.http(port, "/echo", b"ping"), (200, "ping"))
        code, headers = await self.http(port, "/headers")
        self.assertEqual((code, json.loads(headers)["x-test"]), (200, "yes"))
        self.assertEqual(await self.http(port, "/wait?ms=10"), (200, "waited 10 ms"))
        self.assertEqual(
            await self.http(port, "/events?n=2"),
            (200, 'data: {"event": 0}\n\ndata: {"event": 1}\n\ndata: [DONE]\n\n'),
        )
        self.assertEqual((await self.http(port, "/nope"))[0], 404)

    async def test_openai_chat_completion(self):
        port = await self.serve("openai")
        body = {
            "model": self.service.name,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 12,
            "temperature": 0,
        }
        code, text = await self.http(port, "/v1/chat/completions", json.dumps(body).encode())
        self.assertEqual(code, 200, text)
        answer = json.loads(text)
        self.assertEqual(answer["object"], "chat.completion")
        self.assertIn("Paris", answer["choices"][0]["message"]["content"])
        self.assertLessEqual(answer["usage"]["completion_tokens"], 12)
        code, text = await self.http(port, "/v1/chat/completions", b"{not json")
        self.assertEqual(code, 400)
        code, text = await self.http(port, "/v1/models")
        self.assertEqual(json.loads(text)["data"][0]["id"], self.service.name)
        self.assertPagesReturned()


class SandboxAppTests(AppTestCase):
    """A selection of the apps again, each instance inside the WebAssembly sandbox:
    together they import every SDK module (chat templates, forks, drafts and tree
    masks, beam search, vocabulary scans, export/import, pub/sub, HTTP handlers)."""

    def make_executor(self):
        from pie.runtime.executors import build
        from pie.runtime.executors.wasm import WasmExecutor

        build.build()  # cached under $PIE_HOME/sandbox; rebuilt when guest sources change
        return WasmExecutor()

    async def test_helloworld_and_text_completion(self):
        run = await self.run_app("helloworld")
        self.assertIn(run.id, run.messages[0])
        run = await self.run_app(
            "text_completion", "--prompt", "What is 2+2?", "--max-tokens", "16"
        )
        self.assertIn("4", run.messages[0])
        self.assertPagesReturned()

    async def test_forks_beams_and_drafts(self):
        run = await self.run_app(
            "parallel_generation",
            "--max-tokens",
            "8",
            "--prompts",
            "What is the capital of France?|Hi",
        )
        self.assertIn("Paris", run.line("0: "))
        run = await self.run_app("beam_search", "--beam-size", "2", "--max-tokens", "6")
        beam = json.loads(run.messages[0])
        self.assertEqual((bool(beam["text"].strip()), beam["tokens"]), (True, 6))
        prompt = "Repeat this sentence: the quick brown fox jumps over the lazy dog."
        run = await self.run_app("speculative_decoding", "--max-tokens", "20", "--prompt", prompt)
        self.assertGreater(int(re.search(r"accepted=(\d+)", run.messages[1]).group(1)), 0)
        self.assertPagesReturned()

    async def test_constrained_decoding(self):
        run = await self.run_app("constrained_decoding", "--max-tokens", "24")
        self.assertIsInstance(json.loads(run.messages[0]), dict)

    async def test_prefix_caching(self):
        first = await self.run_app("prefix_caching", "--max-tokens", "6")
        second = await self.run_app("prefix_caching", "--max-tokens", "6")
        self.assertEqual((first.messages[0], second.messages[0]), ("cache miss", "cache hit"))

    async def test_messages_store_and_pubsub(self):
        run = await self.launch("messaging", "--count", "2")
        self.signal(run, "a")
        self.signal(run, "b")
        await self.wait(run)
        self.assertEqual(run.messages, ["reply 1: A", "reply 2: B"])
        run = await self.run_app("kvs")
        self.assertEqual(run.messages[-1], "runs=1")
        runs = []
        for role in ("dialogue", "characters", "plot", "idea"):
            runs.append(await self.launch("agent_swarm", "--role", role, "--max-tokens", "4"))
            if role != "idea":
                await self.wait_for_message(runs[-1])  # subscribed
        self.signal(runs[-1], "a lighthouse")
        await self.wait(*runs)
        self.assertEqual([r.reason for r in runs], [NORMAL] * 4)

    async def test_http_server(self):
        port = await self.serve("http_server")
        self.assertEqual(await self.http(port, "/echo", b"ping"), (200, "ping"))
        port = await self.serve("openai")
        body = {
            "model": self.service.name,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4,
            "stop": ["\n"],
            "logprobs": True,
        }
        code, text = await self.http(port, "/v1/chat/completions", json.dumps(body).encode())
        self.assertEqual(code, 200, text)
        answer = json.loads(text)  # the sandbox's clock is the wall clock, and stdlib works there
        self.assertLess(abs(answer["created"] - time.time()), 60)
        entries = answer["choices"][0]["logprobs"]["content"]
        self.assertEqual(len(entries), answer["usage"]["completion_tokens"])

    async def test_bare_abi_fetch_and_code_actions(self):
        run = await self.run_app("helloworld_plain")
        self.assertIn(run.id, run.messages[0])
        run = await self.run_app("image_fetch", "--url", self.tools.url("/image.png"))
        info = json.loads(run.messages[0])
        self.assertEqual(
            (info["bytes"], info["width"], info["height"]), (len(self.tools.png), 123, 45)
        )
        replies = [
            "```python\nx = sum(range(5))\nprint(x)\n```",
            "```python\nwhile True:\n    x += 1\n```",
            "```python\nprint(x > 10)\n```",
            "Final answer: 10",
        ]
        run = await self.run_app(
            "agent_codeact", "--canned", json.dumps(replies), "--step-budget", "500"
        )
        self.assertEqual(
            [run.line(f"observation {i}: ") for i in range(3)],
            ["10", "step budget exceeded (500 lines)", "True"],
        )
        run = await self.run_app(
            "agent_react_bench", "--tools", self.tools.url("/tool"), "--rounds", "2",
            "--max-tokens", "2", "--drop", "--overlap",
        )  # fmt: skip
        result = json.loads(run.messages[0])
        self.assertEqual(result["config"], "drop+overlap")
        self.assertGreater(result["pages_dropped"], 0)
        self.assertEqual(
            (self.tools.calls["drop+overlap"], self.tools.peak["drop+overlap"]), (6, 3)
        )
        self.assertPagesReturned()

    async def test_every_other_app_finishes(self):
        """The apps not run above, with tiny budgets: each finishes normally in the sandbox."""
        for app, *arguments in (
            ("tree_of_thought", "--branches", "2", "--max-tokens", "2"),
            ("skeleton_of_thought", "--max-tokens", "4"),
            ("graph_of_thought", "--budgets", "2,2,2,2"),
            ("recursion_of_thought", "--depth", "1", "--max-tokens", "4"),
            ("prefix_tree", "--max-tokens", "2"),
            ("jacobi_decoding", "--max-tokens", "6"),
            ("attention_sink", "--max-tokens", "20", "--window", "16"),
            ("windowed_attention", "--max-tokens", "20", "--window", "16"),
            ("hierarchical_attention", "--max-tokens", "4"),
            ("output_validation",),
            ("watermarking", "--max-tokens", "8"),
            ("agent_react", "--rounds", "1", "--max-tokens", "4", "--tool-ms", "5"),
            ("debugger", "--policy", "k 2"),
            ("bench_spawn_time",),
            ("bench_host_call", "--iterations", "20"),
            ("bench_host_call", "--aggregate"),
            ("debugger", "--policy", "batching_algo:t:8:16"),
        ):
            run = await self.run_app(app, *arguments)
            self.assertTrue(run.messages, app)
        self.assertPagesReturned()

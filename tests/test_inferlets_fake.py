"""Every example inferlet on the fake model (pie.inferlet.testing): fast, no weights needed.

The apps run under the real guest driver on pie's host (FakeWorld: the real
runtime and model service over a fake worker), which checks pages, masks and
queue order. Where the fake model's outputs can be
predicted (greedy continuations, scores), they are compared exactly; this is
where the decoding apps are checked to reproduce plain greedy decoding, which
bfloat16 on the real model cannot promise across differently shaped passes.
tests/test_inferlets_apps.py runs the same apps on SmolLM2 through the protocol.
"""

from __future__ import annotations

import json
import os

from twisted.trial import unittest

from pie.inferlet import _abi, get_auto_model, testing
from pie.inferlet.testing import FakeModel, FakeWorld, greedy_reference, reference_distribution
from pie.runtime.hostapi import HostApi
from pie.runtime.hostcalls import HOST_CALLS, MODEL_COMMANDS
from pie.runtime.sandbox.loader import load_main
from tests.httpfixtures import make_png

APPS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "inferlets")


def app(name: str):
    with open(os.path.join(APPS, name + ".py")) as f:
        return load_main({"main.py": f.read()}, tag=f"{name}/")


def chat_prompt(world: FakeWorld, user: str) -> list[int]:
    """Token ids of a one-turn chat with the generation prompt (the fake's SmolLM2 template)."""
    text = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        f"Face<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )
    return world.model.tokenize(text)


class FakeAppTests(unittest.TestCase):
    def run_app(self, name: str, *args: str, world: FakeWorld | None = None):
        world = world or FakeWorld()
        instance = world.finish(app(name), list(args))
        instance.outcome()
        self.assertEqual(world.live_pages, len({p for ps in world.exports.values() for p in ps}))
        return world, instance

    def greedy_text(self, world: FakeWorld, user: str, n: int) -> str:
        return world.model.detokenize(greedy_reference(world.model, chat_prompt(world, user), n))

    def test_text_completion_is_greedy(self):
        world, inst = self.run_app("text_completion", "--prompt", "hi", "--max-tokens", "9")
        self.assertEqual(inst.sent[0], self.greedy_text(world, "hi", 9))

    def test_text_completion_raw_feeds_plain_text(self):
        world, inst = self.run_app(
            "text_completion", "--raw", "--prompt", "hi", "--max-tokens", "9"
        )
        want = greedy_reference(world.model, world.model.tokenize("hi"), 9)
        self.assertEqual(inst.sent[0], world.model.detokenize(want))
        self.assertEqual(len(inst.sent), 2)

    def test_text_completion_without_a_template_falls_back_to_raw_with_bos(self):
        model = FakeModel(chat_template="", bos_token_id=0)
        world, inst = self.run_app(
            "text_completion", "--prompt", "hi", "--max-tokens", "9", world=FakeWorld(model)
        )
        notice, text, timing = inst.sent
        self.assertEqual(
            notice, "model 'fake-model' has no chat template: the prompt is fed as plain text"
        )
        want = greedy_reference(model, [0] + model.tokenize("hi"), 9)
        self.assertEqual(text, model.detokenize(want))
        self.assertTrue(timing.startswith("tokens=9 "))

    def test_decoders_reproduce_greedy(self):
        for name in ("speculative_decoding", "jacobi_decoding"):
            world, inst = self.run_app(name, "--prompt", "ab ab ab ab", "--max-tokens", "20")
            self.assertEqual(inst.sent[0], self.greedy_text(world, "ab ab ab ab", 20), name)

    def test_beam_search_of_width_one_is_greedy(self):
        world, inst = self.run_app(
            "beam_search",
            "--prompt",
            "x",
            "--beam-size",
            "1",
            "--max-tokens",
            "6",
            "--compare-greedy",
        )
        beam = json.loads(inst.sent[0])
        self.assertEqual(beam["text"], self.greedy_text(world, "x", 6))
        self.assertLess(abs(beam["score"] - beam["greedy_score"]), 1e-9)

    def test_forking_apps(self):
        _, inst = self.run_app("tree_of_thought", "--branches", "2", "--max-tokens", "2")
        self.assertEqual(len(inst.sent), 8)
        _, inst = self.run_app("prefix_tree", "--max-tokens", "2")
        self.assertEqual(len(inst.sent), 8)
        _, inst = self.run_app("skeleton_of_thought", "--max-tokens", "4")
        self.assertTrue(inst.sent[0].startswith("skeleton: "))
        _, inst = self.run_app("graph_of_thought", "--budgets", "2,3,4,5")
        self.assertEqual(inst.sent[-1].split(":")[0], "merge final")
        _, inst = self.run_app("recursion_of_thought", "--max-tokens", "4")
        self.assertTrue(inst.sent[-1].startswith("answer: "))

    def test_parallel_generation_matches_separate_contexts(self):
        world, inst = self.run_app(
            "parallel_generation", "--system", "S", "--prompts", "a|b", "--max-tokens", "5"
        )
        for i, user in enumerate("ab"):
            text = (
                f"<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                "<|im_start|>assistant\n"
            )
            want = greedy_reference(world.model, world.model.tokenize(text), 5)
            self.assertEqual(inst.sent[i], f"{i}: {world.model.detokenize(want)}")

    def test_prefix_caching_hit_equals_miss(self):
        world = FakeWorld()
        _, miss = self.run_app("prefix_caching", "--max-tokens", "6", world=world)
        _, hit = self.run_app("prefix_caching", "--max-tokens", "6", world=world)
        self.assertEqual((miss.sent[0], hit.sent[0]), ("cache miss", "cache hit"))
        self.assertEqual(miss.sent[1], hit.sent[1])

    def test_streaming_attention_frees_pages(self):
        for name in ("attention_sink", "windowed_attention"):
            _, inst = self.run_app(name, "--max-tokens", "40", "--window", "8")
            figures = dict(p.split("=") for p in inst.sent[1].split())
            self.assertLessEqual(int(figures["max_pages"]), 4)  # page size 4: sink + 8 + 1
            self.assertGreater(int(figures["pages_freed"]), 5)

    def test_scoring_apps(self):
        _, inst = self.run_app("output_validation", "--candidates", "a|b")
        self.assertTrue(inst.sent[-1].startswith("best: "))
        _, inst = self.run_app("watermarking", "--max-tokens", "30")
        z = {m.split(":")[0]: float(m.rsplit("z=", 1)[1]) for m in inst.sent[1:]}
        self.assertGreater(z["watermarked"], z["plain"])

    def test_hierarchical_attention_masks_the_document(self):
        world, inst = self.run_app("hierarchical_attention", "--max-tokens", "3")
        self.assertRegex(inst.sent[0], r"nodes=8 tokens=\d+")
        masks = [
            a[5]
            for n, a in world.instances[0].calls
            if n in ("forward_text", "forward_text_no_output")
        ]
        self.assertTrue(any(m for m in masks))  # custom masks went out

    def test_messaging_kvs_agents(self):
        world = FakeWorld()
        inst = world.spawn(app("messaging"), [])
        for word in ("x", "y", "z"):
            inst.signal(word)
        world.run_until_idle()
        self.assertEqual(inst.sent, ["reply 1: X", "reply 2: Y", "reply 3: Z"])
        _, inst = self.run_app("kvs")
        self.assertEqual(inst.sent[-1], "runs=1")
        world, inst = self.run_app("agent_react", "--tool-ms", "40", "--max-tokens", "3")
        self.assertEqual(world.now_ms, 80)  # two simulated tool calls on the virtual clock
        world = FakeWorld()
        roles = ["dialogue", "characters", "plot", "idea"]
        runs = [world.spawn(app("agent_swarm"), ["--role", r, "--max-tokens", "3"]) for r in roles]
        runs[-1].signal("a cat")
        world.run_until_idle()
        for role, run in zip(roles, runs, strict=True):
            run.outcome()
            self.assertTrue(run.sent[-1].startswith(f"{role}: "))

    def test_servers_and_tools(self):
        """(The bundled OpenAI server inferlet has its own tests: test_openai_inferlet.)"""
        _, inst = self.run_app(
            "http_server", "--pie-http-request", json.dumps({"path": "/wait", "query": "ms=7"})
        )
        self.assertEqual(json.loads(inst.result)["body"], "waited 7 ms")
        _, inst = self.run_app(
            "http_server", "--pie-http-request", json.dumps({"path": "/events", "query": "n=2"})
        )
        self.assertEqual(inst.streamed["status"], 200)
        self.assertEqual(
            inst.streamed["headers"],
            [("content-type", "text/event-stream"), ("cache-control", "no-cache")],
        )
        self.assertEqual(
            inst.streamed["chunks"],
            [b'data: {"event": 0}\n\n', b'data: {"event": 1}\n\n', b"data: [DONE]\n\n"],
        )
        self.assertTrue(inst.streamed["finished"])
        world, inst = self.run_app("debugger", "--policy", "k 2")
        self.assertEqual(inst.sent[1], "after: k 2")
        self.assertEqual(world.service.get_batching(), "k 2")
        _, inst = self.run_app("helloworld")
        self.assertIn(inst.id, inst.sent[0])
        for name in ("bench_spawn_time", "bench_host_call"):
            self.run_app(name)

    def test_helloworld_plain_sends_what_helloworld_sends(self):
        world = FakeWorld()
        plain = world.finish(app("helloworld_plain"), [])
        sdk = world.finish(app("helloworld"), [])
        self.assertEqual(
            [m.replace(plain.id, "ID") for m in plain.sent],
            [m.replace(sdk.id, "ID") for m in sdk.sent],
        )
        self.assertEqual(
            [name for name, _ in plain.calls], ["get_instance_id", "get_version", "send"]
        )

    def test_image_fetch_parses_the_png_it_fetched(self):
        png = make_png(31, 17)
        world = FakeWorld()
        world.web["http://img.test/a.png"] = lambda url, method, body: (200, [], png)
        _, inst = self.run_app("image_fetch", "--url", "http://img.test/a.png", world=world)
        info = json.loads(inst.sent[0])
        self.assertEqual((info["bytes"], info["width"], info["height"]), (len(png), 31, 17))
        world.web["http://img.test/b.png"] = lambda url, method, body: (200, [], png[:-20])
        _, inst = self.run_app("image_fetch", "--url", "http://img.test/b.png", world=world)
        self.assertEqual(inst.sent, ["error: chunk IDAT is truncated"])
        world.web["http://img.test/c.png"] = lambda url, method, body: (404, [], b"no")
        _, inst = self.run_app("image_fetch", "--url", "http://img.test/c.png", world=world)
        self.assertEqual(inst.sent, ["error: HTTP status 404"])

    def test_agent_codeact_observes_what_its_code_printed(self):
        replies = [
            "Let me compute.\n```python\ndef f(n):\n    return n * 2\nprint(f(21))\n```",
            "```python\nprint(1 / 0)\n```",
            "```python\nimport math\nprint(math.isqrt(f(50)))\n```",
            "```python\nfor i in range(10**9):\n    pass\n```",
            "no code here",
        ]
        _, inst = self.run_app(
            "agent_codeact", "--canned", json.dumps(replies), "--turns", "5",
            "--step-budget", "300",
        )  # fmt: skip
        observations = [m.split(": ", 1)[1] for m in inst.sent if m.startswith("observation")]
        self.assertEqual(
            observations,
            [
                "42",
                "ZeroDivisionError: division by zero",
                "10",
                "step budget exceeded (300 lines)",
                "No ```python block found.",
            ],
        )
        self.assertEqual(inst.sent[-2], "answer: none")

    def test_agent_react_bench_calls_its_tools_over_fetch(self):
        world = FakeWorld()
        called = []

        def tool(url, method, body):
            called.append(url.split("?")[0])
            return 200, [], b"Paris has 2.1 million people." if "search" in url else b"doc " * 40

        world.web["http://tools.test/search"] = tool
        world.web["http://tools.test/docs"] = tool
        args = ["--tools", "http://tools.test", "--rounds", "3", "--max-tokens", "3"]
        _, inst = self.run_app("agent_react_bench", *args, "--drop", "--cache", world=world)
        result = json.loads(inst.sent[0])
        self.assertEqual((result["config"], result["prefix"]), ("cache+drop", "miss"))
        self.assertGreater(result["pages_dropped"], 0)
        self.assertEqual(called, ["http://tools.test/search", *["http://tools.test/docs"] * 2] * 3)
        _, again = self.run_app("agent_react_bench", *args, "--cache", world=world)
        self.assertEqual(json.loads(again.sent[0])["prefix"], "hit")

    def test_bench_host_call_aggregates_samples(self):
        world = FakeWorld()
        for _ in range(3):
            self.run_app("bench_host_call", "--iterations", "5", world=world)
        samples = [json.loads(world.store[k]) for k in world.store if "/sample/" in k]
        _, inst = self.run_app("bench_host_call", "--aggregate", world=world)
        aggregate = json.loads(inst.sent[0])
        self.assertEqual(aggregate["samples"], 3)
        values = sorted(s["async_call_us"] for s in samples)
        self.assertAlmostEqual(aggregate["async_call_us"]["median"], values[1])
        self.assertAlmostEqual(aggregate["async_call_us"]["mean"], sum(values) / 3)

    def test_bad_arguments_fail_the_instance(self):
        world = FakeWorld(FakeModel())
        inst = world.finish(app("text_completion"), ["--max-tokens", "many"])
        self.assertEqual(inst.status, "failed")
        self.assertIn("invalid int value", inst.error)


class FakeHostTableTests(unittest.TestCase):
    """FakeWorld is the real host: every host call is served by pie's HostApi, none here."""

    def test_every_host_call_goes_through_the_real_host_api(self):
        world = FakeWorld()
        self.assertIs(type(world.runtime.hostapi), HostApi)
        served = []
        real_call = world.runtime.hostapi.call
        world.runtime.hostapi.call = lambda inst, name, args: (
            served.append(name) or real_call(inst, name, args)
        )
        inst = world.finish(app("prefix_caching"), ["--max-tokens", "3"])
        inst.outcome()
        self.assertEqual(served, [name for name, _ in inst.calls])
        self.assertGreater(len(set(served)), 10)

    def test_the_host_api_serves_the_whole_table_and_testing_serves_none(self):
        handlers = {n[1:] for n in vars(HostApi) if n.startswith("_") and n[1:] in HOST_CALLS}
        self.assertEqual(handlers | MODEL_COMMANDS, set(HOST_CALLS))
        for value in vars(testing).values():
            if isinstance(value, type) and value.__module__ == testing.__name__:
                mine = {n[1:] for n in vars(value) if n.startswith("_")} & set(HOST_CALLS)
                self.assertEqual(mine, set(), value.__name__)

    def test_a_queue_reading_pages_another_queue_has_not_written_fails(self):
        """Held queues: qa's prefill reaches the model only when qa is awaited."""

        tokens = FakeModel().tokenize("abcdef")

        def main(wait: bool):
            async def main(args):
                model = get_auto_model()
                qa, qb = model.create_queue(), model.create_queue()
                pages = model.kv_pages.acquire(qb, 2)
                await qb.synchronize()
                _abi.call("forward_text_no_output", qa.id, 2, pages, tokens, [*range(6)], [])
                if wait:
                    await qa.synchronize()
                dists = await _abi.call_async("forward_text", qb.id, 3, pages, [40], [6], [], [0])
                return repr(dists[0][0])

            return main

        world = FakeWorld()
        racing = world.finish(main(False))
        self.assertEqual(racing.status, "failed")
        self.assertIn("attended KV slot 0 was never written", racing.error)
        want = reference_distribution(world.model, tokens + [40])[0]
        self.assertEqual(eval(world.run(main(True))), want)

    def test_a_freed_page_forgets_what_it_held(self):
        """A page reused by the host reads as never written, not as its last owner's tokens."""

        async def writer(args):
            model = get_auto_model()
            queue = model.create_queue()
            pages = model.kv_pages.acquire(queue, 1)
            await _abi.call_async(
                "forward_text", queue.id, 4, pages, [40] * 4, [*range(4)], [], [3]
            )

        async def stale_reader(args):
            model = get_auto_model()
            queue = model.create_queue()
            pages = model.kv_pages.acquire(queue, 1)
            await _abi.call_async("forward_text", queue.id, 4, pages, [41], [3], [], [0])

        world = FakeWorld()
        world.run(writer)
        self.assertEqual((world.live_pages, world.pages), (0, {}))
        reader = world.finish(stale_reader)
        self.assertIn("attended KV slot 0 was never written", reader.error)

"""Grammar-constrained generation on SmolLM2-135M (float32 worker), end to end (issue 13).

Programs run in the dev executor against the real runtime, model service and
worker: `ctx.generate_until(..., grammar=g)` takes the engine's fast path
(masks computed on the host, applied to the full-vocabulary logits), and a
custom sampler drives a Matcher token by token.
"""

from __future__ import annotations

import json
import os
import textwrap

import jsonschema
import pytest
from twisted.internet import reactor
from twisted.trial import unittest

from pie.runtime.executors.dev import DevExecutor
from pie.runtime.instances import NORMAL_FINISH
from tests.model_fixtures import model_path
from tests.runtime_doubles import RecordingOwner, make_runtime

pytestmark = pytest.mark.slow

_worker = None


def shared_worker():
    """float32: these tests compare texts of two paths (bf16 near-ties differ by CPU)."""
    global _worker
    if _worker is None:
        from pie.service.local import load_worker

        _worker = load_worker(model_path(), dtype="float32")
    return _worker


_whole = None


def whole_vocabulary_worker():
    """float32, and every distribution over the whole vocabulary (dist_size is clamped to
    it): a custom sampler then sees every token the fast path may draw."""
    global _whole
    if _whole is None:
        from pie.service.local import load_worker

        _whole = load_worker(model_path(), dtype="float32", dist_size=1 << 20, num_embeds=16)
    return _whole


PROGRAM = textwrap.dedent(
    """
    import json
    from pie.inferlet import Grammar, GrammarError, Greedy, Temperature, gather, get_auto_model, send

    def grammar_of(kind, source):
        if kind == "json_schema":
            return Grammar.json_schema(source)
        if kind == "choice":
            return Grammar.choice(json.loads(source))
        return getattr(Grammar, kind)(source)

    def context(model, prompt):
        ctx = model.create_context()
        ctx.user(prompt)
        ctx.cue()
        return ctx

    async def sample(model, prompt, grammar, seed, max_tokens):
        ctx = context(model, prompt)
        sampler = Greedy() if seed < 0 else Temperature(1.0, seed=seed)
        text = await ctx.generate_until(max_tokens=max_tokens, sampler=sampler, grammar=grammar)
        ctx.close()
        return text

    async def per_token(model, prompt, grammar, seed, max_tokens):
        # a custom sampler over the top-k distribution, filtered by a Matcher: greedy, or
        # the SDK's seeded Temperature(1.0) over the allowed candidates
        ctx = context(model, prompt)
        matcher = await grammar.matcher(model)
        draw = Temperature(1.0, seed=seed) if seed >= 0 else Greedy()
        out = []
        for _ in range(max_tokens):
            dist = await ctx.decode_step()
            allowed = set(matcher.allowed_ids(dist.ids))
            kept = [(t, p) for t, p in zip(dist.ids, dist.probs) if t in allowed]
            token = draw.sample([t for t, _ in kept], [p for _, p in kept])
            assert matcher.consume([token])
            if token in model.eos_token_ids:
                break
            out.append(token)
            ctx.fill_token(token)
            if matcher.is_stopped():
                break
        matcher.close()
        ctx.close()
        return model.tokenizer.detokenize(out)

    async def main(args):
        mode, kind, source, prompt, count, max_tokens = args
        count, max_tokens = int(count), int(max_tokens)
        model = get_auto_model()
        try:
            grammar = grammar_of(kind, source)
            (await grammar.matcher(model)).close()  # a malformed grammar fails here
        except GrammarError as e:
            send("GrammarError: " + str(e))
            return
        if mode == "sample":
            texts = await gather(
                *[sample(model, prompt, grammar, seed, max_tokens) for seed in range(count)]
            )
            for text in texts:
                send(text)
        elif mode == "greedy-both":
            send(await sample(model, prompt, grammar, -1, max_tokens))
            send(await per_token(model, prompt, grammar, -1, max_tokens))
        elif mode == "seeded-both":
            for seed in range(count):
                send(await sample(model, prompt, grammar, seed, max_tokens))
                send(await per_token(model, prompt, grammar, seed, max_tokens))
        elif mode == "far":
            target = json.loads(source)[0]
            first = model.tokenizer.tokenize(target)[0]
            ctx = context(model, prompt)
            dist = await ctx.decode_step()
            ctx.close()
            send(str(first in dist.ids))
            send(await sample(model, prompt, grammar, -1, max_tokens))
    """
).encode()

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "pet": {
            "type": "object",
            "properties": {
                "kind": {"enum": ["cat", "dog", "fish"]},
                "age": {"type": "integer", "minimum": 0, "maximum": 30},
            },
            "required": ["kind", "age"],
            "additionalProperties": False,
        },
        "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 2},
    },
    "required": ["name", "pet", "scores"],
    "additionalProperties": False,
}


class GrammarGenerationTests(unittest.TestCase):
    timeout = 600

    def setUp(self):
        if model_path() is None:
            raise unittest.SkipTest("SmolLM2 is not in $PIE_HOME/models")
        self.start(shared_worker())

    def start(self, worker) -> None:
        from pie.service.service import ModelService

        self.service = ModelService(worker, reactor=reactor)
        self.runtime = make_runtime(
            self,
            home=os.path.abspath(self.mktemp()),
            executor=DevExecutor(),
            services={"smollm2": self.service},
        )
        self.owner = RecordingOwner()

    async def run_program(self, *args: str) -> list[str]:
        digest = await self.runtime.add_program(PROGRAM)
        instance_id = await self.runtime.launch(digest, list(args), self.owner)
        reason = await self.owner.ended(instance_id)
        self.assertEqual(reason, NORMAL_FINISH)
        return self.owner.messages(instance_id)

    async def test_fifty_samples_at_temperature_one_validate(self):
        prompt = "Describe a person and their pet as JSON."
        texts = await self.run_program(
            "sample", "json_schema", json.dumps(SCHEMA), prompt, "50", "64"
        )
        self.assertEqual(len(texts), 50)
        for text in texts:
            jsonschema.validate(json.loads(text), SCHEMA)
        self.assertGreater(len(set(texts)), 1)  # really sampled
        self.assertEqual(self.service.resources.pages.available, self.service.info.num_kv_pages)

    async def test_a_date_regex_always_matches(self):
        pattern = r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
        texts = await self.run_program(
            "sample", "regex", pattern, "When was Rome founded?", "8", "16"
        )
        for text in texts:
            self.assertRegex(text, "^" + pattern + "$")

    async def test_a_choice_returns_one_of_its_strings(self):
        options = ["Paris", "London", "a city in Peru"]
        texts = await self.run_program(
            "sample", "choice", json.dumps(options), "Capital of France?", "6", "12"
        )
        self.assertTrue(all(t in options for t in texts), texts)

    async def test_a_token_far_outside_the_top_64_still_completes(self):
        target = "zxqv 9917"
        outside, text = await self.run_program(
            "far", "choice", json.dumps([target]), "What is the capital of France?", "1", "16"
        )
        self.assertEqual(outside, "False")  # its first token is not among the top 64
        self.assertEqual(text, target)

    async def test_a_malformed_schema_is_a_clear_error(self):
        (message,) = await self.run_program(
            "sample", "json_schema", '{"type": "objec"}', "x", "1", "4"
        )
        self.assertEqual(message, "GrammarError: bad json_schema grammar: Invalid type: objec")

    async def test_a_per_token_matcher_agrees_with_the_fast_path(self):
        """Greedy on both paths; the custom sampler only sees the top 64, so the grammar is
        one whose tokens the model ranks there."""
        fast, slow = await self.run_program(
            "greedy-both", "regex", r"\d{4}-\d{2}-\d{2}", "What is today's date? (YYYY-MM-DD)",
            "1", "16",
        )  # fmt: skip
        self.assertRegex(fast, r"^\d{4}-\d{2}-\d{2}$")
        self.assertEqual(fast, slow)

    async def test_a_seeded_per_token_sampler_agrees_with_the_fast_path(self):
        """Temperature 1.0 on the same seed, token for token: both paths draw with the
        counter-based race (pie.inferlet.sampling), the fast path over the masked full
        vocabulary, the custom sampler over the allowed tokens of its distribution, here the
        whole vocabulary too (with the top 64 they agree whenever the fast path's pick is
        among them, tests/test_sampling_race.py)."""
        self.start(whole_vocabulary_worker())
        texts = await self.run_program(
            "seeded-both", "regex", r"[0-9]{4}-[0-9]{2}-[0-9]{2}", "What is today's date? (YYYY-MM-DD)",
            "6", "16",
        )  # fmt: skip
        fast, slow = texts[0::2], texts[1::2]
        self.assertEqual(len(fast), 6)
        for text in fast:  # ([0-9]: Rust's \d also takes other scripts' digits)
            self.assertRegex(text, r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
        self.assertEqual(fast, slow)
        self.assertGreater(len(set(fast)), 1)  # really sampled

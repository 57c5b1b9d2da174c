"""Context.generate on the engine's fast path (the `generate` host call) vs token by token."""

from __future__ import annotations

from twisted.trial import unittest

from pie.inferlet import get_auto_model
from pie.inferlet.fastpath import plan
from pie.inferlet.sampling import (
    Greedy,
    Length,
    Temperature,
    TopK,
    TopP,
    Typical,
    Until,
    UntilAny,
    any_of,
)
from pie.inferlet.testing import FakeModel, FakeWorld, greedy_reference

PROMPT = "the quick brown"


def _run(main, model=None):
    world = FakeWorld(model)
    instance = world.finish(main)
    return world, instance, instance.outcome()


def _calls(instance, name):
    return [args for n, args in instance.calls if n == name]


class PlanTests(unittest.TestCase):
    def test_standard_samplers_and_stops_map_to_the_engine(self):
        greedy = plan(Greedy(), any_of(Length(9), UntilAny([2, 5])), 64)
        self.assertEqual(
            (greedy.temperature, greedy.top_k, greedy.limit, greedy.stop_tokens),
            (0.0, 0, 9, (2, 5)),
        )
        self.assertEqual(plan(TopK(200, 0.5), Length(3), 64).top_k, 64)  # capped to dist_size
        top_p = plan(TopP(0.9, 0.7), Length(3) | Until([4, 6]), 64)
        self.assertEqual((top_p.top_k, top_p.top_p, top_p.stop_tokens), (64, 0.9, (6,)))
        self.assertEqual(plan(Temperature(0), Length(3), 64).temperature, 0.0)

    def test_anything_else_stays_per_token(self):
        self.assertIsNone(plan(lambda ids, probs: ids[0], Length(3), 64))
        self.assertIsNone(plan(Typical(), Length(3), 64))
        self.assertIsNone(plan(Greedy(), UntilAny([2]), 64))  # no length bound
        self.assertIsNone(plan(Greedy(), Length(3) | (lambda generated: False), 64))

        class Mine(Greedy):
            pass

        self.assertIsNone(plan(Mine(), Length(3), 64))


class FastPathTests(unittest.TestCase):
    def test_greedy_generation_is_one_host_call_and_matches_the_model(self):
        async def main(args):
            ctx = get_auto_model().create_context()
            ctx.fill(PROMPT)
            tokens = await ctx.generate_tokens(Greedy(), Length(9))
            more = await ctx.generate_tokens(Greedy(), Length(2))
            state = (len(ctx.pages), len(ctx.tokens), ctx.pending)
            ctx.close()
            return repr((tokens + more, state))

        world, instance, result = _run(main)
        tokens, (pages, committed, pending) = eval(result)
        model = world.model
        prompt = model.tokenize(PROMPT)
        self.assertEqual(tokens, greedy_reference(model, prompt, 11))
        self.assertEqual(len(_calls(instance, "generate")), 2)
        self.assertEqual(_calls(instance, "forward_text"), [])
        self.assertEqual(committed, len(prompt) + 10)  # the last sampled token stays pending
        self.assertEqual(pending, tokens[-1:])
        self.assertEqual(pages, -(-committed // model.page_size))  # unused spare pages returned
        self.assertEqual(world.live_pages, 0)

    def test_a_custom_sampler_keeps_the_per_token_path(self):
        async def main(args):
            ctx = get_auto_model().create_context()
            ctx.fill(PROMPT)
            return repr(await ctx.generate_tokens(lambda ids, probs: ids[1], Length(4)))

        _, instance, result = _run(main)
        self.assertEqual(len(_calls(instance, "forward_text")), 4)
        self.assertEqual(_calls(instance, "generate"), [])

    def test_a_multi_token_stop_ends_exactly_where_the_per_token_path_does(self):
        """The engine stops at the stop sequence's last token; the guest checks the rest
        and goes on after a false alarm."""

        async def main(args):
            model = get_auto_model()
            probe = model.create_context()
            probe.fill(PROMPT)
            reference = await probe.generate_tokens(Greedy(), Length(12))
            stop = reference[6:8]  # ends with a token that may also occur earlier
            fast = model.create_context()
            fast.fill(PROMPT)
            got = await fast.generate_tokens(Greedy(), Length(12) | Until(stop))
            slow = model.create_context()
            slow.fill(PROMPT)
            want = await slow.generate_tokens(lambda i, p: Greedy().sample(i, p), Until(stop))
            return repr((got, want, stop))

        _, _, result = _run(main)
        got, want, stop = eval(result)
        self.assertEqual(got, want)
        self.assertEqual(got[-2:], stop)

    def test_seeded_sampling_is_reproducible(self):
        async def main(args):
            outs = []
            for _ in range(2):
                ctx = get_auto_model().create_context()
                ctx.fill(PROMPT)
                outs.append(await ctx.generate_tokens(TopK(4, 1.0, seed=3), Length(16)))
            return repr(outs)

        _, instance, result = _run(main, FakeModel(dist_size=8))
        first, second = eval(result)
        self.assertEqual(first, second)
        self.assertEqual(len(_calls(instance, "generate")), 2)
        self.assertTrue(
            all(args[7] == 4 and args[9] is not None for args in _calls(instance, "generate"))
        )

    def test_masked_context_keeps_the_per_token_path(self):
        async def main(args):
            ctx = get_auto_model().create_context()
            ctx.fill(PROMPT)
            ctx.mask_token(1)
            return repr(await ctx.generate_tokens(Greedy(), Length(3)))

        _, instance, _ = _run(main)
        self.assertEqual(_calls(instance, "generate"), [])
        self.assertEqual(len(_calls(instance, "forward_text")), 3)

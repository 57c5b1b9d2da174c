"""Brle, samplers and stop conditions of pie.inferlet."""

from __future__ import annotations

import random

from twisted.trial import unittest

from pie.inferlet.brle import Brle
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
    sample_with,
)


class BrleTests(unittest.TestCase):
    def test_round_trip_and_buffer_starts_with_visible_run(self):
        flags = [True, True, False, True, False, False]
        b = Brle.from_list(flags)
        self.assertEqual(b.buffer, [0, 2, 1, 1, 2])
        self.assertEqual(b.to_list(), flags)
        self.assertEqual(Brle.from_buffer(b.buffer), b)
        self.assertEqual(Brle(3).buffer, [3])

    def test_edits_match_a_plain_list(self):
        rng = random.Random(7)
        for _ in range(300):
            flags = [rng.random() < 0.4 for _ in range(rng.randrange(0, 20))]
            b = Brle.from_list(flags)
            op = rng.randrange(4)
            start = rng.randrange(len(flags) + 1)
            end = rng.randrange(start, len(flags) + 1)
            value = rng.random() < 0.5
            if op == 0:
                b.mask_range(start, end, value)
                flags[start:end] = [value] * (end - start)
            elif op == 1:
                b.remove_range(start, end)
                del flags[start:end]
            elif op == 2:
                b.append(value)
                flags.append(value)
            else:
                self.assertEqual(
                    b.is_range_all_value(start, end, value),
                    all(f == value for f in flags[start:end]),
                )
            self.assertEqual(b.to_list(), flags)
            self.assertEqual(len(b), len(flags))
            self.assertEqual(sum(b.buffer), len(flags))
            self.assertTrue(all(r > 0 for r in b.buffer[1:]), b.buffer)

    def test_bad_input_is_refused(self):
        self.assertRaises(IndexError, Brle(3).mask_range, 2, 5)
        self.assertRaises(ValueError, Brle.from_buffer, [1, -1])
        self.assertRaises(IndexError, Brle(2).__getitem__, 2)


class SamplerTests(unittest.TestCase):
    ids = [10, 11, 12, 13]
    probs = [0.5, 0.3, 0.15, 0.05]

    def test_greedy_and_zero_temperature(self):
        self.assertEqual(Greedy().sample(self.ids, self.probs), 10)
        self.assertEqual(Temperature(0).sample(self.ids, self.probs), 10)

    def test_top_k_and_top_p_stay_inside_their_set(self):
        seen_k = {TopK(2, seed=s).sample(self.ids, self.probs) for s in range(200)}
        self.assertEqual(seen_k, {10, 11})
        seen_p = {TopP(0.8, seed=s).sample(self.ids, self.probs) for s in range(200)}
        self.assertEqual(seen_p, {10, 11})
        seen_t = {Temperature(1.0, seed=s).sample(self.ids, self.probs) for s in range(400)}
        self.assertEqual(seen_t, set(self.ids))

    def test_seeded_samplers_are_reproducible(self):
        a = [TopP(0.95, seed=3).sample(self.ids, self.probs) for _ in range(5)]
        b = [TopP(0.95, seed=3).sample(self.ids, self.probs) for _ in range(5)]
        self.assertEqual(a, b)

    def test_typical_drops_the_atypical_head(self):
        ids = [1, 2, 3]
        probs = [0.98, 0.01, 0.01]
        self.assertEqual({Typical(0.5, seed=s).sample(ids, probs) for s in range(50)}, {1})

    def test_callables_are_samplers(self):
        self.assertEqual(sample_with(lambda ids, probs: ids[-1], self.ids, self.probs), 13)
        self.assertRaises(TypeError, sample_with, 5, self.ids, self.probs)
        self.assertRaises(ValueError, sample_with, Greedy(), [], [])


class StopTests(unittest.TestCase):
    def test_until_length_any(self):
        self.assertTrue(Until([3, 4])([1, 3, 4]))
        self.assertFalse(Until([3, 4])([3, 4, 1]))
        self.assertTrue(Length(2)([1, 2]))
        self.assertFalse(Length(3)([1, 2]))
        stop = any_of(Length(5), UntilAny([9]))
        self.assertTrue(stop([1, 9]))
        self.assertTrue((Length(1) | Until([7]))([2]))
        self.assertRaises(ValueError, Until, [])

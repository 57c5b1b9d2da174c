"""The host-side generation fast path: sampling and stop tokens run in the engine."""

from __future__ import annotations

from pie.engine.batch import Forward, Sampling, layout_of
from tests.service_case import ServiceCase
from tests.service_doubles import FakeWorker

GREEDY = Sampling()


class GenerateTests(ServiceCase):
    def setUp(self):
        self.make(FakeWorker(num_pages=8))

    def start(self, inst, pages=(0, 1)):
        q = self.service.create_queue(inst)
        self.submit(inst, q, "allocate_kv_pages", list(pages))
        return q

    def generate(self, inst, q, tokens, max_tokens, stops=(), pages=(0, 1), sampling=GREEDY):
        """The `generate` host call over a fresh context of `tokens` in `pages`."""
        used, last_page_len = layout_of(self.worker.info.kv_page_size, len(tokens))
        return self.submit(
            inst, q, "generate", last_page_len, list(pages[:used]), tokens,
            list(range(len(tokens))), list(pages[used:]), sampling.temperature, sampling.top_k,
            sampling.top_p, sampling.seed, max_tokens, list(stops),
        )  # fmt: skip

    def test_greedy_generation_matches_step_by_step_decoding(self):
        q = self.start("a")
        box = self.generate("a", q, [1, 2], 4)
        self.run_reactor()
        self.assertEqual(box, [self.greedy([1, 2], 4)])
        steps = self.worker.jobs_of(Forward)
        self.assertEqual(len(steps), 4)
        self.assertEqual([s.items[0].last_page_len for s in steps], [2, 3, 4, 1])
        self.assertEqual([len(s.items[0].pages) for s in steps], [1, 1, 1, 2])

    def test_stops_at_a_stop_token(self):
        q = self.start("a")
        expected = self.greedy([1, 2], 4)
        box = self.generate("a", q, [1, 2], 4, stops=[expected[1]])
        self.run_reactor()
        self.assertEqual(box, [expected[:2]])

    def test_two_generations_share_every_step(self):
        qa, qb = self.start("a"), self.start("b")
        self.generate("a", qa, [1], 3)
        self.generate("b", qb, [2], 3)
        self.run_reactor()
        self.assertEqual([len(j.items) for j in self.worker.jobs_of(Forward)], [2, 2, 2])

    def test_later_commands_of_the_queue_wait_for_the_generation(self):
        q = self.start("a")
        box = self.generate("a", q, [1, 2], 3)
        after = self.submit("a", q, "forward_text", 1, [0, 1], [9], [4], [], [0])
        self.run_reactor()
        tokens = self.greedy([1, 2], 3)
        self.assertEqual(box, [tokens])
        self.assertIsNone(self.worker.jobs[-1].items[0].sampling)
        context = [(1, 0), (2, 1), (tokens[0], 2), (tokens[1], 3), (9, 4)]
        self.assertEqual(after, [[self.expected(context)]])

    def test_bad_requests(self):
        q = self.start("a")
        self.assertIn("8 slots, 9 are needed", self.generate("a", q, [1, 2], 8)[0][1])
        self.make(FakeWorker(num_pages=8))
        q = self.start("a")
        bad = Sampling(top_p=0.0)
        self.assertIn("bad sampling", self.generate("a", q, [1], 2, sampling=bad)[0][1])

    def test_ending_the_instance_mid_generation(self):
        self.make(FakeWorker(num_pages=8, auto=False))
        q = self.start("a")
        box = self.generate("a", q, [1], 5)
        self.run_reactor()
        self.worker.answer_next()
        self.service.destroy_instance("a")
        self.assertIn("ended", box[0][1])
        self.run_reactor()
        self.assertEqual(len(self.worker.jobs), 1)
        self.assertEqual(self.service.status()["free_kv_pages"], 8)

"""The `generate` host call: the fast path reached through submit, as the runtime forwards it."""

from __future__ import annotations

from pie.engine.batch import Forward, Sampling
from tests.service_case import ServiceCase
from tests.service_doubles import FakeWorker


class GenerateCallTests(ServiceCase):
    def setUp(self):
        self.make(FakeWorker(num_pages=8))
        self.q = self.service.create_queue("a")
        self.submit("a", self.q, "allocate_kv_pages", [0, 1, 2])

    def call(self, last_page_len, pages, tokens, spare, max_tokens, stops=(), **sampling):
        s = Sampling(**sampling)
        seed = s.seed
        return self.submit(
            "a", self.q, "generate", last_page_len, pages, tokens, list(range(len(tokens))),
            spare, s.temperature, s.top_k, s.top_p, seed, max_tokens, list(stops),
        )  # fmt: skip

    def test_the_call_generates_into_the_spare_pages(self):
        box = self.call(3, [0], [1, 2, 3], [1, 2], 6)
        self.run_reactor()
        self.assertEqual(box, [self.greedy([1, 2, 3], 6)])
        steps = self.worker.jobs_of(Forward)
        # 3 prompt slots in page 0, then one slot per step: page 0 fills, 1 follows
        self.assertEqual([s.items[0].last_page_len for s in steps], [3, 4, 1, 2, 3, 4])
        self.assertEqual([len(s.items[0].pages) for s in steps], [1, 1, 2, 2, 2, 2])

    def test_it_continues_a_context_and_stops_at_a_stop_token(self):
        self.submit("a", self.q, "forward_text_no_output", 2, [0], [1, 2], [0, 1], [])
        expected = self.greedy([1, 2, 3], 4)
        box = self.submit(
            "a", self.q, "generate", 3, [0], [3], [2], [1], 0.0, 0, 1.0, None, 4, [expected[1]]
        )
        self.run_reactor()
        self.assertEqual(box, [expected[:2]])

    def test_sampling_parameters_reach_the_worker(self):
        self.call(1, [0], [1], [], 2, temperature=0.7, top_k=3, top_p=0.5, seed=11)
        self.run_reactor()
        first = self.worker.jobs_of(Forward)[0].items[0]
        self.assertEqual(first.sampling, Sampling(0.7, 3, 0.5, 11))

    def test_bad_calls_fault_the_instance(self):
        cases = [
            (lambda: self.call(3, [0], [1, 2, 3], [], 3), "4 slots, 5 are needed"),
            (lambda: self.call(5, [0], [1], [1], 2), "last_page_len 5 is not in 1..4"),
            (lambda: self.call(1, [0], [1], [], 2, top_p=0.0), "bad sampling"),
            (lambda: self.call(4, [0], [1, 2, 3, 4], [7], 2), "KV page 7 is not allocated"),
        ]
        for make, reason in cases:
            self.make(FakeWorker(num_pages=8))
            self.q = self.service.create_queue("a")
            self.submit("a", self.q, "allocate_kv_pages", [0, 1, 2])
            box = make()
            self.run_reactor()
            self.assertIn(reason, self.fault_of(box))

"""The model service's metrics hooks under a Clock: exact latencies, token counts, batch sizes.

A ModelService on the fake worker (jobs answered by hand) with the daemon's
PrometheusMetrics for its model: each forward's send and answer happens at a
known clock time, so time to first token, time per output token and forward
latency have exact values, and prefill versus decode is counted per item.
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from pie.engine.batch import Sampling, layout_of
from pie.metrics import NO_MODEL_METRICS, PrometheusMetrics
from tests.service_case import ServiceCase
from tests.service_doubles import FakeWorker

MODEL = "fake-model"
GREEDY = Sampling()


class ServiceMetricsTests(ServiceCase):
    def setUp(self):
        self.make(FakeWorker(num_pages=8, auto=False))
        self.metrics = PrometheusMetrics()
        self.service.metrics = self.metrics.model(MODEL)

    def value(self, name: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, {"model": MODEL})

    def start(self, inst: str, pages=(0, 1)) -> int:
        q = self.service.create_queue(inst)
        self.submit(inst, q, "allocate_kv_pages", list(pages))
        return q

    def generate(self, inst: str, q: int, tokens: list[int], max_tokens: int) -> list:
        used, last_page_len = layout_of(self.worker.info.kv_page_size, len(tokens))
        return self.submit(
            inst, q, "generate", last_page_len, [0, 1][:used], tokens, list(range(len(tokens))),
            [0, 1][used:], GREEDY.temperature, GREEDY.top_k, GREEDY.top_p, GREEDY.seed,
            max_tokens, [],
        )  # fmt: skip

    def answer_after(self, seconds: float) -> None:
        """The worker answers the job it holds `seconds` after it was sent."""
        self.run_reactor()
        self.clock.advance(seconds)
        self.worker.answer_next()

    def test_a_generation_times_and_counts(self):
        q = self.start("a")
        self.clock.advance(1.0)  # the inferlet spends a second before its first forward
        box = self.generate("a", q, [1, 2, 3], 3)
        self.answer_after(0.5)  # prefill and first token: 1.5 s after the queue was made
        self.answer_after(0.25)
        self.answer_after(0.125)
        self.assertEqual(len(box[0]), 3)
        self.assertEqual(self.value("pie_time_to_first_token_seconds_count"), 1)
        self.assertEqual(self.value("pie_time_to_first_token_seconds_sum"), 1.5)
        self.assertEqual(self.value("pie_time_per_output_token_seconds_count"), 2)
        self.assertEqual(self.value("pie_time_per_output_token_seconds_sum"), 0.375)
        self.assertEqual(self.value("pie_forward_duration_seconds_count"), 3)
        self.assertEqual(self.value("pie_forward_duration_seconds_sum"), 0.875)
        self.assertEqual(self.value("pie_tokens_prefilled_total"), 3)
        self.assertEqual(self.value("pie_tokens_generated_total"), 3)
        self.assertEqual(self.value("pie_forward_batch_tokens_sum"), 3 + 1 + 1)
        # the first token fell in the (1, 2.5] second bucket, not below
        ttft = "pie_time_to_first_token_seconds_bucket"
        below = self.metrics.registry.get_sample_value(ttft, {"model": MODEL, "le": "1.0"})
        upto = self.metrics.registry.get_sample_value(ttft, {"model": MODEL, "le": "2.5"})
        self.assertEqual((below, upto), (0, 1))

    def test_two_queues_share_a_batch(self):
        qa, qb = self.start("a", (0, 1)), self.start("b", (2, 3))
        self.submit("a", qa, "forward_text", 2, [0], [1, 2], [0, 1], [], [1])
        self.submit("b", qb, "forward_text", 1, [2], [5], [0], [], [0])
        self.answer_after(0.0)
        self.assertEqual(self.value("pie_forward_batch_items_count"), 1)
        self.assertEqual(self.value("pie_forward_batch_items_sum"), 2)
        # a one-token forward asking for its next token is a decode step, not prefill
        self.assertEqual(self.value("pie_tokens_prefilled_total"), 2)
        self.assertEqual(self.value("pie_tokens_generated_total"), 2)
        self.assertEqual(self.value("pie_time_to_first_token_seconds_count"), 2)

    def test_a_prefill_without_outputs_and_a_chunked_prompt(self):
        self.make(FakeWorker(num_pages=32, auto=False), max_batch_tokens=32)
        self.service.metrics = self.metrics.model(MODEL)
        q = self.start("a", tuple(range(28)))
        # 30 tokens in 8 pages of 4, no output: prefill only
        self.submit("a", q, "forward_text_no_output", 2, list(range(8)), list(range(1, 31)),
                    list(range(30)), [])  # fmt: skip
        self.answer_after(0.0)
        self.assertEqual(self.value("pie_tokens_prefilled_total"), 30)
        self.assertEqual(self.value("pie_tokens_generated_total"), 0)
        self.assertEqual(self.value("pie_time_to_first_token_seconds_count"), 0)
        # 80 more with the last one's distribution: chunks of 32, 32 and 16 tokens
        box = self.submit("a", q, "forward_text", 2, list(range(28)), list(range(1, 81)),
                          list(range(30, 110)), [], [79])  # fmt: skip
        for _ in range(3):
            self.answer_after(0.0)
        self.assertEqual(len(box[0]), 1)
        self.assertEqual(self.value("pie_forward_batch_tokens_count"), 4)
        self.assertEqual(self.value("pie_forward_batch_tokens_sum"), 110)
        self.assertEqual(self.value("pie_tokens_prefilled_total"), 110)
        self.assertEqual(self.value("pie_tokens_generated_total"), 1)
        self.assertEqual(self.value("pie_time_to_first_token_seconds_count"), 1)

    def test_an_ended_instance_is_forgotten(self):
        q = self.start("a")
        self.submit("a", q, "forward_text", 1, [0], [1], [0], [], [0])
        self.answer_after(0.0)
        self.service.destroy_instance("a")
        q = self.start("a")  # (ids are never reused; this checks the state, not the name)
        self.clock.advance(2.0)
        self.submit("a", q, "forward_text", 1, [0], [1], [0], [], [0])
        self.answer_after(0.0)
        self.assertEqual(self.value("pie_time_to_first_token_seconds_count"), 2)
        self.assertEqual(self.value("pie_time_to_first_token_seconds_sum"), 2.0)

    def test_off_is_the_no_op_hooks(self):
        self.make(FakeWorker(num_pages=8))
        self.assertIs(self.service.metrics, NO_MODEL_METRICS)
        q = self.start("a")
        box = self.generate("a", q, [1, 2], 2)
        self.run_reactor()
        self.assertEqual(box, [self.greedy([1, 2], 2)])


class RegistryTests(TestCase):
    def test_each_daemon_has_its_own_registry(self):
        """Two daemons in one process count apart (no global registry)."""
        one, two = PrometheusMetrics(), PrometheusMetrics()
        one.request("query", "ok")
        one.request("query", "ok")
        two.request("query", "ok")
        self.assertEqual(
            one.registry.get_sample_value(
                "pie_requests_total", {"endpoint": "query", "status": "ok"}
            ),
            2,
        )
        self.assertEqual(
            two.registry.get_sample_value(
                "pie_requests_total", {"endpoint": "query", "status": "ok"}
            ),
            1,
        )

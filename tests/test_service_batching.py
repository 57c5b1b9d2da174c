"""Batching and ordering in the model service: queues, policies, priorities, synchronize."""

from __future__ import annotations

from pie.engine.batch import CopyKv, Forward
from tests.service_case import ServiceCase
from tests.service_doubles import FakeWorker


class BatchingTests(ServiceCase):
    def setUp(self):
        self.make(FakeWorker(auto=False))

    def start(self, inst: str, pages: list[int]) -> int:
        q = self.service.create_queue(inst)
        self.submit(inst, q, "allocate_kv_pages", pages)
        return q

    def forward(self, inst, q, lpl, pages, tokens, start_pos, outputs=(0,)):
        positions = list(range(start_pos, start_pos + len(tokens)))
        return self.submit(
            inst, q, "forward_text", lpl, pages, tokens, positions, [], list(outputs)
        )

    def test_two_queues_share_one_forward_job(self):
        qa, qb = self.start("a", [0]), self.start("b", [0])
        ra = self.forward("a", qa, 1, [0], [5], 0)
        rb = self.forward("b", qb, 1, [0], [6], 0)
        self.run_reactor()
        self.assertEqual([type(j) for j in self.worker.jobs], [Forward])
        self.assertEqual(len(self.worker.jobs[0].items), 2)
        self.worker.answer_next()
        self.assertEqual(ra, [[self.expected([(5, 0)])]])
        self.assertEqual(rb, [[self.expected([(6, 0)])]])

    def test_adaptive_keeps_one_batch_in_flight_and_merges_arrivals(self):
        qs = [self.start(name, [0]) for name in "abc"]
        self.forward("a", qs[0], 1, [0], [1], 0)
        self.run_reactor()
        self.assertEqual(len(self.worker.jobs), 1)
        self.forward("b", qs[1], 1, [0], [2], 0)
        self.forward("c", qs[2], 1, [0], [3], 0)
        self.run_reactor()
        self.assertEqual(
            len(self.worker.jobs), 1, "nothing is sent while a forward batch is in flight"
        )
        self.worker.answer_next()
        self.run_reactor()
        self.assertEqual(len(self.worker.jobs), 2)
        self.assertEqual(len(self.worker.jobs[1].items), 2)

    def test_queue_order_across_command_types(self):
        q = self.start("a", [0, 1])
        self.submit("a", q, "forward_text_no_output", 1, [0], [7], [0], [])
        self.submit("a", q, "copy_kv_page", 0, 1, 0, 0, 1)
        result = self.forward("a", q, 2, [1], [8], 1)
        for _ in range(3):
            self.run_reactor()
            if self.worker.held:
                self.worker.answer_next()
        self.assertEqual([type(j) for j in self.worker.jobs], [Forward, CopyKv, Forward])
        self.assertEqual(result, [[self.expected([(7, 0), (8, 1)])]])

    def test_consecutive_forwards_on_one_context_take_two_batches(self):
        q = self.start("a", [0])
        first = self.forward("a", q, 1, [0], [1], 0)
        second = self.forward("a", q, 2, [0], [2], 1)
        self.run_reactor()
        self.assertEqual(len(self.worker.jobs), 1)
        self.assertEqual(len(self.worker.jobs[0].items), 1)
        self.worker.answer_next()
        self.run_reactor()
        self.worker.answer_next()
        self.assertEqual(first, [[self.expected([(1, 0)])]])
        self.assertEqual(second, [[self.expected([(1, 0), (2, 1)])]])

    def test_one_queue_forwards_on_separate_contexts_share_a_batch(self):
        q = self.start("a", [0, 1])
        self.forward("a", q, 1, [0], [1], 0)
        self.forward("a", q, 1, [1], [2], 0)
        self.run_reactor()
        self.assertEqual(len(self.worker.jobs[0].items), 2)

    def test_synchronize_answers_every_waiter_after_earlier_commands_ran(self):
        qa, qb = self.start("a", [0]), self.start("b", [0])
        self.forward("a", qa, 1, [0], [1], 0)
        self.forward("b", qb, 1, [0], [2], 0)
        sa = self.submit("a", qa, "synchronize")
        sb = self.submit("b", qb, "synchronize")
        self.run_reactor()
        self.assertEqual((sa, sb), ([], []), "the forward has not run yet")
        self.worker.answer_next()
        self.assertEqual((sa, sb), ([True], [True]))

    def test_synchronize_on_an_idle_queue(self):
        q = self.start("a", [0])
        done = self.submit("a", q, "synchronize")
        self.run_reactor()
        self.assertEqual(done, [True])

    def test_k_policy_waits_for_k_items(self):
        self.assertEqual(self.service.set_batching("k 2"), "k 2")
        qa, qb = self.start("a", [0]), self.start("b", [0])
        self.forward("a", qa, 1, [0], [1], 0)
        self.run_reactor()
        self.assertEqual(self.worker.jobs, [])
        self.forward("b", qb, 1, [0], [2], 0)
        self.run_reactor()
        self.assertEqual(len(self.worker.jobs[0].items), 2)

    def test_t_policy_releases_after_t(self):
        self.service.set_batching("t 10")
        q = self.start("a", [0])
        self.forward("a", q, 1, [0], [1], 0)
        self.run_reactor()
        self.clock.advance(0.009)
        self.assertEqual(self.worker.jobs, [])
        self.clock.advance(0.001)
        self.assertEqual(len(self.worker.jobs), 1)

    def test_k_or_t_releases_at_most_k_then_the_rest_on_time(self):
        self.service.set_batching("kort 2 5")
        qs = [self.start(name, [0]) for name in "abc"]
        for i, (name, q) in enumerate(zip("abc", qs, strict=True)):
            self.forward(name, q, 1, [0], [i], 0)
        self.run_reactor()
        self.assertEqual([len(j.items) for j in self.worker.jobs], [2])
        self.clock.advance(0.005)
        self.assertEqual([len(j.items) for j in self.worker.jobs], [2, 1])

    def test_priority_decides_who_goes_first_in_a_capped_batch(self):
        self.service.set_batching("kort 1 1000")
        qa, qb = self.start("a", [0]), self.start("b", [0])
        self.service.set_priority("b", qb, "high")
        self.forward("a", qa, 1, [0], [1], 0)
        self.forward("b", qb, 1, [0], [2], 0)
        self.run_reactor()
        self.assertEqual(self.worker.jobs[0].items[0].tokens, [2])

    def test_debug_query_switches_and_reports_the_policy(self):
        q = self.start("a", [0])
        answers = [
            self.submit("a", q, "queue_debug_query", text)
            for text in (
                "set_batching k 4",
                "get_batching",
                "batching_algo:kort:3:20",
                "get_batching",
                "set_batching nonsense",
                "ping",
            )
        ]
        for _ in range(3):
            self.run_reactor()
            while self.worker.held:
                self.worker.answer_next()
        self.assertEqual(answers[0], ["k 4"])
        self.assertEqual(answers[1], ["k 4"])
        self.assertEqual(answers[3], ["kort 3 20"])
        self.assertIn("unknown batching policy", answers[4][0])
        self.assertEqual(answers[5], ["pong"])
        self.assertEqual(self.service.status()["batching"], "kort 3 20")

    def test_pie_batching_algo_string_works_for_every_policy(self):
        q = self.start("a", [0])
        queries = {
            "batching_algo:adaptive:8:16": "adaptive",
            "batching_algo:k:8:16": "k 8",
            "batching_algo:t:8:16": "t 16",
            "batching_algo:kort:8:16": "kort 8 16",
            "batching_algo:t:20": "t 20",
            "batching_algo:k_or_t:2:5": "kort 2 5",
            "batching_algo:fastest:8:16": "error: unknown batching policy 'fastest' (adaptive, k, t, kort)",
            "batching_algo:k:8:16:1": "error: batching_algo takes <algo>:<k>:<t>",
            "batching_algo:k:x:16": "error: bad parameter in 'k x'",
        }
        answers = [self.submit("a", q, "queue_debug_query", text) for text in queries]
        for _ in range(3):
            self.run_reactor()
        self.assertEqual([a[0] for a in answers], list(queries.values()))
        self.assertEqual(self.service.get_batching(), "kort 2 5")

    def test_worker_failure_faults_the_batch_and_the_next_batch_runs(self):
        qa, qb = self.start("a", [0]), self.start("b", [0])
        self.worker.fail_next = "device on fire"
        ra = self.forward("a", qa, 1, [0], [1], 0)
        self.run_reactor()
        self.assertIn("device on fire", self.fault_of(ra))
        rb = self.forward("b", qb, 1, [0], [2], 0)
        self.run_reactor()
        self.worker.answer_next()
        self.assertEqual(rb, [[self.expected([(2, 0)])]])
        self.assertIn("device on fire", self.fault_of(self.forward("a", qa, 1, [0], [3], 0)))

    def test_destroy_cancels_staged_commands(self):
        qa, qb = self.start("a", [0]), self.start("b", [0])
        self.forward("a", qa, 1, [0], [1], 0)
        self.run_reactor()
        staged = self.forward("b", qb, 1, [0], [2], 0)
        self.run_reactor()
        self.service.destroy_instance("b")
        self.assertIn("ended", self.fault_of(staged))
        self.worker.answer_next()
        self.run_reactor()
        self.assertEqual(len(self.worker.jobs), 1, "the cancelled item never reaches the worker")
        self.assertEqual(self.service.status()["free_kv_pages"], 15)

    def test_a_full_batch_leaves_the_rest_for_the_next_one(self):
        self.make(FakeWorker(auto=False), max_batch_tokens=3, policy="kort 8 50")
        qs = [self.start(name, [0]) for name in "abc"]
        for name, q in zip("abc", qs, strict=True):
            self.forward(name, q, 2, [0], [1, 2], 0)
        self.run_reactor()
        self.assertEqual([len(j.items) for j in self.worker.jobs], [1, 1], "full: sent below k")
        self.clock.advance(0.05)
        self.assertEqual([len(j.items) for j in self.worker.jobs], [1, 1, 1], "the rest on time")

    def test_a_page_freed_while_a_pending_batch_names_it_is_not_reused_before_it_is_sent(self):
        qz = self.start("z", [0])
        self.forward("z", qz, 1, [0], [1], 0)  # in flight: the next batch stays open
        self.run_reactor()
        q1, q2 = self.start("a", [0]), self.service.create_queue("a")
        self.run_reactor()
        (physical,) = self.service.resources.translate_pages("a", [0])
        self.forward("a", q2, 1, [0], [1], 0)  # staged, not sent
        self.submit("a", q1, "deallocate_kv_pages", [0])  # another queue frees the page
        self.start("b", [0])
        self.run_reactor()
        self.assertNotEqual(self.service.resources.translate_pages("b", [0]), [physical])
        free = self.service.status()["free_kv_pages"]
        self.worker.answer_next()
        self.run_reactor()
        self.assertEqual(self.service.status()["free_kv_pages"], free + 1, "freed once sent")
        self.assertIn(physical, self.worker.jobs[-1].items[0].pages)

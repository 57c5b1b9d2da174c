"""Chunked prefill: a long forward item is split so that decodes keep running beside it."""

from __future__ import annotations

from pie.engine.batch import Forward
from pie.service.scheduler import MIN_CHUNK
from tests.service_case import ServiceCase
from tests.service_doubles import FakeWorker

PS = 4
LONG = 100  # prompt tokens: several chunks at a cap of 40
CAP = 40


class ChunkedPrefillTests(ServiceCase):
    def build(self, cap: int, auto: bool = True):
        self.make(FakeWorker(num_pages=64, page_size=PS, auto=auto), max_batch_tokens=cap)

    def start(self, inst: str, pages: list[int]) -> int:
        q = self.service.create_queue(inst)
        self.submit(inst, q, "allocate_kv_pages", pages)
        return q

    def long_prompt(self, q: int, masks: bool = False) -> list:
        pages = list(range(LONG // PS))
        tokens = [(7 * i) % 90 + 1 for i in range(LONG)]
        rows = []
        if masks:  # every token hides slot 3 (once it exists) from itself: BRLE rows per token
            rows = [[i + 1] if i < 3 else [3, 1, i - 3] for i in range(LONG)]
        return self.submit(
            "b", q, "forward_text", PS, pages, tokens, list(range(LONG)), rows, [0, 50, LONG - 1]
        )

    def test_a_decode_step_is_not_blocked_behind_a_whole_long_prefill(self):
        self.build(CAP, auto=False)
        qa = self.start("a", [0, 1])
        qb = self.start("b", list(range(LONG // PS)))
        answered = []

        def decode(_, n: int) -> None:  # the next step as soon as the last one answers
            if n == 6:
                return
            d = self.service.submit("a", qa, "forward_text", n % PS + 1, [0, 1][: n // PS + 1],
                                    [5], [n], [], [0])  # fmt: skip
            d.addCallback(answered.append)
            d.addCallback(decode, n + 1)

        decode(None, 0)
        self.run_reactor()
        prefill = self.long_prompt(qb)
        self.run_reactor()
        while self.worker.held:
            self.worker.answer_next()
            self.run_reactor()
        jobs = self.worker.jobs_of(Forward)
        sizes = [sum(len(i.tokens) for i in j.items) for j in jobs]
        self.assertLessEqual(max(sizes), CAP)
        # every job while the prompt went through also held a decode step of "a"
        with_prefill = [j for j in jobs if any(len(i.tokens) > 1 for i in j.items)]
        self.assertEqual(len(with_prefill), 3)  # 39 + 39 + 22 tokens
        for job in with_prefill:
            self.assertIn(1, [len(i.tokens) for i in job.items])
        self.assertEqual(len(answered), 6)
        self.assertEqual(len(prefill), 1)
        self.assertEqual(len(prefill[0]), 3, "the outputs of every chunk, in order")

    def test_chunks_give_the_answers_of_one_pass(self):
        """The fake model's answer is a function of what each row attends to: a chunked
        prompt (causal, and with masks) must answer exactly as the whole prompt at once."""
        for masks in (False, True):
            answers = []
            for cap in (16384, CAP):
                self.build(cap)
                qa = self.start("a", [60])  # a small item first: the long one fills the room
                self.submit("a", qa, "forward_text", 1, [60], [3], [0], [], [0])
                qb = self.start("b", list(range(LONG // PS)))
                answers.append(self.long_prompt(qb, masks))
                self.run_reactor()
                sizes = [len(j.items[-1].tokens) for j in self.worker.jobs_of(Forward)]
                self.assertEqual(
                    sizes, [LONG] if cap > LONG else [CAP - 1, CAP, LONG - 2 * CAP + 1]
                )
            self.assertEqual(answers[0], answers[1])
            self.assertEqual(len(answers[0][0]), 3)

    def test_a_generation_with_a_long_prompt_is_chunked_and_then_decodes(self):
        """The generate call's first step is split like any prompt; the steps after it come
        from the same request (tokens remaining), and the tokens are plain greedy decoding's."""
        self.build(CAP)
        pages = list(range(LONG // PS + 2))
        q = self.start("b", pages)
        tokens = [(7 * i) % 90 + 1 for i in range(LONG)]
        used = LONG // PS
        box = self.submit(
            "b", q, "generate", PS, pages[:used], tokens, list(range(LONG)), pages[used:],
            0.0, 0, 1.0, None, 5, [],
        )  # fmt: skip
        self.run_reactor()
        self.assertEqual(box, [self.greedy(tokens, 5)])
        sizes = [len(j.items[0].tokens) for j in self.worker.jobs_of(Forward)]
        self.assertEqual(sizes, [CAP, CAP, LONG - 2 * CAP, 1, 1, 1, 1])

    def test_a_page_freed_by_another_queue_waits_for_the_rest_of_the_prompt(self):
        self.build(CAP, auto=False)
        q1 = self.start("b", list(range(LONG // PS)))
        q2 = self.service.create_queue("b")
        self.long_prompt(q1)
        self.run_reactor()
        free = self.service.status()["free_kv_pages"]
        self.submit("b", q2, "deallocate_kv_pages", [LONG // PS - 1])  # the rest still writes it
        self.run_reactor()
        self.assertEqual(self.service.status()["free_kv_pages"], free)
        while self.worker.held:
            self.worker.answer_next()
            self.run_reactor()
        self.assertEqual(self.service.status()["free_kv_pages"], free + 1)

    def test_small_room_is_not_cut_into_tiny_chunks(self):
        self.build(MIN_CHUNK + 10, auto=False)
        qa = self.start("a", [60, 61, 62])
        self.submit("a", qa, "forward_text", 4, [60, 61, 62], list(range(1, 13)), list(range(12)),
                    [], [0])  # fmt: skip
        qb = self.start("b", list(range(LONG // PS)))
        self.long_prompt(qb)
        self.run_reactor()
        first = self.worker.jobs_of(Forward)[0]
        self.assertEqual([len(i.tokens) for i in first.items], [12], "30 free < MIN_CHUNK: wait")


class DefaultCapTests(ServiceCase):
    def test_cpu_workers_chunk_long_prompts_by_default(self):
        from dataclasses import replace

        from pie.service.service import CPU_BATCH_TOKENS, DEVICE_BATCH_TOKENS

        self.make(FakeWorker())
        self.assertEqual(self.service.scheduler.max_batch_tokens, CPU_BATCH_TOKENS)
        gpu = FakeWorker()
        gpu.info = replace(gpu.info, device="cuda:0")
        self.make(gpu)
        self.assertEqual(self.service.scheduler.max_batch_tokens, DEVICE_BATCH_TOKENS)
        self.make(FakeWorker(), max_batch_tokens=7)
        self.assertEqual(self.service.scheduler.max_batch_tokens, 7)

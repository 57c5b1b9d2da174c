"""The model service on the real worker thread with a tiny random-weight Llama."""

from __future__ import annotations

from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from pie.engine.batch import CopyKv, Forward, Sampling
from pie.engine.loaders import load_model
from pie.interfaces import IModelWorker, InstanceFault
from pie.service.local import start_worker
from pie.service.service import CONTENTION_REASON, ModelService
from tests.model_fixtures import write_tiny_model

PS = 4


@implementer(IModelWorker)
class SpyWorker:
    """Records the jobs the service sends, then hands them to the real worker."""

    def __init__(self, worker):
        self.worker = worker
        self.info = worker.info
        self.tokenizer = worker.tokenizer
        self.jobs = []

    def execute(self, job):
        self.jobs.append(job)
        return self.worker.execute(job)

    def close(self):
        return self.worker.close()


class ServiceOnWorkerTests(TestCase):
    def setUp(self):
        self.folder = self.mktemp()
        write_tiny_model(self.folder)
        self.spy = SpyWorker(self.new_worker())
        self.terminated = []
        self.service = ModelService(
            self.spy, instance_terminator=lambda i, r: self.terminated.append((i, r))
        )

    def new_worker(self):
        """A worker thread on the tiny model (its own KV cache), stopped after the test."""
        loaded = load_model(self.folder, dtype="float32")
        worker = start_worker(
            loaded,
            device="cpu",
            dtype="float32",
            page_size=PS,
            num_pages=8,
            num_embeds=8,
            dist_size=8,
            name="tiny",
        )
        self.addCleanup(worker.close)
        return worker

    def assertSameDistribution(self, got, want):
        got_ids, got_probs = got
        want_ids, want_probs = want
        self.assertEqual(got_ids[0], want_ids[0])
        want_of = dict(zip(want_ids, want_probs, strict=True))
        for token, prob in zip(got_ids, got_probs, strict=True):
            if token in want_of:
                self.assertAlmostEqual(prob, want_of[token], places=4)

    def forwards(self):
        return [j for j in self.spy.jobs if isinstance(j, Forward)]

    @inlineCallbacks
    def test_two_queues_batched_and_queue_order_kept(self):
        s = self.service
        qa, qb = s.create_queue("a"), s.create_queue("b")
        s.submit("a", qa, "allocate_kv_pages", [0])
        s.submit("b", qb, "allocate_kv_pages", [0])
        prefill = s.submit("a", qa, "forward_text_no_output", 3, [0], [1, 2, 3], [0, 1, 2], [])
        decode = s.submit("a", qa, "forward_text", 4, [0], [4], [3], [], [0])
        whole = s.submit("b", qb, "forward_text", 4, [0], [1, 2, 3, 4], [0, 1, 2, 3], [], [3])
        results = yield gatherResults([prefill, decode, whole])
        self.assertEqual(results[0], None)
        self.assertSameDistribution(results[1][0], results[2][0])
        first, second = self.forwards()
        self.assertEqual([len(i.tokens) for i in first.items], [3, 4], "two queues in one job")
        self.assertEqual([i.tokens for i in second.items], [[4]], "a's decode after its prefill")

    @inlineCallbacks
    def test_fork_by_shared_pages_equals_recomputing(self):
        s = self.service
        q0, q1, q2 = (s.create_queue("a") for _ in range(3))
        s.submit("a", q0, "allocate_kv_pages", [0, 1, 2, 3, 4])
        yield s.submit("a", q0, "forward_text_no_output", PS, [0], [5, 6, 7, 8], [0, 1, 2, 3], [])
        child1 = s.submit("a", q1, "forward_text", 1, [0, 1], [9], [4], [], [0])
        child2 = s.submit("a", q2, "forward_text", 1, [0, 2], [9], [4], [], [0])
        fresh = s.submit(
            "a", q0, "forward_text", 1, [3, 4], [5, 6, 7, 8, 9], [0, 1, 2, 3, 4], [], [4]
        )
        a, b, c = yield gatherResults([child1, child2, fresh])
        self.assertSameDistribution(a[0], c[0])
        self.assertSameDistribution(b[0], c[0])
        self.assertEqual(
            len(self.forwards()[-1].items), 3, "the forks and the recompute share a batch"
        )

    @inlineCallbacks
    def test_export_import_is_zero_copy(self):
        s = self.service
        qa, qb = s.create_queue("a"), s.create_queue("b")
        s.submit("a", qa, "allocate_kv_pages", [0])
        s.submit("a", qa, "forward_text_no_output", PS, [0], [5, 6, 7, 8], [0, 1, 2, 3], [])
        yield s.submit("a", qa, "export_kv_pages", [0], "prefix", False)
        free = s.status()["free_kv_pages"]
        yield s.submit("b", qb, "import_kv_pages", [7], "prefix")
        self.assertEqual(s.status()["free_kv_pages"], free, "importing takes no page")
        s.submit("b", qb, "allocate_kv_pages", [8, 9])
        imported = s.submit("b", qb, "forward_text", 1, [7, 8], [9], [4], [], [0])
        fresh = s.submit(
            "b", qb, "forward_text", 1, [9, 8], [5, 6, 7, 8, 9], [0, 1, 2, 3, 4], [], [4]
        )
        # (fresh runs after imported on the same queue: it rewrites page 8's first slot identically)
        got, want = yield gatherResults([imported, fresh])
        self.assertSameDistribution(got[0], want[0])
        self.assertEqual([j for j in self.spy.jobs if isinstance(j, CopyKv)], [])

    @inlineCallbacks
    def test_contention_terminates_the_newest_instance(self):
        s = self.service
        qa, qb = s.create_queue("a"), s.create_queue("b")
        yield s.submit("a", qa, "allocate_kv_pages", [0, 1])
        yield s.submit("b", qb, "allocate_kv_pages", [0, 1, 2, 3])
        yield s.submit("a", qa, "allocate_kv_pages", [2, 3])
        self.assertEqual(self.terminated, [])
        yield s.submit("a", qa, "allocate_kv_pages", [4])
        error = yield self.assertFailure(s.submit("b", qb, "synchronize"), InstanceFault)
        self.assertEqual(str(error), CONTENTION_REASON)
        got = yield s.submit(
            "a", qa, "forward_text", 1, [0, 4], [1, 2, 3, 4, 5], [0, 1, 2, 3, 4], [], [4]
        )
        self.assertEqual(len(got[0][0]), 8)
        self.assertEqual(self.terminated, [("b", CONTENTION_REASON)])

    @inlineCallbacks
    def test_generation_fast_path_equals_guest_side_greedy_decoding(self):
        s = self.service
        qa, qb = s.create_queue("a"), s.create_queue("b")
        s.submit("a", qa, "allocate_kv_pages", [0, 1])
        s.submit("b", qb, "allocate_kv_pages", [0, 1])
        fast = yield s.generate("a", qa, [0, 1], 0, [3, 4, 5], [0, 1, 2], Sampling(), 5)
        tokens, slow = [3, 4, 5], []
        while len(slow) < 5:
            n = len(tokens)
            pages = [0, 1] if n > PS else [0]
            dists = yield s.submit(
                "b",
                qb,
                "forward_text",
                n - PS * (len(pages) - 1),
                pages,
                tokens[-1:] if slow else tokens,
                [n - 1] if slow else [0, 1, 2],
                [],
                [0 if slow else 2],
            )
            slow.append(dists[0][0][0])
            tokens.append(slow[-1])
        self.assertEqual(fast, slow)

    @inlineCallbacks
    def test_persistent_export_survives_a_restart_on_a_fresh_worker(self):
        state = self.mktemp()
        prefix = [5, 6, 7, 8, 9, 10, 11, 12]

        def decode_after_import(service, inst):
            q = service.create_queue(inst)
            service.submit(inst, q, "import_kv_pages", [0, 1], "system")
            service.submit(inst, q, "allocate_kv_pages", [2])
            return service.submit(inst, q, "forward_text", 1, [0, 1, 2], [13], [8], [], [0])

        first = ModelService(self.spy, state_dir=state)
        q = first.create_queue("a")
        first.submit("a", q, "allocate_kv_pages", [0, 1])
        first.submit("a", q, "forward_text_no_output", PS, [0, 1], prefix, list(range(8)), [])
        yield first.submit("a", q, "export_kv_pages", [0, 1], "system", True)
        first.destroy_instance("a")
        before = yield decode_after_import(first, "b")
        yield first.close()

        second = ModelService(self.new_worker(), state_dir=state)  # a fresh, empty KV cache
        self.addCleanup(second.close)
        self.assertEqual(second.list_exports(), [("system", 2)])
        after = yield decode_after_import(second, "c")
        self.assertSameDistribution(after[0], before[0])

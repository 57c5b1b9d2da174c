"""The worker thread: jobs in submission order, results as Deferreds on the reactor,
a failing job fails alone (issue 3, points 4 and 5 on the worker side)."""

from __future__ import annotations

import json
import tempfile
import threading

from twisted.internet import defer
from twisted.trial.unittest import SkipTest, TestCase

from pie.engine.batch import EmbedText, Forward, ForwardItem, Query, Sampling, WorkerInfo
from pie.interfaces import IModelWorker, ITokenizer, PieError
from pie.service.local import load_worker
from tests.model_fixtures import write_tiny_model

_FOLDER = tempfile.TemporaryDirectory()
write_tiny_model(_FOLDER.name)


def prompt_item(**kw) -> ForwardItem:
    base = dict(pages=[0], last_page_len=4, positions=[0, 1, 2, 3], tokens=[5, 6, 7, 8])
    return ForwardItem(**(base | kw))


class WorkerThread(TestCase):
    def setUp(self):
        self.worker = load_worker(
            _FOLDER.name, device="cpu", dtype="float32", num_pages=8, num_embeds=8, dist_size=5
        )
        self.addCleanup(self.worker.close)

    def test_provides_the_interface(self):
        self.assertTrue(IModelWorker.providedBy(self.worker))
        self.assertTrue(ITokenizer.providedBy(self.worker.tokenizer))
        info = self.worker.info
        self.assertIsInstance(info, WorkerInfo)
        self.assertEqual(
            (info.kv_page_size, info.dist_size, info.num_kv_pages, info.vocab_size), (16, 5, 8, 300)
        )

    @defer.inlineCallbacks
    def test_results_arrive_on_the_reactor_thread_in_order(self):
        seen = []

        def note(result, tag):
            seen.append((tag, threading.current_thread() is threading.main_thread()))
            return result

        jobs = [
            self.worker.execute(Query("ping")).addCallback(note, "ping"),
            self.worker.execute(Forward([prompt_item(output_indices=[3])])).addCallback(
                note, "fwd"
            ),
            self.worker.execute(EmbedText(slots=[0], tokens=[1], positions=[0])).addCallback(
                note, "emb"
            ),
        ]
        pong, [[(ids, probs)]], none = yield defer.gatherResults(jobs)
        self.assertEqual(pong, "pong")
        self.assertEqual(len(ids), 5)
        self.assertEqual(probs, sorted(probs, reverse=True))
        self.assertIsNone(none)
        self.assertEqual(seen, [("ping", True), ("fwd", True), ("emb", True)])

    @defer.inlineCallbacks
    def test_a_failing_job_fails_alone(self):
        bad = self.worker.execute(Forward([prompt_item(tokens=[5, 6, 7, 999])]))
        good = self.worker.execute(Forward([prompt_item(output_indices=[3], sampling=Sampling())]))
        yield self.assertFailure(bad, PieError)
        [[token]] = yield good
        self.assertIsInstance(token, int)
        unknown = self.worker.execute(object())
        yield self.assertFailure(unknown, PieError)
        stats = json.loads((yield self.worker.execute(Query("stats"))))
        self.assertEqual(stats["forwards"], 1)

    @defer.inlineCallbacks
    def test_close_stops_the_thread(self):
        yield self.worker.close()
        thread = self.worker._thread._thread
        thread.join()  # close fired from the thread's last step: it can only be ending
        self.assertFalse(thread.is_alive())
        yield self.assertFailure(self.worker.execute(Query("ping")), PieError)


class Sampling_(TestCase):
    @defer.inlineCallbacks
    def test_greedy_top_k_and_seeds(self):
        worker = load_worker(
            _FOLDER.name, device="cpu", dtype="float32", num_pages=8, dist_size=300
        )
        self.addCleanup(worker.close)
        [dists] = yield worker.execute(Forward([prompt_item(output_indices=[0, 1, 2, 3])]))
        ids = dists[3][0]
        greedy = yield worker.execute(
            Forward([prompt_item(output_indices=[3], sampling=Sampling())])
        )
        top1 = yield worker.execute(
            Forward([prompt_item(output_indices=[3], sampling=Sampling(temperature=1.5, top_k=1))])
        )
        self.assertEqual(greedy, [[ids[0]]])
        self.assertEqual(top1, [[ids[0]]])
        seeded = Sampling(temperature=2.0, top_p=0.9, seed=42)
        draws = []
        for _ in range(2):
            draws.append(
                (
                    yield worker.execute(
                        Forward([prompt_item(output_indices=[0, 1, 2, 3], sampling=seeded)])
                    )
                )
            )
        self.assertEqual(draws[0], draws[1])
        for (row_ids, row_probs), token in zip(dists, draws[0][0], strict=True):
            tempered = [p**0.5 for p in row_probs]  # softmax(logits / 2) = p^(1/2) / Z
            tempered = [p / sum(tempered) for p in tempered]
            mass, nucleus = 0.0, set()
            for i, p in zip(row_ids, tempered, strict=True):
                if mass >= 0.9:
                    break
                nucleus.add(i)
                mass += p
            self.assertIn(token, nucleus)
        with self.assertRaisesRegex(PieError, "sampling"):
            worker.engine.run(
                Forward([prompt_item(output_indices=[3], sampling=Sampling(top_p=0))])
            )


class Sizing(TestCase):
    def test_impossible_kv_cache_is_a_clear_error(self):
        with self.assertRaisesRegex(PieError, "cannot allocate a KV cache"):
            load_worker(_FOLDER.name, device="cpu", dtype="float32", num_pages=1 << 24)  # 128 GiB


class ReleaseFreedMemoryTests(TestCase):
    def test_glibc_heap_is_trimmed_after_a_load(self):
        import platform

        from pie.engine.memory import release_freed_memory

        if platform.libc_ver()[0] != "glibc":
            raise SkipTest("malloc_trim is glibc's")
        self.assertTrue(release_freed_memory())

"""Persistent KV exports survive a restart: recorded tokens are replayed on the first import."""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.trial.unittest import TestCase

from pie.engine.batch import Forward
from pie.interfaces import InstanceFault
from pie.service.exportstore import ExportStore
from pie.service.resources import PhysicalPool, Resources
from pie.service.service import ModelService
from tests.service_case import ServiceCase
from tests.service_doubles import FakeWorker

PREFIX = [11, 12, 13, 14, 15, 16, 17, 18]  # two full pages of 4


class PersistentExportTests(ServiceCase):
    def setUp(self):
        self.state = self.mktemp()
        self.restart()

    def restart(self):
        """A fresh service on a fresh worker (empty KV cache) over the same state directory."""
        if getattr(self, "service", None) is not None:
            self.service.close()
        self.make(
            FakeWorker(num_pages=8),
            state_dir=self.state,
            run_blocking=lambda fn, *a: maybeDeferred(fn, *a),
        )
        self.addCleanup(self.service.close)

    def do(self, inst, queue, op, *args):
        box = self.submit(inst, queue, op, *args)
        self.run_reactor()
        return box

    def prefill_and_export(self, masks=()):
        q = self.service.create_queue("a")
        self.do("a", q, "allocate_kv_pages", [0, 1])
        self.do("a", q, "forward_text_no_output", 4, [0, 1], PREFIX, list(range(8)), list(masks))
        self.assertEqual(self.do("a", q, "export_kv_pages", [0, 1], "sys", True), [None])
        self.service.destroy_instance("a")

    def decode_after_import(self, inst):
        q = self.service.create_queue(inst)
        self.assertEqual(self.do(inst, q, "import_kv_pages", [4, 5], "sys"), [None])
        self.do(inst, q, "allocate_kv_pages", [6])
        got = self.do(inst, q, "forward_text", 1, [4, 5, 6], [9], [8], [], [0])
        self.service.destroy_instance(inst)
        return got

    def test_synchronize_answers_once_the_export_is_on_disk(self):
        writes = []
        self.make(
            FakeWorker(num_pages=8),
            state_dir=self.state,
            run_blocking=lambda fn, *a: writes.append((fn, a, Deferred())) or writes[-1][2],
        )
        q = self.service.create_queue("a")
        self.do("a", q, "allocate_kv_pages", [0, 1])
        self.do("a", q, "forward_text_no_output", 4, [0, 1], PREFIX, list(range(8)), [])
        self.do("a", q, "export_kv_pages", [0, 1], "sys", True)
        synced = self.do("a", q, "synchronize")
        self.assertEqual(synced, [], "synchronize waits for the store write")
        fn, args, written = writes.pop()
        fn(*args)
        written.callback(None)
        self.run_reactor()
        self.assertEqual(synced, [True])
        self.assertEqual(list(ExportStore(self.state, "fake-model", 4).load()), ["sys"])

    def test_restart_recomputes_the_pages_from_recorded_tokens(self):
        self.prefill_and_export()
        before = self.decode_after_import("b")
        self.assertEqual(
            before, [[self.expected([(t, p) for p, t in enumerate(PREFIX)] + [(9, 8)])]]
        )
        self.assertTrue(os.path.exists(os.path.join(self.state, ExportStore.FILENAME)))

        self.restart()
        self.assertEqual(self.service.list_exports(), [("sys", 2)])
        self.assertEqual(self.service.status()["free_kv_pages"], 8, "dormant until imported")
        after = self.decode_after_import("c")
        self.assertEqual(after, before)
        replay = self.worker.jobs_of(Forward)[0].items[0]
        self.assertEqual(
            (replay.tokens, replay.positions, replay.masks), (PREFIX, list(range(8)), [])
        )
        self.assertEqual(
            self.service.status()["free_kv_pages"], 6, "the export holds its two pages"
        )
        # a second importer shares the recomputed pages: no second replay
        self.assertEqual(self.decode_after_import("d"), before)
        self.assertEqual(len(self.worker.jobs_of(Forward)), 3)

    def test_masked_rows_are_replayed_exactly(self):
        # token 5 does not attend to tokens 1..2
        masks = [[i + 1] for i in range(8)]
        masks[5] = [1, 2, 3]
        self.prefill_and_export(masks)
        before = self.decode_after_import("b")
        self.restart()
        after = self.decode_after_import("c")
        self.assertEqual(after, before)
        self.assertEqual(self.worker.jobs_of(Forward)[0].items[0].masks, masks)

    def test_unexport_removes_it_from_disk(self):
        self.prefill_and_export()
        q = self.service.create_queue("b")
        self.do("b", q, "unexport_kv_pages", "sys")
        self.restart()
        self.assertEqual(self.service.list_exports(), [])

    def test_pages_that_attended_elsewhere_are_not_persisted(self):
        q = self.service.create_queue("a")
        self.do("a", q, "allocate_kv_pages", [0, 1])
        self.do("a", q, "forward_text_no_output", 4, [0, 1], PREFIX, list(range(8)), [])
        self.do("a", q, "export_kv_pages", [1], "tail", True)  # page 1's tokens attended to page 0
        self.assertEqual(self.service.list_exports(), [("tail", 1)])
        self.restart()
        self.assertEqual(self.service.list_exports(), [])

    def test_an_unreadable_row_is_skipped_and_a_broken_store_is_survived(self):
        self.prefill_and_export()
        store = ExportStore(self.state, "fake-model", 4)
        store._db.execute("UPDATE kv_exports SET recipe = 'not json'")
        store.close()
        self.restart()
        self.assertEqual(self.service.list_exports(), [])
        broken = self.mktemp()
        # a directory where the database should be: sqlite cannot open it
        os.makedirs(os.path.join(broken, ExportStore.FILENAME))
        self.service = ModelService(FakeWorker(), reactor=self.clock, state_dir=broken)
        q = self.service.create_queue("a")
        self.do("a", q, "allocate_kv_pages", [0])
        self.assertEqual(self.do("a", q, "export_kv_pages", [0], "kept in memory", True), [None])
        self.assertEqual(self.service.list_exports(), [("kept in memory", 1)])

    def test_a_failed_replay_leaves_the_export_dormant(self):
        self.prefill_and_export()
        self.restart()
        self.worker.fail_next = "boom"
        q = self.service.create_queue("b")
        box = self.do("b", q, "import_kv_pages", [4, 5], "sys")
        self.assertIn("boom", self.fault_of(box))
        self.service.destroy_instance("b")
        self.assertEqual(self.service.status()["free_kv_pages"], 8)
        self.assertEqual(
            self.decode_after_import("c"),
            [[self.expected([(t, p) for p, t in enumerate(PREFIX)] + [(9, 8)])]],
        )


class RecipeTests(TestCase):
    """Which page sets can be replayed from their recorded slots."""

    def setUp(self):
        self.res = Resources(num_pages=8, num_embeds=2, page_size=4)
        self.res.allocate_pages("a", [0, 1, 2])
        self.pages = self.res.translate_pages("a", [0, 1, 2])

    def test_partial_last_page(self):
        self.res.record_forward(self.pages[:2], 2, [1, 2, 3, 4, 5, 6], list(range(6)), [])
        recipe = self.res.recipe_for(self.pages[:2])
        self.assertEqual(
            (recipe.last_page_len, recipe.tokens, recipe.masks), (2, [1, 2, 3, 4, 5, 6], [])
        )

    def test_decode_steps_join_into_one_run(self):
        self.res.record_forward(self.pages[:1], 3, [1, 2, 3], [0, 1, 2], [])
        self.res.record_forward(self.pages[:1], 4, [4], [3], [])
        self.res.record_forward(self.pages[:2], 1, [5], [4], [[2, 2, 1]])
        recipe = self.res.recipe_for(self.pages[:2])
        self.assertEqual(recipe.tokens, [1, 2, 3, 4, 5])
        self.assertEqual(recipe.masks, [[1], [2], [3], [4], [2, 2, 1]])

    def test_not_replayable(self):
        self.assertIsNone(self.res.recipe_for(self.pages[:1]), "nothing written")
        self.res.record_forward(self.pages[:2], 4, [1, 2, 3, 4, 5, 6, 7, 8], list(range(8)), [])
        self.assertIsNone(self.res.recipe_for(self.pages[1:2]), "attended to a page outside")
        self.res.record_opaque(self.pages, 1, 1)
        self.assertIsNone(self.res.recipe_for(self.pages), "written by the embedding path")

    def test_copied_slots_keep_their_history(self):
        self.res.record_forward(self.pages[:1], 2, [1, 2], [0, 1], [])
        self.res.record_copy(self.pages[0], self.pages[1], 0, 0, 2)
        self.assertIsNone(self.res.recipe_for(self.pages[1:2]), "they attended to page 0")
        self.assertEqual(self.res.recipe_for(self.pages[:1]).tokens, [1, 2])


class PhysicalPoolTests(TestCase):
    def test_smallest_free_first_and_all_or_nothing(self):
        pool = PhysicalPool(4)
        self.assertEqual(pool.acquire_many(3), [0, 1, 2])
        pool.release(1)
        self.assertEqual(pool.acquire_many(1), [1])
        self.assertRaises(InstanceFault, pool.acquire_many, 2)
        self.assertEqual(pool.available, 1)
        self.assertRaises(ValueError, pool.release, 3)


class StagedPageTests(TestCase):
    def test_a_staged_page_is_freed_only_when_every_stage_of_it_is_undone(self):
        res = Resources(4, 1, 4)
        res.allocate_pages("a", [0])
        (page,) = res.translate_pages("a", [0])
        res.stage([page])
        res.stage([page])  # the open batch and the waiting rest of a split item
        res.deallocate_pages("a", [0])
        self.assertEqual(res.pages.available, 3, "named by unsent work: not free yet")
        res.unstage([page])
        self.assertEqual(res.pages.available, 3)
        res.unstage([page])
        self.assertEqual(res.pages.available, 4)

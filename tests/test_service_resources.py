"""Resources in the model service: pages, embeds, exports, validation, contention."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from pie.config import ConfigError, kv_page_cap, resolve
from pie.engine.batch import Forward
from pie.service.service import CONTENTION_REASON
from tests.service_case import ServiceCase
from tests.service_doubles import FakeWorker


class ResourceTests(ServiceCase):
    def setUp(self):
        self.make(FakeWorker(num_pages=8, num_embeds=4))
        self.qa = self.service.create_queue("a")

    def free(self) -> int:
        return self.service.status()["free_kv_pages"]

    def do(self, op, *args, inst="a", queue=None):
        box = self.submit(inst, self.qa if queue is None else queue, op, *args)
        self.run_reactor()
        return box

    def test_status_has_the_seed_keys_and_more(self):
        status = self.service.status()
        for key in (
            "version",
            "model_name",
            "kv_page_size",
            "num_kv_pages",
            "num_embeddings",
            "num_distributions",
            "free_kv_pages",
            "batching",
        ):
            self.assertIn(key, status)
        self.assertEqual(status["model_name"], "fake-model")
        self.assertEqual(status["num_kv_pages"], 8)
        self.assertEqual(self.service.kv_page_size, 4)

    def test_free_from_the_middle(self):
        self.do("allocate_kv_pages", [10, 11, 12])
        self.assertEqual(self.free(), 5)
        self.assertEqual(self.do("deallocate_kv_pages", [11]), [None])
        self.assertEqual(self.free(), 6)
        self.do("forward_text", 1, [10, 12], [1, 2, 3, 4, 5], [0, 1, 2, 3, 4], [], [4])
        self.assertIn(
            "page 11 is not allocated",
            self.fault_of(self.do("forward_text", 1, [11], [1], [0], [], [])),
        )

    def test_remapping_a_page_id_is_refused(self):
        self.do("allocate_kv_pages", [1])
        self.assertIn("already in use", self.fault_of(self.do("allocate_kv_pages", [1])))

    def test_embed_remap_does_not_leak(self):
        self.do("allocate_embeds", [0, 1])
        self.do("allocate_embeds", [0, 1])
        self.assertEqual(self.service.status()["free_embeddings"], 2)
        self.do("deallocate_embeds", [0, 1])
        self.assertEqual(self.service.status()["free_embeddings"], 4)

    def test_embedding_path(self):
        self.do("allocate_kv_pages", [0])
        self.do("allocate_embeds", [0, 1, 2])
        self.do("embed_text", [0, 1], [5, 6], [0, 1])
        self.do("forward", 2, [0], [0, 1], [2])
        got = self.do("get_next_token_distribution", [2])
        self.assertEqual(got, [[self.expected([(5, 0), (6, 1)])]])

    def test_embed_slots_must_hold_what_is_read(self):
        self.do("allocate_kv_pages", [0])
        self.do("allocate_embeds", [0, 1, 2])
        box = self.do("forward", 1, [0], [0], [1])
        self.assertIn("input embeds never filled", self.fault_of(box))
        self.make(FakeWorker(num_pages=8, num_embeds=4))
        q = self.service.create_queue("a")
        self.do("allocate_embeds", [0], queue=q)
        box = self.do("get_next_token_distribution", [0], queue=q)
        self.assertIn("no forward wrote these embeds", self.fault_of(box))
        self.assertEqual(self.worker.jobs, [])

    def test_a_reallocated_embed_slot_shows_nothing_of_its_past(self):
        self.do("allocate_kv_pages", [0])
        self.do("allocate_embeds", [0, 1])
        self.do("embed_text", [0], [5], [0])
        self.do("forward", 1, [0], [0], [1])
        self.do("deallocate_embeds", [0, 1])
        self.do("allocate_embeds", [0, 1])
        box = self.do("get_next_token_distribution", [1])
        self.assertIn("no forward wrote these embeds", self.fault_of(box))

    def test_a_worker_query_error_is_an_answer(self):
        self.assertEqual(
            self.do("queue_debug_query", "bad query"), ["error: unknown worker query 'bad query'"]
        )
        self.assertEqual(self.do("queue_debug_query", "ping"), ["pong"])

    def test_destroy_frees_everything(self):
        self.do("allocate_kv_pages", [0, 1, 2])
        self.do("allocate_embeds", [0])
        self.do("export_kv_pages", [0], "mine", False)
        self.service.destroy_instance("a")
        self.assertEqual(self.free(), 8)
        self.assertEqual(self.service.status()["free_embeddings"], 4)
        self.assertEqual(self.service.list_exports(), [])

    def test_bad_commands_are_clear_faults_and_reach_no_worker(self):
        cases = [
            (("forward_text", 1, [], [1], [0], [], []), "no KV pages"),
            (("forward_text", 0, [0], [1], [0], [], []), "last_page_len 0"),
            (("forward_text", 5, [0], [1], [0], [], []), "last_page_len 5"),
            (("forward_text", 1, [0], [1, 2], [0], [], []), "2 tokens but 1 positions"),
            (("forward_text", 1, [0], [1, 2], [0, 1], [], []), "do not fit"),
            (("forward_text", 2, [0], [1], [1], [[1], [2]], []), "2 masks for 1 tokens"),
            (("forward_text", 2, [0], [1], [1], [[1]], []), "covers 1 slots, token 0 sees 2"),
            (("forward_text", 2, [0], [1], [1], [[0, 2]], []), "attends to no slot"),
            (("forward_text", 1, [0], [1], [1 << 24], [], []), "positions must be below"),
            (("forward_text", 1, [0], [1], [0], [], [1]), "output indices [1] out of range"),
            (("forward_text", 1, [0], [1000], [0], [], []), "outside the vocabulary"),
            (("forward", 1, [], [0], []), "no KV pages"),
            (("embed_text", [0, 1], [1], [0]), "same length"),
            (("copy_kv_page", 0, 0, 3, 0, 2), "does not fit a page"),
            (("mask_kv_page", 0, [True] * 5), "5 flags"),
            (("export_kv_pages", [0], "", False), "empty name"),
            (("unexport_kv_pages", "nope"), "no export named 'nope'"),
            (("import_kv_pages", [5], "nope"), "no export named 'nope'"),
        ]
        for (op, *args), message in cases:
            self.make(FakeWorker(num_pages=8, num_embeds=4))
            q = self.service.create_queue("a")
            self.do("allocate_kv_pages", [0], queue=q)
            box = self.do(op, *args, queue=q)
            self.assertIn(message, self.fault_of(box), (op, args))
            self.assertEqual(self.worker.jobs, [], (op, args))
            later = self.do("synchronize", queue=q)
            self.assertEqual(self.fault_of(later), self.fault_of(box), "the instance stays faulted")
            self.service.destroy_instance("a")
            self.assertEqual(self.free(), 8, "a failed instance leaks nothing")

    def test_queue_of_another_instance(self):
        qb = self.service.create_queue("b")
        self.assertIn(
            "not a queue of this instance", self.fault_of(self.do("synchronize", queue=qb))
        )

    def test_export_import_share_pages(self):
        self.do("allocate_kv_pages", [0, 1])
        self.do("forward_text_no_output", 4, [0, 1], [1, 2, 3, 4, 5, 6, 7, 8], list(range(8)), [])
        self.do("export_kv_pages", [0, 1], "prefix", False)
        self.assertEqual(self.service.list_exports(), [("prefix", 2)])
        qb = self.service.create_queue("b")
        self.assertIn(
            "has 2 pages but 1 ids",
            self.fault_of(self.do("import_kv_pages", [0], "prefix", inst="b", queue=qb)),
        )
        self.service.destroy_instance("b")
        qb = self.service.create_queue("b")
        used = 8 - self.free()
        self.do("import_kv_pages", [5, 6], "prefix", inst="b", queue=qb)
        self.assertEqual(8 - self.free(), used, "an import takes no new page")
        self.do("allocate_kv_pages", [7], inst="b", queue=qb)
        # b decodes after the imported prefix, in a page of its own
        got = self.do("forward_text", 1, [5, 6, 7], [9], [8], [], [0], inst="b", queue=qb)
        prefix = [(t, p) for p, t in enumerate([1, 2, 3, 4, 5, 6, 7, 8])]
        self.assertEqual(got, [[self.expected(prefix + [(9, 8)])]])
        # the exporter ends: its non-persistent export goes, the importer's pages stay
        self.service.destroy_instance("a")
        self.assertEqual(self.service.list_exports(), [])
        got = self.do("forward_text", 1, [5, 6, 7], [9], [8], [], [0], inst="b", queue=qb)
        self.assertEqual(got, [[self.expected(prefix + [(9, 8)])]])
        self.service.destroy_instance("b")
        self.assertEqual(self.free(), 8)

    def test_unexport_checks_ownership_and_releases_references(self):
        self.do("allocate_kv_pages", [0])
        self.do("export_kv_pages", [0], "x", False)
        qb = self.service.create_queue("b")
        self.assertIn(
            "exported by another instance",
            self.fault_of(self.do("unexport_kv_pages", "x", inst="b", queue=qb)),
        )
        qc = self.service.create_queue("c")
        self.do("allocate_kv_pages", [0], inst="c", queue=qc)
        box = self.do("export_kv_pages", [0], "x", False, inst="c", queue=qc)
        self.assertIn("exported by another instance", self.fault_of(box))
        self.service.destroy_instance("c")
        self.do("deallocate_kv_pages", [0])
        self.assertEqual(self.free(), 7, "the export keeps its page alive")
        self.assertEqual(self.do("unexport_kv_pages", "x"), [None])
        self.assertEqual(self.free(), 8)

    def test_persistent_export_outlives_the_exporter_and_reexport_releases_old_refs(self):
        self.do("allocate_kv_pages", [0, 1])
        self.do("export_kv_pages", [0], "p", True)
        self.service.destroy_instance("a")
        self.assertEqual(self.service.list_exports(), [("p", 1)])
        self.assertEqual(self.free(), 7)
        qb = self.service.create_queue("b")
        self.do("allocate_kv_pages", [3], inst="b", queue=qb)
        self.do("export_kv_pages", [3], "p", True, inst="b", queue=qb)
        self.assertEqual(self.free(), 7, "re-exporting the name released the old page")
        self.do("unexport_kv_pages", "p", inst="b", queue=qb)
        self.do("deallocate_kv_pages", [3], inst="b", queue=qb)
        self.assertEqual(self.free(), 8)


class ContentionTests(ServiceCase):
    def setUp(self):
        self.make(FakeWorker(num_pages=4))
        self.queues = {name: self.service.create_queue(name) for name in "abc"}

    def alloc(self, inst, ids):
        box = self.submit(inst, self.queues[inst], "allocate_kv_pages", ids)
        self.run_reactor()
        return box

    def test_newest_instances_are_evicted_first(self):
        self.alloc("a", [0])
        self.alloc("b", [0])
        self.alloc("c", [0])
        staged = self.submit("c", self.queues["c"], "forward_text", 1, [0], [1], [0], [], [0])
        self.assertEqual(self.alloc("a", [1, 2, 3]), [None])
        self.assertEqual(self.fault_of(staged), CONTENTION_REASON)
        self.run_reactor()
        self.assertEqual(self.terminated, [("c", CONTENTION_REASON), ("b", CONTENTION_REASON)])
        self.assertEqual(self.service.status()["free_kv_pages"], 0)
        self.assertEqual(
            self.worker.jobs_of(Forward), [], "the evicted instance's command never ran"
        )
        later = self.submit("b", self.queues["b"], "synchronize")
        self.assertEqual(self.fault_of(later), CONTENTION_REASON)

    def test_only_as_many_as_needed(self):
        self.alloc("a", [0])
        self.alloc("b", [0])
        self.alloc("c", [0])
        self.alloc("a", [1, 2])
        self.run_reactor()
        self.assertEqual([i for i, _ in self.terminated], ["c"])

    def test_the_newest_requester_fails_alone(self):
        self.alloc("a", [0, 1])
        self.alloc("b", [0])
        box = self.alloc("c", [0, 1])
        self.assertIn("out of KV pages: 2 requested, 1 free", self.fault_of(box))
        self.run_reactor()
        self.assertEqual(self.terminated, [])
        self.assertEqual(self.service.status()["free_kv_pages"], 1)

    def test_nobody_is_evicted_when_it_would_not_help(self):
        self.alloc("a", [0])
        self.alloc("b", [0, 1])
        box = self.alloc("b", [2, 3, 4])
        self.assertIn("out of KV pages", self.fault_of(box))
        self.run_reactor()
        self.assertEqual(self.terminated, [])


class FairShareTests(ServiceCase):
    """Issue 17: a hog holding the pool cannot starve a newcomer; a per-instance cap holds."""

    def alloc(self, inst, ids):
        box = self.submit(inst, self.queues[inst], "allocate_kv_pages", ids)
        self.run_reactor()
        return box

    def start(self, names, **options):
        self.make(FakeWorker(num_pages=16), **options)
        self.queues = {name: self.service.create_queue(name) for name in names}

    def test_an_older_hog_is_evicted_for_a_newcomer_within_its_share(self):
        self.start("hn")
        self.assertEqual(self.alloc("h", list(range(16))), [None])
        box = self.alloc("n", [0, 1])
        self.assertEqual(box, [None], "the newcomer's 2-page request is served")
        self.run_reactor()
        self.assertEqual(self.terminated, [("h", CONTENTION_REASON)])
        self.assertEqual(self.service.status()["free_kv_pages"], 14)
        later = self.submit("h", self.queues["h"], "synchronize")
        self.assertEqual(self.fault_of(later), CONTENTION_REASON)

    def test_the_instance_most_beyond_its_share_goes_first(self):
        self.start("abcn")  # fair share: 16 / 4 = 4 pages
        self.alloc("a", list(range(5)))
        self.alloc("b", list(range(9)))
        self.alloc("c", [0, 1])
        self.assertEqual(self.alloc("n", [0, 1, 2]), [None])
        self.run_reactor()
        self.assertEqual([i for i, _ in self.terminated], ["b"], "a and c keep running")
        self.assertEqual(self.service.resources.holds("a"), (5, 0))

    def test_a_requester_beyond_its_share_does_not_evict_older_instances(self):
        self.start("ab")  # fair share: 8 pages
        self.alloc("a", list(range(10)))
        self.alloc("b", list(range(6)))
        box = self.alloc("b", [6, 7, 8])  # 9 > 8: b would be beyond its own share
        self.assertIn("out of KV pages: 3 requested, 0 free", self.fault_of(box))
        self.run_reactor()
        self.assertEqual(self.terminated, [])

    def test_the_instance_cap_refuses_clearly_and_takes_nothing(self):
        self.start("a", instance_pages=4)
        self.assertEqual(self.alloc("a", [0, 1, 2]), [None])
        box = self.alloc("a", [3, 4])
        self.assertIn("KV page cap reached: the instance maps 3 pages", self.fault_of(box))
        self.assertIn("cap of 4 (kv_instance_pages)", self.fault_of(box))
        self.assertEqual(self.service.status()["free_kv_pages"], 13)

    def test_the_cap_counts_imported_pages(self):
        self.start("ab", instance_pages=3)
        self.alloc("a", [0, 1])
        self.submit("a", self.queues["a"], "export_kv_pages", [0, 1], "x", False)
        self.alloc("b", [0, 1])
        box = self.submit("b", self.queues["b"], "import_kv_pages", [5, 6], "x")
        self.run_reactor()
        self.assertIn("import_kv_pages: KV page cap reached", self.fault_of(box))

    def test_every_page_not_exported_comes_back_when_instances_end(self):
        self.start("ab")
        self.alloc("a", list(range(6)))
        self.submit("a", self.queues["a"], "export_kv_pages", [0, 1], "kept", True)
        self.submit("a", self.queues["a"], "export_kv_pages", [2, 3, 4], "shared", False)
        self.submit("b", self.queues["b"], "import_kv_pages", [0, 1, 2], "shared")
        self.alloc("b", [7, 8])
        self.run_reactor()
        self.assertEqual(self.service.status()["free_kv_pages"], 8)
        self.service.destroy_instance("a")
        self.assertEqual(self.service.status()["free_kv_pages"], 9, "only a's unshared page 5")
        self.service.destroy_instance("b")
        self.assertEqual(
            self.service.status()["free_kv_pages"], 14, "all but the persistent export's 2"
        )
        self.assertEqual(self.service.list_exports(), [("kept", 2)])


class InstancePagesSettingTests(TestCase):
    def test_the_default_is_three_quarters_of_the_pool_and_negative_is_refused(self):
        self.assertEqual(kv_page_cap(resolve({}, {}), "kv_instance_pages", 1024), 768)
        self.assertEqual(kv_page_cap(resolve({}, {}), "kv_instance_pages", 1), 1)
        self.assertEqual(
            kv_page_cap(resolve({"kv_instance_pages": 10}, {}), "kv_instance_pages", 64), 10
        )
        with self.assertRaises(ConfigError):
            resolve({"kv_instance_pages": -1}, {})


class RemoveExportTests(ServiceCase):
    """The admin's kv_unexport: any export goes, whoever owns it, and its pages come back."""

    def test_remove_persistent_and_owned_exports(self):
        self.make(FakeWorker(num_pages=8))
        q = self.service.create_queue("a")
        self.submit("a", q, "allocate_kv_pages", [0, 1, 2])
        self.submit("a", q, "export_kv_pages", [0, 1], "pinned", True)
        self.submit("a", q, "export_kv_pages", [2], "owned", False)
        self.run_reactor()
        self.service.destroy_instance("a")
        self.assertEqual(self.service.status()["free_kv_pages"], 6)
        self.assertTrue(self.service.remove_export("pinned"))
        self.assertEqual(self.service.status()["free_kv_pages"], 8)
        self.assertFalse(self.service.remove_export("pinned"))
        q = self.service.create_queue("b")
        self.submit("b", q, "allocate_kv_pages", [0])
        self.submit("b", q, "export_kv_pages", [0], "owned", False)
        self.run_reactor()
        self.assertTrue(self.service.remove_export("owned"))
        self.assertEqual(self.service.list_exports(), [])

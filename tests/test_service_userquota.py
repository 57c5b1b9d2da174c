"""Issue 17: per-user KV page cap and export quota in the model service, and their settings."""

from __future__ import annotations

from twisted.internet.defer import maybeDeferred
from twisted.trial.unittest import TestCase

from pie.config import ConfigError, kv_page_cap, resolve
from tests.service_case import ServiceCase
from tests.service_doubles import FakeWorker


class UserCase(ServiceCase):
    def start(self, users: dict[str, str | None], **options):
        """Instances (name -> user) on a 16-page pool."""
        self.make(FakeWorker(num_pages=16), **options)
        self.queues = {i: self.service.create_queue(i, user) for i, user in users.items()}

    def do(self, inst, op, *args):
        box = self.submit(inst, self.queues[inst], op, *args)
        self.run_reactor()
        return box


class UserPageCapTests(UserCase):
    def test_a_users_instances_together_stop_at_the_user_cap_and_others_are_unaffected(self):
        self.start({"a1": "alice", "a2": "alice", "b": "bob", "d": None}, user_pages=6)
        self.assertEqual(self.do("a1", "allocate_kv_pages", [0, 1, 2, 3]), [None])
        box = self.do("a2", "allocate_kv_pages", [0, 1, 2])
        self.assertEqual(
            self.fault_of(box),
            "allocate_kv_pages: KV page cap reached: user 'alice''s instances map 4 pages, "
            "3 more would pass the user cap of 6 (kv_user_pages)",
        )
        self.assertEqual(self.service.resources.holds("a2"), (0, 0), "nothing was taken")
        self.assertEqual(self.do("b", "allocate_kv_pages", list(range(6))), [None])
        self.assertEqual(self.do("d", "allocate_kv_pages", [0, 1, 2, 3, 4, 5]), [None], "no user")
        self.assertEqual(self.terminated, [])

    def test_the_user_cap_counts_imports_and_frees_with_the_instance(self):
        self.start({"a1": "alice", "a2": "alice", "a3": "alice", "b": "bob"}, user_pages=5)
        self.do("b", "allocate_kv_pages", [0, 1, 2])
        self.do("b", "export_kv_pages", [0, 1, 2], "shared/doc", False)
        self.do("a1", "allocate_kv_pages", [0, 1, 2])
        box = self.do("a2", "import_kv_pages", [0, 1, 2], "shared/doc")
        self.assertIn("import_kv_pages: KV page cap reached: user 'alice'", self.fault_of(box))
        self.service.destroy_instance("a1")  # (a2 ended with its fault)
        self.assertEqual(self.do("a3", "import_kv_pages", [0, 1, 2], "shared/doc"), [None])


class ExportQuotaTests(UserCase):
    def test_regular_and_persistent_exports_count_and_give_back_on_unexport(self):
        self.start({"a": "alice", "b": "bob"}, export_pages=4)
        self.do("a", "allocate_kv_pages", list(range(8)))
        self.assertEqual(self.do("a", "export_kv_pages", [0, 1], "kept", True), [None])
        self.assertEqual(self.do("a", "export_kv_pages", [2], "mine", False), [None])
        box = self.do("a", "export_kv_pages", [3, 4], "more", True)
        self.assertEqual(
            self.fault_of(box),
            "export_kv_pages: export quota reached: user 'alice' exports 3 pages, "
            "2 more would pass 4 (kv_user_export_pages)",
        )
        self.assertNotIn("more", dict(self.service.list_exports()))
        self.do("b", "allocate_kv_pages", [0, 1, 2, 3])
        self.assertEqual(self.do("b", "export_kv_pages", [0, 1, 2, 3], "b", True), [None])
        self.start({"a": "alice"}, export_pages=4)  # a fresh service: the quota is per service
        self.do("a", "allocate_kv_pages", list(range(5)))
        self.do("a", "export_kv_pages", [0, 1, 2], "kept", True)
        self.do("a", "unexport_kv_pages", "kept")
        self.assertEqual(self.do("a", "export_kv_pages", [0, 1, 2, 3], "kept", True), [None])

    def test_a_regular_export_stops_counting_when_its_instance_ends(self):
        self.start({"a1": "alice", "a2": "alice"}, export_pages=2)
        self.do("a1", "allocate_kv_pages", [0, 1])
        self.do("a1", "export_kv_pages", [0, 1], "tmp", False)
        self.service.destroy_instance("a1")
        self.do("a2", "allocate_kv_pages", [0, 1])
        self.assertEqual(self.do("a2", "export_kv_pages", [0, 1], "tmp", True), [None])

    def test_a_persistent_export_counts_for_its_user_after_a_restart(self):
        state = self.mktemp()
        options = dict(
            state_dir=state, export_pages=2, run_blocking=lambda fn, *a: maybeDeferred(fn, *a)
        )
        self.start({"a": "alice"}, **options)
        self.do("a", "allocate_kv_pages", [0, 1])
        self.do("a", "forward_text_no_output", 4, [0, 1], list(range(8)), list(range(8)), [])
        self.assertEqual(self.do("a", "export_kv_pages", [0, 1], "sys", True), [None])
        self.service.close()
        self.start({"a": "alice"}, **options)
        self.assertEqual(self.service.list_exports(), [("sys", 2)])
        self.do("a", "allocate_kv_pages", [0])
        box = self.do("a", "export_kv_pages", [0], "other", True)
        self.assertIn("user 'alice' exports 2 pages", self.fault_of(box))
        self.service.close()


class UserQuotaSettingTests(TestCase):
    def test_defaults_are_shares_of_the_pool_and_negatives_are_refused(self):
        settings = resolve({}, {})
        caps = [
            kv_page_cap(settings, key, 1024) for key in ("kv_user_pages", "kv_user_export_pages")
        ]
        self.assertEqual(caps, [896, 256])
        self.assertEqual(kv_page_cap(resolve({"kv_user_pages": 10}, {}), "kv_user_pages", 1024), 10)
        self.assertEqual(settings["kv_store_user_bytes"], 256 * 2**20)
        self.assertEqual(settings["kv_store_value_bytes"], 16 * 2**20)
        for key in ("kv_user_pages", "kv_user_export_pages"):
            with self.assertRaises(ConfigError):
                resolve({key: -1}, {})
        for key in ("kv_store_user_bytes", "kv_store_value_bytes"):
            with self.assertRaises(ConfigError):
                resolve({key: 0}, {})

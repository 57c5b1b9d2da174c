"""Issue 17: users are apart in the key-value store and the KV export catalogue, with quotas.

Each instance runs for a user (its owner's `user`, as a client connection
has it); the runtime scopes its store keys and export names to that user
(pie.namespaces), with "shared/" the opt-in shared namespace.
Runtime + the real model service on a fake worker + scripted guests.
"""

from __future__ import annotations

import os
import sqlite3

from twisted.trial import unittest

from pie.interfaces import PieError
from pie.runtime.instances import NORMAL_FINISH
from pie.service.service import ModelService
from tests.runtime_doubles import RecordingOwner, launched, make_runtime
from tests.service_doubles import FakeWorker


def owner(user: str | None) -> RecordingOwner:
    o = RecordingOwner()
    if user is not None:
        o.user = user
    return o


class UserRuntimeCase(unittest.TestCase):
    def setUp(self):
        self.home = os.path.abspath(self.mktemp())
        self.service = ModelService(FakeWorker(num_pages=16, page_size=4), export_pages=6)

    def runtime(self, **kwargs):
        return make_runtime(self, home=self.home, services={"fake": self.service}, **kwargs)

    async def run_as(self, runtime, user, script, *arguments):
        """Run a script for `user` to its end; (its messages, its termination reason)."""
        instance_id, who = await launched(runtime, script, arguments, owner=owner(user))
        reason = await who.ended(instance_id)
        return who.messages(instance_id), reason


async def _store_ops(host, args):
    """args: ops as 'set:k=v', 'get:k', 'del:k', 'list'; returns repr of the results."""
    out = []
    for op in args:
        kind, _, rest = op.partition(":")
        try:
            if kind == "set":
                key, _, value = rest.partition("=")
                out.append(await host.call("store_set", (key, value)))
            elif kind == "get":
                out.append(await host.call("store_get", (rest,)))
            elif kind == "del":
                out.append(await host.call("store_delete", (rest,)))
            else:
                out.append(await host.call("store_list_keys", ()))
        except PieError as e:
            out.append(f"error: {e}")
    return repr(out)


class StoreNamespaceTests(UserRuntimeCase):
    async def test_users_neither_read_nor_overwrite_each_others_records(self):
        runtime = self.runtime()
        await self.run_as(runtime, "alice", _store_ops, "set:cache=alice's", "set:shared/note=hi")
        bob, _ = await self.run_as(
            runtime, "bob", _store_ops, "get:cache", "set:cache=bob's", "del:cache", "list"
        )
        self.assertEqual(bob, [repr([None, None, None, ["shared/note"]])])
        alice, _ = await self.run_as(runtime, "alice", _store_ops, "get:cache", "list")
        self.assertEqual(alice, [repr(["alice's", ["cache", "shared/note"]])])

    async def test_the_shared_namespace_is_read_and_written_by_everyone(self):
        runtime = self.runtime()
        await self.run_as(runtime, "alice", _store_ops, "set:shared/board=from alice")
        bob, _ = await self.run_as(
            runtime, "bob", _store_ops, "get:shared/board", "set:shared/board=from bob"
        )
        self.assertEqual(bob, [repr(["from alice", None])])
        alice, _ = await self.run_as(runtime, "alice", _store_ops, "get:shared/board")
        self.assertEqual(alice, [repr(["from bob"])])

    async def test_a_user_named_like_a_path_cannot_reach_into_another_namespace(self):
        runtime = self.runtime()
        await self.run_as(runtime, "alice", _store_ops, "set:k=secret")
        for user in ("alice/", "user:alice", "alice%2F", ""):
            seen, _ = await self.run_as(runtime, user, _store_ops, "get:k", "list")
            self.assertEqual(seen, [repr([None, []])], user)

    async def test_a_store_from_before_namespaces_belongs_to_the_anonymous_user(self):
        os.makedirs(self.home)
        db = sqlite3.connect(os.path.join(self.home, "kvstore.sqlite3"))
        db.execute("CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID")
        db.executemany("INSERT INTO kv VALUES (?, ?)", [("old", "1"), ("shared/s", "2")])
        db.commit()
        db.close()
        runtime = self.runtime()
        anonymous, _ = await self.run_as(runtime, "anonymous", _store_ops, "get:old", "list")
        self.assertEqual(anonymous, [repr(["1", ["old", "shared/s"]])])
        bob, _ = await self.run_as(runtime, "bob", _store_ops, "get:old", "get:shared/s")
        self.assertEqual(bob, [repr([None, "2"])])


class StoreQuotaTests(UserRuntimeCase):
    async def test_a_value_past_kv_store_value_bytes_is_refused_clearly(self):
        runtime = self.runtime(store_value_bytes=10)
        seen, reason = await self.run_as(runtime, "alice", _store_ops, "set:k=" + "v" * 11, "get:k")
        self.assertEqual(reason, NORMAL_FINISH)
        self.assertEqual(
            seen,
            [
                repr(
                    [
                        "error: store value of 11 bytes exceeds 10 bytes (kv_store_value_bytes)",
                        None,
                    ]
                )
            ],
        )

    async def test_the_user_quota_refuses_the_one_past_it_and_not_the_others(self):
        runtime = self.runtime(store_user_bytes=18)  # key + value bytes
        seen, _ = await self.run_as(
            runtime, "alice", _store_ops, "set:a=1234567", "set:a=12345678", "set:b=123456789"
        )
        results = eval(seen[0])
        self.assertEqual(results[:2], [None, None], "overwriting a record does not count twice")
        self.assertEqual(
            results[2],
            "error: key-value store quota reached: user 'alice' stores 9 bytes, this record "
            "of 10 bytes would pass 18 (kv_store_user_bytes)",
        )
        bob, _ = await self.run_as(runtime, "bob", _store_ops, "set:b=123456789", "get:b")
        self.assertEqual(bob, [repr([None, "123456789"])], "bob has a quota of his own")
        alice, _ = await self.run_as(runtime, "alice", _store_ops, "del:a", "set:b=123456789")
        self.assertEqual(alice, [repr([None, None])], "a delete gives the bytes back")

    async def test_a_shared_record_is_paid_by_its_last_writer(self):
        runtime = self.runtime(store_user_bytes=30)
        big = "set:shared/x=" + "v" * 20  # 28 bytes
        await self.run_as(runtime, "alice", _store_ops, big)
        await self.run_as(runtime, "bob", _store_ops, big)
        self.assertEqual(await runtime.kvstore.usage("alice"), 0)
        self.assertEqual(await runtime.kvstore.usage("bob"), 28)
        alice, _ = await self.run_as(runtime, "alice", _store_ops, "set:mine=" + "v" * 20)
        self.assertEqual(alice, [repr([None])])

    async def test_usage_survives_a_restart(self):
        runtime = self.runtime(store_user_bytes=20)
        await self.run_as(runtime, "alice", _store_ops, "set:a=" + "v" * 15)
        await runtime.stopService()
        runtime = self.runtime(store_user_bytes=20)
        seen, _ = await self.run_as(runtime, "alice", _store_ops, "set:b=" + "v" * 15)
        self.assertIn("key-value store quota reached: user 'alice' stores 16 bytes", seen[0])


async def _exports(host, args):
    """args: ops 'export:NAME:PAGES[:persistent]', 'import:NAME:PAGES', 'unexport:NAME', 'list'."""
    service = host.call("get_model", (host.call("get_all_models", ())[0],))
    queue = host.call("create_queue", (service,))
    out, next_id = [], 0
    for op in args:
        kind, *rest = op.split(":")
        if kind == "list":
            out.append(sorted(host.call("get_all_exported_kv_pages", (queue,))))
            continue
        if kind == "unexport":
            host.call("unexport_kv_pages", (queue, rest[0]))
        else:
            ids = list(range(next_id, next_id + int(rest[1])))
            next_id += len(ids)
            if kind == "export":
                host.call("allocate_kv_pages", (queue, ids))
                host.call("export_kv_pages", (queue, ids, rest[0], rest[2:] == ["persistent"]))
            else:
                host.call("import_kv_pages", (queue, ids, rest[0]))
        out.append(await host.call("synchronize", (queue,)))
    host.call("send", (repr(out),))
    if "park" in args:
        await host.call("receive", ())


class ExportNamespaceTests(UserRuntimeCase):
    async def test_another_user_cannot_see_import_replace_or_remove_an_export(self):
        runtime = self.runtime()
        await self.run_as(runtime, "alice", _exports, "export:sys:2:persistent")
        seen, reason = await self.run_as(runtime, "bob", _exports, "list", "unexport:sys")
        self.assertEqual(seen, [], "the instance ended at the unexport, before it could send")
        self.assertIn("unexport_kv_pages: no export named 'sys'", reason)
        seen, reason = await self.run_as(runtime, "bob", _exports, "import:sys:2")
        self.assertIn("import_kv_pages: no export named 'sys'", reason)
        # bob's own "sys" is a different export: alice's stays hers, with its 2 pages
        await self.run_as(runtime, "bob", _exports, "export:sys:3:persistent")
        alice, reason = await self.run_as(runtime, "alice", _exports, "list", "import:sys:2")
        self.assertEqual(reason, NORMAL_FINISH)
        self.assertEqual(alice, [repr([[("sys", 2)], True])])
        bob, _ = await self.run_as(runtime, "bob", _exports, "list")
        self.assertEqual(bob, [repr([[("sys", 3)]])])

    async def test_a_shared_export_is_imported_by_another_user(self):
        runtime = self.runtime()
        await self.run_as(runtime, "alice", _exports, "export:shared/doc:2:persistent")
        bob, reason = await self.run_as(runtime, "bob", _exports, "list", "import:shared/doc:2")
        self.assertEqual((bob, reason), ([repr([[("shared/doc", 2)], True])], NORMAL_FINISH))


class ExportQuotaTests(UserRuntimeCase):
    async def test_exports_past_the_user_quota_end_that_instance_alone(self):
        runtime = self.runtime()  # export_pages=6
        _, reason = await self.run_as(runtime, "alice", _exports, "export:a:4:persistent")
        self.assertEqual(reason, NORMAL_FINISH)
        _, reason = await self.run_as(runtime, "alice", _exports, "export:b:3")
        self.assertIn(
            "export quota reached: user 'alice' exports 4 pages, 3 more would pass 6 "
            "(kv_user_export_pages)",
            reason,
        )
        _, reason = await self.run_as(runtime, "bob", _exports, "export:a:6:persistent")
        self.assertEqual(reason, NORMAL_FINISH, "bob's quota is his own")
        _, reason = await self.run_as(runtime, "alice", _exports, "export:a:6:persistent")
        self.assertEqual(reason, NORMAL_FINISH, "replacing an export does not count it twice")

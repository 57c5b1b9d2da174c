"""The program store and the key-value store, and both surviving a restart (issue 4 point 5; issue 2 point 5)."""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred
from twisted.trial import unittest

from pie.interfaces import PieError
from pie.runtime.instances import NORMAL_FINISH
from pie.runtime.programs import program_hash
from pie.runtime.runtime import Runtime
from tests.runtime_doubles import (
    FakeModelService,
    RecordingOwner,
    ScriptExecutor,
    launched,
    make_runtime,
)


class ProgramStoreTests(unittest.TestCase):
    def setUp(self):
        self.home = os.path.abspath(self.mktemp())
        self.executor = ScriptExecutor()

    def runtime(self, **kwargs) -> Runtime:
        return make_runtime(self, home=self.home, executor=self.executor, **kwargs)

    async def _noop(self, host, args):
        return None

    async def test_upload_is_content_addressed_and_survives_a_restart(self):
        program = self.executor.program(self._noop)
        first = self.runtime()
        digest = await first.add_program(program)
        self.assertEqual(digest, program_hash(program))
        self.assertTrue(first.program_exists(digest))
        with open(os.path.join(self.home, "programs", digest), "rb") as f:
            self.assertEqual(f.read(), program)
        self.assertEqual(os.listdir(os.path.join(self.home, "programs")), [digest])
        await first.stopService()

        second = self.runtime()
        self.assertTrue(second.program_exists(digest))
        owner = (await launched(second, self._noop))[1]  # uploading again is harmless
        instance_id = await second.launch(digest, [], owner)
        self.assertEqual(await owner.ended(instance_id), NORMAL_FINISH)

    def test_rescan_trusts_content_not_names(self):
        program = self.executor.program(self._noop)
        os.makedirs(os.path.join(self.home, "programs"))
        with open(os.path.join(self.home, "programs", "renamed-by-hand"), "wb") as f:
            f.write(program)
        with open(os.path.join(self.home, "programs", ".upload-interrupted"), "wb") as f:
            f.write(b"half")
        runtime = self.runtime()
        self.assertTrue(runtime.program_exists(program_hash(program)))
        self.assertFalse(runtime.program_exists(program_hash(b"half")))
        self.assertNotIn(".upload-interrupted", os.listdir(os.path.join(self.home, "programs")))

    async def test_invalid_program_fails_upload_with_the_message(self):
        runtime = self.runtime()
        with self.assertRaises(PieError) as caught:
            await runtime.add_program(b"def main(:\n")
        self.assertIn("SyntaxError", str(caught.exception))
        self.assertFalse(runtime.program_exists(program_hash(b"def main(:\n")))
        self.assertEqual(os.listdir(os.path.join(self.home, "programs")), [])

    async def test_program_that_became_invalid_fails_launch(self):
        """A stored program the executor refuses (e.g. after an upgrade) fails the launch, once checked."""
        os.makedirs(os.path.join(self.home, "programs"))
        with open(os.path.join(self.home, "programs", "x"), "wb") as f:
            f.write(b"not a script")
        runtime = self.runtime()
        with self.assertRaises(PieError) as caught:
            await runtime.launch(program_hash(b"not a script"), [], None)
        self.assertIn("SyntaxError", str(caught.exception))

    async def test_size_limits(self):
        runtime = self.runtime(max_program_size=10)
        for data, message in ((b"", "empty program"), (b"x" * 11, "exceeds the limit of 10")):
            with self.assertRaises(PieError) as caught:
                await runtime.add_program(data)
            self.assertIn(message, str(caught.exception))

    def test_program_exists_on_garbage(self):
        runtime = self.runtime()
        self.assertFalse(runtime.program_exists("../../etc/passwd"))
        self.assertFalse(runtime.program_exists(None))

    async def test_debug_query_shows_a_user_only_its_own_instances(self):
        runtime = self.runtime()
        parked = Deferred()
        self.addCleanup(lambda: parked.called or parked.callback(None))

        async def park(host, args):
            await parked

        def owner(user, admin=False):
            o = RecordingOwner()
            o.user, o.is_admin = user, admin
            return o

        ids = {}
        for name, who in (("a1", owner("alice")), ("a2", owner("alice")), ("b", owner("bob"))):
            ids[name] = (await launched(runtime, park, owner=who))[0]
        ids["root"] = (await launched(runtime, park, owner=owner("root", admin=True)))[0]

        def ask(name, query):
            return runtime.debug_query(query, runtime.instances.running[ids[name]])

        listed = ask("a1", "list_running_instances")
        self.assertIn(ids["a2"], listed)
        self.assertNotIn(ids["b"], listed)
        self.assertEqual(ask("a1", "get_instance_count"), "2")
        self.assertEqual(ask("b", "get_instance_count"), "1")
        self.assertEqual(ask("root", "get_instance_count"), "4")
        self.assertEqual(
            ask("b", "get_cache_dir"), "get_cache_dir requires a token with role Admin"
        )
        self.assertEqual(ask("root", "get_cache_dir"), os.path.join(self.home, "programs"))

    async def test_debug_queries_about_programs(self):
        runtime = self.runtime()
        digest = await runtime.add_program(self.executor.program(self._noop))
        self.assertEqual(runtime.debug_query("list_in_memory_programs"), digest)
        self.assertEqual(runtime.debug_query("get_cache_dir"), os.path.join(self.home, "programs"))
        self.assertEqual(runtime.debug_query("ping"), "pong")
        self.assertEqual(runtime.debug_query("what"), "Unknown query: what")


class KeyValueStoreTests(unittest.TestCase):
    def setUp(self):
        self.home = os.path.abspath(self.mktemp())
        self.executor = ScriptExecutor()

    def runtime(self) -> Runtime:
        return make_runtime(self, home=self.home, executor=self.executor)

    async def test_operations_from_an_inferlet(self):
        async def script(host, args):
            out = []
            await host.call("store_set", ("k1", "v1"))
            await host.call("store_set", ("k2", "v2"))
            await host.call("store_set", ("k1", "v1b"))
            out.append(await host.call("store_get", ("k1",)))
            out.append(await host.call("store_get", ("missing",)))
            out.append(await host.call("store_exists", ("k2",)))
            await host.call("store_delete", ("k2",))
            await host.call("store_delete", ("never-there",))
            out.append(await host.call("store_exists", ("k2",)))
            out.append(await host.call("store_list_keys", ()))
            return repr(out)

        instance_id, owner = await launched(self.runtime(), script)
        self.assertEqual(await owner.ended(instance_id), NORMAL_FINISH)
        self.assertEqual(owner.messages(instance_id), [repr(["v1b", None, True, False, ["k1"]])])

    async def test_store_survives_a_restart(self):
        async def writer(host, args):
            await host.call("store_set", ("greeting", "héllo ✓"))

        async def reader(host, args):
            return await host.call("store_get", ("greeting",))

        first = self.runtime()
        instance_id, owner = await launched(first, writer)
        await owner.ended(instance_id)
        await first.stopService()

        second = self.runtime()
        instance_id, owner = await launched(second, reader)
        await owner.ended(instance_id)
        self.assertEqual(owner.messages(instance_id), ["héllo ✓"])

    async def test_bad_values_are_errors_the_guest_sees(self):
        async def script(host, args):
            try:
                await host.call("store_set", ("k" * 5000, "v"))
            except PieError as e:
                return str(e)

        instance_id, owner = await launched(self.runtime(), script)
        self.assertEqual(await owner.ended(instance_id), NORMAL_FINISH)
        self.assertEqual(owner.messages(instance_id), ["store key exceeds 4096 bytes"])

    async def test_store_ops_do_not_run_on_the_reactor_thread(self):
        import threading

        runtime = self.runtime()
        seen = []
        original = runtime.kvstore._call

        def spy(operation, args):
            seen.append(threading.current_thread() is threading.main_thread())
            return original(operation, args)

        runtime.kvstore._call = spy
        await runtime.kvstore.set("a", "b")
        self.assertEqual(await runtime.kvstore.get("a"), "b")
        self.assertEqual(seen, [False, False])


class ModelServiceRegistryTests(unittest.TestCase):
    def test_duplicate_service_name_is_refused(self):
        runtime = make_runtime(self, services={"fake": FakeModelService()})
        runtime.add_model_service("second", FakeModelService("second", 1))
        self.assertRaises(PieError, runtime.add_model_service, "second", FakeModelService())
        self.assertEqual(
            [s["model_name"] for s in runtime.model_status()], ["fake-model", "second"]
        )

    def test_kv_exports_lists_and_removes_across_models(self):
        runtime = make_runtime(self, services={"fake": FakeModelService()})
        self.assertEqual(runtime.kv_exports(), [{"model": "fake", "name": "prefix", "pages": 3}])
        self.assertTrue(runtime.remove_kv_export("fake", "prefix"))
        self.assertFalse(runtime.remove_kv_export("fake", "other"))
        self.assertFalse(runtime.remove_kv_export("no-such-model", "prefix"))

    async def test_attach_unknown_service_type_is_a_pie_error(self):
        runtime = make_runtime(self)
        with self.assertRaises(PieError) as caught:
            await runtime.attach_remote_service("tcp://127.0.0.1:1", "carrier-pigeon", "svc")
        self.assertIn("Unknown service type: 'carrier-pigeon'", str(caught.exception))

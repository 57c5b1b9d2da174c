"""Instance lifecycle: launch, owner events, the one termination and its reason (issue 4; issue 2 point 6)."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from pie.interfaces import IRuntime, PieError
from pie.runtime.instances import NORMAL_FINISH
from tests.runtime_doubles import FakeModelService, RecordingOwner, launched, make_runtime


class LaunchTests(unittest.TestCase):
    def setUp(self):
        self.runtime = make_runtime(self)

    def test_provides_the_interface(self):
        self.assertTrue(verifyObject(IRuntime, self.runtime))

    async def test_events_then_one_normal_termination(self):
        """send() reaches the owner in order, then exactly one "instance normally finished"."""

        async def script(host, args):
            host.call("send", ("first",))
            host.call("send", (" ".join(args),))

        instance_id, owner = await launched(self.runtime, script, ["a", "b"])
        self.assertEqual(await owner.ended(instance_id), NORMAL_FINISH)
        self.assertEqual(
            owner.events,
            [
                ("message", instance_id, "first"),
                ("message", instance_id, "a b"),
                ("terminated", instance_id, NORMAL_FINISH),
            ],
        )

    async def test_launch_answers_before_the_program_runs(self):
        """The id is known to the caller before any event: the owner is registered first."""
        seen_ids = []

        async def script(host, args):
            host.call("send", ("hi",))

        owner = RecordingOwner()
        digest = await self.runtime.add_program(self.runtime.executor.program(script))
        d = self.runtime.launch(digest, [], owner)

        def answered(instance_id):
            seen_ids.append((instance_id, list(owner.events)))
            return instance_id

        instance_id = await d.addCallback(answered)
        self.assertEqual(seen_ids, [(instance_id, [])])
        await owner.ended(instance_id)
        self.assertEqual(owner.messages(instance_id), ["hi"])

    async def test_exception_reason(self):
        async def script(host, args):
            raise ValueError("bad input")

        instance_id, owner = await launched(self.runtime, script)
        self.assertEqual(await owner.ended(instance_id), "Runtime error: ValueError: bad input")
        self.assertEqual(len(owner.terminations(instance_id)), 1)
        self.flushLoggedErrors(ValueError)

    async def test_return_value_is_the_last_message(self):
        async def script(host, args):
            host.call("send", ("working",))
            return "the answer"

        instance_id, owner = await launched(self.runtime, script)
        await owner.ended(instance_id)
        self.assertEqual(owner.messages(instance_id), ["working", "the answer"])

    async def test_set_return(self):
        async def script(host, args):
            host.call("set_return", ("set by call",))

        instance_id, owner = await launched(self.runtime, script)
        await owner.ended(instance_id)
        self.assertEqual(owner.messages(instance_id), ["set by call"])

    async def test_terminate_kills_with_the_reason_once(self):
        parked = Deferred()

        async def script(host, args):
            received = host.call("receive", ())
            reactor.callLater(0, parked.callback, None)  # once the executor's run() returned
            await received
            host.call("send", ("never",))

        instance_id, owner = await launched(self.runtime, script)
        await parked
        self.runtime.terminate(instance_id, "user terminated the program")
        self.runtime.terminate(instance_id, "again")
        self.assertEqual(await owner.ended(instance_id), "user terminated the program")
        self.assertEqual(owner.terminations(instance_id), ["user terminated the program"])
        self.assertEqual(owner.messages(instance_id), [])
        self.assertEqual(self.runtime.executor.executions[-1].killed, "user terminated the program")

    async def test_a_failing_owner_does_not_fail_the_program(self):
        class BrokenOwner(RecordingOwner):
            def instance_message(self, instance_id, message):
                raise ConnectionError("gone")

        async def script(host, args):
            host.call("send", ("lost",))
            return "result"

        instance_id, owner = await launched(self.runtime, script, owner=BrokenOwner())
        self.assertEqual(await owner.ended(instance_id), NORMAL_FINISH)
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 2)

    def test_terminate_unknown_id_is_ignored(self):
        self.runtime.terminate("no-such-instance", "whatever")
        self.runtime.terminate(["not", "hashable"], "whatever")

    def test_signal_with_bad_types_is_a_pie_error(self):
        self.assertRaises(PieError, self.runtime.signal, ["x"], "m")
        self.assertRaises(PieError, self.runtime.signal, "x", b"bytes")
        self.runtime.signal("no-such-instance", "ignored")

    async def test_unknown_program_is_a_pie_error(self):
        """Pie crashed its runtime here; now the launch fails and the runtime carries on."""
        with self.assertRaises(PieError) as caught:
            await self.runtime.launch("0" * 64, [], RecordingOwner())
        self.assertEqual(str(caught.exception), f"No such program with hash={'0' * 64}")
        with self.assertRaises(PieError):
            await self.runtime.launch("not-a-hash", [], RecordingOwner())

        async def script(host, args):
            host.call("send", ("still alive",))

        instance_id, owner = await launched(self.runtime, script)
        await owner.ended(instance_id)
        self.assertEqual(owner.messages(instance_id), ["still alive"])

    async def test_bad_arguments_are_refused(self):
        with self.assertRaises(PieError):
            await self.runtime.launch("0" * 64, ["ok", 3], RecordingOwner())

    async def test_finished_instances_leave_the_running_table(self):
        release = Deferred()

        async def waits(host, args):
            await release

        async def counts(host, args):
            host.call("send", (host.call("debug_query", ("get_instance_count",)),))

        waiting_id, _ = await launched(self.runtime, waits)
        ids = []
        for _ in range(3):
            instance_id, owner = await launched(self.runtime, counts)
            await owner.ended(instance_id)
            ids.append(owner.messages(instance_id)[0])
        self.assertEqual(ids, ["2", "2", "2"])  # itself and the waiting one, never more
        self.assertEqual(list(self.runtime.instances.running), [waiting_id])
        release.callback(None)

    async def test_stop_service_ends_everything(self):
        async def script(host, args):
            await host.call("receive", ())

        instance_id, owner = await launched(self.runtime, script)
        await self.runtime.stopService()
        self.assertEqual(await owner.ended(instance_id), "engine shutting down")


class ModelResourceTests(unittest.TestCase):
    def setUp(self):
        self.model = FakeModelService()
        self.other = FakeModelService("other", 1)
        self.runtime = make_runtime(self, services={"fake": self.model, "other": self.other})

    async def test_resources_freed_on_every_ending(self):
        """Whatever way an instance ends, every model service is told to free it."""
        parked = Deferred()

        async def allocates(host, args):
            queue = host.call("create_queue", (0,))
            host.call("allocate_kv_pages", (queue, [1, 2, 3]))
            if args == ["fail"]:
                raise RuntimeError("boom")
            if args == ["wait"]:
                parked.callback(None)
                await host.call("receive", ())

        finished, owner = await launched(self.runtime, allocates)
        failed, _ = await launched(self.runtime, allocates, ["fail"], owner)
        killed, _ = await launched(self.runtime, allocates, ["wait"], owner)
        await owner.ended(finished)
        await owner.ended(failed)
        await parked
        self.assertEqual(self.model.pages, {killed: {1, 2, 3}})
        self.runtime.terminate(killed, "user terminated the program")
        await owner.ended(killed)
        self.assertEqual(self.model.pages, {})
        self.assertCountEqual(self.model.destroyed, [finished, failed, killed])
        self.assertCountEqual(self.other.destroyed, [finished, failed, killed])
        self.flushLoggedErrors(RuntimeError)

    async def test_failed_command_terminates_with_the_fault_text(self):
        """A fire-and-forget command that fails later ends the instance with its reason."""
        self.model.failing["allocate_kv_pages"] = "no free blocks available"
        after = []

        async def script(host, args):
            queue = host.call("create_queue", (0,))
            host.call("allocate_kv_pages", (queue, [1]))
            after.append("went on")

        instance_id, owner = await launched(self.runtime, script)
        self.assertEqual(await owner.ended(instance_id), "no free blocks available")
        self.assertEqual(owner.terminations(instance_id), ["no free blocks available"])

    async def test_forward_and_queue_calls_reach_the_service(self):
        async def script(host, args):
            queue = host.call("create_queue", (0,))
            host.call("set_priority", (queue, "high"))
            dists = await host.call(
                "forward_text", (queue, 2, [7], [104, 105], [0, 1], [[1], [2]], [1])
            )
            synced = await host.call("synchronize", (queue,))
            page_size = host.call("get_kv_page_size", (queue,))
            host.call("send", (repr((dists, synced, page_size)),))

        instance_id, owner = await launched(self.runtime, script)
        self.assertEqual(await owner.ended(instance_id), NORMAL_FINISH)
        self.assertEqual(owner.messages(instance_id), [repr(([([1, 2], [0.75, 0.25])], True, 16))])
        ops = [(op, args) for i, _, op, args in self.model.submitted if i == instance_id]
        self.assertEqual(
            ops,
            [
                ("forward_text", (2, [7], [104, 105], [0, 1], [[1], [2]], [1])),
                ("synchronize", ()),
            ],
        )
        self.assertEqual(list(self.model.priorities.values()), ["high"])

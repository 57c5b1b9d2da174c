"""User → instance inboxes and pub/sub between instances (issue 4 point 1; spec §4.1–4.2, §10.8)."""

from __future__ import annotations

from twisted.internet.defer import Deferred, gatherResults
from twisted.trial import unittest

from pie.interfaces import PieError
from pie.runtime.instances import NORMAL_FINISH
from pie.runtime.messaging import Inboxes, PubSub
from tests.runtime_doubles import launched, make_runtime


class InboxTests(unittest.TestCase):
    def test_fifo_when_messages_arrive_first(self):
        inboxes = Inboxes()
        inboxes.open("i")
        for m in ("a", "b", "c"):
            inboxes.push("i", m)
        self.assertEqual(
            [self.successResultOf(inboxes.pull("i")) for _ in range(3)], ["a", "b", "c"]
        )

    def test_waiting_pullers_served_oldest_first(self):
        inboxes = Inboxes()
        inboxes.open("i")
        first, second = inboxes.pull("i"), inboxes.pull("i")
        inboxes.push("i", "a")
        inboxes.push("i", "b")
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), ("a", "b"))

    def test_dead_puller_is_skipped(self):
        """Pie's push loop panicked on a vanished puller; here the message goes to the next one."""
        inboxes = Inboxes()
        inboxes.open("i")
        dead, alive = inboxes.pull("i"), inboxes.pull("i")
        dead.cancel()
        self.failureResultOf(dead)
        inboxes.push("i", "a")
        self.assertEqual(self.successResultOf(alive), "a")
        inboxes.push("i", "b")
        self.assertEqual(self.successResultOf(inboxes.pull("i")), "b")

    def test_full_inbox_refuses_with_a_reason(self):
        inboxes = Inboxes(max_pending=2)
        inboxes.open("i")
        inboxes.push("i", "a")
        inboxes.push("i", "b")
        self.assertRaises(PieError, inboxes.push, "i", "c")
        self.assertEqual(self.successResultOf(inboxes.pull("i")), "a")

    def test_inbox_bytes_are_bounded_and_freed_by_reading(self):
        inboxes = Inboxes(max_bytes=10)
        inboxes.open("i")
        inboxes.open("neighbour")
        inboxes.push("i", "x" * 6)
        with self.assertRaises(PieError) as refused:
            inboxes.push("i", "é" * 3)  # 6 more bytes in UTF-8: 12 > 10
        self.assertIn("has 1 unread messages of 6 bytes", str(refused.exception))
        self.assertIn("or 10 bytes, inbox_bytes); message refused", str(refused.exception))
        inboxes.push("neighbour", "y" * 10)  # the neighbour's inbox is its own
        inboxes.push("i", "z" * 4)  # exactly 10
        self.assertEqual(self.successResultOf(inboxes.pull("i")), "x" * 6)
        inboxes.push("i", "é" * 3)  # reading gave the bytes back
        self.assertEqual(inboxes.pending("i"), 2)

    def test_closed_inbox_forgets_everything(self):
        inboxes = Inboxes()
        inboxes.open("i")
        inboxes.push("i", "a")
        inboxes.drop_instance("i")
        inboxes.push("i", "ignored")
        self.assertEqual((len(inboxes), inboxes.pending("i")), (0, 0))


class PubSubTests(unittest.TestCase):
    def test_every_message_in_order_to_every_subscriber(self):
        pubsub = PubSub()
        one, two = pubsub.subscribe("x", "t"), pubsub.subscribe("y", "t")
        waiting = pubsub.next("y", two)
        for m in ("1", "2", "3"):
            self.assertEqual(pubsub.broadcast("t", m), 2)
        self.assertEqual(
            [self.successResultOf(pubsub.next("x", one)) for _ in range(3)], ["1", "2", "3"]
        )
        self.assertEqual(self.successResultOf(waiting), "1")
        self.assertEqual(
            [self.successResultOf(pubsub.next("y", two)) for _ in range(2)], ["2", "3"]
        )

    def test_only_later_messages_and_only_the_topic(self):
        pubsub = PubSub()
        pubsub.broadcast("t", "before")
        sub = pubsub.subscribe("x", "t")
        pubsub.broadcast("other", "elsewhere")
        pubsub.broadcast("t", "after")
        self.assertEqual(self.successResultOf(pubsub.next("x", sub)), "after")
        self.assertNoResult(pubsub.next("x", sub))

    def test_subscription_belongs_to_its_instance(self):
        pubsub = PubSub()
        sub = pubsub.subscribe("x", "t")
        self.assertRaises(PieError, pubsub.next, "intruder", sub)
        self.assertRaises(PieError, pubsub.unsubscribe, "intruder", sub)
        pubsub.unsubscribe("x", sub)
        self.assertRaises(PieError, pubsub.next, "x", sub)
        self.assertEqual(pubsub.broadcast("t", "nobody"), 0)

    def test_overflow_is_reported_not_silent(self):
        pubsub = PubSub(max_pending=2)
        sub = pubsub.subscribe("x", "t")
        for m in ("1", "2", "3", "4"):
            pubsub.broadcast("t", m)
        failure = self.failureResultOf(pubsub.next("x", sub), PieError)
        self.assertIn("dropped 2 messages", str(failure.value))
        self.assertEqual(self.successResultOf(pubsub.next("x", sub)), "1")

    def test_subscription_backlog_bytes_are_bounded(self):
        pubsub = PubSub(max_bytes=5)
        slow, fast = pubsub.subscribe("x", "t"), pubsub.subscribe("y", "t")
        pubsub.broadcast("t", "abc")
        self.assertEqual(self.successResultOf(pubsub.next("y", fast)), "abc")
        pubsub.broadcast("t", "def")  # slow would hold 6 bytes: dropped for it only
        self.assertEqual(self.successResultOf(pubsub.next("y", fast)), "def")
        failure = self.failureResultOf(pubsub.next("x", slow), PieError)
        self.assertIn("dropped 1 messages: more than 65536 messages or 5 bytes", str(failure.value))
        self.assertEqual(self.successResultOf(pubsub.next("x", slow)), "abc")

    def test_instance_end_drops_its_subscriptions(self):
        pubsub = PubSub()
        pubsub.subscribe("x", "t")
        pubsub.subscribe("x", "u")
        kept = pubsub.subscribe("y", "t")
        pubsub.drop_instance("x")
        self.assertEqual((pubsub.subscriber_count(), pubsub.subscriber_count("u")), (1, 0))
        pubsub.broadcast("t", "m")
        self.assertEqual(self.successResultOf(pubsub.next("y", kept)), "m")


class ThroughTheRuntimeTests(unittest.TestCase):
    def setUp(self):
        self.runtime = make_runtime(self)

    async def test_signal_then_receive_in_order(self):
        async def echo(host, args):
            for _ in range(3):
                host.call("send", ("got " + await host.call("receive", ()),))

        instance_id, owner = await launched(self.runtime, echo)
        for m in ("a", "b", "c"):
            self.runtime.signal(instance_id, m)
        await owner.ended(instance_id)
        self.assertEqual(owner.messages(instance_id), ["got a", "got b", "got c"])

    async def test_signal_after_a_killed_receiver_reaches_the_next_one(self):
        async def waits(host, args):
            await host.call("receive", ())

        async def echo(host, args):
            host.call("send", (await host.call("receive", ()),))

        dead, owner = await launched(self.runtime, waits)
        self.runtime.terminate(dead, "user terminated the program")
        self.runtime.signal(dead, "into the void")  # ignored, not a crash
        alive, _ = await launched(self.runtime, echo, owner=owner)
        self.runtime.signal(alive, "hello")
        await owner.ended(alive)
        self.assertEqual(owner.messages(alive), ["hello"])
        self.assertEqual(len(self.runtime.inboxes), 0)

    async def test_pubsub_pipeline_delivers_every_message(self):
        """A subscriber reads a whole stream; the publisher starts once it is subscribed."""
        subscribed = Deferred()

        async def subscriber(host, args):
            sub = host.call("subscribe", ("numbers",))
            subscribed.callback(None)
            total = []
            while (message := await host.call("subscription_next", (sub,))) != "end":
                total.append(message)
            host.call("unsubscribe", (sub,))
            return ",".join(total)

        async def publisher(host, args):
            for i in range(5):
                host.call("broadcast", ("numbers", str(i)))
            host.call("broadcast", ("numbers", "end"))

        sub_id, owner = await launched(self.runtime, subscriber)
        await subscribed
        pub_id, _ = await launched(self.runtime, publisher, owner=owner)
        reasons = await gatherResults([owner.ended(sub_id), owner.ended(pub_id)])
        self.assertEqual(reasons, [NORMAL_FINISH, NORMAL_FINISH])
        self.assertEqual(owner.messages(sub_id), ["0,1,2,3,4"])
        self.assertEqual(self.runtime.pubsub.subscriber_count(), 0)

    async def test_ended_subscriber_leaves_nothing_behind(self):
        async def subscriber(host, args):
            host.call("subscribe", ("t",))
            host.call("subscribe", ("t",))

        instance_id, owner = await launched(self.runtime, subscriber)
        await owner.ended(instance_id)
        self.assertEqual(self.runtime.pubsub.subscriber_count(), 0)

    async def test_foreign_subscription_is_refused_inside_the_guest(self):
        async def script(host, args):
            try:
                await host.call("subscription_next", (12345,))
            except PieError as e:
                return str(e)

        instance_id, owner = await launched(self.runtime, script)
        self.assertEqual(await owner.ended(instance_id), NORMAL_FINISH)
        self.assertEqual(owner.messages(instance_id), ["unknown subscription 12345"])

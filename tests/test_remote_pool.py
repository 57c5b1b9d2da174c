"""ModelPool: several workers behind one model name (issue 6, points 3 and 4), without processes."""

from __future__ import annotations

import dataclasses

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial import unittest

from pie.interfaces import InstanceFault, PieError
from pie.service.placement import Member, ModelPool, _join
from pie.service.service import ModelService
from tests.remote_helpers import FakeWorker


class FakeRemote(FakeWorker):
    """A FakeWorker with RemoteWorker's loss notification."""

    def __init__(self, name: str, **info_changes) -> None:
        super().__init__(model_name="m")
        self.name = name
        self.info = dataclasses.replace(self.info, **info_changes)
        self.observers = []
        self.closed = False

    def on_lost(self, observer) -> None:
        self.observers.append(observer)

    def lose(self, reason: str) -> None:
        for observer in self.observers:
            observer(self, reason)

    def close(self):
        self.closed = True
        return succeed(None)


class FakeRuntime:
    def __init__(self) -> None:
        self.reactor = Clock()
        self.home = "/nonexistent"
        self.services: dict = {}
        self.terminated: list[tuple[str, str]] = []

    def model_services(self):
        return self.services.values()

    def add_model_service(self, name: str, service) -> None:
        self.services[name] = service

    def terminate(self, instance_id: str, reason: str) -> None:
        self.terminated.append((instance_id, reason))


class PoolTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.runtime = FakeRuntime()
        self.w1, self.w2 = FakeRemote("w1"), FakeRemote("w2")
        self.pool = _join(self.runtime, self.w1, "ws://a:1", "w1")
        self.assertIs(_join(self.runtime, self.w2, "ws://b:1", "w2"), self.pool)

    def test_one_model_for_inferlets(self):
        """Both workers serve one registered model with the first worker's service id."""
        self.assertEqual(list(self.runtime.services), ["m"])
        self.assertEqual(self.pool.name, "m")
        status = self.pool.status()
        self.assertEqual([w["name"] for w in status["workers"]], ["w1", "w2"])
        self.assertEqual(status["num_kv_pages"], 256)

    def test_instances_spread_and_stay_on_their_worker(self):
        """New instances go to the worker with the fewest; all of an instance's queues stay there."""
        queues = {i: self.pool.create_queue(i) for i in ("a", "b", "c")}
        self.assertNotEqual(self.pool.create_queue("a"), queues["a"])
        placed = {name: sorted(m.instances) for name, m in self.pool.members.items()}
        self.assertEqual(placed, {"w1": ["a", "c"], "w2": ["b"]})
        d = self.pool.submit("c", queues["c"], "allocate_kv_pages", [1, 2])
        self.runtime.reactor.advance(0)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.pool.members["w1"].service.resources.pages.available, 126)
        self.pool.destroy_instance("a")  # now one instance each: the most free pages wins
        self.pool.create_queue("d")
        self.assertIn("d", self.pool.members["w2"].instances)

    def test_lost_worker_ends_only_its_instances(self):
        """Losing w1 terminates the instances placed on it, with the reason; w2's go on."""
        for i in ("a", "b", "c"):
            self.pool.create_queue(i)
        self.w1.lose("model worker w1 at ws://a:1 lost: connection closed")
        self.assertEqual(
            self.runtime.terminated,
            [(i, "model worker w1 at ws://a:1 lost: connection closed") for i in ("a", "c")],
        )
        self.assertEqual(list(self.pool.members), ["w2"])
        self.pool.create_queue("e")
        self.assertIn("e", self.pool.members["w2"].instances)
        self.failureResultOf(self.pool.submit("a", 1, "allocate_kv_pages", [1]), InstanceFault)

    def test_no_worker_left(self):
        """With every worker lost, a new instance gets a clear fault; a new worker revives the model."""
        self.w1.lose("lost")
        self.w2.lose("lost")
        with self.assertRaises(InstanceFault) as caught:
            self.pool.create_queue("a")
        self.assertEqual(str(caught.exception), "model m has no attached workers (all were lost)")
        _join(self.runtime, FakeRemote("w1"), "ws://c:1", "w1")
        self.pool.create_queue("a")

    def test_detach(self):
        """detach ends that worker's instances with 'detached' and closes its connection."""
        self.pool.create_queue("a")
        self.successResultOf(self.pool.detach("w1"))
        self.assertEqual(self.runtime.terminated, [("a", "model worker w1 at ws://a:1 detached")])
        self.assertTrue(self.w1.closed)
        self.failureResultOf(self.pool.detach("w1"), PieError)

    def test_incompatible_worker_is_refused(self):
        """A worker with another page size or tokenizer cannot join the model's pool."""
        with self.assertRaises(PieError) as caught:
            _join(self.runtime, FakeRemote("w3", kv_page_size=32), "ws://c:1", "w3")
        self.assertIn("kv_page_size=32, the attached workers with 16", str(caught.exception))
        other = FakeRemote("w4")
        other.tokenizer.vocabs = lambda: ([0], [b"z"])
        self.assertRaises(PieError, _join, self.runtime, other, "ws://d:1", "w4")
        self.assertEqual(list(self.pool.members), ["w1", "w2"])

    def test_model_served_in_process_is_not_shadowed(self):
        """A worker whose model name is served in-process is refused with a hint."""
        runtime = FakeRuntime()
        runtime.add_model_service("m", ModelService(FakeWorker("m"), reactor=runtime.reactor))
        with self.assertRaises(PieError) as caught:
            _join(runtime, FakeRemote("w1"), "ws://a:1", "w1")
        self.assertIn("already served in-process", str(caught.exception))

    def test_duplicate_worker_name(self):
        """Two live workers cannot share a name."""
        member = Member("w1", "ws://x:1", FakeRemote("w1"), self.pool.members["w1"].service, set())
        self.assertRaises(PieError, ModelPool.add, self.pool, member)

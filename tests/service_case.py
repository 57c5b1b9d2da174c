"""Shared set-up for the model-service tests: a ModelService on a FakeWorker under a Clock."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from pie.interfaces import InstanceFault
from pie.service.service import ModelService
from tests.service_doubles import FakeWorker, fake_distribution


class ServiceCase(TestCase):
    def make(self, worker: FakeWorker | None = None, **options) -> ModelService:
        self.clock = Clock()
        self.worker = worker or FakeWorker()
        self.terminated: list[tuple[str, str]] = []
        options.setdefault("instance_terminator", lambda i, r: self.terminated.append((i, r)))
        self.service = ModelService(self.worker, reactor=self.clock, **options)
        return self.service

    def run_reactor(self) -> None:
        self.clock.advance(0)

    def submit(self, inst: str, queue: int, op: str, *args) -> list:
        """Submit; the returned list receives the result, or the InstanceFault's text as ('fault', text)."""
        box: list = []
        d: Deferred = self.service.submit(inst, queue, op, *args)
        d.addCallbacks(
            box.append, lambda f: box.append(("fault", f.trap(InstanceFault) and f.value.args[0]))
        )
        return box

    def fault_of(self, box: list) -> str:
        self.assertEqual(len(box), 1, box)
        self.assertIsInstance(box[0], tuple)
        self.assertEqual(box[0][0], "fault", box)
        return box[0][1]

    def expected(self, context: list[tuple[int, int]]) -> tuple[list[int], list[float]]:
        info = self.worker.info
        return fake_distribution(context, info.dist_size, info.vocab_size)

    def greedy(self, tokens: list[int], count: int) -> list[int]:
        """What step-by-step greedy decoding on the fake model gives."""
        context = [(t, p) for p, t in enumerate(tokens)]
        out = []
        for _ in range(count):
            token = self.expected(context)[0][0]
            out.append(token)
            context.append((token, len(context)))
        return out

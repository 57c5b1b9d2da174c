"""Preemption in the sandbox: no guest holds the reactor for more than a slice.

Each hostile program here runs while the reactor keeps serving: a well-behaved
neighbour, launched after the hog, makes its round trips (answered on later
reactor turns, as the model and the network answer) and finishes while the hog
is still running. The hog is then killed or ends by a limit with a clear reason.
"""

from __future__ import annotations

import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from pie.interfaces import InstanceFault
from tests.wasm_artifact import BUILD_TIMEOUT, sandbox

NEIGHBOUR = b"""
from pie.inferlet import _abi

async def main(args):
    for i in range(20):
        await _abi.call_async("sleep", 0)
        _abi.call("send", f"tick {i}")
    return "neighbour done"
"""

SEND_LOOP = "while True:\n        _abi.call('send', 'x')"
SPIN = "while True:\n        pass"
ALLOCATE = "while True:\n        hog = bytearray(8 << 20)\n        del hog"
HOGS = {"sync host calls": SEND_LOOP, "spinning": SPIN, "allocating": ALLOCATE}


def hog(loop: str) -> bytes:
    return f"from pie.inferlet import _abi\nasync def main(args):\n    {loop}\n".encode()


class ReactorHost:
    """Answers sync calls at once and async ones on a later reactor turn."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def call(self, name: str, args: tuple):
        if name == "send":
            self.sent.append(args[0])
            return False  # not backed up
        if name == "time_ms":
            return int(time.monotonic() * 1000)
        if name == "sleep":
            answer: Deferred = Deferred()
            reactor.callLater(0, answer.callback, None)
            return answer
        raise AssertionError(f"unexpected host call {name}")


class PreemptionTests(TestCase):
    timeout = BUILD_TIMEOUT

    def launch(self, executor, source: bytes):
        """(execution, host, outcome): `outcome` gets the result or Failure, and
        `execution.ended_watch` fires (with None) once it is there."""
        host = ReactorHost()
        execution = executor.run(source, [], host)
        outcome: list = []
        execution.ended_watch = Deferred()
        execution.finished.addBoth(
            lambda r: outcome.append(r) or execution.ended_watch.callback(None)
        )
        return execution, host, outcome

    async def outcome_of(self, execution, outcome: list):
        await execution.ended_watch
        return outcome[0]

    async def assertNeighbourFinishesBeside(self, executor, hog_source: bytes):
        """Launch the hog, then the neighbour; the neighbour finishes while the hog runs."""
        hog_execution, hog_host, hog_outcome = self.launch(executor, hog_source)
        self.addCleanup(hog_execution.kill, "test over")
        self.assertEqual(hog_outcome, [], "the hog's first step should outlast a slice")
        neighbour, host, neighbour_outcome = self.launch(executor, NEIGHBOUR)
        self.assertEqual(await self.outcome_of(neighbour, neighbour_outcome), "neighbour done")
        self.assertEqual(host.sent, [f"tick {i}" for i in range(20)])
        self.assertEqual(hog_outcome, [], "the hog kept running meanwhile")
        return hog_execution, hog_host, hog_outcome

    async def test_hogs_are_preempted_and_the_neighbour_runs(self):
        for what, loop in HOGS.items():
            with self.subTest(what):
                executor = sandbox(slice_ms=50)
                hog_execution, _, outcome = await self.assertNeighbourFinishesBeside(
                    executor, hog(loop)
                )
                hog_execution.kill("user terminated the program")
                self.assertEqual(len(outcome), 1)
                self.assertIsInstance(outcome[0].value, InstanceFault)
                self.assertEqual(str(outcome[0].value), "user terminated the program")
                # this code runs in a callback of the neighbour's end, inside a turn: the
                # paused step unwinds in the next one, and its store is gone
                await deferLater(reactor, 0, lambda: None)
                self.assertIsNone(hog_execution._store)
                self.assertEqual(executor.scheduler._paused, set())

    async def test_hog_over_its_cpu_share_is_ended_with_the_reason(self):
        executor = sandbox(slice_ms=50, cpu_policy="end", cpu_percent=10, cpu_window_s=1)
        hog_execution, _, outcome = self.launch(executor, hog(SEND_LOOP))
        neighbour, _, neighbour_outcome = self.launch(executor, NEIGHBOUR)
        self.assertEqual(await self.outcome_of(neighbour, neighbour_outcome), "neighbour done")
        failure = await self.outcome_of(hog_execution, outcome)
        self.assertIsInstance(failure.value, InstanceFault)
        self.assertEqual(
            str(failure.value), "CPU share exceeded: used more than 10% of a core over 1 s"
        )

    async def test_hog_over_its_cpu_share_is_throttled(self):
        """With "throttle" the hog keeps running, but on about its share of the CPU.

        The hog sends the time in ms as fast as it can: the distinct milliseconds it
        sent in are the time it ran. Over 1.5 s at 10% (and a 0.1 s burst) that is
        about 0.25 s; unthrottled it would be nearly all of the 1.5 s.
        """
        executor = sandbox(slice_ms=20, cpu_percent=10, cpu_window_s=1)
        source = hog("while True:\n        _abi.call('send', str(_abi.call('time_ms')))")
        hog_execution, host, outcome = self.launch(executor, source)
        self.addCleanup(hog_execution.kill, "test over")
        await deferLater(reactor, 1.5, lambda: None)
        ran_ms = len(set(host.sent))
        self.assertEqual(outcome, [])
        self.assertLess(ran_ms, 600, f"the hog ran for {ran_ms} ms of 1500")
        self.assertGreater(ran_ms, 50)

    async def test_too_many_paused_steps_end_the_hungriest(self):
        executor = sandbox(slice_ms=30, max_paused=1)
        first, _, first_outcome = self.launch(executor, hog(SPIN))
        second, _, second_outcome = self.launch(executor, hog(SPIN))
        self.addCleanup(first.kill, "test over")
        self.addCleanup(second.kill, "test over")
        await DeferredList([first.ended_watch, second.ended_watch], fireOnOneCallback=True)
        self.assertEqual(len(first_outcome) + len(second_outcome), 1)
        failure = (first_outcome + second_outcome)[0]
        self.assertIn("more than 1 inferlets were computing at once", str(failure.value))

    async def test_cpu_deadline_counts_running_time_only(self):
        """A spinning guest is ended by its deadline, even while it keeps being paused."""
        executor = sandbox(slice_ms=20, deadline_ms=200)
        hog_execution, _, outcome = self.launch(executor, hog(SPIN))
        neighbour, _, neighbour_outcome = self.launch(executor, NEIGHBOUR)
        self.assertEqual(await self.outcome_of(neighbour, neighbour_outcome), "neighbour done")
        failure = await self.outcome_of(hog_execution, outcome)
        self.assertIn("CPU deadline exceeded (over 200 ms without a host call)", str(failure.value))

"""The dev executor passes the executor contract (everything but isolation)."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from pie.runtime.executors.dev import DevExecutor
from tests.executor_contract import ExecutorContract


class DevExecutorTests(ExecutorContract, TestCase):
    def setUp(self) -> None:
        self.executor = DevExecutor()

    def test_tracebacks_show_source_lines(self) -> None:
        _, _, outcome = self.launch(b"async def main(args):\n    raise KeyError('nope')\n")
        text = self.assertFailedWith(outcome, "KeyError")
        self.assertIn("raise KeyError('nope')", text)

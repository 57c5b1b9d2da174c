"""The runtime driving real inferlet sources through the dev executor (issue 4 points 1, 4, 5).

tests/test_runtime_wasm.py runs the same tests in the sandbox.
"""

from __future__ import annotations

from twisted.trial import unittest

from pie.runtime.executors.dev import DevExecutor
from tests.inferlet_sources import InferletSourceTests


class DevExecutorTests(InferletSourceTests, unittest.TestCase):
    def make_executor(self):
        return DevExecutor()

"""The runtime's inferlet-source tests again, with every instance in the wasm sandbox (issue 4 point 2)."""

from __future__ import annotations

from twisted.trial import unittest

from pie.runtime.executors import build
from pie.runtime.executors.wasm import WasmExecutor
from tests.test_runtime_dev import InferletSourceTests


class WasmExecutorTests(InferletSourceTests, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        # Cached under $PIE_HOME/sandbox; rebuilt (a minute on a busy machine) only when the
        # guest sources change. Here, not in setUp, so the build is outside any test's timeout.
        build.build()

    def make_executor(self):
        return WasmExecutor()

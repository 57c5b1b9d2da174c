"""The sandbox's per-program compiled-code cache.

Instances of one program load the code a throwaway instance compiled once
(WasmExecutor.compiled) instead of compiling the sources again; they must behave
exactly as if they had compiled it themselves, tracebacks included.
"""

from __future__ import annotations

import pytest
from twisted.trial.unittest import TestCase

from pie.runtime.sandbox.loader import COMPILE_ONLY, COMPILED, module_name
from tests.executor_contract import ExecutorHelpers
from tests.wasm_artifact import BUILD_TIMEOUT, sandbox

pytestmark = pytest.mark.slow

PROGRAM = b"""
import json

def helper(n):
    return {"n": n, "doc": helper.__doc__, "line": helper.__code__.co_firstlineno}

async def main(args):
    if args == ["boom"]:
        raise ValueError("boom in main")
    return json.dumps(helper(int(args[0])))
"""


class CompiledCodeTests(ExecutorHelpers, TestCase):
    timeout = BUILD_TIMEOUT

    def setUp(self) -> None:
        self.executor = sandbox()

    def test_instances_of_one_program_share_one_compilation(self) -> None:
        results = []
        for n in ("1", "2"):
            _, _, outcome = self.launch(PROGRAM, [n])
            self.assertEqual(len(outcome), 1, outcome)
            results.append(outcome[0])
        self.assertEqual(results[0], '{"n": 1, "doc": null, "line": 4}')
        self.assertEqual(results[1], '{"n": 2, "doc": null, "line": 4}')
        self.assertEqual(len(self.executor._compiled), 1)
        self.assertIsInstance(next(iter(self.executor._compiled.values())), str)

    def test_traceback_from_loaded_code_names_the_source_line(self) -> None:
        self.launch(PROGRAM, ["3"])  # fills the cache
        _, _, outcome = self.launch(PROGRAM, ["boom"])
        reason = self.assertFailedWith(outcome, "boom in main")
        self.assertIn('main.py", line 9', reason)
        self.assertIn('raise ValueError("boom in main")', reason)

    def test_reserved_entries_are_never_a_programs_own_files(self) -> None:
        for name in (COMPILE_ONLY, COMPILED):
            with self.assertRaises(ValueError):
                module_name(name)

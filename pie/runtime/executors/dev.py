"""DevExecutor: the same inferlet source run in-process, for trusted debugging.

The program is loaded by the same loader and stepped by the same driver as in
the sandbox, but its host calls go straight to the host object: no wasm, no
copies, real tracebacks with source lines, `print` on the server's stdout,
and pdb works. There is NO isolation: no memory limit, no CPU deadline (a
busy loop freezes the server), full access to files and the network. Use it
for your own programs only (`--executor dev`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from pie.inferlet import _abi
from pie.inferlet._driver import Driver, format_failure
from pie.interfaces import IInferletExecutor
from pie.runtime.executors import program
from pie.runtime.executors.base import Execution, Step
from pie.runtime.sandbox.loader import load_main


class DevExecution(Execution):
    def __init__(self, files: dict[str, str], arguments: list[str], host: Any) -> None:
        super().__init__(host)
        self._files = files
        self._arguments = list(arguments)
        self._driver: Driver | None = None

    def _enter_start(self) -> Step:
        try:
            main = self._load()
            self._driver, step = _abi.run(main, self._arguments, self)
        except Exception as error:  # the program's own fault, as in the sandbox
            return ("failed", format_failure(error))
        return step

    def _load(self) -> Callable:
        """The program's main (pie.inferlet.testing runs a given one instead)."""
        return load_main(self._files, tag=f"<inferlet {id(self):x}>/")

    def _enter_resume(self, fut: int, name: str, value: Any) -> Step:
        return self._driver.resume(fut, value)

    def _release(self) -> None:
        driver, self._driver = self._driver, None
        if driver is not None:
            driver.close()


@implementer(IInferletExecutor)
class DevExecutor:
    """Runs programs as plain coroutines on the reactor thread (no sandbox)."""

    name = "dev"

    def __init__(self, program_limits: program.Limits = program.DEFAULT_LIMITS) -> None:
        self.limits = program_limits

    def check(self, program_bytes: bytes) -> Deferred:
        """Deferred firing with the program checked (program.Checked); PieError if not valid.

        Compiled in a thread. The compiler holds the GIL while it works, so a huge
        program still slows the reactor (dev mode is for trusted programs only).
        """
        return deferToThread(program.check, bytes(program_bytes), self.limits)

    def run(
        self, program_bytes: bytes | program.Checked, arguments: list[str], host: Any
    ) -> DevExecution:
        """Start main(args) now (until its first park); raises PieError if the program is invalid."""
        checked = program_bytes
        if not isinstance(checked, program.Checked):
            checked = program.check(program_bytes, self.limits)
        execution = DevExecution(checked.files, arguments, host)
        execution.start()
        return execution

"""Inferlet executors: the WebAssembly sandbox ("wasm") and in-process dev mode ("dev").

Both implement pie.interfaces.IInferletExecutor over the same guest driver
and loader, so a program behaves the same under either; see docs/sandbox.md.
"""

from __future__ import annotations

from pathlib import Path

from pie.interfaces import PieError

EXECUTORS = ("wasm", "dev")


def make_executor(
    name: str, home: str | Path | None = None, program_limits=None, **limits: int | str
):
    """The executor called `name`; `program_limits` (pie.runtime.executors.program.Limits)
    apply to both, `limits` (memory_limit, deadline_ms, slice_ms, cpu_percent, cpu_window_s,
    cpu_policy, max_paused) to "wasm": dev mode cannot bound its programs."""
    from pie.runtime.executors import program

    program_limits = program_limits or program.DEFAULT_LIMITS
    if name == "wasm":
        from pie.runtime.executors.wasm import WasmExecutor

        return WasmExecutor(Path(home) if home else None, program_limits=program_limits, **limits)
    if name == "dev":
        from pie.runtime.executors.dev import DevExecutor

        return DevExecutor(program_limits)
    raise PieError(f"unknown executor {name!r}: use one of {', '.join(EXECUTORS)}")

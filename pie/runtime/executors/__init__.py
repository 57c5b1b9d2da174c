"""Inferlet executors: the WebAssembly sandbox ("wasm") and in-process dev mode ("dev").

Both implement pie.interfaces.IInferletExecutor over the same guest driver
and loader, so a program behaves the same under either; see docs/sandbox.md.
"""

from __future__ import annotations

from pathlib import Path

from pie.interfaces import PieError

EXECUTORS = ("wasm", "dev")


def make_executor(name: str, home: str | Path | None = None, **limits: int):
    """The executor called `name`; `limits` (memory_limit, deadline_ms) apply to "wasm"."""
    if name == "wasm":
        from pie.runtime.executors.wasm import WasmExecutor

        return WasmExecutor(Path(home) if home else None, **limits)
    if name == "dev":
        from pie.runtime.executors.dev import DevExecutor

        return DevExecutor()
    raise PieError(f"unknown executor {name!r}: use one of {', '.join(EXECUTORS)}")

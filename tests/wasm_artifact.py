"""The sandbox runtime component, built once per test run and shared by the tests that need it."""

from __future__ import annotations

from pie.runtime.executors import build
from pie.runtime.executors.wasm import WasmExecutor

_artifact: list = []


def pinned_artifact():
    """The cached runtime, built (if the guest sources changed) once per test run.

    Pinned for the whole run: the working tree may change under a long test run,
    and a rebuild per test would be slow (and could catch a half-saved file).
    """
    if not _artifact:
        _artifact.append(build.build())
    return _artifact[0]


MEMORY_LIMIT = 64 * 1024 * 1024
DEADLINE_MS = 5000
"""Generous: the test machine is shared, and only the runaway tests should meet it."""
SHORT_DEADLINE_MS = 100
TEST_SLICE_MS = 60_000
"""These tests drive steps synchronously (a launch or a release returns with the step
parked), so their steps must fit in one turn; the preemption tests set a short slice."""
BUILD_TIMEOUT = 600
"""The first test may build the runtime (~15 s idle, minutes on a loaded machine)."""


def sandbox(**limits) -> WasmExecutor:
    """A WasmExecutor with the test limits over the pinned runtime."""
    options = {
        "memory_limit": MEMORY_LIMIT,
        "deadline_ms": DEADLINE_MS,
        "slice_ms": TEST_SLICE_MS,
        **limits,
    }
    executor = WasmExecutor(artifact=pinned_artifact(), **options)
    executor.ready()
    return executor

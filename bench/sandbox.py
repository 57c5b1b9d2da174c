"""Sandbox microbenchmarks: instance spawn time and host-call round trip.

    PYTHONPATH=. .venv/bin/python bench/sandbox.py [--n 200] [--calls 20000]

Prints, for the wasm sandbox and for dev mode: the time to spawn an instance
and run a trivial main to completion, the time a guest spends per "sync" host
call, per "async" host call (park, host answers, resume), and the memory
of a parked instance, plus the sandbox/dev ratios. No model is involved: the host answers at once, so these
are the pure costs of the executor. bench/inferlets.py can call the functions.
"""

from __future__ import annotations

import argparse
import gc
import time

from twisted.internet.defer import Deferred, succeed

from pie.runtime.executors import build
from pie.runtime.executors.dev import DevExecutor
from pie.runtime.executors.wasm import WasmExecutor


class InstantHost:
    """Answers every call at once: sync calls with a short string, async ones already fired."""

    def call(self, name: str, args: tuple):
        if name in ("store_get", "receive", "sleep"):
            return succeed("v")
        return "0.2.0"


TRIVIAL = b"async def main(args):\n    return None\n"
SYNC_LOOP = b"""
from pie.inferlet import _abi
async def main(args):
    for _ in range(int(args[0])):
        _abi.call("get_version")
"""
ASYNC_LOOP = b"""
from pie.inferlet import _abi
async def main(args):
    for _ in range(int(args[0])):
        await _abi.call_async("store_get", "k")
"""


def _run(executor, source: bytes, arguments: list[str]) -> None:
    outcome: list = []
    executor.run(source, arguments, InstantHost()).finished.addBoth(outcome.append)
    if not outcome or not (outcome[0] is None or isinstance(outcome[0], str)):
        raise RuntimeError(f"benchmark program did not finish cleanly: {outcome}")


def spawn_time(executor, n: int = 200) -> float:
    """Mean seconds to start an instance and run a trivial main to completion."""
    _run(executor, TRIVIAL, [])  # warm (loads the runtime)
    started = time.perf_counter()
    for _ in range(n):
        _run(executor, TRIVIAL, [])
    return (time.perf_counter() - started) / n


def _best_of(runs: int, executor, source: bytes, arguments: list[str]) -> float:
    """The fastest of `runs` runs, in seconds (the machine is shared; the minimum is the cost)."""
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        _run(executor, source, arguments)
        best = min(best, time.perf_counter() - started)
    return best


def host_call_latency(executor, calls: int = 20000, mode: str = "sync", runs: int = 3) -> float:
    """Mean seconds per host call made from inside an instance ("sync" or "async")."""
    source = SYNC_LOOP if mode == "sync" else ASYNC_LOOP
    _run(executor, source, ["10"])
    total = _best_of(runs, executor, source, [str(calls)])
    baseline = _best_of(runs, executor, source, ["0"])
    return (total - baseline) / calls


PARKED = b"""
from pie.inferlet import _abi
async def main(args):
    return await _abi.call_async("receive")
"""


class ParkingHost(InstantHost):
    def call(self, name: str, args: tuple):
        return Deferred() if name == "receive" else super().call(name, args)


def _pss_bytes() -> int:
    """Proportional set size: resident memory, with shared pages split among their users.

    RSS would count the runtime snapshot's copy-on-write pages once per instance
    although they are shared (about 9 MB per instance by RSS, 2 MB by PSS).
    """
    with open("/proc/self/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no Pss line in /proc/self/smaps_rollup")


def parked_memory(executor, n: int = 100) -> float:
    """Memory (PSS) per instance while n instances are parked on a host call."""
    _run(executor, TRIVIAL, [])
    gc.collect()
    before = _pss_bytes()
    executions = [executor.run(PARKED, [], ParkingHost()) for _ in range(n)]
    used = _pss_bytes() - before
    for execution in executions:
        execution.finished.addErrback(lambda _: None)
        execution.kill("benchmark over")
    return used / n


def wasm_executor(slice_ms: int = 600_000) -> WasmExecutor:
    """The sandbox for these measurements. By default one turn per program: they run
    programs synchronously (no reactor), so a paused step would never go on; they
    measure per-call costs. bench/inferlets.py runs its inferlets with the daemon's slice."""
    build.build(progress=lambda line: print("  " + line, flush=True))
    return WasmExecutor(deadline_ms=10_000, slice_ms=slice_ms)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="instances spawned")
    parser.add_argument("--calls", type=int, default=20000, help="host calls per measurement")
    opts = parser.parse_args(argv)
    executors = {"wasm": wasm_executor(), "dev": DevExecutor()}
    rows = {}
    for name, executor in executors.items():
        rows[name] = (
            spawn_time(executor, opts.n),
            host_call_latency(executor, opts.calls, "sync"),
            host_call_latency(executor, opts.calls, "async"),
            parked_memory(executor, opts.n),
        )
    print(f"{'executor':8} {'spawn':>10} {'sync call':>11} {'async call':>11} {'parked PSS':>11}")
    for name, (spawn, sync, async_, rss) in rows.items():
        print(
            f"{name:8} {spawn * 1e3:8.3f}ms {sync * 1e6:9.2f}µs {async_ * 1e6:9.2f}µs "
            f"{rss / 1e6:8.2f} MB"
        )
    ratios = [rows["wasm"][i] / rows["dev"][i] for i in range(3)]
    print(f"{'wasm/dev':8} {ratios[0]:9.1f}x {ratios[1]:10.1f}x {ratios[2]:10.1f}x")


if __name__ == "__main__":
    main()

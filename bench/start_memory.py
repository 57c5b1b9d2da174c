"""RSS after each stage of a daemon's start, in one fresh process (SmolLM2-135M, cpu).

Stages: Python; import torch; Twisted, autobahn, wasmtime, tokenizers, gguf; pie's
daemon modules; build_engine (the model loaded and placed, its KV pool allocated, the
load's freed heap trimmed). The last line splits RSS as bench/load.py does (weights,
KV pool, anonymous and file-backed overhead). Figures: docs/limits.md, "Memory".
Run from the repository root: PYTHONPATH=$PWD python bench/start_memory.py
"""

from __future__ import annotations

import gc
import os

MIB = 2**20
MODEL = "~/.cache/pie/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"


def rollup_mib(pid: int | str) -> tuple[int, int]:
    """(RSS, of which anonymous) in MiB from /proc/PID/smaps_rollup."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("Rss", "Anonymous"):
                fields[name] = int(rest.split()[0]) // 1024
    return fields["Rss"], fields["Anonymous"]


def stages(path: str) -> None:
    """RSS after each stage of a daemon's start, in this (fresh) process."""
    last = rollup_mib("self")
    print(f"{'python':55s} RSS {last[0]:5d} MiB, anonymous {last[1]:5d}")

    def stage(name: str) -> None:
        nonlocal last
        gc.collect()
        now = rollup_mib("self")
        print(
            f"{name:55s} RSS {now[0]:5d} MiB, anonymous {now[1]:5d} "
            f"(+{now[0] - last[0]} RSS, +{now[1] - last[1]} anonymous)"
        )
        last = now

    import torch  # noqa: F401

    stage("import torch")
    import autobahn.twisted.websocket  # noqa: F401
    import gguf  # noqa: F401
    import tokenizers  # noqa: F401
    import twisted.internet.reactor  # noqa: F401
    import wasmtime  # noqa: F401

    stage("import twisted, autobahn, wasmtime, tokenizers, gguf")
    import pie.runtime.executors.wasm  # noqa: F401
    import pie.service.local  # noqa: F401
    import pie.tap  # noqa: F401
    from pie.engine.worker import build_engine

    stage("import pie (tap, service, wasm executor, engine)")
    engine = build_engine(path, device="cpu", dtype="auto")
    stage("model loaded, KV pool allocated (build_engine)")
    from bench.load import breakdown  # after the stages: it imports Twisted

    print(breakdown(os.getpid(), engine.info.memory))


if __name__ == "__main__":
    stages(os.path.expanduser(MODEL))

"""Reactor-side cost of the model service per decode step (no model: an instant fake worker).

N inferlet-like streams each decode one token per step through
ModelService.submit("forward_text", ...) (validation, translation, queue
order, batching, result split), or through ModelService.generate (the host
side fast path, one submit for all steps). Prints microseconds of service
time per token and the share of a model step that would be, for a given
model step time: this is the service's part of the programmability tax.

    PYTHONPATH=. .venv/bin/python bench/service_overhead.py [--streams 1 8 32 256] [--tokens 64]
"""

from __future__ import annotations

import argparse
import time

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from pie.engine.batch import Forward, Sampling, WorkerInfo
from pie.interfaces import IModelWorker
from pie.service.service import ModelService

PAGE = 16
DIST = [(list(range(64)), [1.0 / 64] * 64)]


@implementer(IModelWorker)
class InstantWorker:
    """Answers every Forward at once: token 1, or a 64-entry distribution."""

    def __init__(self, pages: int) -> None:
        self.info = WorkerInfo("bench", PAGE, 64, pages, 16, 50000, 1 << 20, "cpu", "float32")
        self.tokenizer = None
        self.steps = 0

    def execute(self, job):
        if isinstance(job, Forward):
            self.steps += 1
            return succeed([[1] if i.sampling else DIST for i in job.items])
        return succeed(None)

    def close(self):
        return succeed(None)


def run(streams: int, tokens: int, fast: bool) -> tuple[float, int]:
    pages_each = (tokens + 1) // PAGE + 1
    clock = Clock()
    worker = InstantWorker(streams * pages_each)
    service = ModelService(worker, reactor=clock)
    done = []

    def stream(inst: str) -> None:
        q = service.create_queue(inst)
        pages = list(range(pages_each))
        service.submit(inst, q, "allocate_kv_pages", pages)
        if fast:
            d = service.generate(inst, q, pages, 0, [5], [0], Sampling(), tokens)
            d.addCallback(lambda out: done.append(len(out)))
            return

        def step(_, n: int) -> None:
            if n == tokens:
                done.append(n)
                return
            used = n // PAGE + 1
            d = service.submit(
                inst, q, "forward_text", n % PAGE + 1, pages[:used], [5], [n], [], [0]
            )
            d.addCallback(step, n + 1)

        step(None, 0)

    start = time.perf_counter()
    for i in range(streams):
        stream(f"i{i}")
    while len(done) < streams:
        clock.advance(0)
    return time.perf_counter() - start, worker.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32, 256])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument(
        "--step-ms", type=float, default=20.0, help="model step time to compare with"
    )
    args = parser.parse_args()
    run(1, 2, True)  # warm up (the first generate imports the sampler)
    print(f"{'streams':>8} {'path':>10} {'us/token':>9} {'batches':>8} {'share of a step':>16}")
    for n in args.streams:
        for fast in (False, True):
            seconds, steps = run(n, args.tokens, fast)
            per_token = seconds / (n * args.tokens) * 1e6
            share = seconds / steps / (args.step_ms / 1000.0)
            path = "generate" if fast else "per-token"
            print(f"{n:>8} {path:>10} {per_token:>9.1f} {steps:>8} {share:>15.1%}")


if __name__ == "__main__":
    main()

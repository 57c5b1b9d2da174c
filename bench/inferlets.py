"""The programmability tax: N text-completion inferlets vs the engine's own decode loop.

    PYTHONPATH=. .venv/bin/python bench/inferlets.py [--n 1 8 32] [--new 32] [--executors dev wasm]

One run prints:
- the executors' own costs, no model (bench/sandbox.py's functions): the time to
  spawn an instance and run a trivial main, and an async host-call round trip;
- for each N: N concurrent instances of the real inferlets/text_completion.py
  (chat turn, greedy, --max-tokens NEW) launched through the runtime, with the
  real model service and SmolLM2 worker behind it, in dev mode and in the wasm
  sandbox; and the engine's own loop on the same prompts: Forward jobs sent
  straight to the same worker (all N sequences per step, greedy sampling in the
  worker, no runtime, no service, no inferlet), generating exactly as many tokens
  per sequence as the inferlet did. Throughput counts generated tokens over the
  wall time from launch (or the prefill job) to the last token, prefill included
  on both sides. The ratio inferlets/engine is the tax (target >= 0.95 at N=32).

The sides alternate within each repeat. Two ratios are printed per executor: the
best of --repeats of each side (load from elsewhere only slows), and the median over
repeats of the ratio within one repeat (runs back to back, so slow drifts of a shared
machine cancel). Before each run the bench waits up to --quiet-wait seconds for
other processes to leave the CPU. `--device cuda` runs the same on a GPU.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time

import torch
from twisted.internet import defer, task, threads
from zope.interface import implementer

from bench.decode import wait_for_quiet
from bench.sandbox import host_call_latency, spawn_time, wasm_executor
from pie.engine.batch import Forward, ForwardItem, Sampling
from pie.interfaces import IInstanceOwner
from pie.runtime.chat_template import render
from pie.runtime.executors.dev import DevExecutor
from pie.runtime.executors.scheduler import DEFAULT_SLICE_MS
from pie.runtime.runtime import Runtime
from pie.service.local import load_worker
from pie.service.registry import default_model_path
from pie.service.service import ModelService

APP = "inferlets/text_completion.py"
TOPICS = [
    "the ocean", "a lighthouse", "mountains", "a small robot", "the moon", "a library",
    "winter", "a train journey", "bees", "a city at night", "volcanoes", "a garden",
    "the desert", "an old clock", "rain", "a ship", "forests", "a bakery", "stars",
    "a river", "a castle", "the wind", "a market", "snow", "a violin", "islands",
    "a bridge", "autumn", "a cat", "the sea floor", "a comet", "a village",
]  # fmt: skip
NORMAL = "instance normally finished"


def prompt(i: int) -> str:
    return f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}."


@implementer(IInstanceOwner)
class Owner:
    """Collects each instance's messages; `done[id]` fires with its termination reason."""

    def __init__(self) -> None:
        self.messages: dict[str, list[str]] = {}
        self.done: dict[str, defer.Deferred] = {}

    def instance_message(self, instance_id: str, message: str) -> None:
        self.messages.setdefault(instance_id, []).append(message)

    def instance_terminated(self, instance_id: str, reason: str) -> None:
        self.done.setdefault(instance_id, defer.Deferred()).callback(reason)

    def tokens(self, instance_id: str) -> int:
        """The 'tokens=N ...' line text_completion sends last."""
        line = self.messages[instance_id][-1]
        return int(line.split()[0].split("=")[1])


async def inferlets(runtime: Runtime, digest: str, n: int, new: int) -> tuple[float, list[int]]:
    """(seconds from launch to the last instance's end, tokens generated per instance)."""
    owner = Owner()
    start = time.perf_counter()
    ids = []
    for i in range(n):
        args = ["--prompt", prompt(i), "--max-tokens", str(new)]
        ids.append(await runtime.launch(digest, args, owner))
    reasons = [await owner.done.setdefault(i, defer.Deferred()) for i in ids]
    elapsed = time.perf_counter() - start
    bad = [r for r in reasons if r != NORMAL]
    if bad:
        raise RuntimeError(f"an instance failed: {bad[0]}")
    return elapsed, [owner.tokens(i) for i in ids]


def prompt_tokens(worker, n: int) -> list[list[int]]:
    """What text_completion fills: the chat template's user turn, then the generation prompt."""
    tok = worker.tokenizer
    specials = {"bos_token": tok.bos_token, "eos_token": tok.eos_token}  # as the host renders
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": prompt(i)}]
        turn = render(tok.chat_template, messages, **specials)
        full = render(tok.chat_template, messages, add_generation_prompt=True, **specials)
        out.append(tok.tokenize(turn) + tok.tokenize(full[len(turn) :]))
    return out


async def engine_loop(worker, prompts: list[list[int]], counts: list[int]) -> float:
    """Seconds for the engine alone to generate counts[i] tokens after prompts[i], batched."""
    ps = worker.info.kv_page_size
    greedy = Sampling()
    pages, next_page = [], 0
    for p, count in zip(prompts, counts, strict=True):
        need = math.ceil((len(p) + count) / ps)
        pages.append(list(range(next_page, next_page + need)))
        next_page += need
    lengths = [0] * len(prompts)
    feed = [list(p) for p in prompts]
    made = [0] * len(prompts)
    start = time.perf_counter()
    while True:
        live = [b for b in range(len(prompts)) if made[b] < counts[b]]
        if not live:
            return time.perf_counter() - start
        items = []
        for b in live:
            lengths[b] += len(feed[b])
            used = math.ceil(lengths[b] / ps)
            items.append(
                ForwardItem(
                    pages=pages[b][:used],
                    last_page_len=lengths[b] - ps * (used - 1),
                    positions=list(range(lengths[b] - len(feed[b]), lengths[b])),
                    tokens=feed[b],
                    output_indices=[len(feed[b]) - 1],
                    sampling=greedy,
                )
            )
        answers = await worker.execute(Forward(items))
        for b, answer in zip(live, answers, strict=True):
            feed[b] = [answer[0]]
            made[b] += 1


def paired_median(side: list[float], engine: list[float]) -> float:
    """The median over repeats of side/engine, each from runs taken back to back
    (slow drifts of a shared machine cancel within a pair)."""
    return statistics.median(a / b for a, b in zip(side, engine, strict=True))


async def run(reactor, opts) -> None:
    torch.set_num_threads(opts.threads)
    path = opts.model or default_model_path()
    worker = load_worker(path, device=opts.device, num_pages=opts.pages)
    service = ModelService(worker, reactor=reactor)
    executors = {}
    if "wasm" in opts.executors:
        executors["wasm"] = wasm_executor()  # for the executor costs (synchronous runs)
    if "dev" in opts.executors:
        executors["dev"] = DevExecutor()
    print(f"model {worker.info.model_name} ({path}) on {worker.info.device} {worker.info.dtype}")
    print(f"torch threads {opts.threads}, new tokens {opts.new}, repeats {opts.repeats}")
    print(f"{'executor':8} {'spawn':>10} {'async call':>11}   (no model: executor cost only)")
    for name, executor in executors.items():
        spawn = spawn_time(executor, 50)
        call = host_call_latency(executor, 5000, "async")
        print(f"{name:8} {spawn * 1e3:8.2f}ms {call * 1e6:9.1f}µs", flush=True)
    runtimes = {}
    with open(APP, "rb") as f:
        source = f.read()
    if "wasm" in executors:  # the inferlets run as in the daemon: preempted at its slice
        executors["wasm"] = wasm_executor(slice_ms=DEFAULT_SLICE_MS)
    for name, executor in executors.items():
        runtime = Runtime(tempfile.mkdtemp(prefix="pie-bench-"), {"m": service}, executor, reactor)
        runtime.startService()
        runtimes[name] = (runtime, await runtime.add_program(source))
    for runtime, digest in runtimes.values():  # warm up every path
        _, counts = await inferlets(runtime, digest, 2, 4)
    await engine_loop(worker, prompt_tokens(worker, 2), [4, 4])
    header = " ".join(
        f"{name + ' tok/s':>13} {name + '/eng':>9} {'median':>7}" for name in runtimes
    )
    print(f"{'N':>3} {'tokens':>7} {'engine tok/s':>13} {header}")
    for n in opts.n:
        prompts = prompt_tokens(worker, n)
        rates: dict[str, list[float]] = {name: [] for name in runtimes}
        engine_rates: list[float] = []
        total = 0
        for _ in range(opts.repeats):
            counts = None
            for name, (runtime, digest) in runtimes.items():
                await threads.deferToThread(wait_for_quiet, opts.quiet_wait)
                seconds, got = await inferlets(runtime, digest, n, opts.new)
                counts = counts or got
                rates[name].append(sum(got) / seconds)
            await threads.deferToThread(wait_for_quiet, opts.quiet_wait)
            seconds = await engine_loop(worker, prompts, counts)
            total = sum(counts)
            engine_rates.append(total / seconds)
        best_engine = max(engine_rates)
        cells = " ".join(
            f"{max(r):13.1f} {max(r) / best_engine:9.3f} {paired_median(r, engine_rates):7.3f}"
            for r in rates.values()
        )
        print(f"{n:3d} {total:7d} {best_engine:13.1f} {cells}", flush=True)
    for runtime, _ in runtimes.values():
        await defer.maybeDeferred(runtime.stopService)
    await worker.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file or HF folder (default: SmolLM2)")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 8, 32], help="instances")
    parser.add_argument("--new", type=int, default=32, help="max new tokens per instance (128)")
    parser.add_argument("--executors", nargs="+", default=["dev", "wasm"], choices=["dev", "wasm"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pages", type=int, default=1024, help="KV pages of the worker")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--quiet-wait", type=float, default=20.0,
        help="before each run wait up to this many seconds for other load to leave the CPU",
    )  # fmt: skip
    opts = parser.parse_args(argv)
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, opts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Prefill: time to first token of a long prompt vs Hugging Face, and decode stalls behind it.

    PYTHONPATH=. .venv/bin/python bench/prefill.py [--prompt 2000] [--chunk 256] [--device cpu]

1. Time to first token of one --prompt-token prompt: our model service
   (ModelService.generate, 1 token: the whole prompt in one forward, greedy
   sample in the worker), also with the prompt chunked at --chunk tokens, vs
   Hugging Face LlamaForCausalLM's forward over the same ids (same weights,
   dtype, device and threads) plus an argmax. Target: ours within 1.5x of HF.
2. Decode steps while a long prefill arrives: --streams generations run on the
   service; after a few steps the long prompt arrives on another instance.
   Each decode step's time is the gap between the Forward jobs that answer
   it; printed p50/p99/max over every decode step of the run, with the prompt
   in one piece (max_batch_tokens large) and chunked (max_batch_tokens=--chunk).
Sides alternate in each repeat; the best (TTFT) or the last run (step times) is shown.

All torch work outside the worker thread (loading, the HF side) runs in short-lived
threads, never on the main thread: libgomp keeps an OpenMP thread pool per thread
that ran a parallel region, and with more pooled threads than cores it throttles
their spinning, which slows the worker thread's small ops severalfold.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import torch
from twisted.internet import defer, task

from pie.engine.batch import Forward, Sampling
from pie.engine.engine import create_engine
from pie.engine.hf_reference import hf_model
from pie.engine.loaders import load_model, resolve_dtype
from pie.service.local import LocalWorker
from pie.service.registry import default_model_path
from pie.service.service import ModelService

TEXT = (
    "The history of the lighthouse is a history of people who kept a light burning for ships "
    "they would never meet. Each night the keeper climbed the stairs, trimmed the wick, wound "
    "the clockwork that turned the lens, and wrote the weather in a book. "
)


class StampedWorker:
    """Wraps a worker: notes when each Forward job's answer comes back, and its item sizes."""

    def __init__(self, worker: LocalWorker) -> None:
        self.worker = worker
        self.info, self.tokenizer = worker.info, worker.tokenizer
        self.answers: list[tuple[float, list[int]]] = []

    def execute(self, job):
        d = self.worker.execute(job)
        if isinstance(job, Forward):
            sizes = [len(item.tokens) for item in job.items]
            d.addCallback(lambda r: (self.answers.append((time.perf_counter(), sizes)), r)[1])
        return d


def in_fresh_thread(reactor, fn, *args) -> defer.Deferred:
    """fn(*args) in a new thread that ends afterwards (taking its OpenMP pool with it)."""
    d = defer.Deferred()

    def body() -> None:
        try:
            result = fn(*args)
        except Exception as e:  # noqa: BLE001 - handed to the Deferred
            reactor.callFromThread(d.errback, e)
        else:
            reactor.callFromThread(d.callback, result)

    threading.Thread(target=body, daemon=True).start()
    return d


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


async def generate(service, prompt: list[int], new: int, start_page: int) -> list[int]:
    inst = f"bench-{start_page}-{time.monotonic_ns()}"
    q = service.create_queue(inst)
    ps = service.kv_page_size
    pages = list(range(start_page, start_page + -(-(len(prompt) + new) // ps)))
    service.submit(inst, q, "allocate_kv_pages", pages)
    try:
        return await service.generate(
            inst, q, pages, 0, prompt, list(range(len(prompt))), Sampling(), new
        )
    finally:
        service.destroy_instance(inst)


async def ttft_ours(service, prompt: list[int]) -> float:
    start = time.perf_counter()
    await generate(service, prompt, 1, 0)
    return time.perf_counter() - start


def ttft_hf(model, prompt: list[int], device: str) -> float:
    ids = torch.tensor([prompt], device=device)
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        model(ids).logits[0, -1].argmax().item()
    _sync(device)
    return time.perf_counter() - start


async def stalls(service, stamped, prompt, streams: int, new: int, reactor) -> list[float]:
    """Decode step times (s) of `streams` generations while `prompt` arrives after 4 steps."""
    short = prompt[:16]
    stamped.answers.clear()
    decodes = [generate(service, short, new, 200 + 8 * i) for i in range(streams)]
    runs = [defer.ensureDeferred(d) for d in decodes]
    while len(stamped.answers) < 4:
        await task.deferLater(reactor, 0.001, lambda: None)
    long = defer.ensureDeferred(generate(service, prompt, 1, 0))
    await defer.gatherResults([*runs, long], consumeErrors=True)
    times = [t for t, sizes in stamped.answers if 1 in sizes]  # jobs answering decode steps
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(reactor, opts) -> None:
    torch.set_num_threads(opts.threads)
    path = opts.model or default_model_path()
    dtype = resolve_dtype(opts.dtype, torch.device(opts.device))

    def load():
        loaded = load_model(path, dtype=torch.float32)
        engine = create_engine(loaded, device=opts.device, dtype=dtype, num_pages=512)
        return loaded, engine, hf_model(loaded, dtype).to(opts.device)

    loaded, engine, reference = await in_fresh_thread(reactor, load)
    stamped = StampedWorker(LocalWorker(engine, reactor=reactor))
    whole = ModelService(stamped, reactor=reactor, max_batch_tokens=1 << 20)
    chunked = ModelService(stamped, reactor=reactor, max_batch_tokens=opts.chunk)
    ids = loaded.tokenizer.tokenize(TEXT * (opts.prompt // 40 + 2))[: opts.prompt]
    print(f"model {loaded.name} ({path}) on {opts.device} {str(dtype)[6:]}, threads {opts.threads}")
    print(f"prompt {len(ids)} tokens, chunk {opts.chunk}, torch {torch.__version__}")
    await ttft_ours(whole, ids[:64])  # warm up
    await in_fresh_thread(reactor, ttft_hf, reference, ids[:64], opts.device)
    best = {"ours": 1e9, "ours chunked": 1e9, "HF forward": 1e9}
    for _ in range(opts.repeats):
        best["ours"] = min(best["ours"], await ttft_ours(whole, ids))
        hf = await in_fresh_thread(reactor, ttft_hf, reference, ids, opts.device)
        best["HF forward"] = min(best["HF forward"], hf)
        best["ours chunked"] = min(best["ours chunked"], await ttft_ours(chunked, ids))
    hf = best["HF forward"]
    print(f"{'time to first token':22} {'seconds':>8} {'/ HF':>6}   (target <= 1.5)")
    for name, seconds in best.items():
        print(f"{name:22} {seconds:8.3f} {seconds / hf:6.2f}")
    print(f"decode steps of {opts.streams} streams while the prompt arrives (ms):")
    print(f"{'max_batch_tokens':22} {'steps':>6} {'p50':>7} {'p99':>7} {'max':>7}")
    for name, service in (("whole prompt", whole), (f"chunked at {opts.chunk}", chunked)):
        steps = await stalls(service, stamped, ids, opts.streams, opts.new, reactor)
        print(
            f"{name:22} {len(steps):6d} {statistics.median(steps) * 1e3:7.1f} "
            f"{_pct(steps, 0.99) * 1e3:7.1f} {max(steps) * 1e3:7.1f}",
            flush=True,
        )
    await stamped.worker.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file or HF folder (default: SmolLM2)")
    parser.add_argument("--prompt", type=int, default=2000, help="prompt tokens")
    parser.add_argument("--chunk", type=int, default=256, help="max_batch_tokens when chunked")
    parser.add_argument("--streams", type=int, default=4, help="decode streams for the stall test")
    parser.add_argument("--new", type=int, default=48, help="tokens per decode stream")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    opts = parser.parse_args(argv)
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, opts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

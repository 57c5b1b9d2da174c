"""Decode tokens/s through the model service: in-process worker vs `pie worker` processes.

    PYTHONPATH=. .venv/bin/python bench/remote.py [--model NAME|PATH] [--sequences 8] [--new 32]

Three set-ups serve the same model to the same load, S sequences decoding
greedily at once (each one a virtual instance with its own queue and pages,
as inferlets would; the service batches their steps):
- in-process: ModelService over pie.engine.worker's thread in this process;
- one worker: `pie worker` on loopback, attached with the l4m service type
  (RemoteWorker: msgpack jobs over a WebSocket);
- two workers: two such processes behind one ModelPool (instances spread).
Decode tokens/s counts tokens after prefill, over the time from the end of
the prefills to the last token; a first round warms everything up, uncounted. It prints the ratios to in-process. Every
process uses --threads torch threads (the workers via OMP_NUM_THREADS), so on
a machine with fewer cores than processes x threads the workers compete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch
from twisted.internet import defer, task

from pie.remote.client import WorkerProcess, spawn_worker
from pie.remote.wire import WORKER_TOKEN_FILE
from pie.service.local import load_worker
from pie.service.placement import attach_worker
from pie.service.registry import resolve_model
from pie.service.service import ModelService

PAGE = 16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BenchRuntime:
    """The part of the Runtime the l4m attach uses."""

    def __init__(self, reactor, home: str) -> None:
        self.reactor = reactor
        self.home = home
        self.services: dict = {}

    def model_services(self):
        return self.services.values()

    def add_model_service(self, name: str, service) -> None:
        self.services[name] = service

    def terminate(self, instance_id: str, reason: str) -> None:
        raise SystemExit(f"instance {instance_id} ended: {reason}")


def start_worker(reactor, options, token_file: str) -> WorkerProcess:
    args = ["--model", options.model, "--listen", "tcp:0:interface=127.0.0.1"]
    args += ["--token-file", token_file, "--device", "cpu", "--dtype", options.dtype]
    args += ["--num-pages", str(options.pages)]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(options.threads))
    return spawn_worker(reactor, args, env=env)


async def decode(service, tokenizer, sequences: int, prompt_len: int, new: int) -> float:
    """Decode tokens/s of `sequences` concurrent greedy generations on `service`."""
    text = "The quick brown fox jumps over the lazy dog. " * 40
    ids = tokenizer.tokenize(text)
    prefilled: list[defer.Deferred] = [defer.Deferred() for _ in range(sequences)]
    go = defer.Deferred()

    async def one(index: int) -> None:
        instance = f"bench-{index}-{time.monotonic_ns()}"
        queue = service.create_queue(instance)
        pages = list(range((prompt_len + new + PAGE - 1) // PAGE))
        service.submit(instance, queue, "allocate_kv_pages", pages)
        tokens = ids[index : index + prompt_len]

        async def step(new_tokens: list[int]) -> int:
            nonlocal length
            start, length = length, length + len(new_tokens)
            used = pages[: (length + PAGE - 1) // PAGE]
            last = length - PAGE * (len(used) - 1)
            positions = list(range(start, length))
            (dist,) = await service.submit(
                instance,
                queue,
                "forward_text",
                last,
                used,
                new_tokens,
                positions,
                [],
                [len(new_tokens) - 1],
            )
            return dist[0][0]

        length = 0
        try:
            token = await step(tokens)
        except Exception as error:
            prefilled[index].errback(error)
            raise
        prefilled[index].callback(None)
        await go
        for _ in range(new - 1):
            token = await step([token])
        service.destroy_instance(instance)

    runs = [defer.ensureDeferred(one(i)) for i in range(sequences)]
    await defer.gatherResults(prefilled, consumeErrors=True)
    start = time.perf_counter()
    go.callback(None)
    await defer.gatherResults(runs)
    return sequences * (new - 1) / (time.perf_counter() - start)


async def main(reactor, argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--pages", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args(argv)
    options.model = resolve_model(options.model)
    torch.set_num_threads(options.threads)
    home = tempfile.mkdtemp(prefix="pie-bench-remote-")
    reactor.addSystemEventTrigger("after", "shutdown", shutil.rmtree, home, True)
    token_file = os.path.join(home, WORKER_TOKEN_FILE)
    with open(token_file, "w") as f:
        f.write(os.urandom(32).hex())

    local = load_worker(options.model, device="cpu", dtype=options.dtype, num_pages=options.pages)
    workers = [start_worker(reactor, options, token_file) for _ in range(3)]
    urls = await defer.gatherResults([w.url for w in workers])
    one, two = BenchRuntime(reactor, home), BenchRuntime(reactor, home)
    await attach_worker(one, urls[0], "w1")
    await attach_worker(two, urls[1], "w2")
    await attach_worker(two, urls[2], "w3")
    setups = {
        "in-process": ModelService(local),
        "one worker, loopback": next(iter(one.model_services())),
        "two workers, loopback": next(iter(two.model_services())),
    }
    rates: dict[str, list[float]] = {name: [] for name in setups}
    for round in range(options.repeats + 1):  # interleaved: other tenants' load hits all alike
        for name, service in setups.items():
            rate = await decode(
                service, local.tokenizer, options.sequences, options.prompt, options.new
            )
            print(f"round {round}: {name}: {rate:.1f} decode tokens/s", file=sys.stderr, flush=True)
            if round:  # round 0 warms every worker up (the first forward passes are slow)
                rates[name].append(rate)
    for runtime in (one, two):
        for pool in runtime.model_services():
            await pool.close()
    await local.close()
    await defer.gatherResults([w.stop() for w in workers])

    print(
        f"model {os.path.basename(options.model)}, {options.dtype}, {options.sequences} sequences, "
        f"prompt {options.prompt}, {options.new} new tokens, {options.threads} torch thread(s) per "
        f"process, {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f}; "
        f"best of {options.repeats} after a warm-up round"
    )
    base = max(rates["in-process"])
    for name, values in rates.items():
        print(f"{name:22s} {max(values):8.1f} decode tokens/s   {max(values) / base:.2f}x")


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, sys.argv[1:])))

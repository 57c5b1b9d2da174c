"""The OpenAI endpoint's cost: N streaming chat requests vs the same N `pie run` completions.

    PYTHONPATH=. .venv/bin/python -m bench.openai [--n 8 32] [--new 64] [--repeats 2]

One `pie serve --openai` daemon (a child process, as in production: the wasm
sandbox, SmolLM2 on the CPU, no auth) serves both sides, which alternate within
each repeat:

- openai: N concurrent `chat.completions.create(stream=True)` calls of the
  official async client, greedy (temperature 0), max_tokens NEW, usage from
  stream_options.include_usage; time to first token is the wait for the first
  content delta;
- pie run: N concurrent launches of inferlets/text_completion.py (what
  `pie run inferlets/text_completion.py -- --prompt P --max-tokens NEW` does: the
  same chat turn, greedy) over pie's own protocol, its tokens from the line it
  sends last.

Throughput is all generated tokens over the wall time from the first request to
the last reply, prefill included on both sides. Printed per N: the best tokens/s
of each side over the repeats, their ratio (target >= 0.9), and the openai side's
time to first token, p50 over all its requests. `--no-stream` sends the same
requests not streamed (tokens from the usage, no time to first token), which
separates the cost of streaming from that of a request's own instance. Twisted runs on asyncio here, so
the official async client and pie's Twisted client share one loop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]  # run as bench/openai.py: `import openai` must not find this file

from twisted.internet import asyncioreactor  # noqa: E402

asyncioreactor.install(asyncio.new_event_loop())

import openai  # noqa: E402
from twisted.internet import defer, task  # noqa: E402

from pie.client.tx import connect  # noqa: E402
from pie.runtime.executors import build  # noqa: E402

APP = "inferlets/text_completion.py"
TOPICS = ["the ocean", "a lighthouse", "mountains", "a small robot", "the moon", "a library"]
MODEL = "smollm2-135m-instruct"


def prompt(i: int) -> str:
    return f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]} (number {i})."


def start_daemon(home: str, threads: int) -> tuple[subprocess.Popen, str]:
    """`pie serve --openai` on free loopback ports, the model and the sandbox runtime linked in."""
    os.makedirs(f"{home}/models")
    os.symlink(os.path.expanduser(f"~/.cache/pie/models/{MODEL}"), f"{home}/models/{MODEL}")
    artifact, link = build.build(), build.artifact_path(Path(home)).parent
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(artifact.parent, link)
    loopback = "tcp:0:interface=127.0.0.1"
    command = [sys.executable, "-m", "pie.cli", "serve", "--home", home, "--no-auth"]
    command += ["--port", loopback, "--openai", loopback, "--device", "cpu"]
    log_path = f"{home}/log"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(command, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env)
    return proc, log_path


async def ports(reactor, proc: subprocess.Popen, log_path: str) -> tuple[int, int]:
    """(pie port, openai port) from the daemon's log (a benchmark, not a test: polling is fine)."""
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited:\n{open(log_path).read()[-3000:]}")
        log = open(log_path).read()
        pie = re.search(r"pie listening on \S*\(.*port=(\d+)", log)
        oai = re.search(r"pie openai listening on \S*\(.*port=(\d+)", log)
        if pie and oai:
            return int(pie.group(1)), int(oai.group(1))
        await task.deferLater(reactor, 0.2, lambda: None)


async def pie_run(client, digest: str, n: int, new: int) -> tuple[float, int]:
    """(seconds, tokens) of N concurrent text_completion instances."""

    async def one(i: int) -> int:
        args = ["--prompt", prompt(i), "--max-tokens", str(new)]
        instance = await client.launch_instance(digest, args)
        messages = [m async for event, m in instance if event == "message"]
        return int(messages[-1].split()[0].split("=")[1])  # "tokens=N ms_per_token=X"

    start = time.perf_counter()
    counts = await defer.gatherResults([defer.ensureDeferred(one(i)) for i in range(n)])
    return time.perf_counter() - start, sum(counts)


async def openai_streams(
    api: openai.AsyncOpenAI, n: int, new: int, stream: bool = True
) -> tuple[float, int, list]:
    """(seconds, tokens, times to first token) of N concurrent chat requests."""

    async def one(i: int) -> tuple[int, float]:
        sent = time.perf_counter()
        first, tokens = None, 0
        request = {"model": MODEL, "messages": [{"role": "user", "content": prompt(i)}]}
        request.update(max_tokens=new, temperature=0)
        if not stream:
            reply = await api.chat.completions.create(**request)
            return reply.usage.completion_tokens, float("nan")
        chunks = await api.chat.completions.create(
            **request, stream=True, stream_options={"include_usage": True}
        )
        async for chunk in chunks:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - sent
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return tokens, first if first is not None else float("nan")

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - start, sum(t for t, _ in results), [f for _, f in results]


async def run(reactor, opts) -> None:
    home = tempfile.mkdtemp(prefix="pie-bench-openai-")
    proc, log_path = start_daemon(home, opts.threads)
    try:
        pie_port, openai_port = await ports(reactor, proc, log_path)
        client = await connect(f"ws://127.0.0.1:{pie_port}", reactor=reactor)
        with open(APP, "rb") as f:
            digest = await client.upload_program(f.read())
        api = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{openai_port}/v1", api_key="none", max_retries=0
        )

        def streams(n: int, new: int):
            coro = openai_streams(api, n, new, not opts.no_stream)
            return defer.Deferred.fromFuture(asyncio.ensure_future(coro))

        await pie_run(client, digest, 2, 4)  # warm up both paths
        await streams(2, 4)
        print(f"model {MODEL} on cpu (daemon torch threads {opts.threads}), new tokens {opts.new}")
        print(f"openai side {'not ' if opts.no_stream else ''}streamed, repeats {opts.repeats}")
        print(f"{'N':>3} {'pie run tok/s':>14} {'openai tok/s':>13} {'ratio':>6} {'ttft p50':>9}")
        for n in opts.n:
            pie_rates, openai_rates, ttfts = [], [], []
            for _ in range(opts.repeats):
                seconds, tokens = await pie_run(client, digest, n, opts.new)
                pie_rates.append(tokens / seconds)
                seconds, tokens, firsts = await streams(n, opts.new)
                openai_rates.append(tokens / seconds)
                ttfts += firsts
            best_pie, best_openai = max(pie_rates), max(openai_rates)
            print(
                f"{n:3d} {best_pie:14.1f} {best_openai:13.1f} {best_openai / best_pie:6.3f}"
                f" {statistics.median(ttfts) * 1e3:7.0f}ms",
                flush=True,
            )
        await defer.Deferred.fromFuture(asyncio.ensure_future(api.close()))
        client.close()
    finally:
        proc.terminate()
        proc.wait(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[8, 32], help="concurrent requests")
    parser.add_argument("--new", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-stream", action="store_true", help="openai side not streamed")
    parser.add_argument("--threads", type=int, default=2, help="the daemon's OMP_NUM_THREADS")
    opts = parser.parse_args(argv)
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, opts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

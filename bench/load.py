"""Load: 1,000 clients at once, and the daemon's memory idle and per parked instance.

Starts `pie serve` (cpu, the wasm sandbox, auth on) on a temporary home that links
the cached SmolLM2 model. Then:

1. idle RSS once it listens, split honestly: the weights (each tensor once, the dense
   copies kept beside int4 included, from `model_status`'s `memory`), the KV pool, and
   what is over them, anonymous (heap, Python objects) or file-backed (the shared
   libraries' resident pages), from /proc/PID/smaps_rollup; again right after step 2
   and once the daemon's memory trimmer has run (`memory_trim_interval_s`);
2. N clients (default 1000) connect at the same moment, each authenticates with its
   own token (ten users), launches a program that sends one message and ends, and
   waits for that message: the time from connecting to the message, p50/p99/max;
3. RSS per parked instance: 2 x 50 instances that park in receive().

bench/start_memory.py gives the RSS after each stage of a daemon's start.

Figures: docs/limits.md and docs/benchmarks.md.
Run from the repository root: PYTHONPATH=$PWD python bench/load.py [--clients N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer, task

from bench.start_memory import MIB, rollup_mib
from pie.server.auth import issue_token
from pie.server.uploads import hash_program
from tests import rawclient
from tests.protocol_helpers import upload

TRIM_WAIT_S = 11  # the daemon's memory_trim_interval_s (10) and a second
MODEL = "~/.cache/pie/models/smollm2-135m-instruct"
SECRET = "bench-load-secret-long-enough-for-hs256-keys-0123456789abcdef"
HELLO = b"from pie.inferlet import send\n\nasync def main(args):\n    send('hello')\n"
PARK = (
    b"from pie.inferlet import receive, send\n\n"
    b"async def main(args):\n    send('parked')\n    await receive()\n"
)


def rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) // 1024


def breakdown(pid: int, memory: dict) -> str:
    """RSS = weights + KV pool + anonymous overhead + file-backed pages."""
    rss, anon = rollup_mib(pid)
    weights, kv = memory["weights"] // MIB, memory["kv_pool"] // MIB
    return (
        f"RSS {rss} MiB = weights {weights} (dense copies beside int4 "
        f"{memory['dense_copies'] // MIB}) + KV pool {kv} + {rss - weights - kv} over them: "
        f"anonymous {anon - weights - kv}, file-backed {rss - anon}"
    )


def start_daemon(home: str) -> tuple[subprocess.Popen, str]:
    os.makedirs(f"{home}/models")
    os.symlink(
        os.path.expanduser(MODEL),
        f"{home}/models/smollm2-135m-instruct",
    )
    log_path = f"{home}/log"
    command = [sys.executable, "-m", "pie.cli", "serve", "--home", home, "--auth-secret", SECRET]
    command += ["--port", "tcp:0:interface=127.0.0.1", "--device", "cpu"]
    proc = subprocess.Popen(command, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    return proc, log_path


async def listening_port(reactor, proc: subprocess.Popen, log_path: str) -> int:
    """Poll the daemon's log for its listening line (a benchmark, not a test)."""
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited:\n{open(log_path).read()[-3000:]}")
        found = re.search(r"pie listening on \S*\(.*port=(\d+)", open(log_path).read())
        if found:
            return int(found.group(1))
        await task.deferLater(reactor, 0.2, lambda: None)


async def authenticated(port: int, user: str) -> rawclient.RawClient:
    client = await rawclient.connect(port)
    token = issue_token(SECRET, subject=user)
    reply = await client.request({"type": "authenticate", "corr_id": 1, "token": token})
    assert reply["successful"], reply
    return client


async def one_client(port: int, index: int, program: str) -> float:
    """Seconds from connecting to the launched program's message."""
    started = time.perf_counter()
    client = await authenticated(port, f"user{index % 10}")
    client.send({"type": "launch_instance", "corr_id": 2, "program_hash": program, "arguments": []})
    while True:
        message = await client.next()
        if message.get("type") == "response":
            assert message["successful"], message
        elif message.get("event") == "message":
            break
    elapsed = time.perf_counter() - started
    client.close()
    return elapsed


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def park(client: rawclient.RawClient, count: int, first_corr: int) -> None:
    for i in range(count):
        client.send(
            {
                "type": "launch_instance",
                "corr_id": first_corr + i,
                "program_hash": hash_program(PARK),
                "arguments": [],
            }
        )
    parked = 0
    while parked < count:
        message = await client.next()
        parked += message.get("event") == "message"


async def main(reactor, clients: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * clients + 256)), hard))
    proc, log_path = start_daemon(tempfile.mkdtemp())
    try:
        port = await listening_port(reactor, proc, log_path)
        uploader = await authenticated(port, "uploader")
        status = await uploader.request(
            {"type": "query", "corr_id": 9, "subject": "model_status", "record": ""}
        )
        memory = json.loads(status["result"])[0]["memory"]
        print(f"idle: {breakdown(proc.pid, memory)}")
        for corr, source in ((2, HELLO), (3, PARK)):
            assert (await upload(uploader, source, corr_id=corr))["successful"]
        started = time.perf_counter()
        results = await defer.DeferredList(
            [
                defer.ensureDeferred(one_client(port, i, hash_program(HELLO)))
                for i in range(clients)
            ],
            consumeErrors=True,
        )
        wall = time.perf_counter() - started
        times = [value for ok, value in results if ok]
        failed = [value for ok, value in results if not ok]
        print(
            f"{clients} clients: {len(times)} served, {len(failed)} failed in {wall:.1f} s; "
            f"connect->message p50 {percentile(times, 0.5):.2f} s, "
            f"p99 {percentile(times, 0.99):.2f} s, max {max(times):.2f} s"
        )
        for failure in failed[:3]:
            print("  failure:", failure.getErrorMessage())
        print(f"right after them: {breakdown(proc.pid, memory)}")
        await task.deferLater(reactor, TRIM_WAIT_S, lambda: None)
        print(f"{TRIM_WAIT_S} s later (trimmed): {breakdown(proc.pid, memory)}")
        await park(uploader, 50, 100)
        first = rss_mib(proc.pid)
        await park(uploader, 50, 200)
        per = (rss_mib(proc.pid) - first) / 50
        print(f"RSS {rss_mib(proc.pid)} MiB with 100 parked; per parked instance {per:.1f} MiB")
    finally:
        proc.kill()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    arguments = parser.parse_args()
    task.react(lambda r: defer.ensureDeferred(main(r, arguments.clients)))

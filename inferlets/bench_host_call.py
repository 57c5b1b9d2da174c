"""bench-host-call: host-call round-trip latency, at the runtime and at the model service.

Times --iterations round trips of a runtime debug query ("ping", a sync
call), of the model queue's debug query ("ping", an async call through the
model service's queue), and of a no-op async call (store_exists), and sends
one JSON line {"runtime_ping_us", "queue_ping_us", "async_call_us",
"iterations"}. The line is also kept in the KV store as one sample, under
"bench-host-call/sample/<instance id>", and as "bench-host-call/last".

Aggregate mode (Pie's bench-execution-latency): `--aggregate` measures
nothing; it reads every kept sample and sends {"samples": N, "<metric>":
{"mean", "median", "stdev"}, ...} in µs (stdev: the sample standard
deviation, 0 for one sample). `--reset` deletes the samples first.

    --iterations N (default 200)  --aggregate  --reset
"""

import argparse
import json

from pie.inferlet import (
    debug_query,
    get_auto_model,
    get_instance_id,
    send,
    store_delete,
    store_exists,
    store_get,
    store_list_keys,
    store_set,
    time_ms,
)

SAMPLES = "bench-host-call/sample/"
METRICS = ("runtime_ping_us", "queue_ping_us", "async_call_us")


async def measure(n):
    start = time_ms()
    for _ in range(n):
        debug_query("ping")
    runtime_us = (time_ms() - start) * 1000 / n

    queue = get_auto_model().create_queue()
    start = time_ms()
    for _ in range(n):
        await queue.debug_query("ping")
    queue_us = (time_ms() - start) * 1000 / n

    start = time_ms()
    for _ in range(n):
        await store_exists("bench-host-call/none")
    async_us = (time_ms() - start) * 1000 / n
    return {
        "runtime_ping_us": runtime_us,
        "queue_ping_us": queue_us,
        "async_call_us": async_us,
        "iterations": n,
    }


def summary(values):
    """mean, median and sample standard deviation of a non-empty list."""
    n = len(values)
    mean = sum(values) / n
    ordered = sorted(values)
    middle = n // 2
    median = ordered[middle] if n % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    stdev = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return {"mean": mean, "median": median, "stdev": stdev}


async def sample_keys():
    return sorted(k for k in await store_list_keys() if k.startswith(SAMPLES))


async def main(args):
    parser = argparse.ArgumentParser(prog="bench-host-call")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--aggregate", action="store_true")
    parser.add_argument("--reset", action="store_true")
    opts = parser.parse_args(args)

    if opts.reset:
        for key in await sample_keys():
            await store_delete(key)
    if opts.aggregate:
        samples = [json.loads(await store_get(key)) for key in await sample_keys()]
        result = {"samples": len(samples)}
        if samples:
            result.update({m: summary([s[m] for s in samples]) for m in METRICS})
        send(json.dumps(result))
        return
    result = json.dumps(await measure(max(1, opts.iterations)))
    await store_set(SAMPLES + get_instance_id(), result)
    await store_set("bench-host-call/last", result)
    send(result)

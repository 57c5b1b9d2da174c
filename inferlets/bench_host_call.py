"""bench-host-call: host-call round-trip latency, at the runtime and at the model service.

Times --iterations round trips of a runtime debug query ("ping", a sync
call), of the model queue's debug query ("ping", an async call through the
model service's queue), and of a no-op async call (store_exists), and sends
one JSON line {"runtime_ping_us", "queue_ping_us", "async_call_us",
"iterations"}. The mean is also stored in the KV store under
"bench-host-call/last".

    --iterations N (default 200)
"""

import argparse
import json

from pie.inferlet import debug_query, get_auto_model, send, store_exists, store_set, time_ms


async def main(args):
    parser = argparse.ArgumentParser(prog="bench-host-call")
    parser.add_argument("--iterations", type=int, default=200)
    opts = parser.parse_args(args)
    n = max(1, opts.iterations)

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

    result = json.dumps(
        {
            "runtime_ping_us": runtime_us,
            "queue_ping_us": queue_us,
            "async_call_us": async_us,
            "iterations": n,
        }
    )
    await store_set("bench-host-call/last", result)
    send(result)

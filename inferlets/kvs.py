"""kvs: a self-test of the persistent key-value store shared by all instances.

Sets, reads, lists, checks and deletes keys under a per-instance prefix, and
bumps a shared run counter ("kvs-demo/runs") that survives restarts. Sends
one "ok ..." line per check and "runs=N"; raises on the first failure.

    --prefix TEXT (default: kvs-demo/<instance id>)
"""

import argparse

from pie.inferlet import (
    get_instance_id,
    send,
    store_delete,
    store_exists,
    store_get,
    store_list_keys,
    store_set,
)


def check(condition, what):
    if not condition:
        raise AssertionError(f"kvs check failed: {what}")
    send(f"ok {what}")


async def main(args):
    parser = argparse.ArgumentParser(prog="kvs")
    parser.add_argument("--prefix", default=None)
    opts = parser.parse_args(args)
    prefix = opts.prefix or f"kvs-demo/{get_instance_id()}"

    await store_set(f"{prefix}/a", "1")
    await store_set(f"{prefix}/b", "two")
    check(await store_get(f"{prefix}/a") == "1", "get")
    check(await store_get(f"{prefix}/missing") is None, "get missing")
    check(await store_exists(f"{prefix}/b"), "exists")
    keys = [k for k in await store_list_keys() if k.startswith(prefix + "/")]
    check(sorted(keys) == [f"{prefix}/a", f"{prefix}/b"], "list keys")
    await store_set(f"{prefix}/a", "3")
    check(await store_get(f"{prefix}/a") == "3", "overwrite")
    await store_delete(f"{prefix}/a")
    await store_delete(f"{prefix}/b")
    check(not await store_exists(f"{prefix}/a"), "delete")
    runs = int(await store_get("kvs-demo/runs") or "0") + 1
    await store_set("kvs-demo/runs", str(runs))
    send(f"runs={runs}")

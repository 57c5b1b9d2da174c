"""debugger: read or switch the model service's batching policy at run time.

    --policy "adaptive" | "k 8" | "t 16" | "kort 8 16"   (omit to only read it)
    --policy "batching_algo:<algo>:<k>:<t>"             (Pie's debugger form, any policy)

Sends "before: <policy>", "after: <policy>" (answers of the queue debug
queries "get_batching" / "set_batching <policy>"), and the runtime's
answer to "ping".
"""

import argparse

from pie.inferlet import debug_query, get_auto_model, send


async def main(args):
    parser = argparse.ArgumentParser(prog="debugger")
    parser.add_argument("--policy", default=None)
    opts = parser.parse_args(args)

    queue = get_auto_model().create_queue()
    send(f"before: {await queue.debug_query('get_batching')}")
    if opts.policy:
        pie_form = opts.policy.startswith("batching_algo:")
        query = opts.policy if pie_form else f"set_batching {opts.policy}"
        answer = await queue.debug_query(query)
        if answer.startswith("error"):
            raise ValueError(answer)
    send(f"after: {await queue.debug_query('get_batching')}")
    send(f"runtime ping: {debug_query('ping')}")

"""graph-of-thought: proposals with different token budgets, merged pairwise in two levels.

Four proposals run at once; each pair is merged as soon as both of its
proposals are done (a merge does not wait for the other pair), then the two
merges are merged. Sends "proposal i", "merge a+b" and "final" lines.

    --question TEXT  --budgets N,N,N,N (default 8,12,16,20)
"""

import argparse

from pie.inferlet import get_auto_model, send, spawn


async def main(args):
    parser = argparse.ArgumentParser(prog="graph-of-thought")
    parser.add_argument("--question", default="Suggest a name for a bakery.")
    parser.add_argument("--budgets", default="8,12,16,20")
    opts = parser.parse_args(args)
    budgets = [int(b) for b in opts.budgets.split(",")]
    if len(budgets) != 4:
        raise ValueError("--budgets needs four numbers")

    model = get_auto_model()
    base = model.create_context()
    base.user(opts.question)
    base.cue()
    await base.flush()

    async def propose(i):
        ctx = base.fork()
        text = await ctx.generate_until(max_tokens=budgets[i])
        ctx.close()
        send(f"proposal {i}: {text}")
        return text

    async def merge(label, first, second, budget):
        a, b = await first, await second
        ctx = model.create_context()
        ctx.user(f"Combine these two ideas into one:\n1. {a}\n2. {b}")
        ctx.cue()
        text = await ctx.generate_until(max_tokens=budget)
        ctx.close()
        send(f"merge {label}: {text}")
        return text

    proposals = [spawn(propose(i)) for i in range(4)]
    left = spawn(merge("0+1", proposals[0], proposals[1], 12))
    right = spawn(merge("2+3", proposals[2], proposals[3], 12))
    await merge("final", left, right, 16)

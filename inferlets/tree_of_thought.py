"""tree-of-thought: propose -> execute -> reflect, `branches` ways at each level.

Every level forks each node `branches` times and generates all branches at
once, so the engine batches them: branches**3 leaves. Sends one line per
leaf ("leaf i: ...").

    --question TEXT  --branches N (default 2)  --max-tokens N per step (default 24)
"""

import argparse

from pie.inferlet import gather, get_auto_model, send

STEPS = [
    "Propose a short plan to solve the problem.",
    "Carry out the plan step by step.",
    "Reflect: is the result right? Give the final answer.",
]


async def expand(ctx, level, branches, max_tokens):
    if level == len(STEPS):
        return [ctx.get_text()]
    ctx.user(STEPS[level])
    ctx.cue()
    children = await ctx.fork_many(branches)
    await gather(*(c.generate_until(max_tokens=max_tokens) for c in children))
    leaves = await gather(*(expand(c, level + 1, branches, max_tokens) for c in children))
    for child in children:
        child.close()
    return [leaf for group in leaves for leaf in group]


async def main(args):
    parser = argparse.ArgumentParser(prog="tree-of-thought")
    parser.add_argument("--question", default="What is 12 times 7?")
    parser.add_argument("--branches", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=24)
    opts = parser.parse_args(args)

    root = get_auto_model().create_context()
    root.user(opts.question)
    leaves = await expand(root, 0, opts.branches, opts.max_tokens)
    for i, leaf in enumerate(leaves):
        send(f"leaf {i}: {leaf[-200:]}")

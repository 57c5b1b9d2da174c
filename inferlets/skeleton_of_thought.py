"""skeleton-of-thought: write a skeleton of points, then expand every point in parallel.

The skeleton is generated once; each point is expanded on its own fork of
the shared context (one batch). Sends "skeleton: ..." then "point i: ...".

    --question TEXT  --points N (max points, default 3)  --max-tokens N (default 24)
"""

import argparse
import re

from pie.inferlet import gather, get_auto_model, send


def parse_points(text, limit):
    points = [p.strip() for p in re.findall(r"<point>(.*?)(?:</point>|$)", text, re.S)]
    if not points:
        lines = [re.sub(r"^\s*(\d+[.)]|[-*])\s*", "", line) for line in text.splitlines()]
        points = [line.strip() for line in lines if line.strip()]
    return [p for p in points if p][:limit] or [text.strip() or "the question"]


async def main(args):
    parser = argparse.ArgumentParser(prog="skeleton-of-thought")
    parser.add_argument("--question", default="How do I make a cup of tea?")
    parser.add_argument("--points", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=24)
    opts = parser.parse_args(args)

    model = get_auto_model()
    ctx = model.create_context()
    ctx.system("Answer with a numbered list of short points, one per line.")
    ctx.user(opts.question)
    ctx.cue()
    skeleton = await ctx.generate_until(max_tokens=opts.max_tokens * 2)
    points = parse_points(skeleton, opts.points)
    send(f"skeleton: {' | '.join(points)}")

    async def expand(i, point, child):
        child.user(f"Expand point {i + 1} ({point}) in one or two sentences.")
        child.cue()
        return await child.generate_until(max_tokens=opts.max_tokens)

    children = await ctx.fork_many(len(points))
    texts = await gather(
        *(expand(i, p, c) for i, (p, c) in enumerate(zip(points, children, strict=True)))
    )
    for i, text in enumerate(texts):
        send(f"point {i}: {text}")

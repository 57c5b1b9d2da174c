"""prefix-caching: keep a long system prompt's KV cache across invocations.

On a miss the prompt is prefilled and saved (exported pages + its tokens in
the KV store); on a hit the pages are imported, shared and not recomputed.
Sends "cache hit" or "cache miss", then the answer.

    --prompt TEXT  --name NAME (cache entry, default "prefix-caching/system")
    -i / --invalidate (drop the entry first)  --max-tokens N (default 32)
"""

import argparse

from pie.inferlet import Context, get_auto_model, send

SYSTEM = (
    "You are a meticulous assistant for a hardware store. You know the aisles: "
    "aisle 1 has paint and brushes, aisle 2 has screws, nails and bolts, aisle 3 has "
    "power tools, aisle 4 has garden supplies, aisle 5 has plumbing, aisle 6 has "
    "electrical parts and light bulbs. Answer in one short sentence."
)


async def main(args):
    parser = argparse.ArgumentParser(prog="prefix-caching")
    parser.add_argument("--prompt", default="Where are the light bulbs?")
    parser.add_argument("--name", default="prefix-caching/system")
    parser.add_argument("-i", "--invalidate", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=32)
    opts = parser.parse_args(args)

    model = get_auto_model()
    if opts.invalidate:
        await Context.delete(model, opts.name)
    ctx = await Context.open(model, opts.name)
    if ctx is None:
        send("cache miss")
        ctx = model.create_context()
        ctx.system(SYSTEM)
        await ctx.save(opts.name)
    else:
        send("cache hit")
    ctx.user(opts.prompt)
    ctx.cue()
    text = await ctx.generate_until(max_tokens=opts.max_tokens)
    send(text)

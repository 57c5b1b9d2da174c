"""attention-sink: StreamingLLM generation in bounded KV memory.

Keeps the first --sink tokens (the attention sink) and the last --window
tokens visible; after every token the evicted range is masked and pages that
became fully masked are freed, so memory stays bounded however long the
output (Context.generate_windowed). Positions keep counting (gaps are
allowed). Sends the text, then "tokens=T max_pages=P pages_freed=F".

    --prompt TEXT  --max-tokens N (default 64)  --sink N (default 4)  --window N (default 32)
"""

import argparse

from pie.inferlet import Greedy, get_auto_model, send


async def main(args):
    parser = argparse.ArgumentParser(prog="attention-sink")
    parser.add_argument("--prompt", default="Tell me a long story about a dragon.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=32)
    opts = parser.parse_args(args)

    ctx = get_auto_model().create_context()
    ctx.user(opts.prompt)
    ctx.cue()
    stats = {}
    before = len(ctx)
    text = await ctx.generate_windowed(
        Greedy(), ctx.eos_stop(opts.max_tokens), opts.sink, opts.window, stats
    )
    send(text)
    send(
        f"tokens={len(ctx) - before} max_pages={stats['max_pages']} "
        f"pages_freed={stats['pages_freed']}"
    )

"""windowed-attention: sliding-window attention over the last --window tokens, keeping token 0.

Every new token sees token 0 and the --window most recent tokens (the prompt
included); pages that became fully hidden are freed as generation goes on.
Pie's version had a fixed 32-token window; here it is a parameter. Sends the
text, then "tokens=T max_pages=P pages_freed=F".

    --prompt TEXT  --max-tokens N (default 64)  --window N (default 32)
"""

import argparse

from pie.inferlet import TopK, get_auto_model, send


async def main(args):
    parser = argparse.ArgumentParser(prog="windowed-attention")
    parser.add_argument("--prompt", default="List as many animals as you can.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=1, help="1 = greedy")
    opts = parser.parse_args(args)

    ctx = get_auto_model().create_context()
    ctx.user(opts.prompt)
    ctx.cue()
    stats = {}
    before = len(ctx)
    text = await ctx.generate_windowed(
        TopK(opts.top_k, seed=0), ctx.eos_stop(opts.max_tokens), 1, opts.window, stats
    )
    send(text)
    send(
        f"tokens={len(ctx) - before} max_pages={stats['max_pages']} "
        f"pages_freed={stats['pages_freed']}"
    )

"""beam-search: answer a prompt with beam search over forked contexts.

--prompt TEXT  --beam-size N (default 3)  --max-tokens N (default 32)
"""

import argparse

from pie.inferlet import get_auto_model, send


async def main(args):
    parser = argparse.ArgumentParser(prog="beam-search")
    parser.add_argument("--prompt", default="Name three primary colours.")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    opts = parser.parse_args(args)

    ctx = get_auto_model().create_context()
    ctx.user(opts.prompt)
    ctx.cue()
    text = await ctx.generate_with_beam(opts.beam_size, ctx.eos_stop(opts.max_tokens))
    send(text)

"""windowed-attention: sliding-window attention over the last --window tokens, keeping token 0.

Like attention-sink with a one-token sink: every new token sees token 0 and
the --window most recent tokens; fully hidden pages are freed as it goes.
Sends the text, then "tokens=T max_pages=P pages_freed=F".

    --prompt TEXT  --max-tokens N (default 64)  --window N (default 32)
"""

import argparse

from pie.inferlet import Greedy, get_auto_model, send


async def main(args):
    parser = argparse.ArgumentParser(prog="windowed-attention")
    parser.add_argument("--prompt", default="List as many animals as you can.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--window", type=int, default=32)
    opts = parser.parse_args(args)

    model = get_auto_model()
    ctx = model.create_context()
    ctx.user(opts.prompt)
    ctx.cue()
    ctx.keep_window(1, opts.window)  # the prompt itself is windowed too
    stop = ctx.eos_stop(opts.max_tokens)
    sampler = Greedy()
    generated = []
    max_pages = freed = 0
    while not generated or not stop(generated):
        dist = await ctx.decode_step()
        token = sampler.sample(dist.ids, dist.probs)
        generated.append(token)
        ctx.fill_token(token)
        freed += ctx.keep_window(1, opts.window)
        max_pages = max(max_pages, len(ctx.pages))
    text = model.tokenizer.detokenize(generated)
    send(text)
    send(f"tokens={len(generated)} max_pages={max_pages} pages_freed={freed}")

"""text-completion: one chat turn on the model's own template, greedy.

    --prompt TEXT   the user message (default: a question about the sky)
    --system TEXT   an optional system message
    --max-tokens N  generation limit (default 64)
    --raw           feed the prompt as plain text (no chat template) and continue it

A model without a chat template (a base model such as Gemma 3 270M) gets the
prompt as plain text by itself; the first message says so. Sends the reply
text, then a line with timing ("tokens=N ms_per_token=X").
"""

import argparse

from pie.inferlet import get_auto_model, send, time_ms


async def main(args):
    parser = argparse.ArgumentParser(prog="text-completion")
    parser.add_argument("--prompt", default="Why is the sky blue?")
    parser.add_argument("--system", default=None)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--raw", action="store_true")
    opts = parser.parse_args(args)

    model = get_auto_model()
    ctx = model.create_context()
    raw = opts.raw or not model.chat_template
    if raw and not opts.raw:
        send(f"model {model.name!r} has no chat template: the prompt is fed as plain text")
    if raw:
        ctx.fill((opts.system + "\n\n" if opts.system else "") + opts.prompt)
    else:
        if opts.system:
            ctx.system(opts.system)
        ctx.user(opts.prompt)
        ctx.cue()
    start = time_ms()
    before = len(ctx)
    text = await ctx.generate_until(max_tokens=opts.max_tokens)
    generated = len(ctx) - before
    elapsed = time_ms() - start
    send(text)
    send(f"tokens={generated} ms_per_token={elapsed / max(generated, 1):.1f}")

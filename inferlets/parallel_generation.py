"""parallel-generation: two user prompts forked from one shared system prompt, generated at once.

--system TEXT  --prompts "A|B" (default two questions)  --max-tokens N (default 32)
"""

import argparse

from pie.inferlet import gather, get_auto_model, send


async def main(args):
    parser = argparse.ArgumentParser(prog="parallel-generation")
    parser.add_argument("--system", default="You are a helpful, concise assistant.")
    parser.add_argument("--prompts", default="What is the capital of France?|Name a fruit.")
    parser.add_argument("--max-tokens", type=int, default=32)
    opts = parser.parse_args(args)

    base = get_auto_model().create_context()
    base.system(opts.system)
    prompts = opts.prompts.split("|")
    children = await base.fork_many(len(prompts))

    async def answer(ctx, prompt):
        ctx.user(prompt)
        ctx.cue()
        return await ctx.generate_until(max_tokens=opts.max_tokens)

    texts = await gather(*(answer(c, p) for c, p in zip(children, prompts, strict=True)))
    for i, text in enumerate(texts):
        send(f"{i}: {text}")

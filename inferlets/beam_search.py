"""beam-search: answer a prompt with beam search over forked contexts.

--prompt TEXT  --beam-size N (default 3)  --max-tokens N (default 32)
--compare-greedy  also score the greedy continuation of the same length

Sends one JSON object: the best beam's `text`, its length in `tokens` and its
`score` (summed natural log-probability of its tokens); with
--compare-greedy, `greedy_score` too, which beam search exists to beat or match.
"""

import argparse
import json
import math

from pie.inferlet import get_auto_model, send


async def greedy_score(ctx, length):
    """Summed log-probability of the `length` most-likely-next tokens after ctx."""
    total = 0.0
    for _ in range(length):
        dist = await ctx.decode_step()  # most likely first
        total += math.log(dist.probs[0])
        ctx.fill_token(dist.ids[0])
    return total


async def main(args):
    parser = argparse.ArgumentParser(prog="beam-search")
    parser.add_argument("--prompt", default="Name three primary colours.")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--compare-greedy", action="store_true")
    opts = parser.parse_args(args)

    ctx = get_auto_model().create_context()
    ctx.user(opts.prompt)
    ctx.cue()
    baseline = (await ctx.fork_many(1))[0] if opts.compare_greedy else None
    beam = await ctx.beam_search(opts.beam_size, ctx.eos_stop(opts.max_tokens))
    result = {"text": beam.text, "tokens": len(beam.tokens), "score": beam.score}
    if baseline is not None:
        result["greedy_score"] = await greedy_score(baseline, len(beam.tokens))
        baseline.close()
    send(json.dumps(result))

"""output-validation: score candidate answers by the model's own likelihood.

Each candidate is teacher-forced on its own fork of the question context, with
one forward pass that returns a distribution after every candidate token; the
score is the sum of the log-probabilities of the candidate's tokens (-1000 for
a token outside the top-k list, as Pie did). Scores are normalised into a
softmax over candidates. Sends "candidate<TAB>probability" lines, best first,
then "best: <candidate>".

    --question TEXT  --candidates "A|B|C"
"""

import argparse
import math

from pie.inferlet import gather, get_auto_model, send

OUTSIDE_TOP_K = -1000.0


async def score(base, model, candidate):
    ctx = base.fork()
    tokens = model.tokenizer.tokenize(candidate)
    seed = ctx.pending[-1:]  # the token before the candidate, whose output predicts it
    ctx.fill_tokens(tokens)
    first = len(ctx.pending) - len(tokens) - len(seed)
    dists = await ctx.forward_pending(list(range(first, first + len(tokens))))
    ctx.close()
    total = 0.0
    for token, dist in zip(tokens, dists, strict=True):
        if token in dist.ids:
            total += math.log(max(dist.probs[dist.ids.index(token)], 1e-30))
        else:
            total += OUTSIDE_TOP_K
    return total


async def main(args):
    parser = argparse.ArgumentParser(prog="output-validation")
    parser.add_argument("--question", default="What is the capital of France?")
    parser.add_argument("--candidates", default="Paris|London|A banana")
    opts = parser.parse_args(args)
    candidates = [c for c in opts.candidates.split("|") if c]

    model = get_auto_model()
    base = model.create_context()
    base.user(opts.question)
    base.cue()
    await base.flush()
    scores = await gather(*(score(base, model, c) for c in candidates))
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    ranked = sorted(zip(candidates, (w / total for w in weights), strict=True), key=lambda x: -x[1])
    for candidate, prob in ranked:
        send(f"{candidate}\t{prob:.4f}")
    send(f"best: {ranked[0][0]}")

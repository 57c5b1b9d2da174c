"""watermarking: Kirchenbauer-style green-list sampling, and its detection.

The previous token seeds a shuffle of the top-k candidates; a fraction gamma
of them is "green" and gets its probability multiplied by e^delta before
sampling (on the *untempered* distribution: Pie PR #417 found that sampling
at temperature 0 made the watermark a no-op). Detection recomputes the green
lists and reports the share of green tokens and a z-score. Sends the text,
then "green=G/T z=Z" for the watermarked text and for an unwatermarked one.

    --prompt TEXT  --max-tokens N (default 48)  --gamma F (default 0.5)
    --delta F (default 4.0)  --seed N (default 42)
"""

import argparse
import math
import random

from pie.inferlet import Temperature, get_auto_model, send


def green_list(previous, ids, gamma, key):
    order = sorted(ids)
    random.Random(previous * 1000003 + key).shuffle(order)
    return set(order[: max(1, int(len(order) * gamma))])


class WatermarkSampler:
    def __init__(self, ctx, gamma, delta, key, seed):
        self.ctx, self.gamma, self.delta, self.key = ctx, gamma, delta, key
        self.rng = random.Random(seed)
        self.lists = []  # (previous token, green set) per sampled token

    def sample(self, ids, probs):
        previous = self.ctx.get_token_ids()[-1]
        green = green_list(previous, ids, self.gamma, self.key)
        weights = [
            p * math.exp(self.delta) if t in green else p for t, p in zip(ids, probs, strict=True)
        ]
        token = self.rng.choices(ids, weights)[0]
        self.lists.append(token in green)
        return token


class PlainSampler(WatermarkSampler):
    def sample(self, ids, probs):
        previous = self.ctx.get_token_ids()[-1]
        token = Temperature(1.0, seed=self.rng.random()).sample(ids, probs)
        self.lists.append(token in green_list(previous, ids, self.gamma, self.key))
        return token


def z_score(greens, gamma):
    n = len(greens)
    return (sum(greens) - gamma * n) / math.sqrt(n * gamma * (1 - gamma)) if n else 0.0


async def main(args):
    parser = argparse.ArgumentParser(prog="watermarking")
    parser.add_argument("--prompt", default="Write a short poem about the moon.")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--gamma", type=float, default=0.5)
    parser.add_argument("--delta", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=42)
    opts = parser.parse_args(args)

    model = get_auto_model()
    base = model.create_context()
    base.user(opts.prompt)
    base.cue()
    await base.flush()
    marked_ctx, plain_ctx = base.fork(), base.fork()
    marked = WatermarkSampler(marked_ctx, opts.gamma, opts.delta, opts.seed, opts.seed)
    plain = PlainSampler(plain_ctx, opts.gamma, opts.delta, opts.seed, opts.seed + 1)
    text = await marked_ctx.generate(marked, marked_ctx.eos_stop(opts.max_tokens))
    await plain_ctx.generate(plain, plain_ctx.eos_stop(opts.max_tokens))
    send(text)
    for name, sampler in (("watermarked", marked), ("plain", plain)):
        send(
            f"{name}: green={sum(sampler.lists)}/{len(sampler.lists)} "
            f"z={z_score(sampler.lists, opts.gamma):.2f}"
        )

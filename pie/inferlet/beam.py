"""Beam search over forked contexts (Pie's generate_with_beam).

Every beam is a Context; each step decodes all beams concurrently (one batch
on the engine), expands each with its `beam_size` most likely next tokens
(from the top-k distribution), keeps the `beam_size` best candidates by summed
log-probability, each on its own fork, and stops at the best-ranked beam that
meets the stop condition. The caller's context then adopts that beam, and the
caller gets its text, tokens and score (summed natural log-probability of the
tokens, from the full-softmax probabilities of the top-k distributions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pie.inferlet.instance import gather
from pie.inferlet.sampling import StopLike, should_stop

if TYPE_CHECKING:
    from pie.inferlet.context import Context


@dataclass(frozen=True)
class Beam:
    """The beam a search adopted."""

    text: str
    tokens: list[int]
    score: float  # sum of log p(token | the text before it) over `tokens`


async def beam_search(ctx: Context, beam_size: int, stop: StopLike) -> Beam:
    if beam_size < 1:
        raise ValueError("beam_size must be >= 1")
    if beam_size > ctx.model.dist_size:
        raise ValueError(
            f"beam_size {beam_size} exceeds the distribution size {ctx.model.dist_size}"
        )
    await ctx.flush()
    beams: list[tuple[Context, list[int], float]] = [(ctx.fork(), [], 0.0)]
    try:
        while True:
            dists = await gather(*(beam.decode_step() for beam, _, _ in beams))
            candidates: list[tuple[float, int, int]] = []  # (score, beam index, token)
            for index, ((_, _, score), dist) in enumerate(zip(beams, dists, strict=True)):
                for token, prob in list(zip(dist.ids, dist.probs, strict=True))[:beam_size]:
                    candidates.append((score + math.log(max(prob, 1e-30)), index, token))
            candidates.sort(key=lambda c: -c[0])
            chosen = candidates[:beam_size]
            next_beams: list[tuple[Context, list[int], float]] = []
            for score, index, token in chosen:
                parent, tokens, _ = beams[index]
                child = parent.fork()
                child.fill_token(token)
                next_beams.append((child, tokens + [token], score))
            for beam, _, _ in beams:
                beam.close()
            beams = next_beams
            for beam, tokens, score in beams:
                if should_stop(stop, tokens):
                    ctx._become(beam)
                    ctx._record_generated(tokens)
                    return Beam(ctx.tokenizer.detokenize(tokens), tokens, score)
    finally:
        for beam, _, _ in beams:
            beam.close()

"""Token sampling on the device, for the generation fast path (no guest round trip per token).

A row whose Sampling carries a grammar mask (`allowed`, a packed bitmask)
first has every other token's logit set to -inf, over the full vocabulary, so
greedy, temperature, top-k and top-p all draw only allowed tokens. Greedy
rows then take one batched argmax. Other rows are sampled one by one:
temperature, then top-k, then top-p (nucleus) filtering, then a draw. A row
with a seed draws by pie.engine.draw's counter-based race keyed by it (the
service gives each step its own key), the draw the SDK's samplers make, so a
seeded generation picks the same tokens on the fast path and in a guest.
"""

from __future__ import annotations

import numpy as np
import torch

from pie.engine.batch import Sampling
from pie.engine.draw import race


def sample(
    logits: torch.Tensor,
    params: list[Sampling],
    generator: torch.Generator,
) -> list[int]:
    """One token id per row of logits [R, vocab]."""
    if any(s.allowed is not None for s in params):
        keep = np.ones(tuple(logits.shape), dtype=bool)
        for row, s in enumerate(params):
            if s.allowed is not None:
                keep[row] = unpack_bits(s.allowed, logits.shape[-1])
        logits = logits.masked_fill(~torch.from_numpy(keep).to(logits.device), float("-inf"))
    chosen = logits.max(dim=-1).indices  # (faster than argmax on CPU bf16)
    for row, s in enumerate(params):
        if s.temperature <= 0:
            continue
        scores = logits[row].float() / s.temperature
        if 0 < s.top_k < scores.shape[0]:
            kth = torch.topk(scores, s.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if s.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            sorted_probs = sorted_probs.masked_fill(before >= s.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        if s.seed is not None:
            candidates = torch.nonzero(probs > 0).flatten()
            weights = probs[candidates].double().log().cpu().numpy()
            chosen[row] = race(s.seed, candidates.cpu().numpy(), weights)
        else:
            chosen[row] = torch.multinomial(probs, 1, generator=generator)[0]
    return chosen.tolist()


def unpack_bits(mask: bytes, vocab: int) -> np.ndarray:
    """A packed bitmask (bit i % 8 of byte i // 8 = token i) as a bool array [vocab];
    tokens past the mask's end are not allowed. (numpy: torch's uint8 shifts took ~1000x
    longer on CPU, and one masked_fill for the whole batch avoids per-row thread syncs.)"""
    bits = np.unpackbits(np.frombuffer(mask, dtype=np.uint8), bitorder="little")[:vocab]
    keep = np.zeros(vocab, dtype=bool)
    keep[: bits.shape[0]] = bits
    return keep

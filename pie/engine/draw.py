"""The seeded draw of the generation fast path, vectorised: the same counter-based race as
the SDK's samplers (pie.inferlet.sampling, whose docstring defines it), so a seeded sampler
draws the same tokens in the engine and in a guest's own sampler.

A draw with key k picks, among the candidates with a finite score, the one with the
largest score + Gumbel noise, token t's noise coming from (k, t) alone. The service
keys step i of a generation with race_key(seed, i) (torch-free: pie.service uses it).
"""

from __future__ import annotations

import numpy as np

GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def race_key(seed: int, draw: int) -> int:
    """The key of draw number `draw` of a stream seeded `seed`."""
    return (seed + draw * GOLDEN) & _MASK64


def _mix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def race_uniforms(key: int, tokens: np.ndarray) -> np.ndarray:
    """Each token's uniform number in (0, 1) for the draw with this key (float64)."""
    with np.errstate(over="ignore"):
        mixed_key = _mix64(np.array([key], dtype=np.uint64))[0]
        z = _mix64(mixed_key + tokens.astype(np.uint64) * np.uint64(GOLDEN))
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53


def race(key: int, tokens: np.ndarray, scores: np.ndarray) -> int:
    """The token (of `tokens`, with float64 log-weights `scores`) that wins the race."""
    noise = -np.log(-np.log(race_uniforms(key, tokens)))
    return int(tokens[int(np.argmax(scores + noise))])

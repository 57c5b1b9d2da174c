"""Samplers and stop conditions over Pie's sparse top-k distributions.

A forward pass returns, per output row, the `dist_size` most likely tokens and
their probabilities under the full softmax (descending). Every sampler here
works inside that list, as Pie's do. A sampler is anything with
`sample(ids, probs) -> id` or a plain callable `(ids, probs) -> id`, so a
watermark or a grammar constraint is just a Python function. Samplers get the
*untempered* distribution (Pie PR #417: tempering before a custom sampler
made the watermark a no-op).

Randomness is a counter-based race, the same on the engine's fast path
(pie.engine.draw) so a seeded sampler draws the same tokens on either path:
draw n of a sampler seeded s has the key k = (s + n * GOLDEN) mod 2**64, token
t gets u = (mix64((mix64(k) + t * GOLDEN) mod 2**64) >> 11 + 0.5) / 2**53
(mix64: SplitMix64's finalizer), and the draw is the candidate with the
largest log(weight) - log(-log(u)) (Gumbel-max: a draw in proportion to the
weights). A token's noise depends only on (seed, n, token), so the fast
path's draw over the full (masked) vocabulary and a custom sampler's draw
over its top-k candidates pick the same token whenever the winner is among
those candidates. An unseeded sampler takes a random seed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class Sampler(Protocol):
    def sample(self, ids: Sequence[int], probs: Sequence[float]) -> int: ...


SamplerLike = Sampler | Callable[[Sequence[int], Sequence[float]], int]


def sample_with(sampler: SamplerLike, ids: Sequence[int], probs: Sequence[float]) -> int:
    """Run a Sampler object or a plain callable."""
    if not ids:
        raise ValueError("cannot sample from an empty distribution")
    if isinstance(sampler, Sampler):
        return int(sampler.sample(ids, probs))
    if callable(sampler):
        return int(sampler(ids, probs))
    raise TypeError(f"not a sampler: {sampler!r} (need .sample(ids, probs) or a callable)")


GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def mix64(z: int) -> int:
    """SplitMix64's finalizer over a 64-bit integer."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def race_key(seed: int, draw: int) -> int:
    """The key of draw number `draw` of a sampler seeded `seed` (see the module docstring)."""
    return (seed + draw * GOLDEN) & _MASK64


def race_uniform(key: int, token: int) -> float:
    """Token's uniform number in (0, 1) for the draw with this key."""
    return ((mix64((mix64(key) + token * GOLDEN) & _MASK64) >> 11) + 0.5) / 2.0**53


def race(key: int, ids: Sequence[int], weights: Sequence[float]) -> int:
    """The candidate with the largest log(weight) + Gumbel noise (weights need not sum to 1)."""
    best, best_score = int(ids[0]), -math.inf
    for token, weight in zip(ids, weights, strict=True):
        if weight > 0:
            score = math.log(weight) - math.log(-math.log(race_uniform(key, int(token))))
            if score > best_score:
                best, best_score = int(token), score
    return best


class SeededSampler:
    """A sampler's random stream: a 64-bit seed and the number of draws made so far."""

    def __init__(self, seed: object) -> None:
        self.seed = seed if isinstance(seed, int) else random.Random(seed).getrandbits(64)
        self.seed &= _MASK64
        self.draws = 0

    def _draw(self, ids: Sequence[int], weights: Sequence[float]) -> int:
        key = race_key(self.seed, self.draws)
        self.draws += 1
        return race(key, ids, weights)


class Greedy:
    """The most probable token."""

    def sample(self, ids: Sequence[int], probs: Sequence[float]) -> int:
        best = max(range(len(ids)), key=lambda i: probs[i])
        return int(ids[best])


class Temperature(SeededSampler):
    """Reweight p -> p^(1/T) and draw; T = 0 is greedy."""

    def __init__(self, temperature: float, seed: int | None = None) -> None:
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        super().__init__(seed)
        self.temperature = temperature

    def sample(self, ids: Sequence[int], probs: Sequence[float]) -> int:
        if self.temperature == 0:
            return Greedy().sample(ids, probs)
        return self._draw(ids, _tempered(probs, self.temperature))


def _tempered(probs: Sequence[float], temperature: float) -> list[float]:
    if temperature == 1.0:
        return list(probs)
    logs = [math.log(p) / temperature if p > 0 else -math.inf for p in probs]
    top = max(logs)
    return [math.exp(v - top) if v > -math.inf else 0.0 for v in logs]


class TopK(SeededSampler):
    """Draw among the k most probable tokens (after temperature)."""

    def __init__(self, k: int, temperature: float = 1.0, seed: int | None = None) -> None:
        if k < 1:
            raise ValueError("top-k needs k >= 1")
        super().__init__(seed)
        self.k = k
        self.temperature = temperature

    def sample(self, ids: Sequence[int], probs: Sequence[float]) -> int:
        order = sorted(range(len(ids)), key=lambda i: -probs[i])[: self.k]
        kept = [probs[i] for i in order]
        if self.temperature == 0:
            return int(ids[order[0]])
        return self._draw([ids[i] for i in order], _tempered(kept, self.temperature))


class TopP(SeededSampler):
    """Nucleus sampling: the smallest prefix of the sorted list with mass >= p."""

    def __init__(self, p: float, temperature: float = 1.0, seed: int | None = None) -> None:
        if not 0 < p <= 1:
            raise ValueError("top-p needs 0 < p <= 1")
        super().__init__(seed)
        self.p = p
        self.temperature = temperature

    def sample(self, ids: Sequence[int], probs: Sequence[float]) -> int:
        order = sorted(range(len(ids)), key=lambda i: -probs[i])
        total = sum(probs)
        kept: list[int] = []
        mass = 0.0
        for i in order:
            kept.append(i)
            mass += probs[i]
            if mass >= self.p * total:
                break
        if self.temperature == 0:
            return int(ids[kept[0]])
        weights = _tempered([probs[i] for i in kept], self.temperature)
        return self._draw([ids[i] for i in kept], weights)


class Typical(SeededSampler):
    """Locally typical sampling: keep tokens whose surprisal is closest to the
    entropy until `mass` of probability is covered, then draw."""

    def __init__(self, mass: float = 0.9, seed: int | None = None) -> None:
        if not 0 < mass <= 1:
            raise ValueError("typical sampling needs 0 < mass <= 1")
        super().__init__(seed)
        self.mass = mass

    def sample(self, ids: Sequence[int], probs: Sequence[float]) -> int:
        total = sum(probs) or 1.0
        norm = [p / total for p in probs]
        entropy = -sum(p * math.log(p) for p in norm if p > 0)
        order = sorted(
            (i for i in range(len(ids)) if norm[i] > 0),
            key=lambda i: abs(-math.log(norm[i]) - entropy),
        )
        kept: list[int] = []
        mass = 0.0
        for i in order:
            kept.append(i)
            mass += norm[i]
            if mass >= self.mass:
                break
        return self._draw([ids[i] for i in kept], [norm[i] for i in kept])


# --------------------------------------------------------------------------- stop conditions


class StopCondition:
    """Decides, after each generated token, whether generation ends.

    Subclasses implement should_stop(generated_ids). Combine with `|` or any_of().
    A plain callable (generated_ids) -> bool is accepted wherever a condition is.
    """

    def should_stop(self, generated: Sequence[int]) -> bool:
        raise NotImplementedError

    def __call__(self, generated: Sequence[int]) -> bool:
        return self.should_stop(generated)

    def __or__(self, other: StopLike) -> StopCondition:
        return AnyOf(self, other)


StopLike = StopCondition | Callable[[Sequence[int]], bool]


class Until(StopCondition):
    """The generated tokens end with `tokens` (e.g. a stop string, tokenized)."""

    def __init__(self, tokens: Sequence[int]) -> None:
        if not tokens:
            raise ValueError("Until needs a non-empty token sequence")
        self.tokens = list(tokens)

    def should_stop(self, generated: Sequence[int]) -> bool:
        n = len(self.tokens)
        return len(generated) >= n and list(generated[-n:]) == self.tokens


class UntilAny(StopCondition):
    """The last generated token is one of `token_ids` (e.g. the model's EOS ids)."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.token_ids = frozenset(int(t) for t in token_ids)

    def should_stop(self, generated: Sequence[int]) -> bool:
        return bool(generated) and generated[-1] in self.token_ids


class Length(StopCondition):
    """At most n generated tokens."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError("Length needs n >= 1")
        self.n = n

    def should_stop(self, generated: Sequence[int]) -> bool:
        return len(generated) >= self.n


class AnyOf(StopCondition):
    """Stops when any of the conditions does."""

    def __init__(self, *conditions: StopLike) -> None:
        if not conditions:
            raise ValueError("AnyOf needs at least one condition")
        self.conditions = conditions

    def should_stop(self, generated: Sequence[int]) -> bool:
        return any(condition(generated) for condition in self.conditions)


def any_of(*conditions: StopLike) -> StopCondition:
    return AnyOf(*conditions)


def should_stop(condition: StopLike, generated: Sequence[int]) -> bool:
    if not callable(condition):
        raise TypeError(f"not a stop condition: {condition!r}")
    return bool(condition(generated))

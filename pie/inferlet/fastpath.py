"""When Context.generate can run in the engine instead of token by token in the guest.

The `generate` host call samples and checks stop tokens inside the engine, so
a whole generation costs one guest round trip instead of one per token (the
programmability tax of plain completion, issue 5). It applies when the
sampler and the stop condition are ones the engine knows: the SDK's own
Greedy, Temperature, TopK and TopP (exact types: a subclass may sample
differently), and stop conditions built from Length, UntilAny and Until.
Anything else (a watermark, a grammar, a callable) keeps the per-token path.

The engine samples over the full vocabulary; the SDK samplers see only the
top `dist_size` tokens. Temperature and TopP are therefore capped to the top
dist_size tokens in the engine too, so both paths draw from the same set of
candidates (with another random stream: a seeded sampler is reproducible on
either path, but the two paths give different draws).
"""

from __future__ import annotations

from dataclasses import dataclass

from pie.inferlet.sampling import (
    AnyOf,
    Greedy,
    Length,
    SamplerLike,
    SeededSampler,
    StopLike,
    Temperature,
    TopK,
    TopP,
    Until,
    UntilAny,
    race_key,
)

MAX_STEP = 256
"""Most tokens asked for in one host call: bounds the pages reserved ahead of the tokens."""


@dataclass(frozen=True)
class EnginePlan:
    """The engine-side form of a sampler and a stop condition."""

    temperature: float
    top_k: int
    top_p: float
    limit: int  # the Length bound: most tokens generated in all
    stop_tokens: tuple[int, ...]  # a generation may end after one of these (checked in the guest)

    def sampling_args(self, sampler: SamplerLike) -> tuple[float, int, float, int | None]:
        """(temperature, top_k, top_p, seed) of one host call; the seed is the key of the
        sampler's next draw (the engine keys step i with race_key(seed, i)), and the
        caller advances the sampler by the tokens the call drew (`drew`)."""
        if self.temperature <= 0 or not isinstance(sampler, SeededSampler):
            return self.temperature, self.top_k, self.top_p, None
        return self.temperature, self.top_k, self.top_p, race_key(sampler.seed, sampler.draws)

    @staticmethod
    def drew(sampler: SamplerLike, count: int) -> None:
        """The host call drew `count` tokens with the sampler's stream."""
        if isinstance(sampler, SeededSampler):
            sampler.draws += count


def plan(sampler: SamplerLike, stop: StopLike, dist_size: int) -> EnginePlan | None:
    """The engine plan for this sampler and stop condition, or None for the per-token path."""
    sampling = _sampling(sampler, dist_size)
    bounds = _stops(stop)
    if sampling is None or bounds is None or bounds[0] is None:
        return None  # (no Length: an unbounded generation stays in the guest's hands)
    return EnginePlan(*sampling, bounds[0], tuple(sorted(bounds[1])))


def _sampling(sampler: SamplerLike, dist_size: int) -> tuple[float, int, float] | None:
    kind = type(sampler)
    if kind not in (Greedy, Temperature, TopK, TopP):
        return None
    if kind is Greedy or sampler.temperature == 0:
        return 0.0, 0, 1.0
    if kind is TopK:
        return float(sampler.temperature), min(sampler.k, dist_size), 1.0
    top_p = sampler.p if kind is TopP else 1.0
    return float(sampler.temperature), dist_size, float(top_p)


def _stops(stop: StopLike) -> tuple[int | None, set[int]] | None:
    """(the smallest Length bound or None, tokens after which the condition may hold),
    or None if the condition is not made of the known kinds."""
    kind = type(stop)
    if kind is Length:
        return stop.n, set()
    if kind is UntilAny:
        return None, set(stop.token_ids)
    if kind is Until:
        return None, {stop.tokens[-1]}
    if kind is AnyOf:
        limit, tokens = None, set()
        for condition in stop.conditions:
            part = _stops(condition)
            if part is None:
                return None
            if part[0] is not None:
                limit = part[0] if limit is None else min(limit, part[0])
            tokens |= part[1]
        return limit, tokens
    return None

"""Text completion as a stream of decoded text deltas: stop texts, UTF-8, log-probabilities.

An OpenAI-style completion needs more than `Context.generate_tokens`: stop
*texts* that may span token boundaries (and are left out of the reply), text
handed out only once it is whole UTF-8 (a multi-byte character split over
tokens is held back), and, on request, the log-probability of every chosen
token with the top alternatives. `deltas()` does all three and yields the
reply piece by piece, so a non-streamed reply joins the pieces and a streamed
one sends each as it comes.

Generation stays on the engine's fast path (pie.inferlet.fastpath) unless
log-probabilities are asked for: those need each step's distribution, so
they take the per-token path. With stop texts the fast path runs in chunks
of `chunk` tokens and the text is checked after each; the tokens the engine
generated past a stop are dropped (their text is never returned). A streamed
reply (`stream=True`) also runs in chunks, the first of `FIRST_CHUNK` tokens so
the first text goes out soon, then of `chunk`. Chunks change nothing for greedy
decoding; a seeded sampler draws one seed per chunk, so a seed reproduces a
reply streamed or not streamed, but the two may differ.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from pie.inferlet.context import Context
from pie.inferlet.grammar import Grammar, Matcher
from pie.inferlet.sampling import Length, SamplerLike, UntilAny, any_of, sample_with

STOP_CHUNK = 16
"""Tokens per fast-path call while stop texts are checked: what a stop may overshoot."""

FIRST_CHUNK = 2
"""Tokens of a streamed reply's first fast-path call: a short wait for the first text."""

UNDERFLOW_LOGPROB = -9999.0
REPLACEMENT = "\ufffd"
"""What the tokenizer decodes an incomplete UTF-8 sequence to."""


@dataclass(frozen=True)
class TokenLogprob:
    """One chosen token: its text, its log-probability and the top alternatives."""

    token: int
    text: str
    logprob: float
    top: tuple[tuple[str, float], ...]  # (text, logprob), most likely first


@dataclass
class Delta:
    """A piece of the reply: new text and the tokens generated since the last piece."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


class Completion:
    """One generation from a filled context; iterate `deltas()` once.

    After the iteration, `finish_reason` is "stop" (an end-of-turn token or a
    stop text) or "length" (max_tokens), and `completion_tokens` counts the
    tokens the reply is made of: up to and including the one that completed a
    stop text, not an end-of-turn token.
    """

    def __init__(
        self,
        ctx: Context,
        sampler: SamplerLike,
        max_tokens: int,
        stop_texts: Sequence[str] = (),
        logprobs: int | None = None,
        chunk: int = STOP_CHUNK,
        stream: bool = False,
        grammar: Grammar | None = None,
    ) -> None:
        self.ctx = ctx
        self.sampler = sampler
        self.max_tokens = max_tokens
        self.stop_texts = [s for s in stop_texts if s]
        self.logprobs = logprobs
        self.chunk = chunk
        self.stream = stream
        if grammar is not None and logprobs is not None:
            raise ValueError("a grammar runs on the fast path, which gives no log-probabilities")
        self.grammar = grammar
        self._matcher: Matcher | None = None  # one for the whole reply, across its chunks
        self.eos = set(ctx.model.eos_token_ids)
        self.finish_reason: str | None = None
        self.completion_tokens = 0

    async def deltas(self) -> AsyncIterator[Delta]:
        if self.grammar is not None:
            self._matcher = await self.grammar.matcher(self.ctx.model)
        try:
            async for delta in self._deltas():
                yield delta
        finally:
            if self._matcher is not None:
                self._matcher.close()

    async def _deltas(self) -> AsyncIterator[Delta]:
        tokens: list[int] = []  # kept tokens (no end-of-turn token)
        entries: list[TokenLogprob] = []
        sent_text, sent_entries = 0, 0
        hold = max((len(s) for s in self.stop_texts), default=1) - 1
        while self.finish_reason is None:
            before = len(tokens)
            new, new_entries = await self._step(self.max_tokens - len(tokens))
            if new and new[-1] in self.eos:
                new, self.finish_reason = new[:-1], "stop"
                new_entries = new_entries[: len(new)]
            tokens += new
            entries += new_entries
            if self._matcher is not None and self._matcher.is_stopped():
                self.finish_reason = self.finish_reason or "stop"  # the grammar is complete
            if self.finish_reason is None and len(tokens) >= self.max_tokens:
                self.finish_reason = "length"
            text = self._decode(tokens)
            cut = self._find_stop(text, max(0, sent_text - hold))
            if cut is not None:
                text, self.finish_reason = text[: cut[0]], "stop"
                del tokens[self._tokens_for(tokens, before, cut[1]) :]
                del entries[len(tokens) :]
            if self.finish_reason is None:  # hold back a split character and a stop's start
                ready = text.rstrip(REPLACEMENT)
                ready = ready[: max(0, len(ready) - hold)]
                text = ready if len(ready) > sent_text else text[:sent_text]
            self.completion_tokens = len(tokens)
            if len(text) > sent_text or len(entries) > sent_entries:
                yield Delta(text[sent_text:], entries[sent_entries:])
                sent_text, sent_entries = max(len(text), sent_text), len(entries)

    async def _step(self, room: int) -> tuple[list[int], list[TokenLogprob]]:
        """The next tokens: one fast-path call, or one decode step with its distribution."""
        if self.logprobs is None:
            step = room
            if self.stream:
                step = min(room, self.chunk if self.completion_tokens else FIRST_CHUNK)
            elif self.stop_texts:
                step = min(room, self.chunk)
            stop = any_of(Length(step), UntilAny(sorted(self.eos)))
            return await self.ctx.generate_tokens(self.sampler, stop, self._matcher), []
        dist = await self.ctx.decode_step()
        token = sample_with(self.sampler, dist.ids, dist.probs)
        self.ctx.fill_token(token)
        return [token], [self._entry(token, dist.ids, dist.probs)]

    def _entry(self, token: int, ids: Sequence[int], probs: Sequence[float]) -> TokenLogprob:
        chosen = dict(zip(ids, probs, strict=True)).get(token, 0.0)
        top = tuple(
            (self._decode([i]), _log(p))
            for i, p in list(zip(ids, probs, strict=True))[: self.logprobs]
        )
        return TokenLogprob(token, self._decode([token]), _log(chosen), top)

    def _decode(self, tokens: list[int]) -> str:
        return self.ctx.tokenizer.detokenize(tokens) if tokens else ""

    def _find_stop(self, text: str, start: int) -> tuple[int, int] | None:
        """(where the earliest stop text starts, where it ends) at or after `start`."""
        found = [(i, i + len(s)) for s in self.stop_texts if (i := text.find(s, start)) != -1]
        return min(found) if found else None

    def _tokens_for(self, tokens: list[int], before: int, end: int) -> int:
        """The fewest leading tokens (more than `before`) whose text reaches `end` characters."""
        for n in range(before + 1, len(tokens) + 1):
            if len(self._decode(tokens[:n]).rstrip(REPLACEMENT)) >= end:
                return n
        return len(tokens)


def _log(p: float) -> float:
    """ln p; OpenAI's -9999.0 for a probability that underflowed (JSON has no -inf)."""
    return math.log(p) if p > 0 else UNDERFLOW_LOGPROB

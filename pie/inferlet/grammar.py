"""Grammars for constrained generation: the SDK side of pie.runtime.grammar.

A Grammar is a description (kind and source); it becomes a Matcher, a parser
state on the host over one model's vocabulary, when it is used:

    g = Grammar.json_schema({"type": "object", ...})
    text = await ctx.generate_until(max_tokens=200, grammar=g)   # on the engine's fast path

or token by token from a custom sampler:

    m = await g.matcher(model)    # the model's first grammar waits for its token table
    mask = m.allowed()            # bytes: bit i % 8 of byte i // 8 = token i allowed
    m.consume([token]); m.is_accepting(); m.rollback(1)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pie.inferlet import _abi


class GrammarError(ValueError):
    """The host refused a grammar; the text is the grammar library's message."""


@dataclass(frozen=True)
class Grammar:
    kind: str  # json_schema | json | regex | lark | choice
    source: str

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> Grammar:
        """JSON text valid under a JSON Schema (a dict or its JSON text)."""
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema))

    @classmethod
    def json(cls) -> Grammar:
        """Any JSON object."""
        return cls("json", "")

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        """Text matching a regular expression (whole text; Rust regex syntax)."""
        return cls("regex", pattern)

    @classmethod
    def lark(cls, grammar: str) -> Grammar:
        """Text of a Lark grammar (llguidance's dialect: `start` is the top rule)."""
        return cls("lark", grammar)

    @classmethod
    def choice(cls, options: Sequence[str]) -> Grammar:
        """Exactly one of the strings."""
        return cls("choice", json.dumps(list(options)))

    async def matcher(self, model) -> Matcher:
        """A fresh matcher over `model`'s vocabulary; GrammarError if it is malformed. (An
        async call: the model's first grammar waits while the host builds its token table.)"""
        matcher_id, error = await _abi.call_async(
            "grammar_create", model.service_id, self.kind, self.source
        )
        if not matcher_id:
            raise GrammarError(error)
        return Matcher(int(matcher_id), model.service_id, self)


class Matcher:
    """One grammar's parser state on the host (a host resource; `close` frees it).
    Made by `await Grammar.matcher(model)`."""

    def __init__(self, matcher_id: int, service_id: int, grammar: Grammar) -> None:
        self.id = matcher_id
        self.service_id = service_id
        self.grammar = grammar

    def allowed(self) -> bytes:
        """Bitmask of the tokens allowed next (token i: bit i % 8 of byte i // 8)."""
        return bytes(_abi.call("grammar_allowed", self.id))

    def allowed_ids(self, candidates: Sequence[int]) -> list[int]:
        """The candidates the grammar allows next, in their order."""
        mask = self.allowed()
        return [t for t in candidates if t >> 3 < len(mask) and mask[t >> 3] >> (t & 7) & 1]

    def consume(self, tokens: Sequence[int]) -> bool:
        """Advance over tokens; False at the first one not allowed (those before stay)."""
        return bool(_abi.call("grammar_consume", self.id, [int(t) for t in tokens]))

    def is_accepting(self) -> bool:
        """The text so far is complete under the grammar."""
        return bool(_abi.call("grammar_is_accepting", self.id))

    def is_stopped(self) -> bool:
        """Nothing more may follow (end of sequence consumed, or the grammar is done)."""
        return bool(_abi.call("grammar_is_stopped", self.id))

    def rollback(self, count: int) -> None:
        """Undo the last `count` consumed tokens (a rejected speculative path)."""
        if not _abi.call("grammar_rollback", self.id, int(count)):
            raise GrammarError(f"cannot roll back {count} tokens")

    def close(self) -> None:
        _abi.call("grammar_drop", self.id)

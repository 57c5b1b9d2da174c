"""The drafter protocol for speculative decoding (Context.generate_with_drafter).

A drafter proposes tokens the model is likely to produce next, as a *trie*
flattened in depth-first order: `draft()` returns (tokens, depths) where
depths[i] is the depth of tokens[i] below the current seed token (1 = a
child of the seed, 2 = a grandchild, ...). Siblings share a depth and a
position; the verifying forward pass gives every draft an attention mask that
shows it only its ancestors, so siblings never see each other (the tree mask
Pie 0.1.1 lacked, PR #197). Every draft the sampler agrees with is accepted,
so a good drafter saves forward passes and a bad one costs only wasted slots:
the output is the same as plain generation with the same sampler.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class Drafter(Protocol):
    def update(self, tokens: Sequence[int]) -> None:
        """The full token history of the context (called before every draft)."""

    def draft(self) -> tuple[list[int], list[int]]:
        """(tokens, depths) of a depth-first trie below the seed; ([], []) for none."""


class EmptyDrafter:
    """Drafts nothing: generate_with_drafter then equals plain generation."""

    def update(self, tokens: Sequence[int]) -> None:
        pass

    def draft(self) -> tuple[list[int], list[int]]:
        return [], []

"""The model commands as data: one dataclass per operation, as the scheduler queues them.

The service builds one from each checked host call (virtual ids, as the guest
gave them) and gives it behaviour (ModelService.prepare, finish and dispatched,
chosen by the command's type); the scheduler orders and
batches them by `kind` (Local, Sync, or the batch job class the command
becomes). A Generate is a request with tokens remaining, like nano-vllm's
Sequence: the same command runs once per step until it is done.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from pie.engine.batch import (
    CopyKv,
    EmbedText,
    Forward,
    ForwardItem,
    GetDistributions,
    MaskKv,
    Query,
    Sampling,
)
from pie.engine.draw import race_key
from pie.interfaces import InstanceFault
from pie.service.scheduler import Command, Sync


class GrammarMatcher(Protocol):
    """What a constrained Generate needs of a grammar (pie.runtime.grammar.Matcher);
    the service stays free of any grammar library."""

    def allowed_soon(self) -> Future: ...  # of the packed bitmask, computed off the reactor

    def consume(self, tokens: Sequence[int]) -> bool: ...

    def is_stopped(self) -> bool: ...


@dataclass(eq=False)
class AllocatePages(Command):
    instance: str
    ids: list[int]


@dataclass(eq=False)
class AllocateEmbeds(Command):
    instance: str
    ids: list[int]


@dataclass(eq=False)
class DeallocatePages(Command):
    instance: str
    ids: list[int]


@dataclass(eq=False)
class DeallocateEmbeds(Command):
    instance: str
    ids: list[int]


@dataclass(eq=False)
class ExportPages(Command):
    instance: str
    ids: list[int]
    name: str
    persistent: bool


@dataclass(eq=False)
class UnexportPages(Command):
    instance: str
    name: str


@dataclass(eq=False)
class ImportPages(Command):
    instance: str
    ids: list[int]
    name: str


@dataclass(eq=False)
class ServiceQuery(Command):
    """A queue_debug_query the service answers itself (batching policy, stats)."""

    query: str


@dataclass(eq=False)
class Synchronize(Command):
    kind: ClassVar[type] = Sync


@dataclass(eq=False)
class WorkerQuery(Command):
    kind: ClassVar[type] = Query
    answers_errors: ClassVar[bool] = True
    query: str


@dataclass(eq=False)
class CopyPage(Command):
    kind: ClassVar[type] = CopyKv
    instance: str
    src: int
    dst: int
    src_offset: int
    dst_offset: int
    size: int


@dataclass(eq=False)
class MaskPage(Command):
    kind: ClassVar[type] = MaskKv
    instance: str
    page: int
    mask: list[bool]


@dataclass(eq=False)
class EmbedTokens(Command):
    kind: ClassVar[type] = EmbedText
    instance: str
    embeds: list[int]
    tokens: list[int]
    positions: list[int]


@dataclass(eq=False)
class ReadDistributions(Command):
    kind: ClassVar[type] = GetDistributions
    instance: str
    embeds: list[int]


@dataclass(eq=False)
class ForwardText(Command):
    kind: ClassVar[type] = Forward
    instance: str
    last_page_len: int
    pages: list[int]
    tokens: list[int]
    positions: list[int]
    masks: list[list[int]]
    outputs: list[int] | None  # None: forward_text_no_output (answers None)


@dataclass(eq=False)
class ForwardEmbeds(Command):
    kind: ClassVar[type] = Forward
    instance: str
    last_page_len: int
    pages: list[int]
    inputs: list[int]
    outputs: list[int]


@dataclass(eq=False)
class Recompute(Command):
    """Refill the pages of a dormant export from its recorded tokens (first import after a
    restart); `item` is already physical."""

    kind: ClassVar[type] = Forward
    name: str
    item: ForwardItem


@dataclass(eq=False)
class Generate(Command):
    """A generate call in progress: each step forwards `tokens` (the prompt, then the last
    sampled token) after `filled` slots; `advance` takes the sampled token."""

    kind: ClassVar[type] = Forward
    instance: str
    pages: list[int]  # virtual ids, the context's and then the spare ones
    sampling: Sampling
    remaining: int
    stops: frozenset
    filled: int
    tokens: list[int]
    positions: list[int]
    out: list[int] = field(default_factory=list)
    grammar: GrammarMatcher | None = None  # masks each step's sampling
    holds_queue: bool = field(default=True, kw_only=True)

    def step_sampling(self) -> Sampling:
        """This step's sampling: with a grammar, its mask of the tokens allowed now, as a
        Future that a grammar thread fills while the engine runs the step's forward pass
        (the token sampled last step was consumed, in `advance`, before this is called)."""
        sampling = self.sampling
        if sampling.seed is not None:  # the race's key of this step (pie.engine.draw)
            sampling = dataclasses.replace(sampling, seed=race_key(sampling.seed, len(self.out)))
        if self.grammar is None:
            return sampling
        return dataclasses.replace(sampling, allowed=self.grammar.allowed_soon())

    def advance(self, token: int) -> bool:
        """Take the sampled token; True when the generation is done."""
        self.out.append(token)
        self.remaining -= 1
        self.filled += len(self.tokens)
        self.tokens, self.positions = [token], [self.positions[-1] + 1]
        if self.grammar is not None:
            if not self.grammar.consume([token]):
                raise InstanceFault(f"generate: the grammar refused the sampled token {token}")
            if self.grammar.is_stopped():
                return True
        return token in self.stops or not self.remaining

"""Jobs a model worker executes: the boundary between the model service and a device.

The model service (reactor thread) turns inferlet commands into these jobs,
with every id already translated to a *physical* page or embed slot. A worker
(pie.engine.worker in-process, or a remote `pie worker`) executes them in
submission order. They are plain dataclasses of ints, floats, strings and
lists so that pie.remote.wire can ship them as msgpack without a schema of
its own: `to_wire(job)` / `from_wire(data)`.

Mask convention (BRLE, as on Pie's wire): a list of run lengths that
alternate, starting with a run of *attended* slots (possibly 0), then a run of
masked slots, and so on. For new token i of an item the runs cover the first
T - n + i + 1 slots of the item's context, where T = page_size*(len(pages)-1)
+ last_page_len and n is the number of new tokens. An empty mask list means
plain causal attention for every new token.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future
from dataclasses import dataclass, field

from pie.interfaces import PieError

Distribution = tuple[list[int], list[float]]  # top-k token ids, probabilities (descending)


def context_len(page_size: int, num_pages: int, last_page_len: int) -> int:
    """Slots of a KV context laid out as `num_pages` pages, the last holding `last_page_len`."""
    return page_size * (num_pages - 1) + last_page_len


def layout_of(page_size: int, length: int) -> tuple[int, int]:
    """(pages, last_page_len) of a context of `length` slots (length >= 1): context_len's inverse."""
    pages = -(-length // page_size)
    return pages, length - page_size * (pages - 1)


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker reports about itself (also the remote handshake)."""

    model_name: str
    kv_page_size: int
    dist_size: int
    num_kv_pages: int
    num_embeds: int
    vocab_size: int
    max_positions: int
    device: str
    dtype: str
    kv_sizing: str = ""  # how num_kv_pages was chosen (pie.engine.memory.KvSizing.reason)
    # the path the weights run (dtype, weight_kernel, head, dense_dtype, threads: strings)
    compute: dict = field(default_factory=dict)
    # bytes held: "weights" (each tensor once), "dense_copies" (the part of weights kept only
    # for many-row GEMMs beside int4), "kv_pool" (LlamaModel.weight_bytes, KvCache.bytes)
    memory: dict = field(default_factory=dict)


@dataclass
class Sampling:
    """Host-side sampling for the generation fast path (no per-token guest round trip)."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    allowed: bytes | Future | None = None  # a grammar's packed bitmask over the vocabulary
    # (bit i of byte i // 8 set = token i allowed; pie.runtime.grammar): masked out before
    # sampling. A Future (in-process workers) is still being computed on a host thread: the
    # engine joins it after the forward pass, just before sampling (see `ready`).


def ready(s: Sampling) -> Sampling:
    """s with its mask computed (waiting for a Future), as sampling and the wire need it."""
    if isinstance(s.allowed, Future):
        return dataclasses.replace(s, allowed=s.allowed.result())
    return s


@dataclass
class ForwardItem:
    """One sequence's share of a batched forward pass."""

    pages: list[int]  # physical page ids holding the context, in order
    last_page_len: int  # valid slots in the last page *after* the new tokens are written
    positions: list[int]  # RoPE position of each new token
    tokens: list[int] = field(default_factory=list)  # new token ids (forward_text) ...
    input_embeds: list[int] = field(default_factory=list)  # ... or embed slots (forward path)
    masks: list[list[int]] = field(default_factory=list)  # BRLE per new token; [] = causal
    output_indices: list[int] = field(default_factory=list)  # rows (into new tokens) to return
    output_embeds: list[int] = field(default_factory=list)  # forward path: store dists of the
    # last len(output_embeds) new tokens into these embed slots instead of returning them
    sampling: Sampling | None = None  # fast path: also return a sampled token per output row


@dataclass
class Forward:
    """A batch of forward passes. Result: per item, per output index, a Distribution
    (and with `sampling`, the list of sampled token ids instead)."""

    items: list[ForwardItem]


@dataclass
class EmbedText:
    """Make embed slot slots[i] stand for token tokens[i] at position positions[i]."""

    slots: list[int]
    tokens: list[int]
    positions: list[int]


@dataclass
class GetDistributions:
    """Result: the Distribution stored in each embed slot (written by a Forward)."""

    slots: list[int]


@dataclass
class CopyKv:
    """Copy `size` token slots (K and V, every layer) from src[src_offset:] to dst[dst_offset:]."""

    src: int
    dst: int
    src_offset: int
    dst_offset: int
    size: int


@dataclass
class MaskKv:
    """Per-slot validity of a page for the embedding path (True = attend)."""

    page: int
    mask: list[bool]


@dataclass
class Query:
    """Worker debug query ('ping' -> 'pong', 'stats' -> JSON)."""

    text: str


JOB_TYPES = {
    cls.__name__: cls for cls in (Forward, EmbedText, GetDistributions, CopyKv, MaskKv, Query)
}


def to_wire(job) -> dict:
    """A msgpack-ready dict of a job (a mask still being computed is waited for: the wire
    carries bytes)."""
    if isinstance(job, Forward):
        job = Forward(
            [
                dataclasses.replace(i, sampling=ready(i.sampling)) if i.sampling else i
                for i in job.items
            ]
        )
    return {"job": type(job).__name__, "args": dataclasses.asdict(job)}


def from_wire(data: dict):
    """Rebuild a job from to_wire's dict."""
    cls = JOB_TYPES[data["job"]]
    args = dict(data["args"])
    if cls is Forward:
        items = []
        for item in args["items"]:
            sampling = item.get("sampling")
            item = dict(item, sampling=Sampling(**sampling) if sampling else None)
            items.append(ForwardItem(**item))
        return Forward(items=items)
    return cls(**args)


def check_sampling(s: Sampling) -> None:
    if s.temperature < 0 or s.top_k < 0 or not 0.0 < s.top_p <= 1.0:
        raise PieError(
            f"bad sampling parameters (temperature={s.temperature}, top_k={s.top_k}, top_p={s.top_p}): "
            "need temperature >= 0, top_k >= 0, 0 < top_p <= 1"
        )

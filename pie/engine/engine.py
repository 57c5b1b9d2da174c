"""Executes pie.engine.batch jobs synchronously on one device.

The Engine owns a LlamaModel, its physical KV cache, the embed slots and the
distribution store. It is not thread-safe: pie.engine.worker runs it on one
dedicated thread. Jobs come typed from the model service, which checked the
guest's arguments; the engine checks what only it knows (ids in range of its
cache, embed slots and vocabulary, contexts that fit their pages) before
anything is written, so a bad job fails with a PieError and leaves the cache
as it was.
"""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent import futures
from dataclasses import dataclass

import numpy as np
import torch

from pie.engine.attention import ItemLayout, build_plan, causal_mask
from pie.engine.batch import (
    CopyKv,
    EmbedText,
    Forward,
    ForwardItem,
    GetDistributions,
    MaskKv,
    Query,
    Sampling,
    WorkerInfo,
    check_sampling,
    context_len,
    ready,
)
from pie.engine.cpu_path import usable_cores
from pie.engine.llama import LlamaModel
from pie.engine.loaders import LoadedModel, auto_cpu_path, resolve_device, resolve_dtype
from pie.engine.memory import (
    KvPolicy,
    KvSizing,
    cpu_available,
    cuda_available,
    explicit,
    size_kv_pool,
)
from pie.engine.sampling import sample
from pie.engine.tokenizer import Tokenizer
from pie.interfaces import PieError

MAX_POSITION = 1 << 24  # fp32 holds every integer position up to here exactly


def decode_brle(runs: list[int], length: int) -> np.ndarray:
    """BRLE run lengths (attend, mask, attend, ...) -> bool row, True = attend."""
    if sum(runs) != length:
        raise PieError(f"mask covers {sum(runs)} slots, expected {length}")
    values = np.zeros(len(runs), dtype=bool)
    values[0::2] = True
    return np.repeat(values, runs)


def _positions(values: list[int]) -> np.ndarray:
    positions = np.asarray(values, dtype=np.int64)
    if len(positions) and (positions.min() < 0 or positions.max() >= MAX_POSITION):
        raise PieError(f"position out of range 0..{MAX_POSITION - 1}")
    return positions


def _brle_mask(masks: list[list[int]], n: int, total: int) -> np.ndarray | None:
    """The [n, total] attend-matrix of BRLE rows, or None when every row is plain causal."""
    if not masks:
        return None
    if len(masks) != n:
        raise PieError(f"{len(masks)} masks for {n} new tokens")
    if all(len(m) == 1 for m in masks):  # single runs: causal, once their lengths check out
        for i, runs in enumerate(masks):
            decode_brle(list(runs), total - n + i + 1)
        return None
    mask = np.zeros((n, total), dtype=bool)
    for i, runs in enumerate(masks):
        width = total - n + i + 1
        mask[i, :width] = decode_brle(list(runs), width)
    if not mask.any(axis=1).all():
        raise PieError("a new token's mask attends to no slot at all")
    return mask


@dataclass
class _Prepared:
    """One validated ForwardItem, flattened."""

    tokens: np.ndarray
    positions: np.ndarray
    layout: ItemLayout
    return_rows: list[int]  # absolute rows whose results go back to the caller
    store_rows: list[int]  # absolute rows whose distributions go to embed slots
    store_slots: list[int]
    sampling: Sampling | None
    needs_position_mask: bool


class Engine:
    def __init__(
        self,
        model: LlamaModel,
        tokenizer: Tokenizer | None,
        *,
        name: str,
        page_size: int = 16,
        num_pages: int | KvSizing | None = None,
        kv_policy: KvPolicy | None = None,
        num_embeds: int = 4096,
        dist_size: int = 64,
    ):
        """num_pages: a count, a sizing already decided (TP ranks agree on one), or None
        to size the pool from memory under kv_policy (pie.engine.memory)."""
        if page_size < 1 or num_embeds < 1 or dist_size < 1:
            raise PieError("page_size, num_embeds and dist_size must be positive")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        config = model.config
        if isinstance(num_pages, KvSizing):
            self.kv_sizing = num_pages
        else:
            self.kv_sizing = kv_pool_size(model, page_size, num_pages, kv_policy or KvPolicy())
        num_pages = self.kv_sizing.pages
        self.cache = model.new_kv_cache(num_pages, page_size)
        self.page_size = page_size
        self.dist_size = min(dist_size, config.vocab_size)
        self.num_embeds = num_embeds
        self.embed_token = np.zeros(num_embeds, dtype=np.int64)
        self.embed_position = np.zeros(num_embeds, dtype=np.int64)
        self.embed_filled = np.zeros(num_embeds, dtype=bool)
        self.dist_ids = np.zeros((num_embeds, self.dist_size), dtype=np.int64)
        self.dist_probs = np.zeros((num_embeds, self.dist_size), dtype=np.float32)
        self.dist_filled = np.zeros(num_embeds, dtype=bool)
        self.generator = torch.Generator(device=model.device)
        self.generator.seed()
        self.stats = {"jobs": 0, "forwards": 0, "tokens": 0, "busy_s": 0.0}
        self.info = WorkerInfo(
            model_name=name,
            kv_page_size=page_size,
            dist_size=self.dist_size,
            num_kv_pages=num_pages,
            kv_sizing=self.kv_sizing.reason,
            num_embeds=num_embeds,
            vocab_size=config.vocab_size,
            max_positions=config.max_position_embeddings,
            device=str(model.device),
            dtype=str(model.dtype).removeprefix("torch."),
            compute={**model.path_description(), "threads": str(torch.get_num_threads())},
            memory={**model.weight_bytes(), "kv_pool": self.cache.bytes},
        )
        self._handlers = {
            Forward: self.forward,
            EmbedText: self.embed_text,
            GetDistributions: self.get_distributions,
            CopyKv: lambda j: self.cache.copy(j.src, j.dst, j.src_offset, j.dst_offset, j.size),
            MaskKv: lambda j: self.cache.mask(j.page, j.mask),
            Query: self.query,
        }

    def run(self, job: object) -> object:
        """Execute one job and return its result (see pie.engine.batch for each job's result)."""
        handler = self._handlers.get(type(job))
        if handler is None:
            raise PieError(f"unknown worker job {type(job).__name__}")
        start = time.perf_counter()
        try:
            return handler(job)
        finally:
            self.stats["jobs"] += 1
            self.stats["busy_s"] += time.perf_counter() - start

    # ------------------------------------------------------------------ forward

    def forward(self, job: Forward) -> list[list]:
        """The forward pass; grammar masks still being computed on host threads (Futures
        in Sampling.allowed) are joined after it, just before sampling, so the two overlap.
        They are joined even when the job fails: the host may use the matcher once the
        answer arrives."""
        try:
            return self._forward(job)
        finally:
            pending = [i.sampling.allowed for i in job.items if i.sampling is not None]
            futures.wait([m for m in pending if isinstance(m, futures.Future)])

    def _forward(self, job: Forward) -> list[list]:
        prepared: list[_Prepared] = []
        row = 0
        for number, item in enumerate(job.items):
            try:
                p = self._prepare(item, row)
            except PieError as e:
                raise PieError(f"forward item {number}: {e}") from None
            prepared.append(p)
            row += len(p.tokens)
        if not prepared:
            return []
        device = self.model.device
        tokens = np.concatenate([p.tokens for p in prepared])
        positions = np.concatenate([p.positions for p in prepared])
        plan = build_plan([p.layout for p in prepared], self.page_size, device, self.model.dtype)
        self.cache.record(plan.write_slots.cpu().numpy(), positions)
        for p in prepared:
            if p.needs_position_mask:
                p.layout.mask = self._position_mask(p)
        if any(p.needs_position_mask for p in prepared):
            plan = build_plan(
                [p.layout for p in prepared], self.page_size, device, self.model.dtype
            )
        local_plan = self._local_plan(prepared)
        dist_rows = [r for p in prepared if p.sampling is None for r in p.return_rows]
        dist_rows += [r for p in prepared for r in p.store_rows]
        sample_rows = [r for p in prepared if p.sampling is not None for r in p.return_rows]
        out_rows = torch.tensor(dist_rows + sample_rows, dtype=torch.long, device=device)
        logits = self.model.forward(
            torch.from_numpy(tokens).to(device),
            torch.from_numpy(positions).to(device),
            plan,
            self.cache,
            out_rows,
            local_plan,
        )
        self.stats["forwards"] += 1
        self.stats["tokens"] += len(tokens)
        dists = self._distributions(logits[: len(dist_rows)])
        dist_of = dict(zip(dist_rows, dists, strict=True))
        sampled_of: dict[int, int] = {}
        if sample_rows:
            params = [
                ready(p.sampling) for p in prepared if p.sampling is not None for _ in p.return_rows
            ]
            ids = sample(logits[len(dist_rows) :], params, self.generator)
            sampled_of = dict(zip(sample_rows, ids, strict=True))
        results = []
        for p in prepared:
            for r, slot in zip(p.store_rows, p.store_slots, strict=True):
                ids, probs = dist_of[r]
                self.dist_ids[slot] = ids
                self.dist_probs[slot] = probs
                self.dist_filled[slot] = True
            if p.sampling is not None:
                results.append([sampled_of[r] for r in p.return_rows])
            else:
                results.append([dist_of[r] for r in p.return_rows])
        return results

    def _distributions(self, logits: torch.Tensor) -> list[tuple[list[int], list[float]]]:
        if logits.shape[0] == 0:
            return []
        probs = torch.softmax(logits.float(), dim=-1)
        top = torch.topk(probs, self.dist_size, dim=-1)
        return list(zip(top.indices.cpu().tolist(), top.values.cpu().tolist(), strict=True))

    def _prepare(self, item: ForwardItem, row_start: int) -> _Prepared:
        ps = self.page_size
        if not item.pages:
            raise PieError("no KV pages given")
        if min(item.pages) < 0 or max(item.pages) >= self.cache.num_pages:
            page = next(p for p in item.pages if not 0 <= p < self.cache.num_pages)
            raise PieError(f"KV page {page} out of range (worker has {self.cache.num_pages})")
        if not 1 <= item.last_page_len <= ps:
            raise PieError(f"last_page_len {item.last_page_len} not in 1..{ps}")
        total = context_len(ps, len(item.pages), item.last_page_len)
        if item.tokens and item.input_embeds:
            raise PieError("give either tokens or input_embeds, not both")
        if item.input_embeds:
            slots = self._check_embed_slots(item.input_embeds)
            if not self.embed_filled[slots].all():
                missing = [s for s in item.input_embeds if not self.embed_filled[s]]
                raise PieError(f"input embed slots {missing[:8]} were never filled (embed_text)")
            tokens = self.embed_token[slots]
            positions = self.embed_position[slots]
        else:
            tokens = self._token_ids(item.tokens)
            positions = _positions(item.positions)
            if len(positions) != len(tokens):
                raise PieError(f"{len(tokens)} tokens but {len(positions)} positions")
        n = len(tokens)
        if n == 0:
            raise PieError("no new tokens")
        if n > total:
            raise PieError(f"{n} new tokens do not fit a context of {total} slots")
        mask = _brle_mask(item.masks, n, total)
        layout = ItemLayout(list(item.pages), total, n, row_start, mask)
        if mask is not None and self.model.config.sliding_window is not None:
            windowed = self._window_mask(layout, positions)
            if windowed is not None and not windowed.any(axis=1).all():
                raise PieError("a new token's mask attends to no slot within the sliding window")
        if (
            item.output_indices
            and not 0 <= min(item.output_indices) <= max(item.output_indices) < n
        ):
            bad = next(i for i in item.output_indices if not 0 <= i < n)
            raise PieError(f"output index {bad} not in 0..{n - 1}")
        if len(item.output_embeds) > n:
            raise PieError(f"{len(item.output_embeds)} output embeds for {n} new tokens")
        self._check_embed_slots(item.output_embeds)
        if item.sampling is not None:
            check_sampling(item.sampling)
        k = len(item.output_embeds)
        return _Prepared(
            tokens=tokens,
            positions=positions,
            layout=layout,
            return_rows=[row_start + i for i in item.output_indices],
            store_rows=[row_start + i for i in range(n - k, n)],
            store_slots=list(item.output_embeds),
            sampling=item.sampling,
            needs_position_mask=bool(item.input_embeds) and not item.masks,
        )

    def _token_ids(self, values: list[int]) -> np.ndarray:
        tokens = np.asarray(values, dtype=np.int64)
        vocab = self.model.config.vocab_size
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab):
            raise PieError(f"token id out of range 0..{vocab - 1}")
        return tokens

    def _position_mask(self, p: _Prepared) -> np.ndarray:
        """Embedding path: attend valid slots whose position is not after the query's."""
        layout = p.layout
        pages = np.asarray(layout.pages)
        valid = self.cache.slot_valid[pages].reshape(-1)[: layout.context_len]
        where = self.cache.slot_position[pages].reshape(-1)[: layout.context_len]
        return valid[None, :] & (where[None, :] <= p.positions[:, None])

    def _local_plan(self, prepared: list[_Prepared]):
        """The plan of the sliding-window layers, or None when no item reaches past the window."""
        if self.model.config.sliding_window is None:
            return None
        layouts, windowed = [], False
        for p in prepared:
            mask = self._window_mask(p.layout, p.positions)
            layouts.append(p.layout if mask is None else dataclasses.replace(p.layout, mask=mask))
            windowed = windowed or mask is not None
        if not windowed:
            return None
        return build_plan(layouts, self.page_size, self.model.device, self.model.dtype)

    def _window_mask(self, layout: ItemLayout, positions: np.ndarray) -> np.ndarray | None:
        """The item's mask (BRLE, or causal) ∩ the sliding window; None if the window hides nothing.

        A query at position p sees slots whose position q has p - window < q.
        Windows go by positions, as llama.cpp's do, so position gaps count. The
        new tokens' own positions are taken from `positions`, not the cache, so
        this can run (and reject a job) before the job touches the cache.
        """
        window = self.model.config.sliding_window
        pages = np.asarray(layout.pages)
        where = self.cache.slot_position[pages].reshape(-1)[: layout.context_len].copy()
        where[layout.context_len - layout.num_new :] = positions
        if positions.max() - where.min() < window:
            return None
        base = layout.mask
        if base is None:
            base = causal_mask(layout.context_len, layout.num_new)
        return base & (where[None, :] > positions[:, None] - window)

    def _check_embed_slots(self, slots: list[int]) -> np.ndarray:
        array = np.asarray(slots, dtype=np.int64)
        if len(array) and (array.min() < 0 or array.max() >= self.num_embeds):
            raise PieError(f"embed slot out of range 0..{self.num_embeds - 1}")
        return array

    # ------------------------------------------------------------------ other jobs

    def embed_text(self, job: EmbedText) -> None:
        if not len(job.slots) == len(job.tokens) == len(job.positions):
            raise PieError(
                f"embed_text needs as many slots, tokens and positions "
                f"({len(job.slots)}, {len(job.tokens)}, {len(job.positions)})"
            )
        slots = self._check_embed_slots(job.slots)
        tokens = self._token_ids(job.tokens)
        positions = _positions(job.positions)
        self.embed_token[slots] = tokens
        self.embed_position[slots] = positions
        self.embed_filled[slots] = True

    def get_distributions(self, job: GetDistributions) -> list[tuple[list[int], list[float]]]:
        slots = self._check_embed_slots(job.slots)
        if not self.dist_filled[slots].all():
            missing = [s for s in job.slots if not self.dist_filled[s]]
            raise PieError(f"embed slots {missing[:8]} hold no distribution (run forward first)")
        return [(self.dist_ids[s].tolist(), self.dist_probs[s].tolist()) for s in slots]

    def query(self, job: Query) -> str:
        if job.text == "ping":
            return "pong"
        if job.text == "stats":
            return json.dumps(
                dict(
                    self.stats,
                    model=self.name,
                    device=self.info.device,
                    dtype=self.info.dtype,
                    int4=self.model.int4,
                    kv_pages=self.cache.num_pages,
                    kv_bytes=self.cache.bytes,
                )
            )
        raise PieError(f"unknown worker query {job.text!r} (known: ping, stats)")


def kv_page_bytes(model: LlamaModel, page_size: int) -> int:
    """Bytes of one KV page: K and V of every layer for page_size slots."""
    c = model.config
    element = torch.empty(0, dtype=model.dtype).element_size()
    return 2 * c.num_hidden_layers * page_size * c.num_key_value_heads * c.head_dim * element


def kv_pool_size(
    model: LlamaModel, page_size: int, num_pages: int | None, policy: KvPolicy
) -> KvSizing:
    """num_pages when given; else what the memory left after the weights allows (pie.engine.memory)."""
    page_bytes = kv_page_bytes(model, page_size)
    if num_pages is not None:
        return explicit(num_pages, page_bytes)
    on_cuda = model.device.type == "cuda"
    available = cuda_available(model.device) if on_cuda else cpu_available()
    return size_kv_pool(page_bytes, model.device.type, available, policy)


def create_engine(
    loaded: LoadedModel,
    *,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    page_size: int = 16,
    num_pages: int | None = None,
    kv_policy: KvPolicy | None = None,
    num_embeds: int = 4096,
    dist_size: int = 64,
    use_int4: bool | None = None,
    name: str | None = None,
) -> Engine:
    """Place a loaded model on a device and give it a KV cache (see pie.engine.worker.build_engine)."""
    dev = resolve_device(device)
    quantized = bool(loaded.quantized)
    dense_dtype = None
    if dtype == "auto" and dev.type == "cpu":
        path = auto_cpu_path(quantized)
        dense_dtype = path.dense_dtype
        use_int4 = path.weight_kernel.startswith("int4") if use_int4 is None else use_int4
    if dev.type == "cpu":
        torch.set_num_threads(usable_cores())
    model = LlamaModel(
        loaded.config,
        loaded.weights,
        device=dev,
        dtype=resolve_dtype(dtype, dev, quantized),
        quantized=loaded.quantized,
        rows=loaded.rows,
        use_int4=use_int4,
        dense_dtype=dense_dtype,
    )
    return Engine(
        model,
        loaded.tokenizer,
        name=name or loaded.name,
        page_size=page_size,
        num_pages=num_pages,
        kv_policy=kv_policy,
        num_embeds=num_embeds,
        dist_size=dist_size,
    )

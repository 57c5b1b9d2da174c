"""Paged attention with arbitrary per-token masks, and a batched path for decode.

A batch mixes items of two kinds:

- decode items (exactly one new token): all of them are attended in one
  batched kernel. Their pages are gathered into a padded [B, P*page_size]
  block; a per-row additive bias hides the padding and any masked slot.
  The attention is written out as grouped-query matmuls (q viewed as
  [B, kv_heads, group, dim]) because on CPU that beats SDPA's flash kernel
  for a single query row.
- every other item (prefill, several new tokens, drafts, ...) is attended
  with SDPA and an explicit boolean mask. Items of similar size share one
  padded call (many prompts arriving together); items whose padding would
  more than half again the work go alone, so a long prefill does not pad the
  short ones.

Masks are boolean, True = attend, over the item's T context slots in page order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pie.engine import cpu_kernels
from pie.engine.kv_cache import KvCache


@dataclass
class ItemLayout:
    """Where one item's context lives and who attends to what."""

    pages: list[int]
    context_len: int  # T: slots in use after the new tokens are written
    num_new: int  # n: new tokens, occupying slots T-n .. T-1
    row_start: int  # first row of the item's tokens in the flattened batch
    mask: np.ndarray | None = None  # [n, T] bool, None = causal over the whole context


@dataclass
class PrefillGroup:
    """Multi-token items attended in one SDPA call, padded to the largest of them."""

    rows: torch.Tensor  # [B, n_max] batch row of each query (padding repeats a real row)
    pages: torch.Tensor  # [B, P_max]
    width: int  # context slots kept (the largest T)
    mask: torch.Tensor  # [B, 1, n_max, width] bool
    pick: torch.Tensor  # [R] indices into the flattened [B * n_max] queries that are real
    out_rows: torch.Tensor  # [R] their rows in the batch


@dataclass
class AttentionPlan:
    write_slots: torch.Tensor  # [N] flat slot id of each new token
    decode_rows: torch.Tensor | None  # [Bd] rows of decode items (None: no decode items)
    decode_all: bool  # every row is a decode row, in order
    decode_pages: torch.Tensor | None  # [Bd, P]
    decode_bias: torch.Tensor | None  # [1, Bd, 1, P*page_size] additive (0 / -inf), or None
    decode_mask: torch.Tensor | None  # the same as bool (True = attend), for SDPA
    decode_lens: torch.Tensor | None  # [Bd] int32 context slots of each decode item
    prefill: list[PrefillGroup]
    # one causal decode item: its context length, and its first page when its pages
    # are consecutive (attention then reads a view of the cache, no gather, no mask)
    single_len: int | None = None
    single_first_page: int | None = None
    # the views of that run of pages, every layer (made by the first layer that attends)
    single_run: tuple[torch.Tensor, torch.Tensor] | None = None


def causal_mask(context_len: int, num_new: int) -> np.ndarray:
    """Row i attends slots 0 .. T-n+i."""
    cols = np.arange(context_len)
    limits = context_len - num_new + np.arange(num_new)
    return cols[None, :] <= limits[:, None]


def build_plan(
    layouts: list[ItemLayout],
    page_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> AttentionPlan:
    slots: list[int] = []
    decode: list[ItemLayout] = []
    multi: list[ItemLayout] = []
    for item in layouts:
        t, n = item.context_len, item.num_new
        if n == 1:
            last = t - 1
            slots.append(item.pages[last // page_size] * page_size + last % page_size)
            decode.append(item)
            continue
        positions = np.arange(t - n, t)
        page_ids = np.asarray(item.pages, dtype=np.int64)
        slots.extend(
            (page_ids[positions // page_size] * page_size + positions % page_size).tolist()
        )
        multi.append(item)
    prefill = [_prefill_group(g, page_size, device) for g in _group_by_size(multi, page_size)]
    decode_rows = decode_pages = decode_bias = decode_mask = decode_lens = None
    decode_all = False
    single_len = single_first_page = None
    if len(decode) == 1 and decode[0].mask is None:
        single_len = decode[0].context_len
        first = decode[0].pages[0]
        if decode[0].pages == list(range(first, first + len(decode[0].pages))):
            single_first_page = first
    if decode:
        width = max(len(d.pages) for d in decode)
        table = np.zeros((len(decode), width), dtype=np.int64)
        allowed = np.zeros((len(decode), width * page_size), dtype=bool)
        for b, d in enumerate(decode):
            table[b, : len(d.pages)] = d.pages
            table[b, len(d.pages) :] = d.pages[0]
            if d.mask is None:
                allowed[b, : d.context_len] = True
            else:
                allowed[b, : d.context_len] = d.mask[0]
        decode_pages = torch.from_numpy(table).to(device)
        decode_lens = torch.tensor([d.context_len for d in decode], dtype=torch.int32)
        if single_len is None and not allowed.all():
            bias = np.where(allowed, 0.0, -np.inf).astype(np.float32)
            decode_bias = torch.from_numpy(bias).to(device=device, dtype=dtype)[None, :, None, :]
            decode_mask = torch.from_numpy(allowed).to(device)[None, :, None, :]
        rows = [d.row_start for d in decode]
        decode_all = not prefill
        decode_rows = torch.tensor(rows, dtype=torch.long, device=device)
    return AttentionPlan(
        write_slots=torch.tensor(slots, dtype=torch.long, device=device),
        decode_rows=decode_rows,
        decode_all=decode_all,
        decode_pages=decode_pages,
        decode_bias=decode_bias,
        decode_mask=decode_mask,
        decode_lens=decode_lens,
        prefill=prefill,
        single_len=single_len,
        single_first_page=single_first_page,
    )


# Up to this many gathered slots, CPU decode attention is one SDPA call: the
# batched matmuls' fixed costs dominate tiny matrices, while for a large gather
# (B=32, T=64) the grouped matmuls in the model dtype are faster.
SMALL_DECODE = 1024
PADDING_ALLOWANCE = 1.5  # a group may do this much more work than its items need


def _group_by_size(items: list[ItemLayout], page_size: int) -> list[list[ItemLayout]]:
    """Greedy groups of similar (n, T) so that padding stays within PADDING_ALLOWANCE."""
    groups: list[list[ItemLayout]] = []
    for item in sorted(items, key=lambda i: (i.num_new, len(i.pages))):
        group = groups[-1] if groups else None
        if group is not None:
            candidate = group + [item]
            real = sum(i.num_new * i.context_len for i in candidate)
            n_max = max(i.num_new for i in candidate)
            width = max(len(i.pages) for i in candidate) * page_size
            if len(candidate) * n_max * width <= PADDING_ALLOWANCE * real + n_max * page_size:
                group.append(item)
                continue
        groups.append([item])
    return groups


def _prefill_group(items: list[ItemLayout], page_size: int, device: torch.device) -> PrefillGroup:
    b = len(items)
    n_max = max(i.num_new for i in items)
    p_max = max(len(i.pages) for i in items)
    width = max(i.context_len for i in items)
    rows = np.zeros((b, n_max), dtype=np.int64)
    table = np.zeros((b, p_max), dtype=np.int64)
    mask = np.zeros((b, n_max, width), dtype=bool)
    mask[:, :, 0] = True  # padding queries attend one slot (no NaN); they are dropped
    pick, out_rows = [], []
    for j, item in enumerate(items):
        n, t = item.num_new, item.context_len
        rows[j, :] = item.row_start
        rows[j, :n] = np.arange(item.row_start, item.row_start + n)
        table[j, : len(item.pages)] = item.pages
        table[j, len(item.pages) :] = item.pages[0]
        mask[j, :n, :] = False
        mask[j, :n, :t] = item.mask if item.mask is not None else causal_mask(t, n)
        pick.extend(range(j * n_max, j * n_max + n))
        out_rows.extend(range(item.row_start, item.row_start + n))

    def tensor(array) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array), device=device)

    return PrefillGroup(
        rows=tensor(rows),
        pages=tensor(table),
        width=width,
        mask=tensor(mask)[:, None],
        pick=tensor(np.asarray(pick, dtype=np.int64)),
        out_rows=tensor(np.asarray(out_rows, dtype=np.int64)),
    )


def attend(
    q: torch.Tensor,
    cache: KvCache,
    layer: int,
    plan: AttentionPlan,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q: [N, heads, dim] (RoPE applied) -> attention output [N, heads, dim].

    scale: of the scores, 1/sqrt(dim) unless the model says otherwise (Gemma).
    softcap: Gemma 2's logit soft-capping, scores -> softcap * tanh(scores / softcap)
    before the mask and the softmax; SDPA has no such step, so these models take the
    explicit matmul-softmax-matmul path.
    """
    n, heads, dim = q.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    if plan.decode_all:
        return _decode(q, cache, layer, plan, scale, softcap)
    out = torch.empty_like(q)
    if plan.decode_rows is not None:
        out[plan.decode_rows] = _decode(q[plan.decode_rows], cache, layer, plan, scale, softcap)
    for group in plan.prefill:
        k, v = cache.gather_pages(layer, group.pages)  # [kv_heads, B, P*page_size, dim]
        k = k[:, :, : group.width].transpose(0, 1)
        v = v[:, :, : group.width].transpose(0, 1)
        qg = q[group.rows].transpose(1, 2)  # [B, heads, n_max, dim]
        if softcap is None:
            o = F.scaled_dot_product_attention(
                qg, k, v, attn_mask=group.mask, scale=scale, enable_gqa=True
            )
        else:
            b, kv_heads, width, _ = k.shape
            qk = qg.reshape(b, kv_heads, heads // kv_heads * qg.shape[2], dim)
            bias = torch.zeros(group.mask.shape, dtype=torch.float32, device=q.device)
            bias.masked_fill_(~group.mask, float("-inf"))
            bias = bias.repeat(1, 1, heads // kv_heads, 1)  # rows follow qk's (head, query)
            o = _softcapped(qk, k, v, bias, scale, softcap)
            o = o.view(b, heads, qg.shape[2], dim)
        out[group.out_rows] = o.transpose(1, 2).reshape(-1, heads, dim)[group.pick]
    return out


def _softcapped(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    softcap: float,
) -> torch.Tensor:
    """Attention with soft-capped scores: q [..., M, dim], k/v [..., T, dim], bias additive
    (0 / -inf) broadcasting to the scores [..., M, T]."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


def _decode(
    q: torch.Tensor,
    cache: KvCache,
    layer: int,
    plan: AttentionPlan,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    b, heads, dim = q.shape
    if softcap is None and q.dtype == torch.float32 and q.device.type == "cpu":
        if cpu_kernels.available():  # straight from the pages (pie.engine.cpu_kernels)
            return cpu_kernels.paged_decode_attention(
                q, cache.k[layer], cache.v[layer], plan.decode_pages, plan.decode_lens,
                plan.decode_mask, scale,
            )  # fmt: skip
    if plan.single_first_page is not None:
        if plan.single_run is None:
            pages = plan.decode_pages.shape[1]
            plan.single_run = cache.page_run(plan.single_first_page, pages, plan.single_len)
        k, v = plan.single_run[0][layer, :, None], plan.single_run[1][layer, :, None]
    else:
        k, v = cache.gather_pages(layer, plan.decode_pages)  # [kv_heads, B, T, dim]
        if plan.single_len is not None:
            k, v = k[:, :, : plan.single_len], v[:, :, : plan.single_len]
    kv_heads = k.shape[0]
    qg = q.view(b, kv_heads, heads // kv_heads, dim).transpose(0, 1)  # [kv_heads, B, group, dim]
    if softcap is not None:
        out = _softcapped(qg, k, v, plan.decode_bias, scale, softcap)
        return out.transpose(0, 1).reshape(b, heads, dim).to(q.dtype)
    if q.device.type == "cpu" and b * k.shape[2] <= SMALL_DECODE:
        # few slots: one SDPA call (kv heads as its batch, items as its heads) beats
        # matmul + softmax + matmul, whose fixed costs dominate (B=1, T=176: ~65 vs ~170 us)
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=plan.decode_mask, scale=scale)
        return out.transpose(0, 1).reshape(b, heads, dim)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [kv_heads, B, group, T]
    if plan.decode_bias is not None:
        scores = scores + plan.decode_bias
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    out = torch.matmul(probs, v)  # [kv_heads, B, group, dim]
    return out.transpose(0, 1).reshape(b, heads, dim).to(q.dtype)

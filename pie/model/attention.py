"""Paged attention with arbitrary per-token masks, and a batched path for decode.

A batch mixes items of two kinds:

- decode items (exactly one new token): all of them are attended in one
  batched kernel. Their pages are gathered into a padded [B, P*page_size]
  block; a per-row additive bias hides the padding and any masked slot.
  The attention is written out as grouped-query matmuls (q viewed as
  [B, kv_heads, group, dim]) because on CPU that beats SDPA's flash kernel
  for a single query row.
- every other item (prefill, several new tokens, drafts, ...) is attended on
  its own with SDPA and an explicit boolean [n, T] mask, so items of very
  different lengths do not pad each other.

Masks are boolean, True = attend, over the item's T context slots in page order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pie.model.kv_cache import KvCache


@dataclass
class ItemLayout:
    """Where one item's context lives and who attends to what."""

    pages: list[int]
    context_len: int  # T: slots in use after the new tokens are written
    num_new: int  # n: new tokens, occupying slots T-n .. T-1
    row_start: int  # first row of the item's tokens in the flattened batch
    mask: np.ndarray | None = None  # [n, T] bool, None = causal over the whole context


@dataclass
class PrefillItem:
    rows: slice
    pages: torch.Tensor  # [1, P]
    context_len: int
    mask: torch.Tensor  # [n, T] bool


@dataclass
class AttentionPlan:
    write_slots: torch.Tensor  # [N] flat slot id of each new token
    decode_rows: torch.Tensor | None  # [Bd] rows of decode items (None: no decode items)
    decode_all: bool  # every row is a decode row, in order
    decode_pages: torch.Tensor | None  # [Bd, P]
    decode_bias: torch.Tensor | None  # [1, Bd, 1, P*page_size] additive (0 / -inf), or None
    prefill: list[PrefillItem]


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
    prefill: list[PrefillItem] = []
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
        mask = item.mask if item.mask is not None else causal_mask(t, n)
        prefill.append(
            PrefillItem(
                rows=slice(item.row_start, item.row_start + n),
                pages=torch.tensor([item.pages], dtype=torch.long, device=device),
                context_len=t,
                mask=torch.from_numpy(np.ascontiguousarray(mask)).to(device),
            )
        )
    decode_rows = decode_pages = decode_bias = None
    decode_all = False
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
        if not allowed.all():
            bias = np.where(allowed, 0.0, -np.inf).astype(np.float32)
            decode_bias = torch.from_numpy(bias).to(device=device, dtype=dtype)[None, :, None, :]
        rows = [d.row_start for d in decode]
        decode_all = not prefill
        decode_rows = torch.tensor(rows, dtype=torch.long, device=device)
    return AttentionPlan(
        write_slots=torch.tensor(slots, dtype=torch.long, device=device),
        decode_rows=decode_rows,
        decode_all=decode_all,
        decode_pages=decode_pages,
        decode_bias=decode_bias,
        prefill=prefill,
    )


def attend(q: torch.Tensor, cache: KvCache, layer: int, plan: AttentionPlan) -> torch.Tensor:
    """q: [N, heads, dim] (RoPE applied) -> attention output [N, heads, dim]."""
    n, heads, dim = q.shape
    scale = 1.0 / math.sqrt(dim)
    if plan.decode_all:
        return _decode(q, cache, layer, plan, scale)
    out = torch.empty_like(q)
    if plan.decode_rows is not None:
        out[plan.decode_rows] = _decode(q[plan.decode_rows], cache, layer, plan, scale)
    for item in plan.prefill:
        k, v = cache.gather_pages(layer, item.pages)  # [kv_heads, 1, P*page_size, dim]
        t = item.context_len
        k = k[:, 0, :t][None]
        v = v[:, 0, :t][None]
        qi = q[item.rows].transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(
            qi, k, v, attn_mask=item.mask[None, None], scale=scale, enable_gqa=True
        )
        out[item.rows] = o[0].transpose(0, 1)
    return out


def _decode(
    q: torch.Tensor, cache: KvCache, layer: int, plan: AttentionPlan, scale: float
) -> torch.Tensor:
    b, heads, dim = q.shape
    k, v = cache.gather_pages(layer, plan.decode_pages)  # [kv_heads, B, T, dim]
    kv_heads = k.shape[0]
    qg = q.view(b, kv_heads, heads // kv_heads, dim).transpose(0, 1)  # [kv_heads, B, group, dim]
    scores = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [kv_heads, B, group, T]
    if plan.decode_bias is not None:
        scores = scores + plan.decode_bias
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v)  # [kv_heads, B, group, dim]
    return out.transpose(0, 1).reshape(b, heads, dim)

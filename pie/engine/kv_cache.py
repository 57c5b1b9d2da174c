"""The physical paged KV cache of one worker.

Per layer, K and V live in tensors of shape [kv_heads, num_pages, page_size,
head_dim] (heads first: gathering an item's pages then yields [heads, T, dim],
the layout attention multiplies in, without another copy). Pages are owned and refcounted by the
model service; here they are plain storage. Beside the tensors the cache keeps,
per slot, the RoPE position written there and a validity flag: the embedding
path (`forward` with input embeds) derives its attention mask from them
(attend to valid slots whose position is not after the query's), and MaskKv
edits the flags.
"""

from __future__ import annotations

import numpy as np
import torch

from pie.engine.memory import cpu_available, human
from pie.interfaces import PieError


class KvCache:
    def __init__(
        self,
        *,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        if num_pages < 1 or page_size < 1:
            raise PieError(f"bad KV cache size: {num_pages} pages of {page_size} slots")
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.page_size = page_size
        shape = (num_layers, num_kv_heads, num_pages, page_size, head_dim)
        size = 2 * int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
        problem = None
        if torch.device(device).type == "cpu" and size > (room := cpu_available()).bytes:
            # a CPU allocation beyond it is granted lazily and the process killed when touched
            problem = f"more than the {human(room.bytes)} available ({room.source})"
        else:
            try:
                self.k = torch.zeros(shape, device=device, dtype=dtype)
                self.v = torch.zeros(shape, device=device, dtype=dtype)
            except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is one too
                problem = str(e)
        if problem:
            raise PieError(
                f"cannot allocate a KV cache of {num_pages} pages ({size / 2**30:.1f} GiB) "
                f"on {device}: {problem}; ask for fewer pages"
            )
        # flat views [layers, heads, pages*page_size, dim] for slot-indexed writes
        flat = (num_layers, num_kv_heads, num_pages * page_size, head_dim)
        self._k_slots = self.k.view(flat)
        self._v_slots = self.v.view(flat)
        self.slot_position = np.zeros((num_pages, page_size), dtype=np.int64)
        self.slot_valid = np.zeros((num_pages, page_size), dtype=bool)

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V rows [N, heads, dim] at flat slot ids (page * page_size + offset)."""
        self._k_slots[layer].index_copy_(1, slots, k.transpose(0, 1))
        self._v_slots[layer].index_copy_(1, slots, v.transpose(0, 1))

    def gather_pages(
        self, layer: int, page_table: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the pages in page_table [B, P] as [heads, B, P*page_size, dim]."""
        b, p = page_table.shape
        k = self.k[layer][:, page_table]
        v = self.v[layer][:, page_table]
        heads, dim = k.shape[0], k.shape[-1]
        return k.view(heads, b, p * self.page_size, dim), v.view(heads, b, p * self.page_size, dim)

    def page_run(self, first: int, count: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the first `length` slots of pages first .. first+count-1, every layer,
        as [layers, heads, length, dim] views (no copy: a head's pages are adjacent)."""
        layers, heads, _, ps, dim = self.k.shape
        shape = (layers, heads, count * ps, dim)
        end = first + count
        k = self.k[:, :, first:end].reshape(shape)[:, :, :length]
        v = self.v[:, :, first:end].reshape(shape)[:, :, :length]
        return k, v

    def record(self, flat_slots: np.ndarray, positions: np.ndarray) -> None:
        """Note the positions of freshly written slots (they become valid)."""
        pages, offsets = np.divmod(flat_slots, self.page_size)
        self.slot_position[pages, offsets] = positions
        self.slot_valid[pages, offsets] = True

    def check_page(self, page: int) -> None:
        if not 0 <= page < self.num_pages:
            raise PieError(f"KV page {page} out of range (worker has {self.num_pages} pages)")

    def mask(self, page: int, mask: list[bool]) -> None:
        """Set the validity of the first len(mask) slots of a page."""
        self.check_page(page)
        if len(mask) > self.page_size:
            raise PieError(f"mask of {len(mask)} slots for a page of {self.page_size}")
        self.slot_valid[page, : len(mask)] = np.asarray(mask, dtype=bool)

    def copy(self, src: int, dst: int, src_offset: int, dst_offset: int, size: int) -> None:
        """Copy `size` slots of K, V (every layer) and their metadata between pages."""
        self.check_page(src)
        self.check_page(dst)
        ps = self.page_size
        if size < 0 or min(src_offset, dst_offset) < 0 or max(src_offset, dst_offset) + size > ps:
            raise PieError(
                f"copy of {size} slots from offset {src_offset} to {dst_offset} "
                f"does not fit a page of {ps}"
            )
        s, d = slice(src_offset, src_offset + size), slice(dst_offset, dst_offset + size)
        self.k[:, :, dst, d] = self.k[:, :, src, s].clone()
        self.v[:, :, dst, d] = self.v[:, :, src, s].clone()
        self.slot_position[dst, d] = self.slot_position[src, s].copy()
        self.slot_valid[dst, d] = self.slot_valid[src, s].copy()

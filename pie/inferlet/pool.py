"""Per-model pools of virtual ids for KV pages and embed slots.

The inferlet chooses the ids it allocates (they are virtual and private to
the instance; the model service maps them to physical pages). A pool hands
out the smallest free id, counts references so that forked contexts can share
pages, and talks to the host only on the first allocation and the last
release of an id.

One subtlety Pie's pool ignores: commands on different queues are not ordered
against each other. An id released on queue A (deallocate queued there) and
re-acquired at once on queue B could be allocated before A's deallocate runs,
and the host would refuse the remap. So a released id is *quarantined* until
A is known to have run past the deallocate, and meanwhile only queue A itself
(whose commands are ordered) may reuse it. (An id released on a queue that
is never awaited again, e.g. by a closed fork, is thus never handed to
another queue: the pool then grows past it, which costs nothing on the host.)
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pie.inferlet.model import Queue


class IdPool:
    """Virtual ids of one resource kind ('kv_pages' or 'embeds') of one model."""

    def __init__(self, kind: str) -> None:
        if kind not in ("kv_pages", "embeds"):
            raise ValueError(f"unknown resource kind {kind!r}")
        self.kind = kind
        self._next = 0
        self._free: list[int] = []  # heap of ids safe for any queue
        self._quarantine: list[tuple[Queue, int, int]] = []  # (queue, seq, id)
        self._refs: dict[int, int] = {}

    # ------------------------------------------------------------------ queries
    def refcount(self, vid: int) -> int:
        return self._refs.get(vid, 0)

    @property
    def in_use(self) -> int:
        return len(self._refs)

    # ------------------------------------------------------------------ operations
    def acquire(self, queue: Queue, n: int) -> list[int]:
        """n fresh ids with one reference each, allocated on the host via `queue`."""
        ids = self.reserve(queue, n)
        if ids:
            queue.command(f"allocate_{self.kind}", ids)
        return ids

    def reserve(self, queue: Queue, n: int) -> list[int]:
        """n fresh ids with one reference each, *not* allocated on the host
        (for import_kv_pages, which maps them itself)."""
        if n < 0:
            raise ValueError("cannot acquire a negative number of ids")
        self._reclaim()
        own = sorted(entry[2] for entry in self._quarantine if entry[0] is queue)
        ids: list[int] = []
        while len(ids) < n:
            candidates = []
            if self._free:
                candidates.append(self._free[0])
            if own:
                candidates.append(own[0])
            if not candidates:
                ids.append(self._next)
                self._next += 1
            elif own and own[0] == min(candidates):
                vid = own.pop(0)
                self._quarantine = [e for e in self._quarantine if e[2] != vid]
                ids.append(vid)
            else:
                ids.append(heapq.heappop(self._free))
        for vid in ids:
            self._refs[vid] = 1
        return ids

    def retain(self, ids: list[int]) -> None:
        """One more reference to each id (a fork sharing pages)."""
        for vid in ids:
            if vid not in self._refs:
                raise ValueError(f"{self.kind} id {vid} is not allocated")
        for vid in ids:
            self._refs[vid] += 1

    def release(self, queue: Queue, ids: list[int]) -> None:
        """Drop one reference to each id; deallocate (on `queue`) those left with none."""
        dead: list[int] = []
        for vid in ids:
            count = self._refs.get(vid)
            if count is None:
                raise ValueError(f"{self.kind} id {vid} released but not allocated")
            if count == 1:
                del self._refs[vid]
                dead.append(vid)
            else:
                self._refs[vid] = count - 1
        if dead:
            seq = queue.command(f"deallocate_{self.kind}", dead)
            self._quarantine.extend((queue, seq, vid) for vid in dead)

    def _reclaim(self) -> None:
        still: list[tuple[Queue, int, int]] = []
        for queue, seq, vid in self._quarantine:
            if queue.done_seq >= seq:
                heapq.heappush(self._free, vid)
            else:
                still.append((queue, seq, vid))
        self._quarantine = still

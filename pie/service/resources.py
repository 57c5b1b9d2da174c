"""Model-side resources: each instance's virtual ids mapped onto physical KV pages and embed slots.

Inferlets choose their own virtual ids (Pie §4.5); the worker only ever sees
physical ids. This module is pure bookkeeping on the reactor thread: it never
talks to the worker. It keeps

- refcounted physical KV pages, shared by forks, imports and exports, freed
  when the last reference goes (from the middle of a sequence too);
- embed slots (not shared): re-allocating a used embed id releases the old
  slot instead of leaking it (Pie bug §10.11);
- the export catalogue: every export holds one reference per page of its own,
  so an export never points at a freed page; a non-persistent export is
  dropped when its owner ends, a persistent one lives until unexported;
- what every written KV slot holds (token, position, attention row) so that a
  persistent export can be written to disk as a *recipe* and recomputed with
  one forward pass after a daemon restart (see docs/model-service.md);
- the per-instance and per-user page caps, the per-user export quota, and the
  contention choice: when pages run out, which instance to evict (the one most
  beyond its fair share, else newer ones). An instance's user (its token
  subject) is given at register(); instances without one (the daemon's own,
  tests) count against no user's cap or quota.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from pie.engine.batch import context_len
from pie.interfaces import InstanceFault
from pie.namespaces import shown

HOLDS_TOKEN, HOLDS_DISTRIBUTION = 1, 2  # what an embed slot has been given

OPAQUE = "opaque"
"""Slot record of a slot written through the embedding path: it cannot be replayed from tokens."""


class PhysicalPool:
    """Physical ids [0, capacity): the smallest free id is handed out first (Pie §4.4)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free = list(range(capacity))  # already a heap
        self._used = bytearray(capacity)

    @property
    def available(self) -> int:
        return len(self._free)

    def acquire_many(self, count: int) -> list[int]:
        """`count` ids, or InstanceFault with nothing taken if fewer are free."""
        if count > len(self._free):
            raise InstanceFault(f"only {len(self._free)} of {count} requested ids are free")
        ids = [heapq.heappop(self._free) for _ in range(count)]
        for i in ids:
            self._used[i] = 1
        return ids

    def release(self, ident: int) -> None:
        if not (0 <= ident < self.capacity) or not self._used[ident]:
            raise ValueError(f"id {ident} is not allocated")
        self._used[ident] = 0
        heapq.heappush(self._free, ident)


@dataclass
class Recipe:
    """How to rebuild a run of pages from tokens: one forward item over fresh pages.

    masks is [] when every token attended causally, else one BRLE per token
    over the pages' flat slots [0, i] (batch.py's convention).
    """

    num_pages: int
    last_page_len: int
    tokens: list[int]
    positions: list[int]
    masks: list[list[int]]

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict) -> Recipe:
        return cls(
            **{k: data[k] for k in ("num_pages", "last_page_len", "tokens", "positions", "masks")}
        )


@dataclass
class Export:
    name: str
    owner: str | None  # exporting instance; None for a persistent (engine-owned) export
    pages: list[int]  # physical pages, one reference each held by the export; [] while dormant
    num_pages: int
    recipe: Recipe | None = None  # persistent exports that can be rebuilt after a restart
    user: str | None = None  # whose export quota it counts against (the exporter's user)

    @property
    def dormant(self) -> bool:
        """Restored from disk and not yet recomputed: no physical pages yet."""
        return not self.pages


@dataclass
class _Instance:
    order: int  # launch order on this model: larger is newer
    user: str | None = None  # token subject of the instance's connection
    pages: dict[int, int] = field(default_factory=dict)  # virtual -> physical
    embeds: dict[int, int] = field(default_factory=dict)


def _check_unique(what: str, ids: list[int]) -> None:
    if len(set(ids)) != len(ids):
        raise InstanceFault(f"{what}: duplicate ids in {ids}")


class Resources:
    """Every instance's KV pages and embeds on one model, plus the export catalogue."""

    def __init__(
        self,
        num_pages: int,
        num_embeds: int,
        page_size: int,
        instance_cap: int | None = None,
        user_cap: int | None = None,
        export_cap: int | None = None,
    ) -> None:
        self.page_size = page_size
        self.instance_cap = instance_cap  # most KV pages one instance may map; None: the pool
        self.user_cap = user_cap  # most KV pages one user's instances may map together
        self.export_cap = export_cap  # most KV pages one user's exports may hold together
        self.pages = PhysicalPool(num_pages)
        self.embeds = PhysicalPool(num_embeds)
        self._refs = [0] * num_pages
        # Staged pages: work that is not yet sent to the worker (the open batch, the waiting rest
        # of a split item) names them. A staged page is freed only once that work is sent
        # (unstage), so that no other instance's job can reach the worker ahead of it and find
        # its page reused.
        self._staged: Counter[int] = Counter()
        self._deferred_free: set[int] = set()
        self._embed_holds = bytearray(num_embeds)  # per slot: HOLDS_TOKEN | HOLDS_DISTRIBUTION bits
        self._incarnation = [0] * num_pages  # bumps on every allocation of a physical page
        self._incarnations = itertools.count(1)
        self._slots: dict[int, list] = {}  # physical page -> per-slot record (see record_forward)
        self._instances: dict[str, _Instance] = {}
        self._launch = itertools.count()
        self.exports: dict[str, Export] = {}

    # ------------------------------------------------------------------ instances

    def register(self, instance: str, user: str | None = None) -> None:
        """Note an instance's launch order (first seen = oldest) and its user."""
        if instance not in self._instances:
            self._instances[instance] = _Instance(order=next(self._launch), user=user)
        elif user is not None:
            self._instances[instance].user = user

    def _inst(self, instance: str) -> _Instance:
        self.register(instance)
        return self._instances[instance]

    def holds(self, instance: str) -> tuple[int, int]:
        """(KV pages, embeds) mapped by an instance."""
        inst = self._instances.get(instance)
        return (len(inst.pages), len(inst.embeds)) if inst else (0, 0)

    def pages_of(self, instance: str) -> dict[int, int]:
        """An instance's page table, virtual -> physical (a copy)."""
        inst = self._instances.get(instance)
        return dict(inst.pages) if inst else {}

    def release_instance(self, instance: str) -> None:
        """Free everything the instance maps and drop the non-persistent exports it owns."""
        inst = self._instances.pop(instance, None)
        if inst is None:
            return
        for page in inst.pages.values():
            self._unref(page)
        for slot in inst.embeds.values():
            self.embeds.release(slot)
        for name in [n for n, e in self.exports.items() if e.owner == instance]:
            self._drop_export(name)

    # ------------------------------------------------------------------ KV pages

    def translate_pages(self, instance: str, ids: list[int]) -> list[int]:
        pages = self._instances[instance].pages if instance in self._instances else {}
        try:
            return [pages[i] for i in ids]
        except KeyError as e:
            raise InstanceFault(f"KV page {e.args[0]} is not allocated") from None

    def translate_embeds(self, instance: str, ids: list[int]) -> list[int]:
        embeds = self._instances[instance].embeds if instance in self._instances else {}
        try:
            return [embeds[i] for i in ids]
        except KeyError as e:
            raise InstanceFault(f"embed {e.args[0]} is not allocated") from None

    def _check_new_page_ids(self, instance: str, ids: list[int], what: str) -> None:
        _check_unique(what, ids)
        mapped = self._inst(instance).pages
        used = [i for i in ids if i in mapped]
        if used:
            raise InstanceFault(f"{what}: KV page ids already in use: {used}")

    def check_allocate_pages(self, instance: str, ids: list[int]) -> None:
        self._check_new_page_ids(instance, ids, "allocate_kv_pages")
        self._check_cap(instance, len(ids), "allocate_kv_pages")

    def _check_cap(self, instance: str, count: int, what: str) -> None:
        """InstanceFault if mapping `count` more pages would pass the instance's or its user's cap."""
        me = self._inst(instance)
        held = len(me.pages)
        if self.instance_cap is not None and held + count > self.instance_cap:
            raise InstanceFault(
                f"{what}: KV page cap reached: the instance maps {held} pages, "
                f"{count} more would pass its cap of {self.instance_cap} (kv_instance_pages)"
            )
        if self.user_cap is None or me.user is None:
            return
        mine = sum(len(i.pages) for i in self._instances.values() if i.user == me.user)
        if mine + count > self.user_cap:
            raise InstanceFault(
                f"{what}: KV page cap reached: user {me.user!r}'s instances map {mine} pages, "
                f"{count} more would pass the user cap of {self.user_cap} (kv_user_pages)"
            )

    def _check_export_quota(self, user: str | None, count: int, replaced: Export | None) -> None:
        """InstanceFault if `count` more exported pages would pass the user's export quota."""
        if self.export_cap is None or user is None:
            return
        held = sum(e.num_pages for e in self.exports.values() if e.user == user)
        if replaced is not None and replaced.user == user:
            held -= replaced.num_pages
        if held + count > self.export_cap:
            raise InstanceFault(
                f"export_kv_pages: export quota reached: user {user!r} exports {held} pages, "
                f"{count} more would pass {self.export_cap} (kv_user_export_pages)"
            )

    def allocate_pages(self, instance: str, ids: list[int]) -> None:
        """Map fresh physical pages (refcount 1) under ids; the caller made room first."""
        self.check_allocate_pages(instance, ids)
        physical = self.pages.acquire_many(len(ids))
        for page in physical:
            self._refs[page] = 1
            self._incarnation[page] = next(self._incarnations)
        self._inst(instance).pages.update(zip(ids, physical, strict=True))

    def deallocate_pages(self, instance: str, ids: list[int]) -> None:
        """Drop the instance's references; a page is freed when nobody references it."""
        physical = self.translate_pages(instance, ids)  # all or nothing
        _check_unique("deallocate_kv_pages", ids)
        mapped = self._instances[instance].pages
        for vid, page in zip(ids, physical, strict=True):
            del mapped[vid]
            self._unref(page)

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def _unref(self, page: int) -> None:
        self._refs[page] -= 1
        if self._refs[page] == 0:
            self._slots.pop(page, None)
            if self._staged[page]:
                self._deferred_free.add(page)
            else:
                self.pages.release(page)

    def stage(self, pages: Iterable[int]) -> None:
        """Work not yet sent to the worker names these physical pages (once each per call)."""
        self._staged.update(pages)

    def unstage(self, pages: Iterable[int]) -> None:
        """That work was sent (or dropped): free the pages whose release waited for it."""
        for page in pages:
            self._staged[page] -= 1
            if not self._staged[page]:
                del self._staged[page]
                if page in self._deferred_free:
                    self._deferred_free.discard(page)
                    self.pages.release(page)

    # ------------------------------------------------------------------ embeds

    def allocate_embeds(self, instance: str, ids: list[int]) -> None:
        """Fresh slots under ids; an id already mapped gets a fresh slot and its old one is freed."""
        _check_unique("allocate_embeds", ids)
        embeds = self._inst(instance).embeds
        fresh = self.embeds.acquire_many(len(ids))
        for vid, slot in zip(ids, fresh, strict=True):
            self._embed_holds[slot] = 0
            old = embeds.get(vid)
            if old is not None:
                self.embeds.release(old)
            embeds[vid] = slot

    def deallocate_embeds(self, instance: str, ids: list[int]) -> None:
        slots = self.translate_embeds(instance, ids)
        _check_unique("deallocate_embeds", ids)
        embeds = self._instances[instance].embeds
        for vid, slot in zip(ids, slots, strict=True):
            del embeds[vid]
            self.embeds.release(slot)

    def mark_embeds(self, slots: list[int], what: int) -> None:
        """Slots now hold a token (embed_text) or a distribution (forward's output embeds)."""
        for slot in slots:
            self._embed_holds[slot] |= what

    def check_embeds(self, slots: list[int], what: int, message: str) -> None:
        """InstanceFault(message + the empty ids) unless every slot holds `what`.

        A worker refuses a batch that reads an empty slot, which would fail the
        other instances' items in that batch too; this catches it first (and a
        fresh slot never shows a previous owner's data).
        """
        empty = [s for s in slots if not self._embed_holds[s] & what]
        if empty:
            raise InstanceFault(f"{message} (physical slots {empty[:8]})")

    # ------------------------------------------------------------------ contention

    def fair_share(self) -> float:
        """KV pages each instance may hold under contention: the pool split evenly between them."""
        return self.pages.capacity / max(1, len(self._instances))

    def eviction_victims(self, instance: str, kind: str, count: int) -> list[str] | None:
        """Instances to evict so that `count` pages (kind 'kv') or embeds ('embed') are free.

        [] if there is room already. For KV pages, when the requester stays
        within its fair share (fair_share) after the request, the instances
        holding the most pages beyond theirs go first, so that a hog cannot
        starve a newcomer. Otherwise (and for embeds) only instances newer than
        the requester, newest first. Only as many as needed; None if that
        would not make room (then the requester fails and nobody is evicted).
        """
        pool = self.pages if kind == "kv" else self.embeds
        if pool.available >= count:
            return []
        me = self._inst(instance)
        if kind == "kv":
            share = self.fair_share()
            if len(me.pages) + count <= share:
                hogs = sorted(
                    (i for i, r in self._instances.items() if len(r.pages) > share),
                    key=lambda i: len(self._instances[i].pages),
                    reverse=True,
                )
                victims = self._enough(hogs, kind, count)
                if victims is not None:
                    return victims
        newer = sorted(
            (i for i, r in self._instances.items() if r.order > me.order),
            key=lambda i: self._instances[i].order,
            reverse=True,
        )
        return self._enough(newer, kind, count)

    def _enough(self, candidates: list[str], kind: str, count: int) -> list[str] | None:
        """The first candidates whose eviction frees `count` ids of kind, or None if all do not."""
        pool = self.pages if kind == "kv" else self.embeds
        refs = list(self._refs) if kind == "kv" else None
        free = pool.available
        victims = []
        for victim in candidates:
            held = self._instances[victim]
            if kind == "kv":
                for page in held.pages.values():
                    refs[page] -= 1
                    free += refs[page] == 0
            else:
                free += len(held.embeds)
            victims.append(victim)
            if free >= count:
                return victims
        return None

    # ------------------------------------------------------------------ exports

    def list_exports(self) -> list[tuple[str, int]]:
        return [(name, e.num_pages) for name, e in self.exports.items()]

    def export(
        self, instance: str, ids: list[int], name: str, persistent: bool, with_recipe: bool = False
    ) -> Export:
        """Publish the pages behind ids under name (the export takes its own references).

        Re-exporting a name replaces the entry and releases the old one's
        references (Pie bug §10.10), but only the owner may replace a
        non-persistent export.
        """
        if not name:
            raise InstanceFault("export_kv_pages: empty name")
        if not ids:
            raise InstanceFault("export_kv_pages: no pages")
        physical = self.translate_pages(instance, ids)
        old = self.exports.get(name)
        if old is not None and old.owner not in (None, instance):
            raise InstanceFault(
                f"export_kv_pages: the name {shown(name)!r} is exported by another instance"
            )
        user = self._inst(instance).user
        self._check_export_quota(user, len(physical), old)
        for page in physical:
            self._refs[page] += 1
        if old is not None:
            self._drop_export(name)
        recipe = self.recipe_for(physical) if persistent and with_recipe else None
        entry = Export(
            name, None if persistent else instance, physical, len(physical), recipe, user
        )
        self.exports[name] = entry
        return entry

    def unexport(self, instance: str, name: str) -> Export:
        """Remove an entry: only its owner may, or anyone for a persistent one (Pie's rule)."""
        entry = self.exports.get(name)
        if entry is None:
            raise InstanceFault(f"unexport_kv_pages: no export named {shown(name)!r}")
        if entry.owner not in (None, instance):
            raise InstanceFault(
                f"unexport_kv_pages: {shown(name)!r} is exported by another instance"
            )
        self._drop_export(name)
        return entry

    def _drop_export(self, name: str) -> None:
        for page in self.exports.pop(name).pages:
            self._unref(page)

    def lookup_export(self, instance: str, ids: list[int], name: str) -> Export:
        """The export an import_kv_pages(ids, name) would map, after checking the ids."""
        entry = self.exports.get(name)
        if entry is None:
            raise InstanceFault(f"import_kv_pages: no export named {shown(name)!r}")
        if len(ids) != entry.num_pages:
            raise InstanceFault(
                f"import_kv_pages: {shown(name)!r} has {entry.num_pages} pages but {len(ids)} ids were given"
            )
        self._check_new_page_ids(instance, ids, "import_kv_pages")
        self._check_cap(instance, len(ids), "import_kv_pages")
        return entry

    def import_pages(self, instance: str, ids: list[int], name: str) -> None:
        """Map ids onto the exported physical pages (shared, refcount +1, no copy)."""
        entry = self.lookup_export(instance, ids, name)
        if entry.dormant:
            raise InstanceFault(f"import_kv_pages: {shown(name)!r} is not recomputed yet")
        for page in entry.pages:
            self._refs[page] += 1
        self._inst(instance).pages.update(zip(ids, entry.pages, strict=True))

    def restore(self, name: str, recipe: Recipe, user: str | None = None) -> None:
        """A persistent export read back from disk, dormant until its first import."""
        self.exports[name] = Export(name, None, [], recipe.num_pages, recipe, user)

    def revive(self, name: str, physical: list[int]) -> None:
        """Give a dormant export pages (taken from an importer's fresh allocation: +1 ref each)."""
        for page in physical:
            self._refs[page] += 1
        self.exports[name].pages = list(physical)

    def unrevive(self, name: str) -> None:
        """Back to dormant after a failed recompute: the export lets go of its pages."""
        entry = self.exports[name]
        pages, entry.pages = entry.pages, []
        for page in pages:
            self._unref(page)

    # ------------------------------------------------------------------ what the slots hold

    def record_forward(
        self,
        pages: list[int],
        last_page_len: int,
        tokens: list[int],
        positions: list[int],
        masks: list[list[int]],
    ) -> None:
        """Note what a forward_text item writes: per slot (token, position, context, flat index, row)."""
        ps = self.page_size
        total = context_len(ps, len(pages), last_page_len)
        start = total - len(tokens)
        context = tuple(self._incarnation[p] for p in pages)
        for i, (token, position) in enumerate(zip(tokens, positions, strict=True)):
            flat = start + i
            row = tuple(masks[i]) if masks else None
            self._slot_list(pages[flat // ps])[flat % ps] = (token, position, context, flat, row)

    def record_opaque(self, pages: list[int], last_page_len: int, count: int) -> None:
        """Slots written by the embedding path: their content cannot be replayed from tokens."""
        ps = self.page_size
        total = context_len(ps, len(pages), last_page_len)
        for flat in range(total - count, total):
            self._slot_list(pages[flat // ps])[flat % ps] = OPAQUE

    def record_copy(self, src: int, dst: int, src_offset: int, dst_offset: int, size: int) -> None:
        source = self._slot_list(src)[src_offset : src_offset + size]
        self._slot_list(dst)[dst_offset : dst_offset + size] = source

    def _slot_list(self, page: int) -> list:
        slots = self._slots.get(page)
        if slots is None:
            slots = self._slots[page] = [None] * self.page_size
        return slots

    def recipe_for(self, pages: list[int]) -> Recipe | None:
        """The forward item that rebuilds these pages, or None if they cannot be replayed.

        Replayable: the written slots form one run from the first slot (only the
        last page may end early), every slot came from forward_text, and every
        slot it attended to lies in these pages, before it.
        """
        ps = self.page_size
        where = {self._incarnation[p]: i for i, p in enumerate(pages)}
        records = [r for p in pages for r in self._slots.get(p, [None] * ps)]
        length = next((i for i, r in enumerate(records) if r is None), len(records))
        if length <= context_len(ps, len(pages), 0) or any(r is not None for r in records[length:]):
            return None
        tokens, positions, masks = [], [], []
        causal = True
        for flat, record in enumerate(records[:length]):
            if record is OPAQUE:
                return None
            token, position, context, ctx_flat, row = record
            attended = _attended_runs(context, ctx_flat, row, where, ps)
            if attended is None or (attended and attended[-1][1] > flat + 1):
                return None
            brle = _to_brle(attended, flat + 1)
            causal = causal and brle == [flat + 1]
            tokens.append(token)
            positions.append(position)
            masks.append(brle)
        last = length - context_len(ps, len(pages), 0)
        return Recipe(len(pages), last, tokens, positions, [] if causal else masks)


def _attended_runs(
    context: tuple, ctx_flat: int, row: tuple | None, where: dict, ps: int
) -> list[tuple[int, int]] | None:
    """The slots a recorded token attended to, as sorted [a, b) ranges over the export's flat slots.

    None if one of them lies outside the export.
    """
    spans = [(0, ctx_flat + 1)] if row is None else list(_brle_attended(row))
    out: list[tuple[int, int]] = []
    for a, b in spans:
        while a < b:
            page_index, offset = divmod(a, ps)
            end = min(b, (page_index + 1) * ps)
            target = where.get(context[page_index])
            if target is None:
                return None
            out.append((target * ps + offset, target * ps + offset + end - a))
            a = end
    out.sort()
    merged: list[tuple[int, int]] = []
    for a, b in out:
        if merged and merged[-1][1] >= a:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _brle_attended(row: tuple) -> list[tuple[int, int]]:
    """[a, b) ranges of the attended runs of a BRLE row (runs alternate, attended first)."""
    spans, at = [], 0
    for i, run in enumerate(row):
        if i % 2 == 0 and run:
            spans.append((at, at + run))
        at += run
    return spans


def _to_brle(attended: list[tuple[int, int]], length: int) -> list[int]:
    """BRLE over [0, length) of sorted, disjoint attended ranges (runs alternate, attended first)."""
    runs: list[int] = []

    def push(attend: bool, count: int) -> None:
        if count == 0:
            return
        if runs and (len(runs) % 2 == 1) == attend:  # the last run has this kind
            runs[-1] += count
            return
        if not runs and not attend:
            runs.append(0)
        runs.append(count)

    at = 0
    for a, b in attended:
        push(False, a - at)
        push(True, b - a)
        at = b
    push(False, length - at)
    return runs

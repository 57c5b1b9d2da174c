"""How much memory the KV pool may take, and so how many pages it gets.

When `num_pages` is not given, the pool is sized from the memory left once the
weights are loaded: on CPU from /proc/meminfo's MemAvailable (and the cgroup's
memory.max, where one is set: a container's limit is what the kernel enforces,
whatever the host has free) minus a headroom for activations, the sandboxes and
other processes; on CUDA from `torch.cuda.mem_get_info()` after the caching
allocator has released what it holds (without that, blocks freed by the load
stay reserved and a small GPU reports no room at all), times a fraction. Both
are capped by `max_pages`. `size_kv_pool` is the arithmetic alone, so it is
tested on made-up numbers; the readers beside it fetch the real ones.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass
from pathlib import Path

from pie.interfaces import PieError

DEFAULT_CPU_MAX_PAGES = 1024  # a CPU pool beyond this is seldom used and always resident
MIN_PAGES = 16  # fewer than this serves no real prompt: refuse instead
UNLIMITED = 1 << 62


@dataclass(frozen=True)
class KvPolicy:
    """The settings that size an unsized pool (pie.config: kv_headroom_bytes, ...)."""

    headroom_bytes: int = 2 << 30  # CPU: left free after the pool
    cuda_fraction: float = 0.8  # CUDA: share of the free memory the pool takes
    max_pages: int = 0  # 0: DEFAULT_CPU_MAX_PAGES on CPU, no cap on CUDA


@dataclass(frozen=True)
class Available:
    """Memory the pool could take, and where that figure came from."""

    bytes: int
    source: str  # e.g. "MemAvailable", "cgroup memory.max - memory.current", "free on cuda:0"


@dataclass(frozen=True)
class KvSizing:
    """How many pages the pool has and why (the log line and model_status say `reason`)."""

    pages: int
    page_bytes: int
    reason: str

    @property
    def bytes(self) -> int:
        return self.pages * self.page_bytes


def human(n: float) -> str:
    """Bytes as MiB below a GiB, else GiB with one decimal."""
    return f"{n / 2**20:.0f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"


def explicit(pages: int, page_bytes: int) -> KvSizing:
    return KvSizing(
        pages, page_bytes, f"{pages} pages = {human(pages * page_bytes)}: num_pages set"
    )


def size_kv_pool(
    page_bytes: int, device_type: str, available: Available, policy: KvPolicy
) -> KvSizing:
    """Pages of `page_bytes` that fit `available` under `policy`; PieError if fewer than MIN_PAGES."""
    if page_bytes < 1:
        raise PieError(f"bad KV page size: {page_bytes} bytes")
    if device_type == "cpu":
        budget = available.bytes - policy.headroom_bytes
        how = (
            f"{human(available.bytes)} available ({available.source}) "
            f"- {human(policy.headroom_bytes)} headroom (kv_headroom_bytes)"
        )
        cap = policy.max_pages or DEFAULT_CPU_MAX_PAGES
    else:
        budget = int(available.bytes * policy.cuda_fraction)
        how = f"{policy.cuda_fraction:g} (kv_memory_fraction) x {human(available.bytes)} {available.source}"
        cap = policy.max_pages or UNLIMITED
    fit = max(0, budget) // page_bytes
    pages = min(fit, cap)
    if pages < MIN_PAGES:
        raise PieError(
            f"no room for a KV pool: {how} leaves {fit} pages of {human(page_bytes)}, "
            f"fewer than {MIN_PAGES}; set num_pages, or lower kv_headroom_bytes / "
            "raise kv_memory_fraction"
        )
    capped = f", capped at max_kv_pages ({cap})" if fit > cap else ""
    return KvSizing(
        pages, page_bytes, f"{pages} pages = {human(pages * page_bytes)}: {how}{capped}"
    )


def parse_meminfo(text: str) -> int | None:
    """MemAvailable in bytes from /proc/meminfo's text; None if it is not there."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def cgroup_room(max_text: str, current_text: str) -> int | None:
    """memory.max - memory.current (cgroup v2) in bytes; None when there is no limit ("max")."""
    limit = max_text.strip()
    if limit == "max":
        return None
    return max(0, int(limit) - int(current_text.strip()))


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii")
    except (OSError, ValueError):
        return None


def cpu_available(proc: Path = Path("/proc"), cgroup: Path = Path("/sys/fs/cgroup")) -> Available:
    """What a CPU allocation may take now: the smaller of MemAvailable and the cgroup's room.

    An allocation beyond it would be granted lazily by the kernel and the
    process killed later, when the pages are touched. Unlimited where neither
    is known (not Linux).
    """
    release_freed_memory()  # the load's freed temporaries count as available only once trimmed
    found = [Available(UNLIMITED, "unknown")]
    meminfo = _read(proc / "meminfo")
    if meminfo is not None and (avail := parse_meminfo(meminfo)) is not None:
        found.append(Available(avail, "MemAvailable"))
    limit, current = _read(cgroup / "memory.max"), _read(cgroup / "memory.current")
    if (
        limit is not None
        and current is not None
        and (room := cgroup_room(limit, current)) is not None
    ):
        found.append(Available(room, "cgroup memory.max - memory.current"))
    return min(found, key=lambda a: a.bytes)


def cuda_available(device: object) -> Available:
    """Free memory on a CUDA device once the caching allocator has given back its idle blocks."""
    import torch

    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return Available(free, f"free on {device} after empty_cache")


@functools.cache
def _malloc_trim() -> object | None:
    """glibc's malloc_trim, looked up once (find_library runs ldconfig); None elsewhere."""
    name = ctypes.util.find_library("c")
    return None if name is None else getattr(ctypes.CDLL(name), "malloc_trim", None)


def release_freed_memory() -> bool:
    """Give the heap's freed pages back to the OS (glibc malloc_trim); False where unavailable.

    Why: loading dequantizes and converts the weights through temporaries of
    several hundred MB; glibc keeps them in its arenas after they are freed,
    so without this the daemon stays ~350 MB above weights + KV pool for its
    whole life (SmolLM2-135M on CPU: 1304 -> 948 MiB, see docs/limits.md).
    The daemon also calls it every `memory_trim_interval_s` (pie.tap.memory_trimmer).
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True

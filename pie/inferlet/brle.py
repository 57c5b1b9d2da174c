"""Binary run-length encoded masks (BRLE), the attention-mask format on Pie's wire.

A Brle is a sequence of booleans where True means *masked out* (the token is
not attended) and False means visible. It is stored as run lengths that
alternate False/True and always start with a False run (which may be 0 long
when the sequence starts with True). `buffer` is exactly what goes over the
wire to `forward_text` (pie.engine.batch: "runs start with attended slots").

Masks of long contexts are mostly one or two runs, so run storage keeps the
per-token mask snapshots a Context takes cheap.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class Brle:
    """A boolean sequence (True = masked) stored as alternating run lengths."""

    __slots__ = ("buffer", "_len")

    def __init__(self, size: int = 0) -> None:
        """`size` visible (False) entries, like Pie's Brle::new(n)."""
        if size < 0:
            raise ValueError(f"Brle size must be >= 0, got {size}")
        self.buffer: list[int] = [size] if size else []
        self._len = size

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_list(cls, flags: Iterable[bool]) -> Brle:
        """Encode a list of booleans (True = masked)."""
        out = cls()
        out.extend(flags)
        return out

    from_slice = from_list  # Pie's name

    @classmethod
    def from_buffer(cls, buffer: Iterable[int]) -> Brle:
        """Adopt a run-length buffer (as received or stored); validates it."""
        runs = [int(r) for r in buffer]
        if any(r < 0 for r in runs):
            raise ValueError(f"BRLE runs must be >= 0: {runs}")
        out = cls()
        value = False
        for run in runs:
            out._append_run(value, run)
            value = not value
        return out

    def copy(self) -> Brle:
        out = Brle()
        out.buffer = list(self.buffer)
        out._len = self._len
        return out

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return self._len

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Brle) and self.buffer == other.buffer

    def __repr__(self) -> str:
        return f"Brle({self.buffer})"

    def iter_runs(self) -> Iterator[tuple[bool, int, int]]:
        """(value, start, end) of every non-empty run, in order."""
        start = 0
        value = False
        for run in self.buffer:
            if run:
                yield value, start, start + run
            start += run
            value = not value

    def to_list(self) -> list[bool]:
        out: list[bool] = []
        for value, start, end in self.iter_runs():
            out.extend([value] * (end - start))
        return out

    to_vec = to_list  # Pie's name

    def __getitem__(self, index: int) -> bool:
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"Brle index {index} out of range (len {self._len})")
        for value, _start, end in self.iter_runs():
            if index < end:
                return value
        raise AssertionError("unreachable")

    def is_masked(self, indices: Iterable[int]) -> list[bool]:
        """The value at each index."""
        return [self[i] for i in indices]

    def is_range_all_value(self, start: int, end: int, value: bool) -> bool:
        """True if every entry in [start, end) equals value (vacuously True if empty)."""
        self._check_range(start, end)
        if start == end:
            return True
        for run_value, run_start, run_end in self.iter_runs():
            if run_end > start and run_start < end and run_value != value:
                return False
        return True

    def count(self, value: bool = True) -> int:
        return sum(end - start for v, start, end in self.iter_runs() if v == value)

    # ------------------------------------------------------------------ edits
    def append(self, flag: bool) -> None:
        self._append_run(bool(flag), 1)

    def extend(self, flags: Iterable[bool]) -> None:
        for flag in flags:
            self._append_run(bool(flag), 1)

    def extend_value(self, value: bool, count: int) -> None:
        """Append `count` copies of value (one run, O(1))."""
        if count < 0:
            raise ValueError("count must be >= 0")
        self._append_run(bool(value), count)

    def mask(self, indices: Iterable[int], flag: bool = True) -> None:
        """Set each index to flag."""
        for i in indices:
            self.mask_range(i, i + 1, flag)

    def mask_range(self, start: int, end: int, flag: bool = True) -> None:
        """Set [start, end) to flag."""
        self._check_range(start, end)
        if start == end:
            return
        self._rebuild(
            [(v, s, e) for v, s, e in self._clipped(0, start)]
            + [(bool(flag), start, end)]
            + [(v, s, e) for v, s, e in self._clipped(end, self._len)]
        )

    def remove(self, index: int) -> None:
        self.remove_range(index, index + 1)

    def remove_range(self, start: int, end: int) -> None:
        """Delete entries [start, end); later entries shift down."""
        self._check_range(start, end)
        if start == end:
            return
        self._rebuild(self._clipped(0, start) + self._clipped(end, self._len))

    # ------------------------------------------------------------------ internals
    def _check_range(self, start: int, end: int) -> None:
        if not 0 <= start <= end <= self._len:
            raise IndexError(f"range [{start}, {end}) out of bounds for Brle of length {self._len}")

    def _append_run(self, value: bool, count: int) -> None:
        if count == 0:
            return
        if self.buffer and (len(self.buffer) % 2 == 0) == value:
            self.buffer[-1] += count  # the last run (odd index = True) has this value
        elif not self.buffer and value:
            self.buffer.extend([0, count])
        else:
            self.buffer.append(count)
        self._len += count

    def _clipped(self, start: int, end: int) -> list[tuple[bool, int, int]]:
        return [
            (v, max(s, start), min(e, end)) for v, s, e in self.iter_runs() if e > start and s < end
        ]

    def _rebuild(self, runs: list[tuple[bool, int, int]]) -> None:
        self.buffer = []
        self._len = 0
        for value, start, end in runs:
            self._append_run(value, end - start)

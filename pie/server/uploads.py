"""Assembling a chunked program upload, with the checks Pie 0.1.1 skipped.

A client splits a program into chunks of at most 256 KiB and sends them in
order, all with the same corr_id, program_hash and total_chunks. The seed only
compared the hash at the end; here chunk size, order, a consistent total and
the per-program size limit are checked as chunks arrive, so a bad upload is
refused once, early, and nothing of it is kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import blake3

from pie.interfaces import PieError

CHUNK_SIZE_BYTES = 256 * 1024
DEFAULT_MAX_PROGRAM_SIZE = 32 * 1024 * 1024
DEFAULT_UPLOAD_BYTES_IN_FLIGHT = 256 * 1024 * 1024
DEFAULT_UPLOAD_IDLE_TIMEOUT_S = 60
_HASH_RE = re.compile(r"[0-9a-f]{64}")


class UploadError(PieError):
    """The upload is refused; str(self) is the reason sent to the client.

    `dropped` is the upload that was in flight and is discarded with it (it may
    belong to another corr_id, whose sender then needs telling too).
    """

    dropped: Upload | None = None


def hash_program(data: bytes) -> str:
    """Program identity: lowercase hex BLAKE3-256 of the uploaded bytes."""
    return blake3.blake3(data).hexdigest()


def check_program_hash(program_hash: str) -> str:
    """Return the hash normalised to lowercase, or raise UploadError if it is not one."""
    normalised = program_hash.lower()
    if not _HASH_RE.fullmatch(normalised):
        raise UploadError(
            f"invalid program hash {program_hash[:80]!r}: expected 64 hex characters (BLAKE3)"
        )
    return normalised


@dataclass
class Upload:
    """One upload in progress on one connection."""

    corr_id: int
    program_hash: str
    total_chunks: int
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    hasher: Any = field(default_factory=blake3.blake3)  # hashed chunk by chunk, as they come


class UploadBudget:
    """Bytes that unfinished uploads hold, daemon-wide, against `upload_bytes_in_flight`.

    Each connection may hold one partial upload of up to max_program_size; without a
    shared bound, many connections that start uploads and never finish them hold that
    much memory each. A chunk that would pass the bound is refused (its upload dropped),
    and an upload gives its bytes back when it completes or is dropped.
    """

    def __init__(self, limit: int = DEFAULT_UPLOAD_BYTES_IN_FLIGHT) -> None:
        self.limit = limit
        self.held = 0

    def reserve(self, size: int) -> None:
        if self.held + size > self.limit:
            raise UploadError(
                f"unfinished uploads hold {self.held} bytes; {size} more would pass "
                f"upload_bytes_in_flight = {self.limit}: try again later"
            )
        self.held += size

    def release(self, size: int) -> None:
        self.held -= size


class UploadAssembler:
    """Per-connection state: at most one upload in flight.

    `add_chunk` returns the complete program once its last chunk arrived and
    the hash matched, None while more chunks are expected, and raises
    UploadError on any violation (the upload is then dropped). After a failure
    the remaining chunks of that same upload are ignored silently, so the
    client gets exactly one failure response.
    """

    def __init__(
        self,
        max_program_size: int = DEFAULT_MAX_PROGRAM_SIZE,
        budget: UploadBudget | None = None,
    ) -> None:
        self.max_program_size = max_program_size
        self.budget = budget if budget is not None else UploadBudget()
        self.current: Upload | None = None
        self._abandoned: tuple[int, str] | None = None

    def is_leftover(self, corr_id: int, program_hash: str, chunk_index: int) -> bool:
        """True for a later chunk of an upload that already failed (to be ignored)."""
        return chunk_index > 0 and self._abandoned == (corr_id, program_hash.lower())

    def abandon(self) -> Upload | None:
        """Drop the upload in flight (if any) and return it."""
        upload, self.current = self.current, None
        if upload is not None:
            self._abandoned = (upload.corr_id, upload.program_hash)
            self.budget.release(upload.size)
        return upload

    def add_chunk(
        self, corr_id: int, program_hash: str, chunk_index: int, total_chunks: int, data: bytes
    ) -> bytes | None:
        program_hash = program_hash.lower()
        try:
            return self._add_chunk(corr_id, program_hash, chunk_index, total_chunks, data)
        except UploadError as e:
            e.dropped = self.abandon()
            self._abandoned = (corr_id, program_hash)
            raise

    def _add_chunk(
        self, corr_id: int, program_hash: str, chunk_index: int, total_chunks: int, data: bytes
    ) -> bytes | None:
        if chunk_index == 0:
            self._abandoned = None
            if self.current is not None:  # superseded: the caller tells its sender
                self.budget.release(self.current.size)
                self.current = None
            self.current = self._begin(corr_id, program_hash, total_chunks)
        upload = self.current
        if upload is None:
            raise UploadError(
                f"out-of-order chunk: expected chunk 0 to start an upload, got {chunk_index}"
            )
        if program_hash != upload.program_hash:
            raise UploadError(
                f"program_hash changed during upload: was {upload.program_hash}, now {program_hash}"
            )
        if total_chunks != upload.total_chunks:
            raise UploadError(
                f"mismatch in total_chunks: was {upload.total_chunks}, now {total_chunks}"
            )
        if chunk_index != len(upload.chunks):
            raise UploadError(
                f"out-of-order chunk: expected {len(upload.chunks)}, got {chunk_index}"
            )
        if len(data) > CHUNK_SIZE_BYTES:
            raise UploadError(f"chunk size {len(data)} exceeds limit {CHUNK_SIZE_BYTES}")
        if upload.size + len(data) > self.max_program_size:
            raise UploadError(f"program exceeds the size limit of {self.max_program_size} bytes")
        self.budget.reserve(len(data))
        upload.chunks.append(data)
        upload.size += len(data)
        upload.hasher.update(data)
        if chunk_index < total_chunks - 1:
            return None
        self.current = None
        self.budget.release(upload.size)
        actual = upload.hasher.hexdigest()
        if actual != upload.program_hash:
            raise UploadError(f"hash mismatch: expected {upload.program_hash}, got {actual}")
        return b"".join(upload.chunks)

    def _begin(self, corr_id: int, program_hash: str, total_chunks: int) -> Upload:
        program_hash = check_program_hash(program_hash)
        if total_chunks < 1:
            raise UploadError("total_chunks must be at least 1")
        max_chunks = -(-self.max_program_size // CHUNK_SIZE_BYTES)
        if total_chunks > max(max_chunks, 1):
            raise UploadError(
                f"total_chunks {total_chunks} would exceed the program size limit of "
                f"{self.max_program_size} bytes"
            )
        return Upload(corr_id=corr_id, program_hash=program_hash, total_chunks=total_chunks)

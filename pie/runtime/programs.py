"""The content-addressed program store.

A program is the exact bytes a client uploaded (a .py source or an archive of
modules); its identity is the lowercase blake3 hex digest of those bytes. Each
one lives in `<directory>/<hash>`, written atomically (temp file + fsync +
rename) so a crash never leaves a half program under a valid name. At start the
directory is rescanned and every file is registered under the hash of its
*content*, as Pie does: a renamed or hand-copied file is still found by what it
is. Disk work and hashing run in a thread pool (the runtime checks programs in its own).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import OrderedDict

import blake3
from twisted.internet.defer import fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from pie.interfaces import PieError

DEFAULT_MAX_PROGRAM_BYTES = 32 * 2**20
"""Uploads larger than this are refused (a source file or an archive of sources is far smaller)."""

CACHE_BYTES = 64 * 2**20
"""Program bytes kept in memory for fast launches; older entries are re-read from disk."""

_TEMP_PREFIX = ".upload-"
_HASH_RE = re.compile(r"[0-9a-f]{64}")


def program_hash(data: bytes) -> str:
    """The program identity: blake3 hex digest of the bytes (as on Pie's wire)."""
    return blake3.blake3(data).hexdigest()


def is_program_hash(value: object) -> bool:
    return isinstance(value, str) and _HASH_RE.fullmatch(value) is not None


class ProgramStore:
    """Programs by hash: on disk, with a bounded in-memory cache of their bytes."""

    log = Logger()

    def __init__(self, directory: str, reactor, max_size: int = DEFAULT_MAX_PROGRAM_BYTES):
        self.directory = os.path.abspath(directory)
        self.max_size = max_size
        self._reactor = reactor
        self._paths: dict[str, str] = {}
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cached_bytes = 0

    # ------------------------------------------------------------------ start-up

    def scan(self) -> int:
        """Register every file of the directory by the hash of its content; returns the count.

        Runs once at service start, before clients are served, so it reads the
        files directly (programs are small; a few hundred hash in milliseconds).
        Leftover temp files of an interrupted upload are removed.
        """
        os.makedirs(self.directory, exist_ok=True)
        self._paths.clear()
        for entry in os.scandir(self.directory):
            if not entry.is_file(follow_symlinks=False):
                continue
            try:
                if entry.name.startswith(_TEMP_PREFIX):
                    os.unlink(entry.path)
                    continue
                data = _read(entry.path)
            except OSError as e:
                self.log.error("skipping unreadable program file {path}: {e}", path=entry.path, e=e)
                continue
            self._paths[program_hash(data)] = entry.path
        self.log.info(
            "program store {directory}: {count} programs",
            directory=self.directory,
            count=len(self._paths),
        )
        return len(self._paths)

    # ------------------------------------------------------------------ queries

    def exists(self, digest: str) -> bool:
        return digest in self._paths

    def hashes(self) -> list[str]:
        return sorted(self._paths)

    # ------------------------------------------------------------------ add / load

    def validate_size(self, data: bytes) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise PieError(f"a program must be bytes, not {type(data).__name__}")
        if len(data) == 0:
            raise PieError("empty program")
        if len(data) > self.max_size:
            raise PieError(
                f"program of {len(data)} bytes exceeds the limit of {self.max_size} bytes"
            )

    def add(self, data: bytes, digest: str | None = None):
        """Store validated bytes (`digest`: their hash if known); Deferred with it once on disk."""
        data = bytes(data)
        digest = digest or program_hash(data)
        if digest in self._paths:
            self._remember(digest, data)
            return succeed(digest)
        d = deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), self._write, digest, data
        )

        def stored(path: str) -> str:
            self._paths[digest] = path
            self._remember(digest, data)
            return digest

        return d.addCallback(stored)

    def load(self, digest: str):
        """Deferred firing with the program's bytes; PieError for an unknown hash."""
        if digest in self._cache:
            self._cache.move_to_end(digest)
            return succeed(self._cache[digest])
        path = self._paths.get(digest)
        if path is None:
            return fail(PieError(f"No such program with hash={digest}"))
        d = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), _read_hashed, path)

        def loaded(read: tuple[bytes, str]) -> bytes:
            data, actual = read
            if actual != digest:
                raise PieError(f"program {digest} changed on disk ({path})")
            self._remember(digest, data)
            return data

        def unreadable(failure):
            failure.trap(OSError)
            self._paths.pop(digest, None)
            raise PieError(f"program {digest} cannot be read: {failure.value}")

        return d.addCallbacks(loaded, unreadable)

    # ------------------------------------------------------------------ internals

    def _write(self, digest: str, data: bytes) -> str:
        """Temp file in the same directory, fsync, rename: all or nothing (runs in a thread)."""
        os.makedirs(self.directory, exist_ok=True)
        final = os.path.join(self.directory, digest)
        fd, temp = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, final)
        except BaseException:
            if os.path.exists(temp):
                os.unlink(temp)
            raise
        return final

    def _remember(self, digest: str, data: bytes) -> None:
        if digest in self._cache or len(data) > CACHE_BYTES:
            return
        self._cache[digest] = data
        self._cached_bytes += len(data)
        while self._cached_bytes > CACHE_BYTES:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= len(old)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _read_hashed(path: str) -> tuple[bytes, str]:
    """The file's bytes and their hash (in a thread: a program may be 32 MB)."""
    data = _read(path)
    return data, program_hash(data)

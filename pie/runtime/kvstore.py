"""The inferlets' persistent key-value store, on SQLite, one namespace per user.

Pie keeps one process-wide map shared by every instance of every user; pie
puts it in a SQLite file under PIE_HOME so that it survives a daemon restart
(Pie's WIT calls it a "persistent store"; Pie's own map did not persist), and
keeps each user's records apart (pie.namespaces: keys under
"shared/" are the one opt-in shared namespace). All SQLite work runs on one
dedicated thread, so the reactor never waits on the disk and the operations
of all instances are applied in the order they were issued (a set followed by
a get sees the set). A set or delete is committed before its Deferred fires
("durable on return").

Quotas: one value may hold `value_bytes`, and the records one user pays for
(its own and the shared ones it wrote last) `user_bytes` in total, counting
key and value bytes. A set past either fails with a PieError the guest sees;
nothing is written. Instances without a user are not counted.
"""

from __future__ import annotations

import sqlite3

from twisted.internet.defer import succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from pie.interfaces import PieError
from pie.namespaces import SHARED, scoped, user_prefix, visible

MAX_KEY_BYTES = 4096
DEFAULT_VALUE_BYTES = 16 * 2**20
DEFAULT_USER_BYTES = 256 * 2**20
LEGACY_USER = "anonymous"
"""Whom the records of a store written before namespaces belong to: the one user without auth."""

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS records (key TEXT PRIMARY KEY, value TEXT NOT NULL, "
    "payer TEXT NOT NULL, size INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS records_payer ON records (payer)",
)


class KeyValueStore:
    """get / set / delete / exists / list_keys for a user, each a Deferred, on one SQLite thread."""

    def __init__(
        self,
        path: str,
        reactor,
        value_bytes: int = DEFAULT_VALUE_BYTES,
        user_bytes: int = DEFAULT_USER_BYTES,
    ):
        self.path = path
        self.value_bytes = value_bytes
        self.user_bytes = user_bytes
        self._reactor = reactor
        self._pool: ThreadPool | None = None
        self._db: sqlite3.Connection | None = None
        self._usage: dict[str, int] = {}  # payer -> bytes (thread side, filled on first use)

    def start(self, pool=None) -> None:
        """Open for work on its own thread, or on `pool` (pie.inferlet.testing's inline one)."""
        if pool is None:
            pool = ThreadPool(minthreads=1, maxthreads=1, name="pie-kvstore")
            pool.start()
        self._pool = pool

    def stop(self):
        """Deferred fired once the database is closed and the thread has ended."""
        pool = self._pool
        if pool is None:
            return succeed(None)
        d = deferToThreadPool(self._reactor, pool, self._close)
        self._pool = None
        return d.addBoth(_pass_after, pool.stop)

    # ------------------------------------------------------------------ operations

    def get(self, key: str, user: str | None = None):
        return self._run(_get, _checked_key(user, key))

    def set(self, key: str, value: str, user: str | None = None):
        internal = _checked_key(user, key)
        if not isinstance(value, str):
            raise PieError(f"store value must be a string, not {type(value).__name__}")
        size = len(value.encode("utf-8"))
        if size > self.value_bytes:
            raise PieError(
                f"store value of {size} bytes exceeds {self.value_bytes} bytes (kv_store_value_bytes)"
            )
        return self._run(self._set, internal, value, user, size + len(key.encode("utf-8")))

    def delete(self, key: str, user: str | None = None):
        return self._run(self._delete, _checked_key(user, key))

    def exists(self, key: str, user: str | None = None):
        return self._run(_exists, _checked_key(user, key))

    def list_keys(self, user: str | None = None):
        return self._run(_list_keys, user)

    def usage(self, user: str):
        """Deferred: the bytes `user` pays for."""
        return self._run(self._used, user)

    # ------------------------------------------------------------------ the thread side

    def _run(self, operation, *args):
        if self._pool is None:
            raise PieError("the key-value store is not running")
        return deferToThreadPool(self._reactor, self._pool, self._call, operation, args)

    def _call(self, operation, args):
        if self._db is None:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            for statement in _SCHEMA:
                db.execute(statement)
            _migrate(db)
            self._db = db
        return operation(self._db, *args)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _used(self, db: sqlite3.Connection, payer: str) -> int:
        if payer not in self._usage:
            row = db.execute("SELECT COALESCE(SUM(size), 0) FROM records WHERE payer = ?", (payer,))
            self._usage[payer] = row.fetchone()[0]
        return self._usage[payer]

    def _set(self, db: sqlite3.Connection, key: str, value: str, user: str | None, size: int):
        """Write a record of `size` bytes (the key as the user gave it, and the value)."""
        payer = user or ""
        old = db.execute("SELECT payer, size FROM records WHERE key = ?", (key,)).fetchone()
        used = self._used(db, payer) - (old[1] if old and old[0] == payer else 0)
        if user is not None and used + size > self.user_bytes:
            raise PieError(
                f"key-value store quota reached: user {user!r} stores {used} bytes, this "
                f"record of {size} bytes would pass {self.user_bytes} (kv_store_user_bytes)"
            )
        db.execute(
            "INSERT OR REPLACE INTO records (key, value, payer, size) VALUES (?, ?, ?, ?)",
            (key, value, payer, size),
        )
        if old is not None:
            self._usage[old[0]] = self._used(db, old[0]) - old[1]
        self._usage[payer] = self._used(db, payer) + size

    def _delete(self, db: sqlite3.Connection, key: str) -> None:
        old = db.execute("SELECT payer, size FROM records WHERE key = ?", (key,)).fetchone()
        if old is not None:
            db.execute("DELETE FROM records WHERE key = ?", (key,))
            self._usage[old[0]] = self._used(db, old[0]) - old[1]


def _checked_key(user: str | None, key: str) -> str:
    """The internal key behind a user's key (see pie.namespaces)."""
    if not isinstance(key, str):
        raise PieError(f"store key must be a string, not {type(key).__name__}")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise PieError(f"store key exceeds {MAX_KEY_BYTES} bytes")
    return scoped(user, key)


def _migrate(db: sqlite3.Connection) -> None:
    """Move the records of a store from before namespaces (table kv) to LEGACY_USER's namespace."""
    if not db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='kv'").fetchone():
        return
    db.execute("BEGIN IMMEDIATE")
    for key, value in db.execute("SELECT key, value FROM kv").fetchall():
        size = len(key.encode("utf-8")) + len(value.encode("utf-8"))
        db.execute(
            "INSERT OR IGNORE INTO records (key, value, payer, size) VALUES (?, ?, ?, ?)",
            (scoped(LEGACY_USER, key), value, LEGACY_USER, size),
        )
    db.execute("DROP TABLE kv")
    db.execute("COMMIT")


def _get(db: sqlite3.Connection, key: str) -> str | None:
    row = db.execute("SELECT value FROM records WHERE key = ?", (key,)).fetchone()
    return None if row is None else row[0]


def _exists(db: sqlite3.Connection, key: str) -> bool:
    return db.execute("SELECT 1 FROM records WHERE key = ?", (key,)).fetchone() is not None


def _list_keys(db: sqlite3.Connection, user: str | None) -> list[str]:
    """The keys `user` sees, as it named them: its own and the shared ones, sorted."""
    if user is None:
        return [row[0] for row in db.execute("SELECT key FROM records ORDER BY key")]
    rows = db.execute(
        "SELECT key FROM records WHERE key GLOB ? OR key GLOB ?",
        (user_prefix(user) + "*", SHARED + "*"),
    )
    return sorted(visible(user, row[0]) for row in rows)


def _pass_after(result, action):
    action()
    return result

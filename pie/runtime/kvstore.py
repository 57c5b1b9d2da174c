"""The inferlets' persistent key-value store, on SQLite.

Pie keeps one process-wide map shared by every instance of every user; pie
keeps the same sharing but puts it in a SQLite file under PIE_HOME so that it
survives a daemon restart (Pie's WIT calls it a "persistent store"; Pie's own
map did not persist). All SQLite work runs on one dedicated thread, so the
reactor never waits on the disk and the operations of all instances are
applied in the order they were issued (a set followed by a get sees the set).
A set or delete is committed before its Deferred fires ("durable on return").
"""

from __future__ import annotations

import sqlite3

from twisted.internet.defer import succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from pie.interfaces import PieError

MAX_KEY_BYTES = 4096
MAX_VALUE_BYTES = 16 * 2**20

_SCHEMA = "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID"


class KeyValueStore:
    """get / set / delete / exists / list_keys, each a Deferred, on one SQLite thread."""

    def __init__(self, path: str, reactor):
        self.path = path
        self._reactor = reactor
        self._pool: ThreadPool | None = None
        self._db: sqlite3.Connection | None = None

    def start(self) -> None:
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="pie-kvstore")
        self._pool.start()

    def stop(self):
        """Deferred fired once the database is closed and the thread has ended."""
        pool = self._pool
        if pool is None:
            return succeed(None)
        d = deferToThreadPool(self._reactor, pool, self._close)
        self._pool = None
        return d.addBoth(_pass_after, pool.stop)

    # ------------------------------------------------------------------ operations

    def get(self, key: str):
        return self._run(_get, _checked_key(key))

    def set(self, key: str, value: str):
        key = _checked_key(key)
        if not isinstance(value, str):
            raise PieError(f"store value must be a string, not {type(value).__name__}")
        if len(value.encode("utf-8")) > MAX_VALUE_BYTES:
            raise PieError(f"store value exceeds {MAX_VALUE_BYTES} bytes")
        return self._run(_set, key, value)

    def delete(self, key: str):
        return self._run(_delete, _checked_key(key))

    def exists(self, key: str):
        return self._run(_exists, _checked_key(key))

    def list_keys(self):
        return self._run(_list_keys)

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
            db.execute(_SCHEMA)
            self._db = db
        return operation(self._db, *args)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _checked_key(key: str) -> str:
    if not isinstance(key, str):
        raise PieError(f"store key must be a string, not {type(key).__name__}")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise PieError(f"store key exceeds {MAX_KEY_BYTES} bytes")
    return key


def _get(db: sqlite3.Connection, key: str) -> str | None:
    row = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
    return None if row is None else row[0]


def _set(db: sqlite3.Connection, key: str, value: str) -> None:
    db.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, value))


def _delete(db: sqlite3.Connection, key: str) -> None:
    db.execute("DELETE FROM kv WHERE key = ?", (key,))


def _exists(db: sqlite3.Connection, key: str) -> bool:
    return db.execute("SELECT 1 FROM kv WHERE key = ?", (key,)).fetchone() is not None


def _list_keys(db: sqlite3.Connection) -> list[str]:
    return [row[0] for row in db.execute("SELECT key FROM kv ORDER BY key")]


def _pass_after(result, action):
    action()
    return result

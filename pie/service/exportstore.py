"""Persistent KV exports on disk: one SQLite row per export, holding its recompute recipe.

KV tensors are not written to disk: a page set is stored as the tokens,
positions and attention rows that produced it (pie.service.resources.Recipe),
and rebuilt with one forward pass on its first import after a restart. That
keeps the store tiny and independent of device, dtype and worker layout; the
price is one prefill per export per restart. See docs/model-service.md.

Methods block (file I/O); the model service calls save/remove from a thread.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading

from twisted.logger import Logger

from pie.service.resources import Recipe

log = Logger()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv_exports (
    model TEXT NOT NULL,
    name TEXT NOT NULL,
    page_size INTEGER NOT NULL,
    recipe TEXT NOT NULL,
    user TEXT,
    PRIMARY KEY (model, name)
)
"""


class ExportStore:
    """The persistent exports of one model in `<directory>/kv-exports.sqlite3`."""

    FILENAME = "kv-exports.sqlite3"

    def __init__(self, directory: str, model: str, page_size: int) -> None:
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, self.FILENAME)
        self._model = model
        self._page_size = page_size
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(kv_exports)")}
        if "user" not in columns:  # a store from before export quotas: nobody's
            self._db.execute("ALTER TABLE kv_exports ADD COLUMN user TEXT")

    def load(self) -> dict[str, tuple[Recipe, str | None]]:
        """Every stored export of this model and page size: its recipe and its user."""
        with self._lock:
            rows = self._db.execute(
                "SELECT name, recipe, user FROM kv_exports WHERE model = ? AND page_size = ?",
                (self._model, self._page_size),
            ).fetchall()
        recipes = {}
        for name, text, user in rows:
            try:
                recipes[name] = (Recipe.from_json(json.loads(text)), user)
            except (ValueError, KeyError, TypeError) as e:
                log.warn(
                    "skipping unreadable KV export {name!r} in {path}: {e}",
                    name=name,
                    path=self.path,
                    e=e,
                )
        return recipes

    def save(self, name: str, recipe: Recipe, user: str | None = None) -> None:
        text = json.dumps(recipe.to_json(), separators=(",", ":"))
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO kv_exports (model, name, page_size, recipe, user) "
                "VALUES (?, ?, ?, ?, ?)",
                (self._model, name, self._page_size, text, user),
            )

    def remove(self, name: str) -> None:
        with self._lock:
            self._db.execute(
                "DELETE FROM kv_exports WHERE model = ? AND name = ?", (self._model, name)
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

"""Tokens used per API key, kept in SQLite so that quotas survive a restart.

The counts live in memory (the request path never waits for a disk) and are written once a
second when they changed, so a crash loses at most the last second of use. The file is
`<data_dir>/usage.sqlite3`, one row per key name (never the key itself); WAL mode with full
sync makes each write durable without blocking readers. Delete a row (or the file) to give a
key its quota back.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path

from wicore_cpp.config import ConfigError

log = logging.getLogger("wicore.quota")

FILE_NAME = "usage.sqlite3"
FLUSH_INTERVAL_S = 1.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS key_usage (
    key_name   TEXT PRIMARY KEY,
    tokens     INTEGER NOT NULL,
    updated_at REAL NOT NULL
)
"""


class UsageStore:
    """Tokens used per key name: read at start-up, added to in memory, written every second."""

    def __init__(self, data_dir: str | Path):
        """Open (or create) the store. Raises ConfigError when it cannot be used."""
        self.path = Path(data_dir) / FILE_NAME
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Only one thread at a time touches the connection: start-up here, then the
            # flusher's worker thread, one write after another, then `close`.
            self._db = sqlite3.connect(self.path, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_SCHEMA)
            self._db.commit()
            rows = self._db.execute("SELECT key_name, tokens FROM key_usage").fetchall()
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"data_dir: cannot use {self.path}: {exc}") from None
        self._used: dict[str, int] = {name: tokens for name, tokens in rows}
        self._dirty: set[str] = set()
        self._task: asyncio.Task | None = None

    def used(self, key_name: str) -> int:
        return self._used.get(key_name, 0)

    def add(self, key_name: str, num_tokens: int) -> None:
        if num_tokens > 0:
            self._used[key_name] = self._used.get(key_name, 0) + num_tokens
            self._dirty.add(key_name)

    def start(self) -> None:
        """Write changed counts once a second from now on (on the running loop)."""
        self._task = asyncio.get_running_loop().create_task(self._flush_every_second())

    async def close(self) -> None:
        """Stop the writer, write what is left, close the file."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        try:
            self._write(self._take_dirty())
        except sqlite3.Error as exc:
            log.error("cannot write key usage to %s: %s", self.path, exc)
        self._db.close()

    async def _flush_every_second(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            rows = self._take_dirty()
            if not rows:
                continue
            try:
                await asyncio.to_thread(self._write, rows)
            except sqlite3.Error as exc:  # a full disk: keep counting, try again later
                log.error("cannot write key usage to %s: %s", self.path, exc)
                self._dirty.update(name for name, _, _ in rows)

    def _take_dirty(self) -> list[tuple[str, int, float]]:
        """The changed counts, taken on the loop's thread; later changes wait for next time."""
        dirty, self._dirty = self._dirty, set()
        now = time.time()
        return [(name, self._used[name], now) for name in dirty]

    def _write(self, rows: list[tuple[str, int, float]]) -> None:
        if not rows:
            return
        with self._db:
            self._db.executemany(
                "INSERT INTO key_usage (key_name, tokens, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(key_name) DO UPDATE SET tokens = excluded.tokens, "
                "updated_at = excluded.updated_at",
                rows,
            )

"""SQLite backend: one connection in WAL mode, writes serialized by a lock.

Why not one thread hop per statement (aiosqlite): measured on this project's 2-core machine an
aiosqlite round trip costs about 75 us, and a governed action takes a dozen statements. Here the
statements run on the event loop (microseconds each on a page-cached WAL database) and only the
calls that can wait on the disk or another process's lock, BEGIN IMMEDIATE and COMMIT (the fsync),
go to a worker thread. See docs/design.md.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import anyio
import anyio.to_thread

from ..errors import DatabaseMissing, StateWriteError, StoreConfigError, StoreError
from .base import Backend, Row, UniqueViolation
from .queries import load_queries

_BOOL_COLUMNS = frozenset({"state_bearing", "critical", "safe_to_retry", "simulated"})
_WRITE_WAIT = 30.0  # seconds a write waits for another process holding the lock
_SYNC_MODES = {"full": "FULL", "normal": "NORMAL", "extra": "EXTRA"}


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime passed to the store")
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    return value


def _decode(row: sqlite3.Row) -> Row:
    out: Row = {}
    for key in row.keys():  # noqa: SIM118 - sqlite3.Row is not a mapping
        value = row[key]
        if value is not None and (key.endswith("_at") or key == "deadline"):
            value = datetime.fromisoformat(value)
        elif key in _BOOL_COLUMNS and value is not None:
            value = bool(value)
        out[key] = value
    return out


def parse_sqlite_url(url: str) -> tuple[Path, str]:
    """`sqlite:///abs/path.db` or `sqlite://relative/path.db`, optional `?synchronous=normal`."""
    rest = url[len("sqlite://") :]
    path_part, _, query = rest.partition("?")
    if not path_part or path_part == "/":
        raise StoreConfigError(f"database URL {url!r} names no file (sqlite:///path/to/file.db)")
    options = parse_qs(query)
    sync = options.pop("synchronous", ["full"])[0].lower()
    if sync not in _SYNC_MODES:
        raise StoreConfigError(f"database URL {url!r}: synchronous must be full, normal or extra")
    if options:
        raise StoreConfigError(f"database URL {url!r}: unknown option {sorted(options)[0]!r}")
    return Path(path_part), _SYNC_MODES[sync]


class _SQLiteTx:
    def __init__(self, conn: sqlite3.Connection, queries: dict[str, str], write: bool) -> None:
        self._conn = conn
        self._q = queries
        self._write = write

    def _run(self, name: str, args: tuple[Any, ...]) -> sqlite3.Cursor:
        try:
            return self._conn.execute(self._q[name], tuple(_encode(a) for a in args))
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" in str(exc):
                raise UniqueViolation(f"{name}: {exc}") from exc
            raise StateWriteError(f"{name}: {exc}") from exc
        except sqlite3.Error as exc:
            error = StateWriteError if self._write else StoreError
            raise error(f"sqlite {name}: {exc}") from exc

    async def execute(self, name: str, *args: Any) -> int:
        return self._run(name, args).rowcount

    async def fetchrow(self, name: str, *args: Any) -> Row | None:
        row = self._run(name, args).fetchone()
        return _decode(row) if row is not None else None

    async def fetchall(self, name: str, *args: Any) -> list[Row]:
        return [_decode(r) for r in self._run(name, args).fetchall()]


class SQLiteBackend(Backend):
    dialect = "sqlite"

    def __init__(self, url: str) -> None:
        self.url = url
        self.path, self._sync = parse_sqlite_url(url)
        self._queries = load_queries("sqlite")
        self._conn: sqlite3.Connection | None = None
        self._lock = anyio.Lock()
        self.write_wait = _WRITE_WAIT
        # Without an fsync a COMMIT is a write into the page cache: cheaper on the loop than the
        # thread hand-off (measured: ~55k hand-offs were half a 10-worker simulated month).
        self._commit_inline = self._sync == "NORMAL"

    async def connect(self) -> None:
        plain = str(self.path)
        plain = "/" + plain.lstrip("/") if plain.startswith("//") else plain  # as a person types it
        if not self.create and not self.path.exists():
            raise DatabaseMissing(f"database {plain} does not exist", plain)
        if not self.path.parent.is_dir():
            raise StoreConfigError(f"sqlite database directory {self.path.parent} does not exist")
        try:
            # busy_timeout 0: a statement on the event loop never waits for another process;
            # the one place that may wait (BEGIN IMMEDIATE) does so in a thread, see _begin.
            # mode=rw: no file is created when it vanished since the check above (and `plain`:
            # a leading // would be a URI authority)
            target = self.path if self.create else f"file:{quote(plain)}?mode=rw"
            conn = sqlite3.connect(target, isolation_level=None, check_same_thread=False,
                                   timeout=0.0, uri=not self.create)  # fmt: skip
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._sync}")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise StoreConfigError(f"cannot open sqlite database {self.path}: {exc}") from exc
        self._conn = conn

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            async with self._lock:
                conn.close()

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("the store is not open")
        return self._conn

    async def _begin(self, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE on the loop when the write lock is free (the usual case: no thread
        hop); when another process holds it, wait for it in a thread, up to write_wait."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise StateWriteError(f"sqlite cannot begin a write: {exc}") from exc

        def wait_for_lock() -> None:
            conn.execute(f"PRAGMA busy_timeout={int(self.write_wait * 1000)}")
            try:
                conn.execute("BEGIN IMMEDIATE")
            finally:
                conn.execute("PRAGMA busy_timeout=0")

        try:
            await anyio.to_thread.run_sync(wait_for_lock)
        except sqlite3.Error as exc:
            raise StateWriteError(f"sqlite cannot begin a write: {exc}") from exc

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_SQLiteTx]:
        conn = self._require()
        async with self._lock:
            await self._begin(conn)
            try:
                yield _SQLiteTx(conn, self._queries, write=True)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            try:
                if self._commit_inline:
                    conn.execute("COMMIT")
                else:
                    await anyio.to_thread.run_sync(conn.execute, "COMMIT")
            except BaseException as exc:
                # Also on cancellation (a cycle deadline, shutdown): run_sync's checkpoint raises
                # before COMMIT runs, and a transaction left open would make every later BEGIN on
                # this connection fail ("cannot start a transaction within a transaction").
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StateWriteError(f"sqlite commit failed: {exc}") from exc
                raise

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[_SQLiteTx]:
        conn = self._require()
        async with self._lock:
            yield _SQLiteTx(conn, self._queries, write=False)

    async def schema_versions(self) -> list[int] | None:
        conn = self._require()
        async with self._lock:
            try:
                exists = conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'"
                ).fetchone()
                if not exists:
                    return None
                rows = conn.execute(self._queries["schema_versions"]).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"sqlite cannot read the schema version: {exc}") from exc
        return [int(r["version"]) for r in rows]

    async def apply_migration(self, version: int, statements: list[str], now: datetime) -> bool:
        async with self.transaction() as tx:
            conn = self._require()
            has_table = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'"
            ).fetchone()
            if (
                has_table
                and conn.execute(
                    "SELECT 1 FROM schema_version WHERE version = ?", (version,)
                ).fetchone()
            ):
                return False
            for statement in statements:
                try:
                    conn.execute(statement)
                except sqlite3.Error as exc:
                    raise StateWriteError(f"migration {version}: {exc}") from exc
            await tx.execute("record_version", version, now)
        return True

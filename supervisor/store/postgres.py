"""Postgres backend on an asyncpg pool. Imported only when the URL says postgresql://."""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg

from ..errors import StateWriteError, StoreConfigError, StoreError, StoreUnavailable
from .base import Backend, Row, UniqueViolation
from .queries import load_queries

# Errors that mean "the connection or server went away": transient, worth a reconnect.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    # Raised when the server kills an idle connection and the next query races its FATAL message
    # ("cannot switch to state ..."): the connection is unusable, like a lost one.
    asyncpg.InternalClientError,
)
_MIGRATION_LOCK = zlib.crc32(b"acp-supervisor:migrate")


def _rowcount(status: str) -> int:
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class _PgTx:
    def __init__(self, conn: Any, queries: dict[str, str], write: bool) -> None:
        self._conn = conn
        self._q = queries
        self._write = write

    def _translate(self, name: str, exc: BaseException) -> StoreError:
        if isinstance(exc, asyncpg.UniqueViolationError):
            return UniqueViolation(f"{name}: {exc}")
        if isinstance(exc, _CONNECTION_ERRORS):
            if self._write:
                return StateWriteError(f"postgres connection lost during {name}: {exc}")
            return StoreUnavailable(f"postgres connection lost during {name}: {exc}")
        error = StateWriteError if self._write else StoreError
        return error(f"postgres {name}: {exc}")

    async def execute(self, name: str, *args: Any) -> int:
        try:
            return _rowcount(await self._conn.execute(self._q[name], *args))
        except (asyncpg.PostgresError, *_CONNECTION_ERRORS) as exc:
            raise self._translate(name, exc) from exc

    async def fetchrow(self, name: str, *args: Any) -> Row | None:
        try:
            row = await self._conn.fetchrow(self._q[name], *args)
        except (asyncpg.PostgresError, *_CONNECTION_ERRORS) as exc:
            raise self._translate(name, exc) from exc
        return dict(row) if row is not None else None

    async def fetchall(self, name: str, *args: Any) -> list[Row]:
        try:
            rows = await self._conn.fetch(self._q[name], *args)
        except (asyncpg.PostgresError, *_CONNECTION_ERRORS) as exc:
            raise self._translate(name, exc) from exc
        return [dict(r) for r in rows]


class PostgresBackend(Backend):
    dialect = "postgres"

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 10) -> None:
        self.url = url
        self._queries = load_queries("postgres")
        self._pool: Any = None
        self._sizes = (min_size, max_size)

    async def connect(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.url, min_size=self._sizes[0], max_size=self._sizes[1], timeout=10
            )
        except asyncpg.InvalidCatalogNameError as exc:
            raise StoreConfigError(f"postgres database does not exist ({_safe(self.url)}): {exc}") from exc
        except asyncpg.InvalidAuthorizationSpecificationError as exc:
            raise StoreConfigError(f"postgres refused the login ({_safe(self.url)}): {exc}") from exc
        except (ValueError, asyncpg.ClientConfigurationError) as exc:
            raise StoreConfigError(f"malformed postgres URL {_safe(self.url)}: {exc}") from exc
        except _CONNECTION_ERRORS as exc:  # OSError covers TimeoutError
            raise StoreUnavailable(
                f"postgres is unreachable at {_safe(self.url)}: {exc or type(exc).__name__}"
            ) from exc
        except asyncpg.PostgresError as exc:
            raise StoreUnavailable(f"postgres at {_safe(self.url)}: {exc}") from exc

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    @asynccontextmanager
    async def _connection(self, write: bool) -> AsyncIterator[Any]:
        if self._pool is None:
            raise StoreError("the store is not open")
        error = StateWriteError if write else StoreUnavailable
        try:
            conn = await self._pool.acquire()
        except (TimeoutError, *_CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            raise error(f"postgres is unreachable: {exc or type(exc).__name__}") from exc
        try:
            yield conn
        finally:
            try:
                await self._pool.release(conn)
            except (*_CONNECTION_ERRORS, asyncpg.PostgresError):
                pass  # a broken connection is dropped by the pool

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_PgTx]:
        async with self._connection(write=True) as conn:
            tr = conn.transaction()
            try:
                await tr.start()
            except (asyncpg.PostgresError, *_CONNECTION_ERRORS) as exc:
                raise StateWriteError(f"postgres cannot begin a write: {exc}") from exc
            try:
                yield _PgTx(conn, self._queries, write=True)
            except BaseException:
                try:
                    await tr.rollback()
                except (asyncpg.PostgresError, *_CONNECTION_ERRORS):
                    pass
                raise
            try:
                await tr.commit()
            except (asyncpg.PostgresError, *_CONNECTION_ERRORS) as exc:
                raise StateWriteError(f"postgres commit failed: {exc}") from exc

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[_PgTx]:
        async with self._connection(write=False) as conn:
            yield _PgTx(conn, self._queries, write=False)

    async def schema_versions(self) -> list[int] | None:
        async with self.reader() as tx:
            row = await tx.fetchrow("schema_table_exists")
            if row is None or not row["ok"]:
                return None
            rows = await tx.fetchall("schema_versions")
        return [int(r["version"]) for r in rows]

    async def apply_migration(self, version: int, statements: list[str], now: datetime) -> bool:
        async with self.transaction() as tx:
            conn = tx._conn
            try:
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                exists = await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
                if exists and await conn.fetchval(
                    "SELECT 1 FROM schema_version WHERE version = $1", version
                ):
                    return False
                for statement in statements:
                    await conn.execute(statement)
            except (asyncpg.PostgresError, *_CONNECTION_ERRORS) as exc:
                raise StateWriteError(f"migration {version}: {exc}") from exc
            await tx.execute("record_version", version, now)
        return True

    async def listen(
        self, channel: str, callback: Callable[[str], None]
    ) -> Callable[[], Awaitable[None]] | None:
        try:
            conn = await asyncpg.connect(self.url, timeout=10)
            await conn.add_listener(channel, lambda _c, _pid, _ch, payload: callback(payload))
        except (asyncpg.PostgresError, *_CONNECTION_ERRORS, TimeoutError) as exc:
            raise StoreUnavailable(f"postgres LISTEN {channel}: {exc}") from exc

        async def close() -> None:
            try:
                await conn.close(timeout=2)
            except (asyncpg.PostgresError, *_CONNECTION_ERRORS, TimeoutError):
                conn.terminate()

        return close

    async def notify_in(self, tx: Any, channel: str, payload: str) -> None:
        await tx.fetchrow("notify_killswitch" if channel == "acp_killswitch" else channel, payload)


def _safe(url: str) -> str:
    """The URL without its password, for error lines."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        if parts.password:
            netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
            return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        pass
    return url

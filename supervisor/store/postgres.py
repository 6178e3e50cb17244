"""Postgres backend on an asyncpg pool. Imported only when the URL says postgresql://.

A lost connection is this module's to recover: a connection that lost its server, timed out or
was cancelled mid-query is terminated, never reused or rolled back over (asyncpg answers "another
operation is in progress" on such a connection); a statement that fails that way before anything
ran on the connection (a pooled connection whose server session was terminated) runs again on a
fresh one. Every statement has the query timeout. What cannot be redone here is raised as a store
error with `transient` set, so the layer above may redo the whole unit of work.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import asyncpg
import structlog

from ..errors import StateWriteError, StoreConfigError, StoreError, StoreUnavailable
from .base import DEFAULT_QUERY_TIMEOUT, Backend, Reads, Row, UniqueViolation
from .queries import load_queries

log = structlog.get_logger("supervisor.store")

# Errors that mean "the connection or server went away": transient, worth a reconnect.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # covers TimeoutError, which asyncpg raises when a statement passes its timeout
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    # Raised when the server kills an idle connection and the next query races its FATAL message
    # ("cannot switch to state ..."): the connection is unusable, like a lost one.
    asyncpg.InternalClientError,
)
# Transactions the server rolled back to let others go on: worth running again as they were.
_ABORTED_TO_RESOLVE = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
_MIGRATION_LOCK = zlib.crc32(b"acp-supervisor:migrate")
# DDL and the wait for another host's migration may take longer than a query timeout.
_MIGRATION_TIMEOUT = 600.0
APPLICATION_NAME = "acp-supervisor"
# read_off_loop fetches a scan this many rows at a time: asyncpg decodes a result on the event
# loop, and a whole scorecard or replay page at once stalled it (measured: 185-250 ms at 1M
# events); a page of this size is about a millisecond of decoding.
_SCAN_PAGE = 1000

T = TypeVar("T")
LISTEN_APPLICATION_NAME = "acp-supervisor:listen"


async def _keep_session(conn: Any) -> None:
    """The pool's reset on release: nothing to send. asyncpg's default sends a query (RESET ALL,
    UNLISTEN, CLOSE ALL, advisory unlocks), one more round trip for every store operation,
    for state these connections never leave: no SET (settings are startup parameters), no
    LISTEN (a subscription has a connection of its own), only transaction-scoped advisory
    locks, cursors inside transactions. A transaction left open is still rolled back: the pool
    does that before it calls this."""


def _rowcount(status: str) -> int:
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _lost(exc: BaseException) -> bool:
    """The connection is unusable after `exc` (gone, timed out, or in an unknown state)."""
    return isinstance(exc, _CONNECTION_ERRORS)


def _store_error(write: bool, message: str, exc: BaseException | None = None) -> StoreError:
    """The project's error for a failure; a lost connection or a timeout is marked transient."""
    error = (StateWriteError if write else StoreUnavailable)(
        message, reason="store_timeout" if isinstance(exc, TimeoutError) else None
    )
    error.transient = exc is None or _lost(exc)
    return error


# Statements allowed to wait longer than the query timeout. An engage locks the fleet row,
# which every start and outcome in flight holds FOR SHARE; under a steady stream of them (several
# hosts) taking it can outlast a few seconds, and an operator's halt must not fail for that.
_LOCK_WAITS = {"lock_fleet_switch": 30.0}


class _PgTx:
    def __init__(
        self,
        conn: Any,
        queries: dict[str, str],
        write: bool,
        *,
        backend: PostgresBackend | None = None,
        timeout: float = DEFAULT_QUERY_TIMEOUT,
    ) -> None:
        self._conn = conn
        self._q = queries
        self._write = write
        # Readers only: each read stands alone, so one that lost its connection is read again.
        self._backend = backend
        self._timeout = timeout
        self.broken = False  # the connection must be terminated, not given back to the pool

    async def change_stamp(self) -> None:
        """Other hosts write the same rows at any moment: nothing read here may be cached."""
        return None

    def _translate(self, name: str, exc: BaseException) -> StoreError:
        if isinstance(exc, asyncpg.UniqueViolationError):
            return UniqueViolation(f"{name}: {exc}")
        if isinstance(exc, TimeoutError):
            message = f"postgres {name} timed out after {self._wait(name):g}s"
            return _store_error(self._write, message, exc)
        if isinstance(exc, _CONNECTION_ERRORS):
            return _store_error(self._write, f"postgres connection lost during {name}: {exc}", exc)
        error = StateWriteError if self._write else StoreError
        translated = error(f"postgres {name}: {exc}")
        # The server aborted the transaction to break a deadlock (or a serialization conflict):
        # nothing of it was written, and the same work again may pass (Store.retrying).
        translated.transient = isinstance(exc, _ABORTED_TO_RESOLVE)
        return translated

    async def _call(self, method: str, name: str, args: tuple[Any, ...]) -> Any:
        retries = 0 if self._backend is None else self._backend.fresh_tries
        while True:
            try:
                return await getattr(self._conn, method)(self._q[name], *args,
                                                         timeout=self._wait(name))  # fmt: skip
            except (asyncpg.PostgresError, *_CONNECTION_ERRORS) as exc:
                if _lost(exc):
                    self.broken = True
                # A timeout is not retried: the same wait again would double the bound.
                again = retries > 0 and _lost(exc) and not isinstance(exc, TimeoutError)
                if not again or self._backend is None:
                    raise self._translate(name, exc) from exc
                log.info("store.reconnect", error=str(exc))
            retries -= 1
            conn, self._conn = self._conn, None
            await self._backend.release(conn, broken=True)
            self._conn = await self._backend.acquire(write=False)
            self.broken = False

    def _wait(self, name: str) -> float:
        return max(self._timeout, _LOCK_WAITS.get(name, 0.0))

    async def execute(self, name: str, *args: Any) -> int:
        status: str = await self._call("execute", name, args)
        return _rowcount(status)

    async def fetchrow(self, name: str, *args: Any) -> Row | None:
        row = await self._call("fetchrow", name, args)
        return dict(row) if row is not None else None

    async def fetchval(self, name: str, *args: Any) -> Any:
        return await self._call("fetchval", name, args)

    async def fetchall(self, name: str, *args: Any) -> list[Row]:
        rows = await self._call("fetch", name, args)
        return [dict(r) for r in rows]

    async def executemany(self, name: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """A statement with an array form (`<name>_arrays`: one array per column) runs once,
        set-based; any other once per row, in one round trip (asyncpg sends every row's Bind
        and Execute, then one Sync)."""
        if f"{name}_arrays" in self._q:
            columns = tuple(list(column) for column in zip(*rows, strict=True))
            await self._call("execute", f"{name}_arrays", columns)
            return
        await self._call("executemany", name, (list(rows),))


class _PgSubscription:
    """A LISTEN on its own connection (notifications need one that stays open)."""

    def __init__(self, conn: Any, timeout: float, on_lost: Callable[[Any], None] | None) -> None:
        self._conn = conn
        self._timeout = timeout
        self._on_lost = on_lost

    async def check(self) -> bool:
        """True while the connection answers within the timeout; a dead one (terminated, or a
        blackholed peer that would never say so) is terminated and False comes back."""
        if self._conn.is_closed():
            return False
        try:
            await self._conn.fetchval("SELECT 1", timeout=self._timeout)
        except (asyncpg.PostgresError, *_CONNECTION_ERRORS):
            self._conn.terminate()
            return False
        return True

    async def close(self) -> None:
        if self._on_lost is not None:
            self._conn.remove_termination_listener(self._on_lost)
        if self._conn.is_closed():
            return
        try:
            await self._conn.close(timeout=2)
        except (asyncpg.PostgresError, *_CONNECTION_ERRORS):
            self._conn.terminate()


class _Call:
    __slots__ = ("args", "done", "error", "order", "row", "still", "wake")

    def __init__(self, args: tuple[Any, ...], order: str, still: Callable[[], bool] | None) -> None:
        self.args = args
        self.order = order
        self.still = still
        self.wake = anyio.Event()  # set when its batch has run, or when it is to lead the next
        self.done = False
        self.row: Row | None = None
        self.error: BaseException | None = None


def _still(call: _Call) -> bool:
    """Whether `call` is still to be sent; a check that fails keeps it back (fail closed)."""
    try:
        return call.still is None or call.still()
    except Exception:
        log.exception("store.batch_check_failed")
        return False


class _Batcher:
    """Calls queued while a batch is in flight form the next one; the first of them sends it.
    One batch at a time, so one writer's COMMIT holds the hot rows, not fifty in a row."""

    def __init__(self, run: Callable[[list[tuple[Any, ...]]], Awaitable[list[Row]]]) -> None:
        self._run = run
        self._queue: list[_Call] = []
        self._busy = False

    async def call(
        self, args: tuple[Any, ...], order: str, still: Callable[[], bool] | None
    ) -> Row | None:
        me = _Call(args, order, still)
        self._queue.append(me)
        if self._busy:
            # Shielded: once queued, the call may run; its outcome is learnt, whatever cancels.
            with anyio.CancelScope(shield=True):
                await me.wake.wait()
        if not me.done:  # no batch in flight: this one sends everything queued so far
            self._busy = True
            queued, self._queue = self._queue, []
            # In the order of the rows they lock, so two hosts' batches cannot deadlock; the
            # host's own switch file read last, as they are sent.
            queued.sort(key=lambda c: c.order)
            batch = [c for c in queued if _still(c)]
            rows: list[Row] = []
            try:
                if batch:
                    with anyio.CancelScope(shield=True):
                        rows = await self._run([c.args for c in batch])
            except BaseException as exc:
                for c in batch:
                    c.error = exc
            else:
                for c, row in zip(batch, rows, strict=True):
                    c.row = row
            finally:
                for c in queued:
                    c.done = True
                    c.wake.set()
                if self._queue:
                    self._queue[0].wake.set()  # the next batch's sender
                else:
                    self._busy = False
        if me.error is not None:
            error = me.error
            if isinstance(error, StoreError):  # each member its own exception
                mine = type(error)(str(error), reason=error.reason)
                mine.transient = error.transient
                raise mine from error
            raise error
        return me.row


class PostgresBackend(Backend):
    dialect = "postgres"
    one_statement_writes = True

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        query_timeout: float = DEFAULT_QUERY_TIMEOUT,
    ) -> None:
        self.url = url
        self._queries = load_queries("postgres")
        self._pool: Any = None
        self._sizes = (min_size, max_size)
        self.query_timeout = query_timeout
        # Stale pooled connections are tried one after another: at most the whole pool, then one.
        self.fresh_tries = max_size + 1
        self._batchers: dict[str, _Batcher] = {}

    async def connect(self) -> None:
        # The server side of the same bound: a session whose client vanished mid-transaction (a
        # partition) gives its row locks back instead of holding them until TCP keepalive fires.
        # A startup parameter, not a SET: the pool's reset on release (RESET ALL) would undo that.
        idle_ms = int(max(2.0, 6 * self.query_timeout) * 1000)
        try:
            self._pool = await asyncpg.create_pool(
                self.url, min_size=self._sizes[0], max_size=self._sizes[1],
                timeout=max(10.0, self.query_timeout), command_timeout=self.query_timeout,
                server_settings={"application_name": APPLICATION_NAME,
                                 "idle_in_transaction_session_timeout": str(idle_ms)},
                reset=_keep_session,
            )  # fmt: skip
        except asyncpg.InvalidCatalogNameError as exc:
            raise StoreConfigError(
                f"postgres database does not exist ({_safe(self.url)}): {exc}"
            ) from exc
        except asyncpg.InvalidAuthorizationSpecificationError as exc:
            raise StoreConfigError(
                f"postgres refused the login ({_safe(self.url)}): {exc}"
            ) from exc
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
            try:
                with anyio.fail_after(self.query_timeout):
                    await pool.close()
            except (TimeoutError, *_CONNECTION_ERRORS, asyncpg.PostgresError):
                pool.terminate()  # a server that does not answer cannot hold the exit

    async def acquire(self, write: bool) -> Any:
        """A pooled connection within the query timeout (a new one is made if needed)."""
        if self._pool is None:
            raise StoreError("the store is not open")
        try:
            return await self._pool.acquire(timeout=self.query_timeout)
        except TimeoutError as exc:
            raise _store_error(
                write, f"postgres: no connection within {self.query_timeout:g}s", exc
            ) from exc
        except (*_CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            message = f"postgres is unreachable: {exc or type(exc).__name__}"
            raise _store_error(write, message) from exc

    async def release(self, conn: Any, *, broken: bool) -> None:
        """Give a connection back; a broken one is terminated first, so nobody reuses it."""
        if conn is None or self._pool is None:
            return
        with anyio.CancelScope(shield=True):
            try:
                if broken:
                    conn.terminate()
                await self._pool.release(conn, timeout=self.query_timeout)
            except (*_CONNECTION_ERRORS, asyncpg.PostgresError):
                pass  # a connection that fails its reset is dropped by the pool

    async def _begin(self) -> tuple[Any, Any]:
        """A connection with an open transaction. A pooled connection whose server session was
        terminated fails at BEGIN, before anything ran: that one is dropped and BEGIN runs on the
        next (a fresh one, once the stale ones are gone)."""
        for attempt in range(self.fresh_tries):
            conn = await self.acquire(write=True)
            tr = conn.transaction()
            try:
                await tr.start()
                return conn, tr
            except BaseException as exc:
                if not isinstance(exc, (asyncpg.PostgresError, *_CONNECTION_ERRORS)):
                    # Cancelled while BEGIN was in flight: the connection's state is unknown, and
                    # a connection never given back would hold the pool's close forever.
                    await self.release(conn, broken=True)
                    raise
                await self.release(conn, broken=_lost(exc))
                again = _lost(exc) and not isinstance(exc, TimeoutError)
                if not again or attempt == self.fresh_tries - 1:
                    raise _store_error(True, f"postgres cannot begin a write: {exc}", exc) from exc
                log.info("store.reconnect", error=str(exc))
        raise AssertionError("unreachable")

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_PgTx]:
        conn, tr = await self._begin()
        tx = _PgTx(conn, self._queries, write=True, timeout=self.query_timeout)
        try:
            try:
                yield tx
            except BaseException as exc:
                # Cancelled mid-statement or connection gone: never talk to it again; the server
                # rolls the transaction back when the connection closes.
                lost = not isinstance(exc, Exception) or getattr(exc, "transient", False)
                lost = lost or _lost(exc)
                tx.broken = tx.broken or lost
                if not tx.broken:
                    try:
                        await tr.rollback()
                    except (asyncpg.PostgresError, *_CONNECTION_ERRORS):
                        tx.broken = True
                raise
            try:
                await tr.commit()
            except (asyncpg.PostgresError, *_CONNECTION_ERRORS) as exc:
                tx.broken = _lost(exc)
                if isinstance(exc, TimeoutError):
                    message = f"postgres commit timed out after {self.query_timeout:g}s"
                else:
                    message = f"postgres commit failed: {exc}"
                if _lost(exc):  # the commit may have landed: a redo must find out (idempotent)
                    raise _store_error(True, message, exc) from exc
                failed = StateWriteError(message)
                failed.transient = isinstance(exc, _ABORTED_TO_RESOLVE)  # as in a statement
                raise failed from exc
        finally:
            await self.release(tx._conn, broken=tx.broken)

    async def batched(
        self, name: str, *, args: tuple[Any, ...], order: str = "",
        still: Callable[[], bool] | None = None,
    ) -> Row | None:  # fmt: skip
        """One call of a write function (acp_begin_action, acp_finish_action) in its own
        transaction, sent with every call of the same function queued meanwhile: one statement
        (`<name>_batch`, one array per argument) and one COMMIT for all of them, so a busy host
        locks its window's row and stream once per batch, not once per action. Nothing here is
        retried: a failure (a lost connection, an error that aborts the statement) is every
        member's, raised; the caller redoes its own work the careful way, where the ledger
        finds a write that landed."""
        batcher = self._batchers.get(name)
        if batcher is None:
            batcher = self._batchers[name] = _Batcher(partial(self._run_batch, name))
        return await batcher.call(args, order, still)

    async def _run_batch(self, name: str, calls: list[tuple[Any, ...]]) -> list[Row]:
        tx = _PgTx(await self.acquire(write=True), self._queries, write=True,
                   timeout=self.query_timeout)  # fmt: skip
        try:
            if len(calls) == 1:  # (the one-call function: the same decision, fewer statements)
                query = f"{name}_one"
                rows = await tx.fetchall(query, *calls[0])
            else:
                query = f"{name}_batch"
                columns = [list(column) for column in zip(*calls, strict=True)]
                rows = await tx.fetchall(query, *columns)
        except BaseException as exc:
            tx.broken = tx.broken or not isinstance(exc, Exception)
            raise
        finally:
            await self.release(tx._conn, broken=tx.broken)
        if len(rows) != len(calls):
            raise StateWriteError(f"postgres {query}: {len(rows)} rows for {len(calls)} calls")
        return rows

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[_PgTx]:
        tx = _PgTx(await self.acquire(write=False), self._queries, write=False, backend=self,
                   timeout=self.query_timeout)  # fmt: skip
        try:
            yield tx
        except BaseException as exc:
            tx.broken = tx.broken or not isinstance(exc, Exception)
            raise
        finally:
            await self.release(tx._conn, broken=tx.broken)

    async def read_off_loop(self, reads: Reads, then: Callable[[list[list[Row]]], T]) -> T:
        """The reads in one read-only snapshot, fetched through a cursor a page at a time (the
        loop runs between pages); `then` runs in a worker thread."""
        for attempt in range(self.fresh_tries):
            records: list[list[Row]] = []
            conn = await self.acquire(write=False)
            broken = False
            name = "begin"
            try:
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    for name, args in reads:
                        cursor = conn.cursor(self._queries[name], *args, prefetch=_SCAN_PAGE,
                                             timeout=self.query_timeout)  # fmt: skip
                        # A dict per row as it comes: a dict of plain values is not tracked
                        # by the garbage collector, a Record is (measured: held Records made
                        # full collections of 70-90 ms, which stall the loop as much as a scan).
                        records.append([dict(r) async for r in cursor])
                break
            except (asyncpg.PostgresError, *_CONNECTION_ERRORS) as exc:
                broken = _lost(exc)
                tx = _PgTx(None, self._queries, write=False, timeout=self.query_timeout)
                # A stale pooled connection: the whole read again on the next one (not a timeout).
                if not broken or isinstance(exc, TimeoutError) or attempt == self.fresh_tries - 1:
                    raise tx._translate(name, exc) from exc
                log.info("store.reconnect", error=str(exc))
            except BaseException:
                broken = True  # cancelled mid-fetch: the connection's state is unknown
                raise
            finally:
                await self.release(conn, broken=broken)

        return await anyio.to_thread.run_sync(then, records)

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
            wait = _MIGRATION_TIMEOUT
            try:
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK,
                                   timeout=wait)  # fmt: skip
                exists = await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
                if exists and await conn.fetchval(
                    "SELECT 1 FROM schema_version WHERE version = $1", version
                ):
                    return False
                for statement in statements:
                    await conn.execute(statement, timeout=wait)
            except (asyncpg.PostgresError, *_CONNECTION_ERRORS) as exc:
                tx.broken = _lost(exc)
                raise StateWriteError(f"migration {version}: {exc}") from exc
            await tx.execute("record_version", version, now)
        return True

    async def listen(
        self,
        channel: str,
        callback: Callable[[str], None],
        on_lost: Callable[[], None] | None = None,
    ) -> _PgSubscription:
        conn: Any = None
        try:
            conn = await asyncpg.connect(
                self.url, timeout=self.query_timeout, command_timeout=self.query_timeout,
                server_settings={"application_name": LISTEN_APPLICATION_NAME},
            )  # fmt: skip
            await conn.add_listener(channel, lambda _c, _pid, _ch, payload: callback(payload))
        except (asyncpg.PostgresError, *_CONNECTION_ERRORS) as exc:
            if conn is not None:
                conn.terminate()
            message = f"postgres LISTEN {channel}: {exc or type(exc).__name__}"
            raise _store_error(False, message, exc) from exc
        lost: Callable[[Any], None] | None = None
        if on_lost is not None:

            def lost(_conn: Any) -> None:
                on_lost()

            conn.add_termination_listener(lost)
        return _PgSubscription(conn, self.query_timeout, lost)

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

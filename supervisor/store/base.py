"""The store: domain operations over a small backend interface.

Everything here is dialect-free. A backend (SQLite, Postgres) only runs named queries inside a
transaction and translates driver errors; the rules (exactly-once commands, gapless per-session
sequences, budget reservations, fail-closed state-bearing writes) live once, in this module.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread
import structlog

from ..actions import canonical_json, params_hash
from ..errors import IdempotencyConflict, SchemaMissing, SchemaTooNew, StateWriteError, StoreError
from ..timing.clock import Clock

log = structlog.get_logger("supervisor.store")

# The key of a ledger result that names the call which wrote it (stripped on every read): a
# retry after a lost acknowledgement tells its own landed attempt from a twin's by it.
CALL_MARK = "~call"


def call_mark() -> str:
    return os.urandom(8).hex()


def unreadable(what: str, exc: Exception) -> StoreError:
    """A row this store wrote that no longer decodes (JSON that does not parse or is not what
    was written, a status no version writes): the store was altered outside it. One error
    naming the row; whatever needed it fails closed."""
    return StoreError(f"{what} is unreadable ({exc}): the store was altered outside acp-supervisor")


def json_object(text: str) -> dict[str, Any]:
    """A JSON object column's value; ValueError (or TypeError) when it holds no object. A
    row's decoder turns either into `unreadable`, naming the row."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {type(value).__name__}, not an object")
    return value


def stored_object(text: str, what: str) -> dict[str, Any]:
    """json_object, as `unreadable` naming `what` when the column holds no object."""
    try:
        return json_object(text)
    except (TypeError, ValueError) as exc:
        raise unreadable(what, exc) from exc


Row = dict[str, Any]
IdKind = Literal["session", "approval", "action"]
_ID_QUERIES: dict[str, str] = {
    "session": "session_ids_by_prefix",
    "approval": "approval_ids_by_prefix",
    "action": "action_ids_by_prefix",
}
T = TypeVar("T")
# Named reads (query name, arguments) run together by read_off_loop.
Reads = Sequence[tuple[str, Sequence[Any]]]

# How many telemetry events wait in memory before they are written in one transaction.
TELEMETRY_BATCH = 256
TELEMETRY_MAX_BUFFER = 10_000

# Every statement's bound on a networked backend (config: daemon.query_timeout).
DEFAULT_QUERY_TIMEOUT = 5.0
# Work that may be redone after a lost connection waits RETRY_FIRST, then twice as long each
# time, never more than RETRY_MAX. A command before its effect is tried COMMAND_TRIES times (then
# it fails closed); the outcome of an effect that ran is tried until it lands.
RETRY_FIRST = 0.05
RETRY_MAX = 2.0
COMMAND_TRIES = 3


class UniqueViolation(StoreError):
    """A unique constraint fired; the store uses it to detect a racing twin of a command."""


class FenceLost(StateWriteError):
    """A singleton duty's write was refused: its lease (and fencing token) is no longer held."""

    reason = "fence_lost"


@dataclass(frozen=True, slots=True)
class ActionRecord:
    """An action as its retry sees it: status None when the ledger names no action row."""

    status: str | None  # started | succeeded | failed | halted | in_doubt
    result: Any
    error: str | None
    safe_to_retry: bool


@dataclass(frozen=True, slots=True)
class Fence:
    """The lease a singleton duty holds; every write it makes checks it in the same transaction."""

    lease: str
    holder: str
    token: int


# Set while a singleton duty runs; StoreCore._transaction() checks it inside each write.
current_fence: ContextVar[Fence | None] = ContextVar("current_fence", default=None)


class Tx(Protocol):
    async def execute(self, name: str, *args: Any) -> int:
        """Run a named statement; returns the number of rows it changed where the driver says."""
        ...

    async def fetchrow(self, name: str, *args: Any) -> Row | None: ...

    async def fetchval(self, name: str, *args: Any) -> Any:
        """The first column of the first row as the driver gives it (no times decoded), None
        when there is no row: for a statement's RETURNING of a column that is never NULL."""
        ...

    async def fetchall(self, name: str, *args: Any) -> list[Row]: ...

    async def executemany(self, name: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """Run a named statement once per row, in order, in one call to the driver (one round
        trip on Postgres): a transaction writing many rows holds its locks for one statement's
        time, not one round trip's per row."""
        ...

    async def change_stamp(self) -> Hashable | None:
        """A value that differs whenever rows this transaction reads may have changed since
        the last call by anyone but this store's own statements (another connection's commit,
        a rollback); None when the backend cannot tell (then nothing may be cached)."""
        ...


class Subscription(Protocol):
    """A standing LISTEN (see Backend.listen)."""

    async def check(self) -> bool:
        """True while notifications can still arrive; False once the connection is gone."""
        ...

    async def close(self) -> None: ...


class Backend(ABC):
    dialect: str
    url: str
    create: bool = True  # connect may create a missing database (SQLite); False for reads
    # `db migrate --new`: the operator starts a new store where another one was.
    allow_new: bool = False
    # Whether `batched()` runs an action's start and outcome as one statement each, one round
    # trip for every call queued meanwhile (Postgres); elsewhere writes go through
    # `transaction()`.
    one_statement_writes: bool = False
    # Rows one statement call writes (Tx.executemany) before the event loop gets a turn: a
    # SQLite statement runs on the loop (64 events take a few milliseconds there), a Postgres
    # one in the server.
    rows_per_loop_turn: int = 1024

    def keep_on_loop(self) -> bool:
        """From now on, run everything on the event loop: no thread and no other wait that
        ends on its own time, so tasks that run side by side on a virtual clock interleave the
        same way on every run. True where that holds (SQLite: its COMMITs, checkpoints and
        scans then block the loop, which a simulation does not mind); False: it cannot."""
        return False

    @abstractmethod
    async def connect(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Tx]:
        """A write transaction. A failure to commit raises StateWriteError."""

    @abstractmethod
    def reader(self) -> AbstractAsyncContextManager[Tx]:
        """A read-only snapshot."""

    async def batched(
        self, name: str, *, args: tuple[Any, ...], order: str = "",
        still: Callable[[], bool] | None = None,
    ) -> Row | None:  # fmt: skip
        """One call of the write statement `name`, committed on its own or with the calls of
        the same statement queued meanwhile, sent in `order` (the rows a call locks: calls of
        several batches lock them in one order). `still` is asked as the batch is sent; a call
        it turns down is not sent (None). Only where `one_statement_writes`."""
        raise NotImplementedError(f"{self.dialect}: no one-statement writes")

    @abstractmethod
    async def schema_versions(self) -> list[int] | None:
        """Applied migration versions, or None when the database has no schema at all."""

    @abstractmethod
    async def apply_migration(self, version: int, statements: list[str], now: datetime) -> bool:
        """Apply one migration and record it, unless another process just did. True if applied."""

    async def listen(
        self,
        channel: str,
        callback: Callable[[str], None],
        on_lost: Callable[[], None] | None = None,
    ) -> Subscription | None:
        """Call `callback(payload)` on each notification on `channel`, and `on_lost()` when the
        listening connection goes away (listen again then). None when the backend has no
        notifications (SQLite: one host, the daemon polls instead)."""
        return None

    async def notify_in(self, tx: Tx, channel: str, payload: str) -> None:  # noqa: B027
        """Send a notification when `tx` commits (no-op where there are no notifications)."""

    async def read_off_loop(self, reads: Reads, then: Callable[[list[list[Row]]], T]) -> T:
        """Run `reads` (one list of rows each) and `then` over their rows, leaving the event loop
        free for the whole of it: what scans the event log (the scorecard, a replay) goes here.

        This default reads through reader() on the loop, where the driver waits on its socket
        without blocking it (Postgres), and runs `then`, the Python-side work, in a thread. A
        backend whose driver blocks (SQLite) runs both in a thread on a connection of its own."""
        async with self.reader() as tx:
            rows = [await tx.fetchall(name, *args) for name, args in reads]
        return await anyio.to_thread.run_sync(then, rows)

    def lost(self) -> str | None:
        """Why the database under this backend is gone (its file deleted or replaced), or None.
        Checked on every commit and by the daemon on a timer; only a file-backed store can be."""
        return None

    async def check_identity(self, identity: str | None) -> None:  # noqa: B027
        """Compare the store's id with the record kept beside it (a file-backed store)."""


@dataclass(frozen=True, slots=True)
class NewEvent:
    kind: str
    session_id: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    state_bearing: bool = True
    reason: str | None = None
    command_id: str | None = None
    correlation_id: str | None = None
    worker: str | None = None
    agent_id: str | None = None


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    session_id: str
    seq: int
    kind: str
    reason: str | None
    payload: dict[str, Any]
    state_bearing: bool
    command_id: str | None
    correlation_id: str | None
    worker: str | None
    agent_id: str | None
    created_at: datetime

    @classmethod
    def from_row(cls, row: Row) -> Event:
        try:  # (a scorecard decodes every event: no per-row name unless one fails)
            return cls(
                id=int(row["id"]),
                session_id=row["session_id"],
                seq=int(row["seq"]),
                kind=row["kind"],
                reason=row["reason"],
                payload=json_object(row["payload"]),
                state_bearing=bool(row["state_bearing"]),
                command_id=row["command_id"],
                correlation_id=row["correlation_id"],
                worker=row["worker"],
                agent_id=row["agent_id"],
                created_at=row["created_at"],
            )
        except (TypeError, ValueError) as exc:
            raise unreadable(f"event {row.get('id')}", exc) from exc

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__slots__}
        out["created_at"] = self.created_at.isoformat()
        return out


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    fleet: str
    window_key: str
    starts_at: datetime
    ends_at: datetime
    status: str
    max_cost: float | None
    max_actions: int | None
    used_cost: float
    used_actions: int
    opened_by: str | None
    opened_at: datetime | None
    closed_by: str | None
    closed_at: datetime | None

    @classmethod
    def from_row(cls, row: Row) -> Session:
        return cls(**{k: row[k] for k in cls.__slots__})

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in self.__slots__:
            v = getattr(self, k)
            out[k] = v.isoformat() if isinstance(v, datetime) else v
        return out


def plain_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row with its timestamps as ISO 8601 text, for JSON output."""
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}


def system_stream(fleet: str) -> str:
    """The stream for fleet-level events that belong to no window (kill switch, recovery)."""
    return f"system:{fleet}"


CommandBody = Callable[[Tx], Awaitable[dict[str, Any]]]


class StoreCore:
    """What every aggregate of the store builds on: transactions (fenced for singleton duties),
    the exactly-once command ledger, event appends and the telemetry buffer, the schema.

    `_transaction`, `_fetchrow` and `_fetchall` are private to the store package: outside it,
    code asks an aggregate's named operation (tests/unit/test_store_boundary.py enforces it)."""

    def __init__(self, backend: Backend, clock: Clock, *, latest_version: int) -> None:
        self.backend = backend
        self.clock = clock
        self.latest_version = latest_version
        self._telemetry: list[tuple[NewEvent, datetime]] = []
        self.telemetry_dropped = 0
        from .switches import SwitchCache

        self.switch_cache = SwitchCache()

    @property
    def dialect(self) -> str:
        return self.backend.dialect

    def _transaction(self) -> AbstractAsyncContextManager[Tx]:
        """A write transaction; under a fence, refused unless the lease is still held."""
        fence = current_fence.get()
        if fence is None:
            return self.backend.transaction()  # the hot path: no wrapper around it
        return self._fenced_transaction(fence)

    @asynccontextmanager
    async def _fenced_transaction(self, fence: Fence) -> AsyncIterator[Tx]:
        async with self.backend.transaction() as tx:
            now = await self._db_now_in(tx)
            if await tx.fetchrow("check_fence", fence.lease, fence.holder, fence.token,
                                 now) is None:  # fmt: skip
                raise FenceLost(f"lease {fence.lease} (token {fence.token}) is no longer held")
            yield tx

    async def _db_now_in(self, tx: Tx) -> datetime:
        if self.dialect != "postgres":
            return self.clock.now()
        row = await tx.fetchrow("db_now")
        assert row is not None
        now: datetime = row["now_at"]
        return now

    async def db_now(self) -> datetime:
        """The shared clock for leases: the database's on Postgres. SQLite has one host, so the
        injected clock stands in."""
        if self.dialect != "postgres":
            return self.clock.now()
        async with self.backend.reader() as tx:
            return await self._db_now_in(tx)

    def uses_db_clock(self) -> bool:
        """Whether deadlines are decided by the database's clock: Postgres on the system clock.
        A simulation keeps its virtual time; SQLite has no clock of its own."""
        return self.dialect == "postgres" and not self.clock.virtual

    async def deadline_now(self) -> datetime:
        """The instant approval deadlines are set from and compared with: the database's clock
        where there is one (a step of this host's wall clock cannot stretch a deadline), else
        the injected clock."""
        if not self.uses_db_clock():
            return self.clock.now()
        return await self.db_now()

    def deadline_fence(self) -> datetime | None:
        """The instant a fenced statement compares a deadline with: None where the statement
        uses the database's now() itself, else the injected clock's now."""
        return None if self.uses_db_clock() else self.clock.now()

    async def close(self) -> None:
        try:
            await self.flush_telemetry()
        finally:
            await self.backend.close()

    # -- schema -------------------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        from .queries import load_migrations

        await self._refuse_newer()
        applied: list[int] = []
        for version, _name, statements in load_migrations(self.dialect):
            current = await self.backend.schema_versions() or []
            if version in current:
                continue
            if await self.backend.apply_migration(version, statements, self.clock.now()):
                applied.append(version)
        return applied

    async def check_schema(self) -> None:
        """Refuse to run on a database without our schema, or with a newer one."""
        versions = await self._refuse_newer()
        if not versions or max(versions) < self.latest_version:
            raise SchemaMissing(
                f"database {self.backend.url} is not migrated to version {self.latest_version}: "
                "run `acp-supervisor db migrate`"
            )

    async def _refuse_newer(self) -> list[int]:
        versions = await self.backend.schema_versions() or []
        if versions and max(versions) > self.latest_version:
            raise SchemaTooNew(
                f"database schema version {max(versions)} is newer than this code "
                f"(knows up to {self.latest_version}); upgrade acp-supervisor"
            )
        return versions

    # -- commands and events ------------------------------------------------------------------

    async def run_command(
        self, command_id: str, operation: str, params: Any, body: CommandBody
    ) -> tuple[dict[str, Any], bool]:
        """Run `body` once per command_id, in one transaction with its ledger row.

        Returns (result, fresh): fresh is False when the result another call stored came back.
        """
        digest = params_hash(operation, params)
        mark = call_mark()

        async def attempt(_n: int) -> tuple[dict[str, Any], bool]:
            return await self._run_command_once(command_id, operation, digest, body, mark)

        # A retry after a lost connection is safe: an earlier attempt that did commit left its
        # ledger row, and the retry returns that stored result instead of running `body` again
        # (fresh all the same: the row carries this call's mark).
        return await self.retrying(
            attempt, what=operation, tries=COMMAND_TRIES, command_id=command_id
        )

    async def retrying(
        self,
        attempt: Callable[[int], Awaitable[T]],
        *,
        what: str,
        tries: int | None,
        **context: Any,
    ) -> T:
        """Run `attempt(n)` (n = 0, 1, ...) again after a transient store error with a capped
        exponential backoff. With `tries`, only a lost connection is retried, not a timeout (a
        blackholed database fails the work within one query timeout); `tries=None` retries both
        until it lands or the caller is cancelled. Any other error goes straight to the caller."""
        delay = RETRY_FIRST
        n = 0
        while True:
            try:
                return await attempt(n)
            except StoreError as exc:
                n += 1
                bounded = tries is not None and (n >= tries or exc.reason == "store_timeout")
                if not exc.transient or bounded:
                    raise
                log.warning("store.retry", what=what, attempt=n, retry_in=round(delay, 3),
                            error=str(exc), **context)  # fmt: skip
            await anyio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _run_command_once(
        self, command_id: str, operation: str, digest: str, body: CommandBody, mark: str
    ) -> tuple[dict[str, Any], bool]:
        for _attempt in range(2):
            try:
                async with self._transaction() as tx:
                    stored = await tx.fetchrow("get_command", command_id)
                    if stored is not None:
                        found, by = self._stored_by(command_id, stored, operation, digest)
                        return found, by == mark
                    result = await body(tx)
                    await tx.execute(
                        "insert_command",
                        command_id,
                        operation,
                        digest,
                        canonical_json({**result, CALL_MARK: mark}),
                        self.clock.now(),
                    )
                return result, True
            except UniqueViolation:
                continue  # a racing twin committed first: read its result on the next pass
        async with self.backend.reader() as tx:
            stored = await tx.fetchrow("get_command", command_id)
        if stored is None:
            raise StateWriteError(f"command {command_id}: write conflict without a stored result")
        found, by = self._stored_by(command_id, stored, operation, digest)
        return found, by == mark

    async def claim_in(
        self, tx: Tx, command_id: str, operation: str, digest: str, result_json: str
    ) -> tuple[dict[str, Any], str | None] | None:
        """Claim `command_id`'s ledger row in `tx`, holding the result it will keep (known in
        advance): None when this claimed it (a fresh command; one statement, not a read and a
        write), else the result an earlier run stored and the mark of the call that stored it
        (see _stored_by; IdempotencyConflict if it was another operation or params). A racing
        twin's claim waits for this transaction (Postgres) and then comes back with the stored
        result. `digest`: `params_hash(operation, params)`."""
        claimed = await tx.fetchval("claim_command", command_id, operation, digest, result_json,
                                    self.clock.now())  # fmt: skip
        if claimed is not None:
            return None
        stored = await tx.fetchrow("get_command", command_id)
        if stored is None:
            raise StateWriteError(f"command {command_id}: claimed, but no stored result")
        return self._stored_by(command_id, stored, operation, digest)

    @staticmethod
    def _same_command(command_id: str, stored: Row, operation: str, digest: str) -> None:
        if stored["operation"] != operation or stored["params_hash"] != digest:
            raise IdempotencyConflict(
                command_id,
                stored_operation=stored["operation"],
                stored_hash=stored["params_hash"],
                operation=operation,
                params_hash=digest,
            )

    @classmethod
    def _stored(cls, command_id: str, stored: Row, operation: str, digest: str) -> dict[str, Any]:
        return cls._stored_by(command_id, stored, operation, digest)[0]

    @classmethod
    def _stored_by(
        cls, command_id: str, stored: Row, operation: str, digest: str
    ) -> tuple[dict[str, Any], str | None]:
        """The stored result, and the mark of the call that wrote it (None before marks)."""
        cls._same_command(command_id, stored, operation, digest)
        result = stored_object(stored["result"], f"the ledger row of {command_id}")
        mark = result.pop(CALL_MARK, None)
        return result, mark if isinstance(mark, str) else None

    async def lookup_command(
        self, command_id: str, operation: str, params: Any
    ) -> dict[str, Any] | None:
        """The stored result for a command_id, None if unknown; conflict if reused differently."""
        async with self.backend.reader() as tx:
            stored = await tx.fetchrow("get_command", command_id)
        if stored is None:
            return None
        return self._stored(command_id, stored, operation, params_hash(operation, params))

    async def append_in(self, tx: Tx, event: NewEvent, at: datetime | None = None) -> int:
        """Append inside an open transaction; returns the seq."""
        seq = await tx.fetchval(
            "insert_event",
            event.session_id,
            event.kind,
            event.reason,
            canonical_json(dict(event.payload)),
            event.state_bearing,
            event.command_id,
            event.correlation_id,
            event.worker,
            event.agent_id,
            at or self.clock.now(),
        )
        assert seq is not None
        return int(seq)

    async def append_many_in(
        self, tx: Tx, events: Sequence[tuple[NewEvent, datetime | None]]
    ) -> None:
        """Append `events` inside an open transaction, in order, with consecutive seqs per
        stream: one statement call (Tx.executemany) per `rows_per_loop_turn` of them."""
        now = self.clock.now()
        step = self.backend.rows_per_loop_turn
        for start in range(0, len(events), step):
            if start:
                # Tasks that need no store run meanwhile (the kill switch file's watch, idle
                # waiters): on SQLite a backlog of thousands in one go held the loop for long.
                await anyio.lowlevel.checkpoint()
            await tx.executemany("insert_event", [
                (e.session_id, e.kind, e.reason, canonical_json(dict(e.payload)),
                 e.state_bearing, e.command_id, e.correlation_id, e.worker, e.agent_id,
                 at or now)
                for e, at in events[start : start + step]
            ])  # fmt: skip

    async def append(self, event: NewEvent) -> int | None:
        """State-bearing: committed before returning (seq), or StateWriteError. Telemetry: buffered."""
        if not event.state_bearing:
            self._buffer(event)
            if len(self._telemetry) >= TELEMETRY_BATCH:
                await self.flush_telemetry()
            return None
        async with self._transaction() as tx:
            return await self.append_in(tx, event)

    def _buffer(self, event: NewEvent) -> None:
        if len(self._telemetry) >= TELEMETRY_MAX_BUFFER:
            self._telemetry.pop(0)
            self.telemetry_dropped += 1
            log.warning("telemetry.dropped", reason="buffer_full", dropped=self.telemetry_dropped)
        self._telemetry.append((event, self.clock.now()))

    async def flush_telemetry(self) -> int:
        """Write buffered telemetry in one transaction. On failure the batch is counted as dropped."""
        batch, self._telemetry = self._telemetry, []
        if not batch:
            return 0
        try:
            async with self._transaction() as tx:
                await self.append_many_in(tx, batch)
        except StoreError as exc:
            self.telemetry_dropped += len(batch)
            log.warning(
                "telemetry.dropped",
                reason=str(exc),
                lost=len(batch),
                dropped=self.telemetry_dropped,
            )
            return 0
        return len(batch)

    async def replay(self, session_id: str, after: int = 0, limit: int = 10_000) -> list[Event]:
        """A page of a stream's events, read and decoded off the event loop (a page is large)."""
        return await self.read_off_loop(
            [("replay_events", (session_id, after, limit))],
            lambda rows: [Event.from_row(r) for r in rows[0]],
        )

    async def events_for_command(self, command_id: str) -> list[Event]:
        """Off the loop: on SQLite no index keys events by command_id (see its migration 0009),
        so this is a scan of the event log."""
        return await self.read_off_loop(
            [("events_by_command", (command_id,))],
            lambda rows: [Event.from_row(r) for r in rows[0]],
        )

    # -- plain reads --------------------------------------------------------------------------

    async def read_off_loop(self, reads: Reads, then: Callable[[list[list[Row]]], T]) -> T:
        """Named reads, then `then(rows)` (rows: one list per read), off the event loop: for scans
        whose cost grows with the event log, so the loop (kill switch, heartbeats, the gate)
        never waits for them. On SQLite the reads share one snapshot; see Backend.read_off_loop."""
        return await self.backend.read_off_loop(reads, then)

    async def _fetchrow(self, name: str, *args: Any) -> Row | None:
        async with self.backend.reader() as tx:
            return await tx.fetchrow(name, *args)

    async def _fetchall(self, name: str, *args: Any) -> list[Row]:
        async with self.backend.reader() as tx:
            return await tx.fetchall(name, *args)

    def buffer_telemetry(self, event: NewEvent) -> None:
        """Queue a telemetry event without writing or awaiting: the periodic flush writes it.
        For callers on the gate's path that must never wait for the store (shadow policy)."""
        self._buffer(event)

    async def once(self, command_id: str, event: NewEvent) -> bool:
        """Append `event` exactly once for this command_id (refusals, alerts, exhaustion
        notices). True when this call appended it, also when a retry after a lost connection
        finds that its first attempt had landed; False when it was there already."""
        operation = f"once:{event.kind}"
        digest = params_hash(operation, {})
        mark = call_mark()
        claim = canonical_json({CALL_MARK: mark})

        async def attempt(_n: int) -> bool:
            async with self._transaction() as tx:
                found = await self.claim_in(tx, command_id, operation, digest, claim)
                if found is not None:  # there already: this call's landed attempt, or a twin's
                    return found[1] == mark
                await self.append_in(tx, event)
            return True

        return await self.retrying(attempt, what=operation, tries=COMMAND_TRIES,
                                   command_id=command_id)  # fmt: skip

    # -- store identity and the host kill switch's replay mark -------------------------------

    async def identity(self) -> str | None:
        """This store's id, made once with the schema; None on a database without one."""
        row = await self._fetchrow("store_identity")
        return str(row["id"]) if row is not None else None

    async def ids_with_prefix(self, kind: IdKind, *, fleet: str, prefix: str) -> list[str]:
        """The fleet's ids of `kind` that start with `prefix` (at most 21): the CLI accepts a
        unique prefix, like git."""
        rows = await self._fetchall(_ID_QUERIES[kind], fleet, len(prefix), prefix)
        return [str(r["id"]) for r in rows]

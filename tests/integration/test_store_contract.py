"""The store contract, run against both backends (SQLite and Postgres) through the same tests.

What is promised (docs: DESIGN.md "Promises" 2, 3, 5, 7): gapless per-session sequences, one
effect per command_id, conflicts on reuse, atomic budget reservations, fail-closed state-bearing
writes, counted (never silently lost) telemetry, safe migrations, exactly-once windows.

Failures are real ones: a trigger or CHECK constraint that rejects inserts, a read-only connection,
another process holding the SQLite write lock, a deferred constraint that fails at COMMIT, and
Postgres backends terminated by pg_terminate_backend. No driver call is mocked.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import anyio
import asyncpg
import pytest

from supervisor.actions import params_hash
from supervisor.errors import (
    IdempotencyConflict,
    SchemaMissing,
    SchemaTooNew,
    StateWriteError,
    StoreError,
)
from supervisor.events import (
    ACTION_FAILED,
    ACTION_STARTED,
    ACTION_SUCCEEDED,
    CHECKPOINT,
    WINDOW_CLOSED,
    WINDOW_MISSED,
    WINDOW_OPENED,
)
from supervisor.store import NewEvent, Session, Store, Tx, open_store
from supervisor.store.base import TELEMETRY_BATCH, CommandBody
from supervisor.store.queries import load_migrations
from supervisor.store.sqlite import SQLiteBackend, parse_sqlite_url
from supervisor.timing.clock import VirtualClock
from tests import storetools
from tests.storetools import NO_SWITCH_TARGET

pytestmark = pytest.mark.anyio

T = TypeVar("T")
FLEET = "contract"
WINDOW_START = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


# --- helpers ------------------------------------------------------------------------------------


def all_versions(store: Store) -> list[int]:
    return [v for v, _name, _sql in load_migrations(store.dialect)]


def ev(session_id: str, kind: str = "TEST", **kw: Any) -> NewEvent:
    return NewEvent(kind=kind, session_id=session_id, **kw)


async def seqs(store: Store, session_id: str, after: int = 0) -> list[int]:
    return [e.seq for e in await store.replay(session_id, after)]


async def kinds(store: Store, session_id: str) -> Counter[str]:
    return Counter(e.kind for e in await store.replay(session_id))


async def concurrently(n: int, fn: Callable[[int], Awaitable[T]]) -> list[T]:
    """Run fn(0..n-1) at once in one task group; results in index order."""
    results: dict[int, T] = {}

    async def one(i: int) -> None:
        results[i] = await fn(i)

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)
    return [results[i] for i in range(n)]


def appending_body(store: Store, session_id: str, calls: list[int], command_id: str) -> CommandBody:
    """A command body whose effect is one event tagged with the command_id; counts its runs."""

    async def body(tx: Tx) -> dict[str, Any]:
        calls.append(1)
        seq = await store.append_in(tx, ev(session_id, "EFFECT", command_id=command_id))
        return {"seq": seq}

    return body


async def open_window(
    store: Store, key: str = "w1", *, max_cost: float | None = None, max_actions: int | None = None
) -> tuple[Session, bool]:
    return await store.open_window(
        fleet=FLEET, key=key, starts_at=WINDOW_START, ends_at=WINDOW_START + timedelta(hours=1),
        max_cost=max_cost, max_actions=max_actions, by="test",
    )  # fmt: skip


async def begin(store: Store, session_id: str, command_id: str, cost: float) -> str:
    status, _ = await store.begin_action(
        command_id=command_id, operation="act", params={"id": command_id}, fleet=FLEET,
        session_id=session_id, worker="w", name="act", risk="low", cost=cost, critical=False,
        safe_to_retry=False, rule="test", correlation_id=None, agent_id=None,
        switches=NO_SWITCH_TARGET,
    )  # fmt: skip
    return status


async def budget_row(store: Store, session_id: str) -> dict[str, Any]:
    row = await storetools.fetchrow(store, "get_session", session_id)
    assert row is not None
    return row


async def pg_exec(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@asynccontextmanager
async def inserts_rejected(url: str) -> AsyncIterator[None]:
    """From a second connection, make the database itself reject every new event row."""
    if url.startswith("sqlite"):
        other = sqlite3.connect(parse_sqlite_url(url)[0], isolation_level=None)
        other.execute(
            "CREATE TRIGGER reject_events BEFORE INSERT ON events "
            "BEGIN SELECT RAISE(ABORT, 'inserts rejected by test'); END"
        )
        try:
            yield
        finally:
            other.execute("DROP TRIGGER reject_events")
            other.close()
        return
    await pg_exec(url, "ALTER TABLE events ADD CONSTRAINT reject_events CHECK (false) NOT VALID")
    try:
        yield
    finally:
        await pg_exec(url, "ALTER TABLE events DROP CONSTRAINT reject_events")


async def terminate_other_backends(url: str) -> int:
    """pg_terminate_backend on every other connection to this database (the store's pool)."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    return sum(1 for r in rows if r["ok"])


def sqlite_conn(store: Store) -> sqlite3.Connection:
    backend = store.backend
    assert isinstance(backend, SQLiteBackend) and backend._conn is not None
    return backend._conn


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
async def sqlite_store(sqlite_url: str, clock: VirtualClock) -> AsyncIterator[Store]:
    s = await open_store(sqlite_url, clock, migrate=True)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture(params=["sqlite", "postgres"])
def blank_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An existing database with no schema at all (sync, like conftest's Postgres fixtures)."""
    if request.param == "sqlite":
        (tmp_path / "blank.db").touch()  # a read never creates the file: it must exist
        yield f"sqlite:///{tmp_path / 'blank.db'}"
        return
    pg_url: str = request.getfixturevalue("pg_url")  # skips (or fails under CI) without Postgres
    name = f"acp_blank_{uuid.uuid4().hex[:12]}"
    asyncio.run(pg_exec(pg_url, f'CREATE DATABASE "{name}"'))
    try:
        yield f"{pg_url.rpartition('/')[0]}/{name}"
    finally:
        asyncio.run(pg_exec(pg_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# --- 1. events: order, filtering, per-session sequences, timestamps ---------------------------


async def test_replay_order_after_and_independent_sequences(store: Store) -> None:
    for i in range(3):
        assert await store.append(ev("s-a", payload={"i": i})) == i + 1
        if i < 2:
            assert await store.append(ev("s-b", payload={"i": i})) == i + 1
    events = await store.replay("s-a")
    assert [e.seq for e in events] == [1, 2, 3]
    assert [e.payload["i"] for e in events] == [0, 1, 2]
    assert await seqs(store, "s-b") == [1, 2]
    assert await seqs(store, "s-a", after=1) == [2, 3]
    assert await seqs(store, "s-a", after=3) == []
    assert await seqs(store, "nobody") == []
    assert [e.seq for e in await store.replay("s-a", 0, limit=2)] == [1, 2]


async def test_event_fields_round_trip_with_utc_microseconds(
    store: Store, clock: VirtualClock
) -> None:
    clock.advance(timedelta(seconds=1, microseconds=123457))
    full = {
        "reason": "why",
        "command_id": "c",
        "correlation_id": "k",
        "worker": "w",
        "agent_id": "a",
    }
    await store.append(ev("s", "FULL", payload={"n": 1, "s": "ü"}, **full))
    (event,) = await store.replay("s")
    assert event.created_at == clock.now()
    assert event.created_at.utcoffset() == timedelta(0)
    assert event.created_at.microsecond == 123457
    assert (event.kind, event.reason, event.payload) == ("FULL", "why", {"n": 1, "s": "ü"})
    assert {k: getattr(event, k) for k in full} == full
    assert event.state_bearing is True
    json.dumps(event.as_dict())  # serializable for the CLI


# --- 2, 3. commands: exactly once, conflicts ---------------------------------------------------


async def test_retry_returns_stored_result_without_rerunning(store: Store) -> None:
    calls: list[int] = []
    body = appending_body(store, "s", calls, "cmd-1")
    first = await store.run_command("cmd-1", "op", {"x": 1}, body)
    again = await store.run_command("cmd-1", "op", {"x": 1}, body)
    assert first == ({"seq": 1}, True)
    assert again == ({"seq": 1}, False)
    assert len(calls) == 1
    assert await seqs(store, "s") == [1]
    assert await store.lookup_command("cmd-1", "op", {"x": 1}) == {"seq": 1}
    assert await store.lookup_command("cmd-unknown", "op", {"x": 1}) is None


async def test_once_appends_a_single_event(store: Store) -> None:
    assert await store.once("alert-1", ev("s", "ALERT")) is True
    assert await store.once("alert-1", ev("s", "ALERT")) is False
    assert await kinds(store, "s") == Counter({"ALERT": 1})


def lose_the_first_acknowledgement(
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    meanwhile: Callable[[], Awaitable[Any]] | None = None,
) -> list[bool]:
    """The next write transaction commits, then its caller hears "connection lost" (transient,
    so Store.retrying runs the work again); `meanwhile` runs before it hears it. Returns the
    flag, False once it was injected."""
    real = store.backend.transaction
    armed = [True]

    @asynccontextmanager
    async def reply_lost() -> AsyncIterator[Tx]:
        async with real() as tx:
            yield tx
        if armed[0]:
            await acknowledgement_lost(armed, meanwhile, "commit's")

    monkeypatch.setattr(store.backend, "transaction", reply_lost)
    return armed


async def acknowledgement_lost(
    armed: list[bool], meanwhile: Callable[[], Awaitable[Any]] | None, what: str
) -> None:
    """Disarm, run `meanwhile`, then raise the transient error a lost connection gives."""
    armed[0] = False
    if meanwhile is not None:
        await meanwhile()
    lost = StateWriteError(f"{what} acknowledgement lost (test)")
    lost.transient = True
    raise lost


async def test_once_whose_reply_was_lost_after_it_landed_is_still_this_calls_append(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The COMMIT landed but the caller heard "connection lost": the retry finds its own claim,
    so the append is reported as this call's (an alert is announced), and it is still one."""
    armed = lose_the_first_acknowledgement(store, monkeypatch)
    assert await store.once("alert-1", ev("s", "ALERT")) is True
    assert armed == [False], "the lost acknowledgement was injected"
    assert await store.once("alert-1", ev("s", "ALERT")) is False  # a twin, later: not its own
    assert await kinds(store, "s") == Counter({"ALERT": 1})


async def test_a_command_whose_reply_was_lost_after_it_landed_is_still_fresh(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_command's retry finds the row its first attempt wrote: the result is this call's
    (fresh: a window's close is announced), the body ran once, and reads see the result only."""
    calls: list[int] = []
    armed = lose_the_first_acknowledgement(store, monkeypatch)
    body = appending_body(store, "s", calls, "cmd-1")
    assert await store.run_command("cmd-1", "op", {"x": 1}, body) == ({"seq": 1}, True)
    assert armed == [False], "the lost acknowledgement was injected"
    assert calls == [1]
    assert await store.run_command("cmd-1", "op", {"x": 1}, body) == ({"seq": 1}, False)
    assert await store.lookup_command("cmd-1", "op", {"x": 1}) == {"seq": 1}
    assert calls == [1]
    assert await seqs(store, "s") == [1]


def lose_the_first_start_acknowledgement(
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    meanwhile: Callable[[], Awaitable[Any]] | None = None,
) -> list[bool]:
    """As lose_the_first_acknowledgement, for the next started record on either path: a write
    transaction's, or (Postgres) the one statement that writes it on its own."""
    armed = lose_the_first_acknowledgement(store, monkeypatch, meanwhile)
    if store.backend.one_statement_writes:
        real = store.backend.batched

        async def reply_lost(name: str, **kwargs: Any) -> Any:
            row = await real(name, **kwargs)
            if armed[0] and row is not None and row["status"] == "started":
                await acknowledgement_lost(armed, meanwhile, "the statement's")
            return row

        monkeypatch.setattr(store.backend, "batched", reply_lost)
    return armed


async def test_a_start_whose_reply_was_lost_after_it_landed_is_still_this_calls(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The started record landed, but its caller heard "connection lost": the retry finds the
    ledger row its own first attempt claimed, so the start is this call's (the effect may run),
    not a concurrent twin's (refused, in doubt until recovery). Still one record, one
    reservation; a later twin is a replay."""
    session, _ = await open_window(store, max_actions=5)
    armed = lose_the_first_start_acknowledgement(store, monkeypatch)
    assert await begin(store, session.id, "a1", 1.0) == "started"
    assert armed == [False], "the lost acknowledgement was injected"
    assert await begin(store, session.id, "a1", 1.0) == "replay"  # a twin, later
    assert (await budget_row(store, session.id))["reserved_actions"] == 1
    assert (await kinds(store, session.id))[ACTION_STARTED] == 1
    action = await store.get_action("a1")
    assert action is not None and action.status == "started"


async def test_a_start_whose_reply_was_lost_and_that_recovery_took_meanwhile_is_not_run(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start landed, and before its retry a peer's recovery marked it in-doubt (this
    host's heartbeat was stale past the lease): the retry finds its own mark but not its open
    record, so the effect does not run (a replay, refused in doubt), and the record stays as
    recovery left it."""
    session, _ = await open_window(store, max_actions=5)

    async def recovered() -> None:
        assert await store.mark_in_doubt(command_id="a1", session_id=session.id, cost=1.0,
                                         worker="w", reason="orphaned", payload={})  # fmt: skip

    armed = lose_the_first_start_acknowledgement(store, monkeypatch, recovered)
    assert await begin(store, session.id, "a1", 1.0) == "replay"
    assert armed == [False], "the lost acknowledgement was injected"
    action = await store.get_action("a1")
    assert action is not None and action.status == "in_doubt"
    assert (await budget_row(store, session.id))["reserved_actions"] == 0


async def test_a_start_whose_reply_was_lost_and_that_a_re_run_took_meanwhile_is_not_run(
    store: Store, clock: VirtualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, and then another task of this same process re-ran it (it is safe to retry):
    the record is open again with this host and owner, but it is the re-run's start, not this
    call's (its start time tells), so this call's effect does not run; the re-run's does."""
    session, _ = await open_window(store, max_actions=5)

    async def recovered_then_re_run() -> None:
        assert await store.mark_in_doubt(command_id="a1", session_id=session.id, cost=1.0,
                                         worker="w", reason="orphaned", payload={})  # fmt: skip
        clock.advance(timedelta(seconds=1))
        status, _ = await store.restart_action(
            command_id="a1", fleet=FLEET, session_id=session.id, worker="w", name="act",
            risk="low", cost=1.0, rule="test", correlation_id=None, agent_id=None,
            switches=NO_SWITCH_TARGET,
        )  # fmt: skip
        assert status == "started"

    armed = lose_the_first_start_acknowledgement(store, monkeypatch, recovered_then_re_run)
    assert await begin(store, session.id, "a1", 1.0) == "replay"
    assert armed == [False], "the lost acknowledgement was injected"
    action = await store.get_action("a1")
    assert action is not None and action.status == "started"
    assert (await budget_row(store, session.id))["reserved_actions"] == 1  # the re-run's


@pytest.mark.parametrize(
    ("operation", "params"), [("op", {"x": 2}), ("other-op", {"x": 1})], ids=["params", "operation"]
)
async def test_reused_command_id_is_a_conflict(store: Store, operation: str, params: Any) -> None:
    calls: list[int] = []
    await store.run_command("cmd-1", "op", {"x": 1}, appending_body(store, "s", calls, "cmd-1"))
    retry = appending_body(store, "s", calls, "cmd-1")
    attempts: list[Callable[[], Awaitable[Any]]] = [
        lambda: store.run_command("cmd-1", operation, params, retry),
        lambda: store.lookup_command("cmd-1", operation, params),
    ]
    for attempt in attempts:
        with pytest.raises(IdempotencyConflict) as info:
            await attempt()
        message = str(info.value)
        assert "cmd-1" in message
        for op, p in (("op", {"x": 1}), (operation, params)):
            assert op in message and params_hash(op, p)[:12] in message
    assert len(calls) == 1
    assert await seqs(store, "s") == [1]


# --- 4. concurrency -----------------------------------------------------------------------------


async def test_concurrent_appends_get_gapless_distinct_seqs(store: Store) -> None:
    async def write(i: int) -> int | None:
        return await store.append(ev("s-a" if i < 50 else "s-b", payload={"i": i}))

    returned = await concurrently(70, write)
    assert sorted(s for s in returned[:50] if s is not None) == list(range(1, 51))
    assert sorted(s for s in returned[50:] if s is not None) == list(range(1, 21))
    assert await seqs(store, "s-a") == list(range(1, 51))
    assert await seqs(store, "s-b") == list(range(1, 21))
    by_seq = {e.seq: e.payload["i"] for e in await store.replay("s-a")}
    assert sorted(by_seq.values()) == list(range(50))


async def test_concurrent_twins_of_one_command_take_effect_once(store: Store) -> None:
    calls: list[int] = []
    body = appending_body(store, "s", calls, "cmd-twin")
    results = await concurrently(50, lambda _i: store.run_command("cmd-twin", "op", {}, body))
    assert sum(fresh for _r, fresh in results) == 1
    assert {json.dumps(r) for r, _f in results} == {json.dumps({"seq": 1})}
    assert len(await store.events_for_command("cmd-twin")) == 1
    assert await seqs(store, "s") == [1]
    assert len(calls) >= 1  # rolled-back twins may have run the body; none committed it


async def test_racing_twins_of_a_start_replay_even_when_the_window_is_full(store: Store) -> None:
    """The ledger row is claimed first: a twin that loses the race comes back as a replay, never
    as a budget refusal because it saw the winner's reservation first (Postgres used to)."""
    session, _ = await open_window(store, max_actions=1)
    statuses = await concurrently(30, lambda _i: begin(store, session.id, "cmd-twin", 1.0))
    assert Counter(statuses) == Counter({"started": 1, "replay": 29})
    row = await budget_row(store, session.id)
    assert (row["reserved_actions"], row["reserved_cost"]) == (1, 1.0)
    assert (await kinds(store, session.id))[ACTION_STARTED] == 1


# --- 5. budgets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_actions", "max_cost", "room"), [(10, 100.0, 10), (None, 7.5, 7)], ids=["actions", "cost"]
)
async def test_budget_reservations_cannot_overspend(
    store: Store, max_actions: int | None, max_cost: float, room: int
) -> None:
    session, _ = await open_window(store, max_cost=max_cost, max_actions=max_actions)
    statuses = await concurrently(50, lambda i: begin(store, session.id, f"a{i}", 1.0))
    started = [f"a{i}" for i, s in enumerate(statuses) if s == "started"]
    assert Counter(statuses) == Counter({"started": room, "budget": 50 - room})
    assert (await kinds(store, session.id))[ACTION_STARTED] == room
    row = await budget_row(store, session.id)
    assert (row["reserved_actions"], row["reserved_cost"]) == (room, float(room))

    succeeded, failed = started[:4], started[4:]
    for cid in started:
        await store.finish_action(
            command_id=cid, session_id=session.id, ok=cid in succeeded, cost=1.0
        )
    row = await budget_row(store, session.id)
    assert (row["used_actions"], row["used_cost"]) == (4, 4.0)  # success charged
    assert (row["reserved_actions"], row["reserved_cost"]) == (0, 0.0)  # failure released
    counts = await kinds(store, session.id)
    assert (counts[ACTION_SUCCEEDED], counts[ACTION_FAILED]) == (4, len(failed))
    action = await store.get_action(succeeded[0])
    assert action is not None and action.status == "succeeded"

    # The released reservations are room again; the charged ones are not.
    again = await concurrently(20, lambda i: begin(store, session.id, f"b{i}", 1.0))
    assert again.count("started") == room - 4


async def test_finished_action_cannot_finish_twice(store: Store) -> None:
    session, _ = await open_window(store, max_actions=5)
    assert await begin(store, session.id, "a1", 2.0) == "started"
    assert await begin(store, session.id, "a1", 2.0) == "replay"
    await store.finish_action(command_id="a1", session_id=session.id, ok=True, cost=2.0)
    with pytest.raises(StateWriteError, match="no open started record"):
        await store.finish_action(command_id="a1", session_id=session.id, ok=True, cost=2.0)
    row = await budget_row(store, session.id)
    assert (row["used_actions"], row["used_cost"], row["reserved_actions"]) == (1, 2.0, 0)


# --- 6. fail-closed state-bearing writes ------------------------------------------------------


async def test_rejected_write_fails_closed_and_leaves_nothing(store: Store, store_url: str) -> None:
    session, _ = await open_window(store, max_actions=5)
    before = await seqs(store, session.id)
    calls: list[int] = []
    async with inserts_rejected(store_url):
        with pytest.raises(StateWriteError):
            await store.append(ev(session.id))
        with pytest.raises(StateWriteError):
            await store.run_command(
                "cmd-x", "op", {}, appending_body(store, session.id, calls, "cmd-x")
            )
        with pytest.raises(StateWriteError):
            await begin(store, session.id, "a1", 1.0)
    assert await seqs(store, session.id) == before
    assert await store.lookup_command("cmd-x", "op", {}) is None  # no ledger row: retry will run
    assert await store.get_action("a1") is None  # no started record: the action must not run
    assert (await budget_row(store, session.id))["reserved_actions"] == 0
    # Writes work again, and the sequence has no gap where the failed write was.
    assert await store.append(ev(session.id)) == len(before) + 1
    assert await begin(store, session.id, "a1", 1.0) == "started"


@contextmanager
def _write_lock_held_elsewhere(store: Store, url: str) -> Iterator[None]:
    store.backend.write_wait = 0.1  # type: ignore[attr-defined]  # SQLite only: wait briefly
    other = sqlite3.connect(parse_sqlite_url(url)[0], isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


@contextmanager
def _read_only_connection(store: Store, url: str) -> Iterator[None]:
    conn = sqlite_conn(store)
    conn.execute("PRAGMA query_only=ON")
    try:
        yield
    finally:
        conn.execute("PRAGMA query_only=OFF")


@contextmanager
def _commit_fails(store: Store, url: str) -> Iterator[None]:
    # A deferred foreign key is checked at COMMIT: every statement succeeds, the commit fails.
    conn = sqlite_conn(store)
    conn.execute("CREATE TEMP TABLE parent (id INTEGER PRIMARY KEY)")
    conn.execute(
        "CREATE TEMP TABLE child (pid INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)"
    )
    conn.execute(
        "CREATE TEMP TRIGGER orphan AFTER INSERT ON main.events "
        "BEGIN INSERT INTO child VALUES (1); END"
    )
    try:
        yield
    finally:
        conn.execute("DROP TRIGGER temp.orphan")


@pytest.mark.parametrize(
    ("breaker", "message"),
    [
        (_write_lock_held_elsewhere, "database is locked"),
        (_read_only_connection, "readonly"),
        (_commit_fails, "commit failed"),
    ],
    ids=["locked-by-other-process", "read-only", "commit-fails"],
)
async def test_sqlite_write_failures_fail_closed(
    sqlite_store: Store,
    sqlite_url: str,
    breaker: Callable[[Store, str], AbstractContextManager[None]],
    message: str,
) -> None:
    assert await sqlite_store.append(ev("s")) == 1
    with breaker(sqlite_store, sqlite_url), pytest.raises(StateWriteError, match=message):
        await sqlite_store.append(ev("s"))
    assert await seqs(sqlite_store, "s") == [1]
    assert await sqlite_store.append(ev("s")) == 2


async def _append_or_none(store: Store, event: NewEvent) -> int | None:
    try:
        return await store.append(event)
    except StateWriteError:
        return None


async def test_postgres_connection_loss_fails_closed_then_recovers(
    pg_url: str, clock: VirtualClock
) -> None:
    store = await open_store(pg_url, clock)
    try:
        assert await store.append(ev("s")) == 1
        calls: list[int] = []

        async def body(tx: Tx) -> dict[str, Any]:
            calls.append(1)
            await store.append_in(tx, ev("s", "EFFECT", command_id="cmd-lost"))
            assert await terminate_other_backends(pg_url) >= 1  # kills this very transaction
            await store.append_in(tx, ev("s", "EFFECT", command_id="cmd-lost"))
            return {}

        with pytest.raises(StateWriteError, match="connection lost"):
            await store.run_command("cmd-lost", "op", {}, body)
        assert await store.lookup_command("cmd-lost", "op", {}) is None
        # The pool replaces the dead connection: the next write succeeds, the lost one left nothing.
        assert await store.append(ev("s")) == 2
        assert await seqs(store, "s") == [1, 2]
        # Idle pool connections killed: each dead one fails at most one write, closed (always a
        # StateWriteError, never a raw driver error); then the pool reconnects and writes succeed.
        await terminate_other_backends(pg_url)
        failures = 0
        while (seq := await _append_or_none(store, ev("s"))) is None:
            failures += 1
            assert failures <= 10, "the pool never reconnected"
        assert seq == 3
        assert await store.append(ev("s")) == 4
        assert await seqs(store, "s") == [1, 2, 3, 4]
    finally:
        await store.close()


# --- 7. telemetry -------------------------------------------------------------------------------


async def test_telemetry_is_buffered_until_flushed(store: Store) -> None:
    assert await store.append(ev("s", "TICK", state_bearing=False)) is None
    assert await store.append(ev("s", "TICK", state_bearing=False)) is None
    assert await store.append(ev("s", "STATE")) == 1
    assert await kinds(store, "s") == Counter({"STATE": 1})
    assert await store.flush_telemetry() == 2
    events = await store.replay("s")
    assert [(e.seq, e.kind, e.state_bearing) for e in events] == [
        (1, "STATE", True), (2, "TICK", False), (3, "TICK", False),
    ]  # fmt: skip
    assert await store.flush_telemetry() == 0
    assert store.telemetry_dropped == 0


async def test_telemetry_flushes_itself_when_the_batch_fills(store: Store) -> None:
    for _ in range(TELEMETRY_BATCH):
        await store.append(ev("s", "TICK", state_bearing=False))
    assert len(await store.replay("s")) == TELEMETRY_BATCH


def count_statement_calls(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every call a write transaction makes to the driver, by statement name, from now on."""
    calls: list[str] = []
    real = store.backend.transaction

    class Counting:
        def __init__(self, tx: Tx) -> None:
            self._tx = tx

        def __getattr__(self, method: str) -> Any:
            original = getattr(self._tx, method)
            if method not in ("execute", "fetchrow", "fetchval", "fetchall", "executemany"):
                return original

            async def call(name: str, *args: Any) -> Any:
                calls.append(name)
                return await original(name, *args)

            return call

    @asynccontextmanager
    async def counted() -> AsyncIterator[Any]:
        async with real() as tx:
            yield Counting(tx)

    monkeypatch.setattr(store.backend, "transaction", counted)
    return calls


async def test_telemetry_and_a_checkpoints_cycles_are_written_in_one_call_each(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transaction writing many events holds its stream's row (Postgres) and the write lock
    (SQLite) for one statement call, not one round trip per event: on Postgres a checkpoint of
    a hundred cycles locked the stream's row, and so every start and outcome of its window,
    for a hundred round trips. The seqs are still consecutive, in order."""
    calls = count_statement_calls(store, monkeypatch)
    step = store.backend.rows_per_loop_turn  # (the loop gets a turn between two calls)
    for i in range(300):
        await store.append(ev("s", "TICK", state_bearing=False, payload={"i": i}))
    await store.flush_telemetry()
    # 256 flushed on the way, then the rest (it was one call per event)
    assert calls.count("insert_event") == -(-256 // step) + -(-44 // step), calls
    pending = [(ev("s", "CYCLE", state_bearing=False, payload={"i": i}), store.clock.now())
               for i in range(100)]  # fmt: skip
    calls.clear()
    await store.save_checkpoint(fleet=FLEET, worker="w", cycle=100, session_id="s", state={},
                                counters={}, pending=pending)  # fmt: skip
    assert len(calls) == -(-100 // step) + 3, (
        calls
    )  # the cycles, the seq, the checkpoint, its event
    events = await store.replay("s")
    assert [e.seq for e in events] == list(range(1, 402))
    assert [e.payload.get("i") for e in events[:300]] == list(range(300))
    assert [e.payload.get("i") for e in events[300:400]] == list(range(100))
    assert events[-1].kind == CHECKPOINT


async def test_failed_telemetry_flush_is_counted(store: Store, store_url: str) -> None:
    for _ in range(5):
        await store.append(ev("s", "TICK", state_bearing=False))
    async with inserts_rejected(store_url):
        assert await store.flush_telemetry() == 0
    assert store.telemetry_dropped == 5
    assert await store.replay("s") == []
    await store.append(ev("s", "TICK", state_bearing=False))
    assert await store.flush_telemetry() == 1
    assert store.telemetry_dropped == 5


# --- rows altered outside the store ---------------------------------------------------------


async def alter(store_url: str, sql: str) -> None:
    """Write straight into the database, as someone with the file or the server might."""
    if store_url.startswith("sqlite"):
        conn = sqlite3.connect(parse_sqlite_url(store_url)[0], isolation_level=None)
        try:
            conn.execute(sql)
        finally:
            conn.close()
    else:
        await pg_exec(store_url, sql)


@pytest.mark.parametrize(
    "bad", ["[1, 2]", "not json", '"text"'], ids=["array", "garbage", "string"]
)
async def test_a_row_altered_outside_the_store_is_one_error_naming_it(
    store: Store, store_url: str, bad: str
) -> None:
    """JSON that no longer parses, or is not the object this store wrote, in a ledger row, an
    event, an action row or a checkpoint: a StoreError naming the row (the action that needed
    it fails closed), not an AttributeError or a JSONDecodeError from deep in the store."""
    session, _ = await open_window(store, max_actions=5)
    assert await begin(store, session.id, "a1", 1.0) == "started"
    checkpoint = await store.save_checkpoint(fleet=FLEET, worker="w", cycle=1,
                                             session_id=session.id, state={"n": 1}, counters={})  # fmt: skip
    quoted = bad.replace("'", "''")
    await alter(store_url, f"UPDATE commands SET result = '{quoted}' WHERE command_id = 'a1'")
    await alter(store_url, f"UPDATE events SET payload = '{quoted}' WHERE session_id = '{session.id}'")  # fmt: skip
    await alter(store_url, f"UPDATE actions SET params = '{quoted}' WHERE command_id = 'a1'")
    await alter(store_url, f"UPDATE checkpoints SET state = '{quoted}' WHERE id = {checkpoint}")
    for read, named in [
        (lambda: begin(store, session.id, "a1", 1.0), "ledger row of a1"),  # its retry
        (lambda: store.lookup_command("a1", "act", {"id": "a1"}), "ledger row of a1"),
        (lambda: store.replay(session.id), "event "),
        (lambda: store.get_action("a1"), "action a1"),
        (lambda: store.get_checkpoint(checkpoint), f"checkpoint {checkpoint}"),
    ]:
        with pytest.raises(StoreError) as info:
            await read()
        assert named in str(info.value) and "altered" in str(info.value), str(info.value)
    assert (await budget_row(store, session.id))["reserved_actions"] == 1  # nothing more ran


# --- 8. migrations ------------------------------------------------------------------------------


async def test_migrating_twice_changes_nothing(
    store: Store, store_url: str, clock: VirtualClock
) -> None:
    before = await store.backend.schema_versions()
    assert before == all_versions(store) and max(before) == store.latest_version
    assert await store.migrate() == []
    again = await open_store(store_url, clock, migrate=True)
    await again.close()
    assert await store.backend.schema_versions() == before
    await store.check_schema()


async def test_newer_schema_is_refused(store: Store, store_url: str, clock: VirtualClock) -> None:
    async with store.backend.transaction() as tx:
        await tx.execute("record_version", 999, clock.now())
    for migrate in (False, True):
        with pytest.raises(SchemaTooNew, match=r"version 999 is newer .*upgrade") as info:
            await open_store(store_url, clock, migrate=migrate)
        assert f"knows up to {store.latest_version}" in str(info.value)
    assert await store.backend.schema_versions() == [*all_versions(store), 999]


async def test_unmigrated_database_is_refused(blank_url: str, clock: VirtualClock) -> None:
    with pytest.raises(SchemaMissing, match="db migrate"):
        await open_store(blank_url, clock)
    store = await open_store(blank_url, clock, migrate=True)
    try:
        assert await store.backend.schema_versions() == all_versions(store)
    finally:
        await store.close()


# --- 9. windows ---------------------------------------------------------------------------------


async def test_window_opens_and_closes_exactly_once(store: Store) -> None:
    results = await concurrently(20, lambda _i: open_window(store, max_actions=3))
    assert len({s.id for s, _f in results}) == 1
    assert sum(fresh for _s, fresh in results) == 1
    session = results[0][0]
    assert (session.status, session.fleet, session.max_actions) == ("open", FLEET, 3)
    assert [s.id for s in await store.open_sessions(FLEET)] == [session.id]

    closed = await concurrently(20, lambda _i: store.close_window(session.id, by="test"))
    assert closed.count(True) == 1
    assert await store.close_window(session.id, by="test") is False
    counts = await kinds(store, session.id)
    assert (counts[WINDOW_OPENED], counts[WINDOW_CLOSED]) == (1, 1)
    reread = await store.get_session(session.id)
    assert reread is not None and (reread.status, reread.closed_by) == ("closed", "test")
    assert await store.open_sessions(FLEET) == []
    # Reopening a closed window is a replay, not a second window.
    assert (await open_window(store))[1] is False
    assert (await kinds(store, session.id))[WINDOW_OPENED] == 1


async def test_missed_window_is_recorded_once_and_never_opened(store: Store) -> None:
    end = WINDOW_START + timedelta(hours=1)
    missed = [
        await store.record_missed_window(fleet=FLEET, key="w1", starts_at=WINDOW_START, ends_at=end)
        for _ in range(2)
    ]
    assert missed == [True, False]
    session, opened = await open_window(store, "w1")
    assert session.status == "missed"
    assert opened is False
    assert await kinds(store, session.id) == Counter({WINDOW_MISSED: 1})


# --- 10. both dialects have the same schema -----------------------------------------------------


async def test_dialects_have_the_same_tables_and_columns(
    sqlite_store: Store, sqlite_url: str, pg_url: str
) -> None:
    lite = sqlite3.connect(parse_sqlite_url(sqlite_url)[0])
    try:
        tables = [r[0] for r in lite.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )]  # fmt: skip
        sqlite_schema = {t: [r[1] for r in lite.execute(f"PRAGMA table_info({t})")] for t in tables}
    finally:
        lite.close()
    pg = await asyncpg.connect(pg_url)
    try:
        rows = await pg.fetch(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"
        )
    finally:
        await pg.close()
    pg_schema: dict[str, list[str]] = {}
    for r in rows:
        pg_schema.setdefault(r["table_name"], []).append(r["column_name"])
    assert "events" in sqlite_schema and "schema_version" in sqlite_schema
    assert sqlite_schema == pg_schema


# --- id prefixes (the CLI accepts a unique prefix, like git) -------------------------------------


async def test_ids_resolve_from_a_unique_prefix(store: Store) -> None:
    from supervisor.cli.tables import resolve_id

    session, _ = await open_window(store)
    assert await resolve_id(store, "session", session.id[:8], FLEET) == session.id
    assert await resolve_id(store, "session", session.id, FLEET) == session.id
    assert await resolve_id(store, "session", "zzzzzzzz", FLEET) == "zzzzzzzz"  # unknown: as given
    assert await resolve_id(store, "session", session.id[:8], "other-fleet") == session.id[:8]
    for kind in ("approval", "action"):
        assert await resolve_id(store, kind, "abcdef", FLEET) == "abcdef"

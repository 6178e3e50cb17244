"""Connection loss on the real Postgres: terminated backends (pg_terminate_backend), a
connection cut while an outcome is written, and a blackholed database behind a TCP proxy this
test controls (tests/pg_proxy.py)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import asyncpg
import pytest
from pg_proxy import TcpProxy
from structlog.testing import capture_logs
from test_gate_store import FLEET, Rig, act, build_rig

from supervisor import events as ev
from supervisor.config import load_config
from supervisor.errors import ConfigError, StateWriteError, StoreError, StoreUnavailable
from supervisor.runtime import recovery
from supervisor.store import NewEvent, Store, open_store, system_stream
from supervisor.store.postgres import APPLICATION_NAME
from supervisor.timing.clock import VirtualClock
from tests import storetools
from tests.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def store(pg_url: str, clock: VirtualClock) -> AsyncIterator[Store]:
    s = await open_store(pg_url, clock, query_timeout=3.0)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def rig(store: Store, clock: VirtualClock, tmp_path: Path) -> Rig:
    return await build_rig(store, clock, tmp_path)


def _target(pg_url: str) -> tuple[str, int]:
    parts = urlsplit(pg_url)
    return parts.hostname or "127.0.0.1", parts.port or 5432


async def admin(pg_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    """A statement on the test database over a connection of its own (not the store's)."""
    conn = await asyncpg.connect(pg_url, timeout=5)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def terminate_store_backends(pg_url: str) -> int:
    """pg_terminate_backend on every connection of the store's pool; how many there were."""
    rows = await admin(
        pg_url,
        "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = $1",
        APPLICATION_NAME,
    )
    return int(rows[0]["n"])


async def wait_until_gone(pg_url: str) -> None:
    """Until the server has no session of the store's left (terminated ones take a moment)."""
    query = ("SELECT count(*) AS n FROM pg_stat_activity "
             "WHERE datname = current_database() AND application_name = $1")  # fmt: skip

    async def none_left() -> bool:
        return bool((await admin(pg_url, query, APPLICATION_NAME))[0]["n"] == 0)

    await eventually(none_left, "the store's terminated sessions gone from the server",
                     every=0.02)  # fmt: skip


async def cut_outcome_writes(pg_url: str, times: int) -> None:
    """The server drops the connection in the middle of the next `times` outcome writes (an
    action row leaving 'started' for a final status), as a lost network would."""
    await admin(pg_url, "CREATE SEQUENCE cut_outcome_seq")
    await admin(pg_url, f"""
        CREATE FUNCTION cut_outcome() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF NEW.status IN ('succeeded', 'failed', 'halted')
             AND nextval('cut_outcome_seq') <= {int(times)} THEN
            PERFORM pg_terminate_backend(pg_backend_pid());
            PERFORM pg_sleep(5);
          END IF;
          RETURN NEW;
        END $$""")  # fmt: skip
    await admin(pg_url, "CREATE TRIGGER cut_outcome BEFORE UPDATE ON actions FOR EACH ROW "
                        "EXECUTE FUNCTION cut_outcome()")  # fmt: skip


async def cuts_made(pg_url: str) -> int:
    rows = await admin(pg_url, "SELECT last_value, is_called FROM cut_outcome_seq")
    return int(rows[0]["last_value"]) if rows[0]["is_called"] else 0


# --- the outcome of a finished effect --------------------------------------------------------


async def test_an_outcome_cut_by_a_lost_connection_is_written_on_reconnect(
    rig: Rig, pg_url: str
) -> None:
    await cut_outcome_writes(pg_url, times=2)
    with capture_logs() as logs:
        outcome = await rig.run(act(), "cut-1")
    assert outcome.status == "succeeded" and not outcome.replayed
    assert await cuts_made(pg_url) == 3, "two writes cut, the third landed"
    retries = [e for e in logs if e["event"] == "store.retry"]
    assert [e["what"] for e in retries] == ["action.outcome", "action.outcome"]
    assert rig.effects == ["cut-1"], "the effect ran once"
    row = await rig.store.get_action("cut-1")
    assert row is not None and row.status == "succeeded"
    kinds = [e.kind for e in await rig.store.events_for_command("cut-1")]
    assert kinds.count(ev.ACTION_STARTED) == 1 and kinds.count(ev.ACTION_SUCCEEDED) == 1
    session = await rig.reload_session()
    assert session.used_actions == 1, "charged once"
    stored = await rig.store.lookup_action("cut-1", "action:demo.do", {"n": 1})
    assert stored is not None and stored.status == "succeeded"


async def test_an_outcome_whose_commit_landed_before_the_loss_is_not_written_twice(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit reached the server but its acknowledgement was lost: the retry finds the
    outcome in place and stops, instead of failing on a started record that is gone."""
    backend = rig.store.backend
    real = backend.transaction
    armed = {"finish": True}

    @asynccontextmanager
    async def transaction() -> AsyncIterator[Any]:
        async with real() as tx:
            yield tx
        if armed["finish"] and await _finished(rig.store, "landed-1"):
            armed["finish"] = False
            lost = StateWriteError("postgres commit failed: connection lost (test)")
            lost.transient = True
            raise lost

    real_batched = backend.batched

    async def batched(name: str, **call: Any) -> Any:
        row = await real_batched(name, **call)  # the one-statement outcome (acp_finish_action)
        if armed["finish"] and await _finished(rig.store, "landed-1"):
            armed["finish"] = False
            lost = StateWriteError("postgres connection lost during finish_action_batch (test)")
            lost.transient = True
            raise lost
        return row

    monkeypatch.setattr(backend, "transaction", transaction)
    monkeypatch.setattr(backend, "batched", batched)
    outcome = await rig.run(act(), "landed-1")
    assert outcome.status == "succeeded"
    assert armed["finish"] is False, "the lost acknowledgement was injected"
    kinds = [e.kind for e in await rig.store.events_for_command("landed-1")]
    assert kinds.count(ev.ACTION_SUCCEEDED) == 1
    assert (await rig.reload_session()).used_actions == 1


async def test_a_start_whose_statement_landed_before_the_loss_runs_its_effect_once(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one statement that writes the started record ran on the server, then the connection
    went before its answer came: the start is retried the careful way, finds the ledger row
    this call claimed, and the effect runs, once. (It was refused as in doubt, its reservation
    held until recovery, as if a twin had started it.)"""
    backend = rig.store.backend
    real = backend._run_batch  # type: ignore[attr-defined]
    lost: list[str] = []

    async def answer_lost_once(name: str, calls: list[tuple[Any, ...]]) -> Any:
        rows = await real(name, calls)
        if name == "begin_action" and not lost:
            lost.append(name)
            error = StoreUnavailable("postgres connection lost during begin_action_batch (test)")
            error.transient = True
            raise error
        return rows

    monkeypatch.setattr(backend, "_run_batch", answer_lost_once)
    outcome = await rig.run(act(), "lost-start-1")
    assert lost == ["begin_action"], "the lost answer was injected"
    assert outcome.status == "succeeded" and not outcome.replayed
    assert rig.effects == ["lost-start-1"], "the effect ran once"
    kinds = [e.kind for e in await rig.store.events_for_command("lost-start-1")]
    assert kinds.count(ev.ACTION_STARTED) == 1 and kinds.count(ev.ACTION_SUCCEEDED) == 1
    assert not [e for e in kinds if e == ev.ACTION_DENIED]
    session = await rig.reload_session()
    assert session.used_actions == 1, "charged once"
    row = await storetools.fetchrow(rig.store, "get_session", session.id)
    assert row is not None and row["reserved_actions"] == 0, "no reservation left held"


async def _finished(store: Store, command_id: str) -> bool:
    row = await store.get_action(command_id)
    return row is not None and row.status == "succeeded"


def commit_lands_then_the_connection_resets(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """asyncpg's next COMMIT runs on the server, then the client hears the connection reset.
    Returns the flag, False once it was injected."""
    armed = [True]
    real = asyncpg.transaction.Transaction.commit

    async def commit(self: Any) -> None:
        await real(self)
        if armed[0]:
            armed[0] = False
            raise ConnectionResetError("connection reset after COMMIT (test)")

    monkeypatch.setattr(asyncpg.transaction.Transaction, "commit", commit)
    return armed


async def test_an_alert_and_a_window_close_whose_commit_landed_are_this_calls(
    store: Store, clock: VirtualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver's own failure after a COMMIT that landed: the retry finds this call's row, so
    the alert is announced (once() True) and the close reported (True), each written once."""
    stream = system_stream(FLEET)
    armed = commit_lands_then_the_connection_resets(monkeypatch)
    assert await store.once("alert-1", NewEvent(kind=ev.ALERT, session_id=stream,
                                                payload={})) is True  # fmt: skip
    assert armed == [False], "the reset was injected"
    assert [e.kind for e in await store.replay(stream)] == [ev.ALERT]

    now = clock.now()
    session, _ = await store.open_window(fleet=FLEET, key="w1", starts_at=now,
                                         ends_at=now + timedelta(hours=1), max_cost=None,
                                         max_actions=None, by="t")  # fmt: skip
    armed = commit_lands_then_the_connection_resets(monkeypatch)
    assert await store.close_window(session.id, by="t") is True
    assert armed == [False], "the reset was injected"
    closes = [e for e in await store.replay(session.id) if e.kind == ev.WINDOW_CLOSED]
    assert len(closes) == 1


async def test_an_outcome_is_left_in_doubt_only_when_the_daemon_stops_before_it_lands(
    rig: Rig, pg_url: str
) -> None:
    await cut_outcome_writes(pg_url, times=1_000_000)
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(rig.run, act(), "never-lands")
            await eventually(lambda: sum(e["event"] == "store.retry" for e in logs) >= 3,
                             "three retries of the outcome", every=0.02)  # fmt: skip
            assert rig.effects == ["never-lands"]
            row = await rig.store.get_action("never-lands")
            assert row is not None and row.status == "started", "still retrying, not given up"
            tg.cancel_scope.cancel()  # the daemon stops
    report = await recovery.scan(rig.store, fleet=FLEET, approvals=rig.approvals,
                                 host_switch=None, by="pytest")  # fmt: skip
    assert report.in_doubt == 1
    row = await rig.store.get_action("never-lands")
    assert row is not None and row.status == "in_doubt"


# --- terminated pooled connections -----------------------------------------------------------


async def test_terminated_pooled_connections_are_replaced_not_reported(
    pg_url: str, clock: VirtualClock
) -> None:
    """pg_terminate_backend on the pool's idle connections: the next read and the next write go
    through on fresh connections. The proxy keeps the socket open after the server's FATAL
    message, the moment in which asyncpg answers "another operation is in progress"."""
    async with TcpProxy.running(*_target(pg_url), hold_closes=True) as proxy:
        store = await open_store(proxy.url(pg_url), clock, query_timeout=3.0)
        try:
            stream = system_stream(FLEET)
            for round_ in range(3):
                await store.append(NewEvent(kind="TEST", session_id=stream))  # the pool is warm
                assert await terminate_store_backends(pg_url) >= 1
                await wait_until_gone(pg_url)
                # every other round a write comes first (BEGIN on the dead connection), else a read
                if round_ % 2 == 0:
                    await store.append(NewEvent(kind="TEST", session_id=stream))
                    assert await store.db_now() is not None
                else:
                    assert await store.db_now() is not None
                    await store.append(NewEvent(kind="TEST", session_id=stream))
            events = await store.replay(stream)
            assert sum(e.kind == "TEST" for e in events) == 6
        finally:
            proxy.release_closes()  # as the real server's socket would have, at once
            await store.close()


async def test_a_cut_mid_transaction_is_a_transient_store_error(rig: Rig, pg_url: str) -> None:
    """What cannot be redone below the store surfaces as the project's error, marked transient
    (the fleet then waits for the store instead of counting a worker crash)."""
    with pytest.raises(StoreError) as info:
        async with storetools.transaction(rig.store) as tx:
            await tx.fetchrow("db_now")
            await terminate_store_backends(pg_url)
            await tx.fetchrow("db_now")
    assert info.value.transient
    assert await rig.store.db_now() is not None, "the next operation reconnects"


# --- the query timeout: a blackholed database -------------------------------------------------


async def test_a_blackholed_database_times_out_within_the_bound_and_fails_closed(
    pg_url: str, clock: VirtualClock, tmp_path: Path
) -> None:
    bound = 0.5
    async with TcpProxy.running(*_target(pg_url)) as proxy:
        store = await open_store(proxy.url(pg_url), clock, query_timeout=bound)
        try:
            rig = await build_rig(store, clock, tmp_path)
            proxy.pause()
            event = NewEvent(kind="TEST", session_id=rig.session.id)
            for what, call in (("read", store.db_now),
                               ("write", lambda: store.append(event)),
                               ("command", lambda: store.once("blackholed-once", event)),
                               ("action", lambda: rig.run(act(), "blackholed-1"))):  # fmt: skip
                t0 = time.monotonic()
                with anyio.fail_after(10), pytest.raises(StoreError) as info:
                    await call()
                took = time.monotonic() - t0
                assert bound * 0.8 <= took < bound * 3, f"{what}: {took:.2f}s for a {bound}s bound"
                assert info.value.transient, what
                assert "timed out" in str(info.value) or "no connection within" in str(info.value)
            assert rig.effects == [], "the action failed closed: no effect"
            proxy.resume()
            assert await store.get_action("blackholed-1") is None, "no started record either"
            outcome = await rig.run(act(), "after-the-blackhole")
            assert outcome.status == "succeeded", "the store recovers once the network does"
        finally:
            proxy.resume()
            await store.close()


# --- configuration ---------------------------------------------------------------------------


def test_query_timeout_is_configured_and_bounded_by_the_lease(tmp_path: Path) -> None:
    def load(daemon: str) -> Any:
        path = tmp_path / "c.toml"
        path.write_text(f"[daemon]\n{daemon}\n")
        return load_config(path, env={})

    assert load("").query_timeout == 5.0
    assert load('lease_ttl = "4s"\nheartbeat = "1s"').query_timeout == 2.0
    assert load('query_timeout = "1.5s"').query_timeout == 1.5
    with pytest.raises(ConfigError, match=r"query_timeout.*shorter than the lease"):
        load('query_timeout = "20s"')


# --- the fleet: a lost connection is not a worker crash ----------------------------------------


async def test_a_transient_store_error_is_not_a_worker_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lost connection while an instance resumes its checkpoint, and while a cycle writes a
    started record: the worker waits for the store and goes on; no crash, no quarantine.
    (A simulated day on SQLite, with the two losses injected where the store raises them.)"""
    from test_fleet import Run, _worker

    from supervisor.errors import StoreUnavailable
    from supervisor.runtime.checkpoints import Checkpoints

    def lost(message: str) -> StoreError:
        error = StoreUnavailable(f"postgres connection lost during {message} (injected)")
        error.transient = True
        return error

    real_resume, real_begin = Checkpoints.resume_point, Store.begin_action
    injected = {"resume": 0, "begin": 0}

    async def resume_point(self: Checkpoints, worker: str) -> Any:
        if injected["resume"] == 0:
            injected["resume"] += 1
            raise lost("get_resume_point")
        return await real_resume(self, worker)

    async def begin_action(self: Store, **kw: Any) -> Any:
        if injected["begin"] < 2:
            injected["begin"] += 1
            raise lost("insert_action")
        return await real_begin(self, **kw)

    monkeypatch.syspath_prepend(str(ROOT))  # for tests.fleet_workers
    monkeypatch.setattr(Checkpoints, "resume_point", resume_point)
    monkeypatch.setattr(Store, "begin_action", begin_action)
    run = await Run(tmp_path, _worker("ticker", "tests.fleet_workers:Ticker"),
                    run_length="10m").run()  # fmt: skip
    assert injected == {"resume": 1, "begin": 2}
    assert run.events("ticker", "WORKER_CRASHED", "WORKER_QUARANTINED") == []
    status = run.status("ticker")
    assert status.crashes == 0 and status.restarts == 0
    assert status.cycles >= 50, "the worker went on after each loss"
    started = run.query("SELECT count(*) AS n FROM actions WHERE status = 'succeeded'")
    assert started[0]["n"] == status.cycles


async def test_a_write_cancelled_in_flight_gives_its_connection_back(
    pg_url: str, clock: VirtualClock
) -> None:
    """Cancelled while BEGIN waits on a silent network (a shutdown, a cycle deadline): the
    connection is dropped, not leaked, so the pool still closes at once."""
    async with TcpProxy.running(*_target(pg_url)) as proxy:
        store = await open_store(proxy.url(pg_url), clock, query_timeout=3.0)
        await store.db_now()  # one pooled connection, idle
        proxy.pause()
        with anyio.move_on_after(0.2) as scope:
            async with storetools.transaction(store) as tx:
                await tx.fetchrow("db_now")
        assert scope.cancelled_caught
        proxy.resume()
        assert await store.db_now() is not None
        t0 = time.monotonic()
        await store.close()
        assert time.monotonic() - t0 < 1.5, "close waited for a connection never given back"


async def test_a_partitioned_session_gives_its_row_locks_back(
    pg_url: str, clock: VirtualClock
) -> None:
    """The network goes silent mid-transaction: the client gives up after its query timeout,
    and the server ends the orphaned session (idle in transaction) soon after, so another host
    can take the row it had locked instead of failing closed until TCP keepalive fires."""
    async with TcpProxy.running(*_target(pg_url)) as proxy:
        store = await open_store(proxy.url(pg_url), clock, query_timeout=0.3)
        try:
            async with storetools.transaction(store) as tx:
                await tx.execute("ensure_fleet_switch", FLEET, clock.now())
            with pytest.raises(StoreError):
                async with storetools.transaction(store) as tx:
                    await tx.fetchrow("lock_fleet_switch", FLEET)  # the row is locked
                    proxy.pause()  # a partition: the server still holds the session
                    await tx.fetchrow("db_now")
            conn = await asyncpg.connect(pg_url, timeout=5)
            try:
                t0 = time.monotonic()
                await conn.execute("SET lock_timeout = '8s'")
                await conn.execute("UPDATE kill_switches SET updated_at = updated_at "
                                   "WHERE fleet = $1 AND scope = 'fleet'", FLEET)  # fmt: skip
                took = time.monotonic() - t0
            finally:
                await conn.close()
            assert took < 4.0, f"the lock was held {took:.1f}s after the client gave up"
        finally:
            proxy.resume()
            await store.close()

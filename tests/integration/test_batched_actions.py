"""An action's started record and outcome written together with those of other workers: on
Postgres one statement (and one COMMIT) for every start queued meanwhile, on SQLite one COMMIT
for every transaction (test_group_commit.py). Nobody is told their record is durable before
the COMMIT holding it has returned; a batch that fails fails each member closed; a crash loses
only records whose callers had not been told."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisor import events as ev
from supervisor.errors import StateWriteError, StoreUnavailable
from supervisor.killswitch.hostfile import SwitchState
from supervisor.killswitch.modes import Mode
from supervisor.store import Event, NewEvent, Session, Store, open_store
from supervisor.store.postgres import PostgresBackend
from supervisor.store.switches import SwitchTarget, switches_with_print
from supervisor.timing.clock import SystemClock
from tests import storetools
from tests.crashing import told_before_kill
from tests.waiting import eventually

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
FLEET = "batched"


async def _window(store: Store) -> Session:
    now = store.clock.now()
    session, _ = await store.open_window(fleet=FLEET, key="w", starts_at=now - timedelta(minutes=1),
                                         ends_at=now + timedelta(hours=1), max_cost=None,
                                         max_actions=None, by="pytest")  # fmt: skip
    return session


async def _start(store: Store, session: Session, command_id: str) -> str:
    status, _info = await store.begin_action(
        command_id=command_id, operation="action:demo", params={"n": command_id}, fleet=FLEET,
        session_id=session.id, worker="w1", name="demo", risk="low", cost=0.0, critical=False,
        safe_to_retry=False, rule="risk:low", correlation_id=None, agent_id=None,
        switches=storetools.NO_SWITCH_TARGET,
    )  # fmt: skip
    return status


async def _all_at_once(store: Store, session: Session, ids: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}

    async def one(command_id: str) -> None:
        try:
            results[command_id] = await _start(store, session, command_id)
        except StateWriteError as exc:
            results[command_id] = exc

    async with anyio.create_task_group() as tg:
        for command_id in ids:
            tg.start_soon(one, command_id)
    return results


async def _starts_then_close(
    store: Store, count: int
) -> tuple[list[str], dict[str, Any], list[Event]]:
    """`count` starts at once in a fresh window: their ids, their results, the window's
    events; the store closed."""
    try:
        session = await _window(store)
        ids = [f"c{i}" for i in range(count)]
        results = await _all_at_once(store, session, ids)
        return ids, results, await store.replay(session.id)
    finally:
        await store.close()


def _pg(store: Store) -> PostgresBackend:
    backend = store.backend
    assert isinstance(backend, PostgresBackend)
    return backend


@pytest.mark.postgres
async def test_concurrent_starts_share_one_statement(pg_url: str) -> None:
    store = await open_store(pg_url, SystemClock(), migrate=True)
    backend = _pg(store)
    sizes: list[int] = []
    real = backend._run_batch

    async def spy(name: str, calls: list[tuple[Any, ...]]) -> Any:
        sizes.append(len(calls))
        return await real(name, calls)

    backend._run_batch = spy  # type: ignore[method-assign]
    try:
        session = await _window(store)
        ids = [f"c{i}" for i in range(50)]
        results = await _all_at_once(store, session, ids)
        rows = {cid: await store.get_action(cid) for cid in ids}
        started = await storetools.fetchall(store, "events_by_command", "c7")
    finally:
        await store.close()
    assert results == dict.fromkeys(ids, "started")
    assert all(row is not None and row.status == "started" for row in rows.values())
    assert sum(sizes) == 50 and len(sizes) < 50, f"batches of {sizes}"
    assert [e["kind"] for e in started] == [ev.ACTION_STARTED]
    # The stream's numbers stay consecutive when fifty starts share a statement.
    events = await _replay_all(pg_url, session.id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert sum(e.kind == ev.ACTION_STARTED for e in events) == 50


def _begin_call(command_id: str, session_id: str, print_: str, *, cost: float = 1.0,
                fleet: str = FLEET, now: Any = None) -> tuple[Any, ...]:  # fmt: skip
    """One call's arguments, as ActionsRepo._begin_at_once sends them."""
    from supervisor.actions import canonical_json, params_hash

    params = {"n": command_id}
    return (
        command_id, "action:demo", params_hash("action:demo", params),
        canonical_json({"status": "started", "~call": command_id}), now, print_, fleet,
        session_id, "w1", "demo", canonical_json(params), "low", cost, False, False, "risk:low",
        None, None, None, None, 0, "allow", ev.ACTION_STARTED,
        canonical_json({"action": "demo"}), None, None,
    )  # fmt: skip


@pytest.mark.postgres
async def test_one_batch_decides_each_start_in_call_order(pg_url: str) -> None:
    """What each call of one batch statement comes back with, each decided in call order as
    its own statement would have decided it: room for two actions in the window, so the third
    is refused and nothing of it is written; a command_id twice is a replay of the first (or,
    when the first was refused, "again": decided once more on its own); a window that is not
    there, a stale switch fingerprint. Only the started ones hold a ledger row, an action row,
    a reservation and an ACTION_STARTED, numbered in call order."""
    store = await open_store(pg_url, SystemClock(), migrate=True)
    backend = _pg(store)
    try:
        now = store.clock.now()
        session, _ = await store.open_window(fleet=FLEET, key="w", starts_at=now - timedelta(minutes=1),
                                             ends_at=now + timedelta(hours=1), max_cost=None,
                                             max_actions=2, by="pytest")  # fmt: skip
        async with backend.reader() as tx:
            print_, _records = await switches_with_print(tx, FLEET, store.switch_cache)
        calls = [
            _begin_call("a1", session.id, print_, now=now),
            _begin_call("a1", session.id, print_, now=now),  # its twin, in the same batch
            _begin_call("a2", session.id, print_, now=now),
            _begin_call("a3", session.id, print_, now=now),  # no room left
            _begin_call("a3", session.id, print_, now=now),  # the twin of a refused one
            _begin_call("b1", "no-such-window", print_, now=now),
            _begin_call("s1", session.id, "stale", now=now),
        ]
        rows = await backend._run_batch("begin_action", calls)
        statuses = [r["status"] for r in rows]
        assert statuses == ["started", "replay", "started", "budget", "again", "no_window",
                            "switches"]  # fmt: skip
        assert rows[1]["operation"] == "action:demo" and "~call" in rows[1]["result"]
        assert rows[6]["print"] == print_
        for command_id, held in (("a1", True), ("a2", True), ("a3", False), ("b1", False),
                                 ("s1", False)):  # fmt: skip
            assert (await store.get_action(command_id) is not None) is held, command_id
            ledger = await storetools.fetchrow(store, "get_command", command_id)
            assert (ledger is not None) is held, command_id
        window = await storetools.fetchrow(store, "get_session", session.id)
        assert window is not None and window["reserved_actions"] == 2
        events = await store.replay(session.id)
        started = [(e.seq, e.command_id) for e in events if e.kind == ev.ACTION_STARTED]
        assert [c for _s, c in started] == ["a1", "a2"]
        assert [e.seq for e in events] == list(range(1, len(events) + 1))

        # Their outcomes, one batch: one done, one stale fingerprint, one not open.
        def finish(command_id: str, fingerprint: str | None) -> tuple[Any, ...]:
            return (command_id, session.id, "succeeded", now, None, None, 1.0, True, fingerprint,
                    FLEET, ev.ACTION_SUCCEEDED, None, "{}", None, "w1")  # fmt: skip

        rows = await backend._run_batch("finish_action", [
            finish("a1", print_), finish("a2", "stale"), finish("a3", None)])  # fmt: skip
        assert [r["status"] for r in rows] == ["done", "switches", "not_open"]
        window = await storetools.fetchrow(store, "get_session", session.id)
        assert window is not None
        assert (window["reserved_actions"], window["used_actions"]) == (1, 1)
        events = await store.replay(session.id)
        assert [e.command_id for e in events if e.kind == ev.ACTION_SUCCEEDED] == ["a1"]
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
    finally:
        await store.close()


@pytest.mark.postgres
async def test_a_batch_reserves_and_settles_as_one_action_statements_would(pg_url: str) -> None:
    """Floats summed in another order decide a borderline window otherwise: with 0.1 of 0.7
    reserved, 0.2 + 0.3 leave 0.6000000000000001, so a further 0.1 has no room, one statement
    after another (the general path, SQLite). A batch reserves and settles one call after
    another too, to the last bit."""
    store = await open_store(pg_url, SystemClock(), migrate=True)
    backend = _pg(store)
    try:
        now = store.clock.now()
        session, _ = await store.open_window(fleet=FLEET, key="w", starts_at=now - timedelta(minutes=1),
                                             ends_at=now + timedelta(hours=1), max_cost=0.7,
                                             max_actions=None, by="pytest")  # fmt: skip
        async with backend.reader() as tx:
            print_, _records = await switches_with_print(tx, FLEET, store.switch_cache)
        await backend._run_batch(
            "begin_action", [_begin_call("a0", session.id, print_, cost=0.1, now=now)]
        )
        rows = await backend._run_batch("begin_action", [
            _begin_call(f"a{i}", session.id, print_, cost=cost, now=now)
            for i, cost in ((1, 0.2), (2, 0.3), (3, 0.1))
        ])  # fmt: skip
        assert [r["status"] for r in rows] == ["started", "started", "budget"]
        window = await storetools.fetchrow(store, "get_session", session.id)
        assert window is not None and window["reserved_cost"] == 0.1 + 0.2 + 0.3

        def finish(command_id: str, cost: float) -> tuple[Any, ...]:
            return (command_id, session.id, "succeeded", now, None, None, cost, True, None,
                    FLEET, ev.ACTION_SUCCEEDED, None, "{}", None, "w1")  # fmt: skip

        rows = await backend._run_batch("finish_action", [finish("a1", 0.2), finish("a2", 0.3)])
        assert [r["status"] for r in rows] == ["done", "done"]
        window = await storetools.fetchrow(store, "get_session", session.id)
        assert window is not None
        assert window["reserved_cost"] == (0.1 + 0.2 + 0.3) - 0.2 - 0.3
        assert window["used_cost"] == 0.0 + 0.2 + 0.3
        assert (window["reserved_actions"], window["used_actions"]) == (1, 2)
    finally:
        await store.close()


async def _replay_all(url: str, session_id: str) -> list[Any]:
    store = await open_store(url, SystemClock())
    try:
        return await store.replay(session_id)
    finally:
        await store.close()


@pytest.mark.postgres
async def test_a_failed_batch_is_written_again_member_by_member(pg_url: str) -> None:
    """A batch statement that fails (one bad element, a deadlock) was rolled back whole: each
    member writes its start again on its own, and each ends with one started record."""
    store = await open_store(pg_url, SystemClock(), migrate=True)
    backend = _pg(store)
    real = backend._run_batch
    failed: list[int] = []

    async def failing_once(name: str, calls: list[tuple[Any, ...]]) -> Any:
        if not failed and len(calls) > 1:
            failed.append(len(calls))
            raise StateWriteError("postgres begin_action_batch: injected")
        return await real(name, calls)

    backend._run_batch = failing_once  # type: ignore[method-assign]
    ids, results, events = await _starts_then_close(store, 20)
    assert failed and failed[0] > 1, "no batch of several was failed"
    assert results == dict.fromkeys(ids, "started")
    started = sorted(e.command_id for e in events if e.kind == ev.ACTION_STARTED)
    assert started == sorted(ids)


@pytest.mark.postgres
async def test_a_start_the_store_cannot_write_fails_closed(pg_url: str) -> None:
    """The batch fails and so does the general path: every member raises, and none left a
    started record."""
    store = await open_store(pg_url, SystemClock(), migrate=True)
    backend = _pg(store)

    async def failing(name: str, calls: list[tuple[Any, ...]]) -> Any:
        raise StateWriteError("postgres begin_action_batch: injected")

    @asynccontextmanager
    async def no_transaction() -> AsyncIterator[Any]:
        raise StateWriteError("postgres cannot begin a write: injected")
        yield  # pragma: no cover

    try:
        session = await _window(store)
        backend._run_batch = failing  # type: ignore[method-assign]
        backend.transaction = no_transaction  # type: ignore[method-assign]
        ids = [f"c{i}" for i in range(10)]
        results = await _all_at_once(store, session, ids)
        del backend.transaction, backend._run_batch
        rows = {cid: await store.get_action(cid) for cid in ids}
    finally:
        await store.close()
    assert all(isinstance(r, StateWriteError) and "injected" in str(r) for r in results.values())
    assert all(row is None for row in rows.values()), "a failed start left a started record"


@pytest.mark.postgres
async def test_a_batch_whose_answer_is_lost_is_found_in_the_ledger(pg_url: str) -> None:
    """The statement committed, then the connection went before its answer came: each member
    redoes its start the careful way, finds the ledger row its own call claimed, and reports
    the start as its own (its effect may run), not a twin's and not a second start: one action
    row and one ACTION_STARTED each."""
    store = await open_store(pg_url, SystemClock(), migrate=True)
    backend = _pg(store)
    real = backend._run_batch
    lost: list[int] = []

    async def answer_lost_once(name: str, calls: list[tuple[Any, ...]]) -> Any:
        rows = await real(name, calls)
        if not lost:
            lost.append(len(calls))
            error = StoreUnavailable("postgres connection lost during begin_action_batch")
            error.transient = True
            raise error
        return rows

    backend._run_batch = answer_lost_once  # type: ignore[method-assign]
    ids, results, events = await _starts_then_close(store, 20)
    assert lost and lost[0] >= 1, "the lost answer was injected"
    assert set(results.values()) == {"started"}, results
    started = sorted(e.command_id for e in events if e.kind == ev.ACTION_STARTED)
    assert started == sorted(ids), "a start was written twice or lost"


CHILD = """
import sys
from datetime import timedelta
import anyio
from supervisor.timing.clock import SystemClock
from supervisor.store import open_store
from supervisor.store.switches import SwitchTarget, switches_with_print

async def main(url):
    store = await open_store(url, SystemClock(), migrate=True)
    now = store.clock.now()
    session, _ = await store.open_window(fleet="batched", key="w", starts_at=now,
                                         ends_at=now + timedelta(hours=1), max_cost=None,
                                         max_actions=None, by="child")

    async def worker(i):
        n = 0
        while True:
            n += 1
            cid = "w%d-%d" % (i, n)
            status, _ = await store.begin_action(
                command_id=cid, operation="action:demo", params={}, fleet="batched",
                session_id=session.id, worker="w%d" % i, name="demo", risk="low", cost=0.0,
                critical=False, safe_to_retry=False, rule="risk:low", correlation_id=None,
                agent_id=None, switches=SwitchTarget(worker="w%d" % i, session_id=session.id))
            if status == "started":
                sys.stdout.write(cid + "\\n")
                sys.stdout.flush()

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(worker, i)

anyio.run(main, sys.argv[1])
"""


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
async def test_a_crash_mid_batch_loses_no_start_a_worker_was_told_of(
    store_url: str, tmp_path: Path
) -> None:
    # Blocking reads on purpose (in told_before_kill): nothing else runs on this test's loop.
    told = told_before_kill(CHILD, store_url, tmp_path, at_least=1500)
    store = await open_store(store_url, SystemClock())
    try:
        missing = [cid for cid in told if await store.get_action(cid) is None]
    finally:
        await store.close()
    assert not missing, f"{len(missing)} starts were reported durable and are not: {missing[:5]}"


async def _finish(store: Store, session: Session, command_id: str, *, error: str | None = None,
                  cost: float = 0.0) -> str:  # fmt: skip
    try:
        await store.finish_action(command_id=command_id, session_id=session.id, ok=error is None,
                                  cost=cost, result={"ok": 1} if error is None else None,
                                  error=error, worker="w1")  # fmt: skip
    except StateWriteError as exc:
        return f"failed: {exc}"
    return "done"


@pytest.mark.postgres
async def test_one_outcome_that_cannot_be_written_as_sent_loses_no_other(pg_url: str) -> None:
    """An external worker reports an error text holding a NUL (Postgres text cannot hold one):
    its outcome is stored with the NUL escaped, and the outcomes sent in the same statement
    are all written (one bad element used to roll back every one)."""
    store = await open_store(pg_url, SystemClock(), migrate=True)
    try:
        session = await _window(store)
        ids = [f"c{i}" for i in range(20)]
        for command_id in ids:
            assert await _start(store, session, command_id) == "started"
        results: dict[str, str] = {}

        async def finish(command_id: str) -> None:
            error = "ExternalActionFailed: bad\x00byte" if command_id == "c5" else None
            results[command_id] = await _finish(store, session, command_id, error=error)

        async with anyio.create_task_group() as tg:
            for command_id in ids:
                tg.start_soon(finish, command_id)
        rows = {cid: await store.get_action(cid) for cid in ids}
    finally:
        await store.close()
    assert results == dict.fromkeys(ids, "done")
    assert all(row is not None and row.status == ("failed" if cid == "c5" else "succeeded")
               for cid, row in rows.items())  # fmt: skip
    poisoned = rows["c5"]
    assert poisoned is not None and poisoned.error == "ExternalActionFailed: bad\\x00byte"


@pytest.mark.postgres
async def test_two_hosts_batches_over_two_windows_lose_no_outcome(pg_url: str) -> None:
    """Two hosts each send a batch of outcomes from two windows, in opposite orders, at the
    same instant: sent in one lock order they cannot deadlock (and a batch Postgres rolled back
    would be written again member by member)."""
    a = await open_store(pg_url, SystemClock(), migrate=True)
    b = await open_store(pg_url, SystemClock())
    try:
        now = a.clock.now()
        w1, w2 = [
            (await a.open_window(fleet=FLEET, key=key, starts_at=now - timedelta(minutes=1),
                                 ends_at=now + timedelta(hours=1), max_cost=None,
                                 max_actions=None, by="pytest"))[0]
            for key in ("w1", "w2")
        ]  # fmt: skip
        plan = {"a": [(f"a{i}", w1 if i < 100 else w2) for i in range(200)],
                "b": [(f"b{i}", w2 if i < 100 else w1) for i in range(200)]}  # fmt: skip
        for calls in plan.values():
            for command_id, session in calls:
                assert await _start(a, session, command_id) == "started"
        both = anyio.Event()
        arrived: list[str] = []
        for name, store in (("a", a), ("b", b)):
            backend = _pg(store)
            real = backend._run_batch

            async def together(n: str, calls: list[Any], real: Any = real, name: str = name) -> Any:
                if len(calls) > 1:  # the two big batches: sent at the same instant
                    arrived.append(name)
                    if len(arrived) == 2:
                        both.set()
                    with anyio.move_on_after(10):
                        await both.wait()
                return await real(n, calls)

            backend._run_batch = together  # type: ignore[method-assign]
        results: dict[str, str] = {}

        async def finish(store: Store, command_id: str, session: Session) -> None:
            results[command_id] = await _finish(store, session, command_id)

        async with anyio.create_task_group() as tg:
            for name, store in (("a", a), ("b", b)):
                for command_id, session in plan[name]:
                    tg.start_soon(finish, store, command_id, session)
        statuses = {cid: (await a.get_action(cid)) for calls in plan.values() for cid, _ in calls}
    finally:
        await a.close()
        await b.close()
    lost = {cid: r for cid, r in results.items() if r != "done"}
    assert not lost, f"{len(lost)} outcomes lost: {list(lost.items())[:2]}"
    assert all(row is not None and row.status == "succeeded" for row in statuses.values())


@pytest.mark.postgres
async def test_a_host_returns_to_one_statement_writes_after_an_emergency(pg_url: str) -> None:
    """A fleet emergency seen and then lifted by another process (the CLI, another host): the
    starts after it are one statement each again, not the general path for ever."""
    daemon = await open_store(pg_url, SystemClock(), migrate=True)
    cli = await open_store(pg_url, SystemClock())
    try:
        session = await _window(daemon)
        target = SwitchTarget(worker="w1", session_id=session.id)

        async def engage(mode: Mode) -> None:
            await cli.set_switches(fleet=FLEET, scope="fleet", targets=[""], mode=mode,
                                   reason="drill", by="op",
                                   event=NewEvent(kind=ev.KILLSWITCH_ENGAGED,
                                                  session_id=session.id))  # fmt: skip

        sent: list[int] = []
        backend = _pg(daemon)
        real = backend._run_batch

        async def spy(name: str, calls: list[Any]) -> Any:
            sent.append(len(calls))
            return await real(name, calls)

        backend._run_batch = spy  # type: ignore[method-assign]

        async def start(command_id: str) -> str:
            status, _ = await daemon.begin_action(
                command_id=command_id, operation="action:demo", params={}, fleet=FLEET,
                session_id=session.id, worker="w1", name="demo", risk="low", cost=0.0,
                critical=False, safe_to_retry=False, rule="risk:low", correlation_id=None,
                agent_id=None, switches=target,
            )  # fmt: skip
            return status

        assert await start("before") == "started"
        await engage(Mode.EMERGENCY)
        assert await start("during") == "killswitch"
        await engage(Mode.DISENGAGED)
        sent.clear()
        assert [await start(f"after{i}") for i in range(3)] == ["started"] * 3
    finally:
        await daemon.close()
        await cli.close()
    assert sum(sent) >= 2, f"starts after the emergency went the general path: {sent}"


class _HostFile:
    """A host switch file whose mode the test sets (the real one is signed; the verdict only
    reads its state)."""

    def __init__(self) -> None:
        self.mode = Mode.DISENGAGED

    def read(self) -> SwitchState:
        return SwitchState(mode=self.mode, seq=1, reason="drill", by="op", at="")


@pytest.mark.postgres
async def test_a_host_engage_while_a_start_is_queued_keeps_it_from_the_batch(pg_url: str) -> None:
    """The host file is read again as the batch is sent: a start that queued behind a batch in
    flight, and whose host was halted meanwhile, is not sent; its own transaction refuses it."""
    store = await open_store(pg_url, SystemClock(), migrate=True)
    backend = _pg(store)
    real = backend._run_batch
    hold = anyio.Event()
    host = _HostFile()

    in_flight = anyio.Event()

    async def slow_first(name: str, calls: list[tuple[Any, ...]]) -> Any:
        if calls[0][0] == "first":
            in_flight.set()
            await hold.wait()  # the batch in flight while the next start queues
        return await real(name, calls)

    backend._run_batch = slow_first  # type: ignore[method-assign]
    results: dict[str, str] = {}

    async def start(command_id: str) -> None:
        status, _ = await store.begin_action(
            command_id=command_id, operation="action:demo", params={}, fleet=FLEET,
            session_id=session.id, worker="w1", name="demo", risk="low", cost=0.0,
            critical=False, safe_to_retry=False, rule="risk:low", correlation_id=None,
            agent_id=None,
            switches=SwitchTarget(worker="w1", session_id=session.id, host=host),  # type: ignore[arg-type]
        )  # fmt: skip
        results[command_id] = status

    try:
        session = await _window(store)
        async with anyio.create_task_group() as tg:
            tg.start_soon(start, "first")
            await in_flight.wait()
            tg.start_soon(start, "queued")
            await eventually(lambda: bool(backend._batchers["begin_action"]._queue),
                             "the second start queued behind the batch in flight")  # fmt: skip
            host.mode = Mode.HALT_ALL  # the engage returns here
            hold.set()
        queued = await store.get_action("queued")
    finally:
        await store.close()
    assert results == {"first": "started", "queued": "killswitch"}
    assert queued is None

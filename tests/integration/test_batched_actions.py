"""An action's started record and outcome written together with those of other workers: on
Postgres one statement (and one COMMIT) for every start queued meanwhile, on SQLite one COMMIT
for every transaction (test_group_commit.py). Nobody is told their record is durable before
the COMMIT holding it has returned; a batch that fails fails each member closed; a crash loses
only records whose callers had not been told."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisor import events as ev
from supervisor.errors import StateWriteError, StoreUnavailable
from supervisor.store import Session, Store, open_store
from supervisor.store.postgres import PostgresBackend
from supervisor.timing.clock import SystemClock
from tests import storetools

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


async def _replay_all(url: str, session_id: str) -> list[Any]:
    store = await open_store(url, SystemClock())
    try:
        return await store.replay(session_id)
    finally:
        await store.close()


@pytest.mark.postgres
async def test_a_failed_batch_fails_each_member_closed(pg_url: str) -> None:
    store = await open_store(pg_url, SystemClock(), migrate=True)
    backend = _pg(store)
    real = backend._run_batch
    failed: list[int] = []

    async def failing_once(name: str, calls: list[tuple[Any, ...]]) -> Any:
        if not failed:
            failed.append(len(calls))
            raise StateWriteError("postgres begin_action_batch: injected")
        return await real(name, calls)

    backend._run_batch = failing_once  # type: ignore[method-assign]
    try:
        session = await _window(store)
        ids = [f"c{i}" for i in range(20)]
        results = await _all_at_once(store, session, ids)
        rows = {cid: await store.get_action(cid) for cid in ids}
        after = await _start(store, session, "after")
    finally:
        await store.close()
    refused = [cid for cid, r in results.items() if isinstance(r, StateWriteError)]
    assert len(refused) == failed[0] >= 1
    assert all("injected" in str(results[cid]) for cid in refused)
    assert all(rows[cid] is None for cid in refused), "a failed member left a started record"
    assert all(results[cid] == "started" and rows[cid] is not None
               for cid in ids if cid not in refused)  # fmt: skip
    assert after == "started"


@pytest.mark.postgres
async def test_a_batch_whose_answer_is_lost_is_found_in_the_ledger(pg_url: str) -> None:
    """The statement committed, then the connection went before its answer came: each member
    redoes its start the careful way, finds its own ledger row, and reports it as known (not a
    second start): one action row and one ACTION_STARTED each."""
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
    try:
        session = await _window(store)
        ids = [f"c{i}" for i in range(20)]
        results = await _all_at_once(store, session, ids)
        events = await store.replay(session.id)
    finally:
        await store.close()
    assert sorted(set(results.values())) in (["replay", "started"], ["replay"])
    assert list(results.values()).count("replay") == lost[0]
    started = sorted(e.command_id for e in events if e.kind == ev.ACTION_STARTED)
    assert started == sorted(ids), "a start was written twice or lost"


CHILD = """
import sys
from datetime import timedelta
import anyio
from supervisor.timing.clock import SystemClock
from supervisor.store import open_store
from supervisor.store.switches import SwitchTarget

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
    script = tmp_path / "starts.py"
    script.write_text(textwrap.dedent(CHILD))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # Blocking reads on purpose: nothing else runs on this test's loop.
    proc = subprocess.Popen([sys.executable, str(script), store_url], stdout=subprocess.PIPE,  # noqa: ASYNC220
                            stderr=subprocess.PIPE, env=env)  # fmt: skip
    assert proc.stdout is not None
    told: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while len(told) < 1500 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            told.append(line.decode().strip())
    finally:
        proc.send_signal(signal.SIGKILL)  # mid-batch: starts are always in flight
        rest, err = proc.communicate(timeout=30)
    assert len(told) >= 1500, err.decode()[-2000:]
    told += [line.strip() for line in rest.decode().splitlines()]
    store = await open_store(store_url, SystemClock())
    try:
        missing = [cid for cid in told if await store.get_action(cid) is None]
    finally:
        await store.close()
    assert not missing, f"{len(missing)} starts were reported durable and are not: {missing[:5]}"

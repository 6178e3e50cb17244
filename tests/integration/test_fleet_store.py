"""The fleet, checkpoints and runs aggregates of the store, on both backends: each operation is
one transaction and returns typed records."""

from __future__ import annotations

from datetime import timedelta

import pytest

from supervisor import events as ev
from supervisor.errors import NotFound
from supervisor.runtime.checkpoints import Checkpoint, Checkpoints
from supervisor.store import NewEvent, Store, system_stream
from supervisor.store.records import HostStatus, RunStatus
from supervisor.timing.clock import VirtualClock

pytestmark = pytest.mark.anyio
FLEET = "f"
TTL = timedelta(seconds=30)


async def kinds(store: Store, stream: str) -> list[str]:
    return [e.kind for e in await store.replay(stream)]


async def test_a_restarted_host_takes_its_row_and_its_dead_incarnations_leases(
    store: Store,
) -> None:
    now = await store.db_now()
    await store.take_host(fleet=FLEET, host_id="a", instance="i1", pid=11, at=now)
    leader = await store.acquire_lease(name=f"leader:{FLEET}", holder="a/i1",
                                       expires_at=now + TTL, now=now)  # fmt: skip
    slot = await store.acquire_lease(name=f"slot:{FLEET}:w-0", holder="a/i1",
                                     expires_at=now + TTL, now=now)  # fmt: skip
    assert leader is not None and slot is not None and leader.token == 1
    [view] = await store.host_views(FLEET)
    assert (view.host.host_id, view.host.status, view.leader, view.slots) == (
        "a",
        HostStatus.RUNNING,
        True,
        ("w-0",),
    )
    assert view.as_dict()["status"] == "running" and view.as_dict()["slots"] == ["w-0"]
    assert await store.live_host_count(fleet=FLEET, after=now - TTL) == 1

    # A second incarnation, after a crash: the old one's leases go at once, not after TTL.
    await store.take_host(fleet=FLEET, host_id="a", instance="i2", pid=12, at=now,
                          replaces="i1")  # fmt: skip
    host = await store.get_host(fleet=FLEET, host_id="a")
    assert host is not None and (host.instance, host.pid) == ("i2", 12)
    assert host.fresh(now - TTL) and not host.fresh(now)
    taken = await store.acquire_lease(name=f"leader:{FLEET}", holder="a/i2",
                                      expires_at=now + TTL, now=now)  # fmt: skip
    assert taken is not None and taken.token == 2  # a new holder: the fence moves on
    assert not await store.beat_host(fleet=FLEET, host_id="a", instance="i1", at=now)
    assert await store.beat_host(fleet=FLEET, host_id="a", instance="i2", at=now)

    await store.stop_host(fleet=FLEET, host_id="a", instance="i2", holder="a/i2",
                          leases=[f"leader:{FLEET}"], at=now)  # fmt: skip
    [view] = await store.host_views(FLEET)
    assert (view.host.status, view.leader, view.slots) == (HostStatus.STOPPED, False, ())
    assert await store.live_host_count(fleet=FLEET, after=now - TTL) == 0


async def test_a_lease_is_renewed_by_its_holder_and_refused_to_others_until_released(
    store: Store,
) -> None:
    now = await store.db_now()
    name = f"slot:{FLEET}:w-1"
    first = await store.acquire_lease(name=name, holder="a/1", expires_at=now + TTL, now=now)
    again = await store.acquire_lease(name=name, holder="a/1", expires_at=now + TTL, now=now)
    assert first is not None and again is not None and first.token == again.token == 1
    assert await store.acquire_lease(name=name, holder="b/1", expires_at=now + TTL,
                                     now=now) is None  # fmt: skip
    await store.release_lease(name=name, holder="b/1", at=now)  # not the holder: no effect
    assert await store.acquire_lease(name=name, holder="b/1", expires_at=now + TTL,
                                     now=now) is None  # fmt: skip
    await store.release_lease(name=name, holder="a/1", at=now)
    other = await store.acquire_lease(name=name, holder="b/1", expires_at=now + TTL, now=now)
    assert other is not None and other.token == 2
    [lease] = await store.list_leases(FLEET)
    assert (lease.name, lease.holder, lease.host_id, lease.slot, lease.is_leader) == (
        name, "b/1", "b", "w-1", False
    )  # fmt: skip
    assert await store.list_leases("other") == []


async def test_worker_rows_are_upserted_and_read_back_typed(store: Store) -> None:
    at = store.clock.now()
    for state, cycle in (("starting", -1), ("running", 4)):
        await store.record_worker(fleet=FLEET, name="w-0", host="a", state=state, restarts=1,
                                  last_error="boom", cycle=cycle, session_id=None,
                                  at=at)  # fmt: skip
    [worker] = await store.list_workers(FLEET)
    assert (worker.name, worker.state, worker.cycle, worker.restarts, worker.last_error) == (
        "w-0", "running", 4, 1, "boom"
    )  # fmt: skip
    assert worker.as_dict()["updated_at"] == at.isoformat()


async def test_a_checkpoint_commits_its_pending_telemetry_and_a_restore_pins_it(
    store: Store,
) -> None:
    checkpoints = Checkpoints(store, FLEET)
    pending = [(NewEvent(kind="CYCLE", session_id="s1", state_bearing=False), store.clock.now())]
    first = await checkpoints.save("w-0", cycle=1, session_id="s1", state={"n": 1},
                                   counters={"cycles": 1}, pending=pending)  # fmt: skip
    second = await checkpoints.save("w-0", cycle=2, session_id=None, state={"n": 2}, counters={})
    assert await kinds(store, "s1") == ["CYCLE", ev.CHECKPOINT]
    latest = await checkpoints.resume_point("w-0")
    assert isinstance(latest, Checkpoint) and (latest.id, latest.state) == (second, {"n": 2})
    older = await store.get_checkpoint(first)
    assert older is not None and (older.fleet, older.last_seq, older.counters) == (
        FLEET, 1, {"cycles": 1}
    )  # fmt: skip

    restored = await checkpoints.restore(first, by="ops")
    assert (restored.id, restored.worker) == (first, "w-0")
    pinned = await checkpoints.resume_point("w-0")
    assert pinned is not None and pinned.id == first
    assert await kinds(store, system_stream(FLEET)) == [ev.CHECKPOINT, ev.ROLLBACK]
    await checkpoints.consumed("w-0", second)  # not the pin: it stays
    pinned = await checkpoints.resume_point("w-0")
    assert pinned is not None and pinned.id == first
    await checkpoints.consumed("w-0", first)
    latest = await checkpoints.resume_point("w-0")
    assert latest is not None and latest.id == second
    assert [c.id for c in await checkpoints.list()] == [second, first]

    with pytest.raises(NotFound):
        await Checkpoints(store, "other").restore(first, by="ops")
    with pytest.raises(NotFound):
        await checkpoints.restore(999, by="ops")
    assert await kinds(store, system_stream(FLEET)) == [ev.CHECKPOINT, ev.ROLLBACK]


async def test_a_run_starts_and_finishes_once_each_with_its_events(store: Store) -> None:
    clock = store.clock
    assert isinstance(clock, VirtualClock)
    start = clock.now()
    run = {"fleet": FLEET, "horizon": "week", "simulated": True, "seed": 7, "starts_at": start,
           "ends_at": start + timedelta(days=7), "created_at": start}  # fmt: skip
    assert await store.start_run(run_id="r1", **run)
    assert not await store.start_run(run_id="r1", **run)  # a restart: no second start
    unfinished = await store.unfinished_run(fleet=FLEET, horizon="week", simulated=True)
    assert unfinished is not None and (unfinished.id, unfinished.status) == (
        "r1",
        RunStatus.RUNNING,
    )
    assert unfinished.simulated is True and unfinished.finished_at is None
    assert await store.unfinished_run(fleet=FLEET, horizon="week", simulated=False) is None
    last = await store.last_run(fleet=FLEET, simulated=True)
    assert last is not None and last.ends_at == start + timedelta(days=7)

    clock.advance(timedelta(days=7))
    assert await store.finish_run(run_id="r1", fleet=FLEET, at=clock.now())
    assert not await store.finish_run(run_id="r1", fleet=FLEET, at=clock.now())
    done = await store.get_run("r1")
    assert done is not None and (done.status, done.finished_at) == (RunStatus.FINISHED, clock.now())
    assert await store.unfinished_run(fleet=FLEET, horizon="week", simulated=True) is None
    assert await kinds(store, system_stream(FLEET)) == [ev.RUN_STARTED, ev.RUN_FINISHED]


async def test_the_latest_session_is_the_newest_window(store: Store) -> None:
    assert await store.latest_session(FLEET) is None
    start = store.clock.now()
    for hour in (0, 1):
        await store.open_window(fleet=FLEET, key=f"k{hour}", starts_at=start + timedelta(hours=hour),
                                ends_at=start + timedelta(hours=hour + 1), max_cost=None,
                                max_actions=None, by="test")  # fmt: skip
    latest = await store.latest_session(FLEET)
    assert latest is not None and latest.window_key == "k1"

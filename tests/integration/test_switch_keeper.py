"""The SwitchKeeper, what the daemon runs for the kill switch (and bench/killswitch.py measures):
a change of the host file or of a store switch reaches the effects in flight and the waiting
workers at once, is recorded once, and an emergency leaves its snapshot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisor import events as ev
from supervisor.killswitch import HostSwitchFile, Mode
from supervisor.killswitch.keeper import SwitchKeeper
from supervisor.ops.alerts import AlertConfig, Alerts
from supervisor.store import NewEvent, Store, system_stream
from supervisor.timing.clock import VirtualClock
from tests.storetools import write_switch
from tests.waiting import eventually

SECRET = b"keeper-test-secret"
AT = "2026-11-02T09:00:00+00:00"
FLEET = "keeper"

pytestmark = pytest.mark.anyio


def snapshots(directory: Path, scope: str) -> list[Path]:
    return sorted(directory.glob(f"emergency-{scope}-*.json"))


class Reached:
    """Stands in for the gate: what a change reached, and the event waiting workers sleep on."""

    def __init__(self) -> None:
        self.stopped: list[tuple[str, str, Mode]] = []
        self.moved = 0
        self.switch_changed = anyio.Event()

    def stop_in_flight(self, scope: str, target: str, mode: Mode) -> int:
        self.stopped.append((scope, target, mode))
        return 0

    def switch_moved(self, clock: Any) -> None:
        self.moved += 1
        self.switch_changed.set()


def make_keeper(store: Store, clock: VirtualClock, tmp_path: Path) -> tuple[SwitchKeeper, Reached]:
    reached = Reached()
    keeper = SwitchKeeper(
        store=store, gate=reached, host_switch=HostSwitchFile(tmp_path / "killswitch.json", SECRET),
        alerts=Alerts(store, fleet=FLEET, config=AlertConfig(), clock=clock), clock=clock,
        fleet=FLEET, host_id="h1", state_dir=tmp_path, watch_interval=0.01, store_poll=0.05,
        workers=lambda: [{"name": "w1", "state": "running"}],
    )  # fmt: skip
    return keeper, reached


async def system_events(store: Store) -> list[str]:
    return [e.kind for e in await store.replay(system_stream(FLEET))]


async def test_a_host_file_change_reaches_in_flight_and_waiters_and_is_recorded_once(
    store: Store, clock: VirtualClock, tmp_path: Path
) -> None:
    keeper, reached = make_keeper(store, clock, tmp_path)
    assert (await keeper.poll_host()).mode is Mode.DISENGAGED
    assert reached.stopped == [] and reached.moved == 0  # nothing changed yet

    # Another process (the CLI) engages; the gate's per-action read consumes the stat change
    # first: the keeper compares states, so it still sees the change.
    writer = HostSwitchFile(tmp_path / "killswitch.json", SECRET)
    writer.write(Mode.EMERGENCY, reason="fire", by="alice", at=AT)
    keeper.host_switch.read()
    assert (await keeper.poll_host()).mode is Mode.EMERGENCY
    assert reached.stopped == [("host", "", Mode.EMERGENCY)] and reached.switch_changed.is_set()
    await keeper.poll_host()  # no change since: nothing again
    assert reached.moved == 1
    kinds = await system_events(store)
    assert kinds.count(ev.KILLSWITCH_ENGAGED) == 1
    [snapshot] = snapshots(tmp_path, "host")
    assert json.loads(snapshot.read_text())["workers"] == [{"name": "w1", "state": "running"}]
    assert await store.host_switch_mark(FLEET, "h1") == 1


async def test_the_host_watch_wakes_a_waiting_worker(
    store: Store, clock: VirtualClock, tmp_path: Path
) -> None:
    keeper, reached = make_keeper(store, clock, tmp_path)
    async with anyio.create_task_group() as tg:
        tg.start_soon(keeper.watch_host)
        HostSwitchFile(tmp_path / "killswitch.json", SECRET).write(
            Mode.HALT_ALL, reason="stop", by="bob", at=AT
        )
        with anyio.fail_after(10):
            await reached.switch_changed.wait()
        tg.cancel_scope.cancel()
    assert reached.stopped == [("host", "", Mode.HALT_ALL)]


@pytest.mark.parametrize("mode", ["emergency", "no-such-mode"])
async def test_a_store_switch_change_is_seen_and_an_unknown_mode_fails_closed(
    store: Store, clock: VirtualClock, tmp_path: Path, mode: str
) -> None:
    keeper, reached = make_keeper(store, clock, tmp_path)
    async with anyio.create_task_group() as tg:
        tg.start_soon(keeper.watch_store)
        event = NewEvent(kind=ev.KILLSWITCH_ENGAGED, session_id=system_stream(FLEET),
                         payload={"scope": "worker", "target": "w1"})  # fmt: skip
        if mode == "emergency":
            await store.set_switches(fleet=FLEET, scope="worker", targets=["w1"],
                                     mode=Mode.EMERGENCY, reason="fire", by="carol", event=event)  # fmt: skip
        else:  # a forged row: the store never writes one
            await write_switch(store, FLEET, "worker", "w1", mode, "forged", "mallory",
                               clock.now())  # fmt: skip
        await eventually(lambda: reached.stopped, "the store switch reaching the effects")
        tg.cancel_scope.cancel()
    expected = Mode.EMERGENCY if mode == "emergency" else Mode.HALT_ALL
    assert reached.stopped == [("worker", "w1", expected)]
    assert bool(snapshots(tmp_path, "worker")) is (mode == "emergency")

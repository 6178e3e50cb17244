"""Steps of the wall clock, on the injected clock, and approvals fenced in SQL, on both backends.

- Forward: the scheduled recovery scan after a jump must not take this process's running action
  for an orphan (its outcome would be lost, its budget released, a safe retry run it twice). The
  scan decides by owner (process incarnation) and liveness, not by how old the record looks.
- Backward: a pending approval must not outlive its deadline in elapsed time. On Postgres the
  deadline is set from and compared with the database's clock, so a host clock set back an hour
  changes nothing. (SQLite has no clock of its own: docs/design.md states the limit.)
- A decision after the deadline is refused by the UPDATE itself, and approval keys are scoped by
  fleet.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import pytest

from supervisor import events as ev
from supervisor.actions import Action
from supervisor.errors import ApprovalError
from supervisor.governance.approvals import Approvals
from supervisor.governance.budgets import ModelGovernor, TokenBudgets
from supervisor.governance.escalation import EscalationChain
from supervisor.governance.gate import Gate
from supervisor.governance.policy import Policy
from supervisor.killswitch import HostSwitchFile
from supervisor.runtime import recovery
from supervisor.store import Session, Store, open_store
from supervisor.store.records import ApprovalStatus
from supervisor.timing.clock import SystemClock, VirtualClock
from tests import storetools
from tests.waiting import eventually

pytestmark = pytest.mark.anyio

FLEET = "jumps"
HOST = "host-a"
LONGEST = 300.0  # the daemon's scheduled scan: started_before = now - 2 x the longest deadline


class JumpClock(SystemClock):
    """The system clock plus an offset a test can step, as NTP or a resume from suspend does."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return super().now() + self.offset


def make_gate(store: Store, tmp_path: Path, approvals: Approvals) -> Gate:
    switch = HostSwitchFile(tmp_path / "killswitch.json", b"clock-jump-secret")
    gate = Gate(store=store, fleet=FLEET, policy=Policy(), approvals=approvals,
                host_switch=switch, token_budgets=TokenBudgets(), models=ModelGovernor(),
                timezone=ZoneInfo("UTC"))  # fmt: skip
    gate.host = HOST
    return gate


async def open_window(store: Store, start: datetime, hours: int = 72) -> Session:
    session, _ = await store.open_window(
        fleet=FLEET, key=start.strftime("%Y-%m-%dT%H"), starts_at=start,
        ends_at=start + timedelta(hours=hours), max_cost=100.0, max_actions=None, by="pytest",
    )  # fmt: skip
    return session


async def scheduled_scan(store: Store, gate: Gate, approvals: Approvals) -> recovery.RecoveryReport:
    """The daemon's periodic scan, with the arguments the daemon passes."""
    return await recovery.scan(
        store, fleet=FLEET, approvals=approvals, host_switch=None, by=HOST,
        started_before=store.clock.now() - timedelta(seconds=2 * LONGEST), host=HOST,
        approvals_due=False, live_after=await store.db_now() - timedelta(seconds=30),
        owner=gate.owner, in_flight=gate.in_flight,
    )  # fmt: skip


async def status_of(store: Store, command_id: str) -> str | None:
    row = await store.get_action(command_id)
    return None if row is None else str(row.status)


async def wait_for_status(store: Store, command_id: str, status: str) -> None:
    async def reached() -> bool:
        return await status_of(store, command_id) == status

    await eventually(reached, f"action {command_id} {status}", every=0.01)


async def test_forward_jump_leaves_the_running_action_of_this_process_alone(
    store: Store, clock: VirtualClock, tmp_path: Path
) -> None:
    approvals = Approvals(store, EscalationChain(), FLEET)
    gate = make_gate(store, tmp_path, approvals)
    session = await open_window(store, clock.now())
    release = anyio.Event()
    ran: list[str] = []
    outcome: list[Any] = []
    action = Action(name="demo.slow", params={"n": 1}, risk="low", cost=3.0, safe_to_retry=True)

    async def effect() -> dict[str, int]:
        ran.append("once")
        await release.wait()
        return {"done": 1}

    async def run() -> None:
        outcome.append(await gate.run(action, effect, worker="w1", session=session,
                                      command_id="cmd-slow"))  # fmt: skip

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await wait_for_status(store, "cmd-slow", "started")
        clock.advance(timedelta(days=1))  # the wall clock steps a day ahead mid-effect
        report = await scheduled_scan(store, gate, approvals)
        assert report.in_doubt == 0, report.found
        assert await status_of(store, "cmd-slow") == "started"
        release.set()

    assert outcome[0].status == "succeeded" and ran == ["once"]
    row = await store.get_action("cmd-slow")
    assert row is not None and row.status == "succeeded" and row.owner == gate.owner
    budget = await storetools.fetchrow(store, "get_session", session.id)
    assert budget is not None and budget["used_cost"] == 3.0 and budget["reserved_cost"] == 0.0
    fresh = await store.get_session(session.id)
    assert fresh is not None
    # and a retry replays the recorded outcome: the effect does not run twice
    again = await gate.run(action, effect, worker="w1", session=fresh, command_id="cmd-slow")
    assert again.replayed and ran == ["once"]


async def test_an_action_this_process_abandoned_is_an_orphan_at_once(
    store: Store, clock: VirtualClock, tmp_path: Path
) -> None:
    """Liveness, not age: a cancelled effect's record is in-doubt at the next scan, though it
    started a second ago (before, it waited out twice the longest deadline)."""
    approvals = Approvals(store, EscalationChain(), FLEET)
    gate = make_gate(store, tmp_path, approvals)
    session = await open_window(store, clock.now())
    action = Action(name="demo.hang", params={}, risk="low", cost=1.0)

    async def effect() -> None:
        await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: gate.run(action, effect, worker="w1", session=session,
                                       command_id="cmd-hang"))  # fmt: skip
        await wait_for_status(store, "cmd-hang", "started")
        tg.cancel_scope.cancel()  # the cycle deadline cancels the effect: outcome unknown
    assert "cmd-hang" not in gate.in_flight
    clock.advance(timedelta(seconds=1))
    report = await scheduled_scan(store, gate, approvals)
    assert report.in_doubt == 1
    assert await status_of(store, "cmd-hang") == "in_doubt"


async def test_an_operator_scan_leaves_a_live_daemons_actions_alone(
    store: Store, clock: VirtualClock, tmp_path: Path
) -> None:
    """`acp-supervisor recover` from another process: an action owned by an incarnation whose
    host row is fresh is its own; once that heartbeat is stale, it is an orphan."""
    approvals = Approvals(store, EscalationChain(), FLEET)
    gate = make_gate(store, tmp_path, approvals)

    async def heartbeat(age: timedelta) -> None:
        at = await store.db_now() - age  # heartbeats run on the database's clock
        await store.take_host(fleet=FLEET, host_id=HOST, instance=gate.owner, pid=1, at=at)

    await heartbeat(timedelta(0))
    session = await open_window(store, clock.now())

    async def effect() -> None:
        await anyio.sleep_forever()

    async def operator_scan() -> recovery.RecoveryReport:
        return await recovery.scan(
            store, fleet=FLEET, approvals=approvals, host_switch=None, by="cli",
            started_before=store.clock.now() + timedelta(days=1),  # as if the CLI's clock ran ahead
            live_after=await store.db_now() - timedelta(seconds=30),
        )  # fmt: skip

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: gate.run(Action(name="demo.x", params={}, risk="low"), effect,
                                       worker="w1", session=session, command_id="cmd-live"))  # fmt: skip
        await wait_for_status(store, "cmd-live", "started")
        assert (await operator_scan()).in_doubt == 0
        await heartbeat(timedelta(minutes=5))  # the daemon's heartbeat stopped 5 minutes ago
        assert (await operator_scan()).in_doubt == 1
        tg.cancel_scope.cancel()  # that daemon is gone: its effect never reports


# -- approvals: deadlines on the store's clock, fenced in SQL, scoped by fleet ---------------------


@pytest.fixture
async def pg_jump_store(pg_url: str) -> AsyncIterator[tuple[Store, JumpClock]]:
    clock = JumpClock()
    store = await open_store(pg_url, clock, migrate=True)
    try:
        yield store, clock
    finally:
        await store.close()


async def test_backward_jump_does_not_stretch_an_approval_deadline_on_postgres(
    pg_jump_store: tuple[Store, JumpClock],
) -> None:
    store, clock = pg_jump_store
    approvals = Approvals(store, EscalationChain(timeout=1.0), FLEET)
    session = await open_window(store, clock.now() - timedelta(hours=2), hours=4)
    action = Action(name="deploy", params={"v": 1}, risk="high")
    row = await approvals.request(key="k1", action=action, worker="w1",
                                         session_id=session.id, escalate_now=False,
                                         correlation_id=None)  # fmt: skip
    assert row.status == ApprovalStatus.PENDING
    clock.offset = -timedelta(hours=1)  # the host clock is set back an hour

    async def expired() -> int:
        return (await approvals.escalate_due())["expired"]

    # One second of elapsed time, not an hour and one second: any deadline far below the hour
    # tells the two apart, so a generous one keeps a loaded machine from failing it.
    await eventually(expired, "the approval expired after its 1 s timeout", within=30, every=0.1)
    fresh = await store.approval(row.id)
    assert fresh is not None and fresh.status == ApprovalStatus.EXPIRED


async def test_a_decision_after_the_deadline_is_refused_by_the_statement(
    store: Store, clock: VirtualClock
) -> None:
    """The UPDATE compares the deadline itself: with the caller's instant on SQLite, with now()
    on Postgres (where the virtual clock of this test counts as a simulation's and decides)."""
    approvals = Approvals(store, EscalationChain(timeout=60.0), FLEET)
    session = await open_window(store, clock.now())
    row = await approvals.request(key="k1",
                                         action=Action(name="deploy", params={}, risk="high"),
                                         worker="w1", session_id=session.id, escalate_now=False,
                                         correlation_id=None)  # fmt: skip
    deadline = row.deadline

    async def decide_at(instant: datetime) -> bool:
        async with storetools.transaction(store) as tx:
            changed = await tx.fetchrow(
                "decide_pending_approval", "approved", "op", instant, None, "once", None, None,
                row.id, FLEET, instant,
            )  # fmt: skip
            if changed is not None:
                raise _Undo()  # keep it pending for the next probe
        return False

    with pytest.raises(_Undo):
        await decide_at(deadline - timedelta(seconds=1))
    assert await decide_at(deadline) is False  # at the deadline: refused
    assert await decide_at(deadline + timedelta(seconds=30)) is False

    clock.advance(timedelta(seconds=61))
    with pytest.raises(ApprovalError, match="expired"):
        await approvals.decide(row.id, approve=True, by="op", reason=None)
    fresh = await store.approval(row.id)
    assert fresh is not None and fresh.status == ApprovalStatus.EXPIRED
    events = [e.kind for e in await store.replay(session.id)]
    assert ev.APPROVAL_EXPIRED in events and ev.APPROVAL_GRANTED not in events


class _Undo(Exception):
    """Rolls a probe's transaction back."""


async def test_a_slow_cli_clock_cannot_approve_an_expired_request_on_postgres(
    pg_jump_store: tuple[Store, JumpClock],
) -> None:
    store, clock = pg_jump_store
    approvals = Approvals(store, EscalationChain(timeout=1.0), FLEET)
    session = await open_window(store, clock.now() - timedelta(hours=1), hours=2)
    row = await approvals.request(key="k1",
                                         action=Action(name="deploy", params={}, risk="high"),
                                         worker="w1", session_id=session.id, escalate_now=False,
                                         correlation_id=None)  # fmt: skip

    async def past_deadline() -> bool:
        return await store.db_now() > row.deadline

    await eventually(past_deadline, "the database's clock past the approval's deadline")
    clock.offset = -timedelta(seconds=30)  # the deciding CLI's clock is 30 s slow
    with pytest.raises(ApprovalError, match="expired"):
        await approvals.decide(row.id, approve=True, by="op", reason=None)
    fresh = await store.approval(row.id)
    assert fresh is not None and fresh.status == ApprovalStatus.EXPIRED
    # The statement itself refuses, whatever instant the caller passes in:
    async with storetools.transaction(store) as tx:
        assert await tx.fetchrow(
            "decide_pending_approval", "approved", "op", clock.now(), None, "once", None, None,
            row.id, FLEET, None,
        ) is None  # fmt: skip


async def test_approval_keys_are_scoped_by_fleet(store: Store, clock: VirtualClock) -> None:
    chain = EscalationChain(timeout=3600.0)
    a, b = Approvals(store, chain, "fleet-a"), Approvals(store, chain, "fleet-b")
    action = Action(name="deploy", params={"v": 1}, risk="high")
    sa, _ = await store.open_window(fleet="fleet-a", key="a", starts_at=clock.now(),
                                    ends_at=clock.now() + timedelta(hours=1), max_cost=None,
                                    max_actions=None, by="pytest")  # fmt: skip
    sb, _ = await store.open_window(fleet="fleet-b", key="b", starts_at=clock.now(),
                                    ends_at=clock.now() + timedelta(hours=1), max_cost=None,
                                    max_actions=None, by="pytest")  # fmt: skip
    ra = await a.request(key="shared", action=action, worker="w", session_id=sa.id,
                         escalate_now=False, correlation_id=None)  # fmt: skip
    await a.decide(ra.id, approve=True, by="op-a", reason=None)
    rb = await b.request(key="shared", action=action, worker="w", session_id=sb.id,
                         escalate_now=False, correlation_id=None)  # fmt: skip
    assert rb.id != ra.id and rb.fleet == "fleet-b" and rb.status == ApprovalStatus.PENDING
    # fleet b's operator cannot decide fleet a's approval by its id, nor the reverse
    with pytest.raises(ApprovalError, match="unknown approval"):
        await b.decide(ra.id, approve=False, by="op-b", reason=None)
    with pytest.raises(ApprovalError, match="unknown approval"):
        await a.decide(rb.id, approve=True, by="op-a", reason=None)
    again = await b.request(key="shared", action=action, worker="w", session_id=sb.id,
                                   escalate_now=False, correlation_id=None)  # fmt: skip
    assert again.status == ApprovalStatus.PENDING


async def test_migration_scopes_the_keys_of_existing_approvals(
    tmp_path: Path, clock: VirtualClock
) -> None:
    """A pending approval written before keys were scoped is found again after the upgrade (no
    second request under the same key), in its own fleet only."""
    from supervisor.store import Store as BaseStore
    from supervisor.store import make_backend
    from supervisor.store.queries import load_migrations

    url = f"sqlite:///{tmp_path / 'old.db'}"
    migrations = load_migrations("sqlite")
    backend = make_backend(url)
    await backend.connect()
    old = BaseStore(backend, clock, latest_version=max(v for v, _n, _s in migrations))
    try:
        for version, _name, statements in migrations:
            if version < 4:
                await backend.apply_migration(version, statements, clock.now())
        session = await open_window(old, clock.now())
        async with storetools.transaction(old) as tx:
            await tx.execute(
                "insert_approval", "old-id", "job-7", FLEET, session.id, "w1", None, "deploy",
                "{}", "h", "high", 0.0, "operators", clock.now(), clock.now() + timedelta(hours=1),
                None,
            )  # fmt: skip
    finally:
        await backend.close()

    store = await open_store(url, clock, migrate=True)
    try:
        found = await store.approval_by_key(fleet=FLEET, key=f"{FLEET}/job-7")
        assert found is not None and found.id == "old-id"
        assert await store.approval_by_key(fleet="other", key=f"{FLEET}/job-7") is None
    finally:
        await store.close()

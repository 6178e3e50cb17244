"""One fleet cycle (supervisor.runtime.fleet `Fleet._run_cycle`), as simulated runs repeat it:
the log context it binds and gives back, the cycle id it derives once for the correlation id
and CYCLE_COMPLETED's command_id, its deadline (a hang) apart from the worker's own timeout (a
crash), and the per-cycle rng, seeded from (seed, worker, cycle) so that a month replays alike.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

import anyio
import pytest
import structlog

from supervisor import events as ev
from supervisor.actions import derive_id
from supervisor.config import WorkerSpec
from supervisor.runtime.fleet import Fleet, WorkerStatus
from supervisor.runtime.worker import CycleContext, EffectLog, Worker
from supervisor.store import NewEvent, Session
from supervisor.timing.clock import VirtualClock
from supervisor.timing.horizons import DEFAULTS

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 11, 1, tzinfo=UTC)
SEED = 7


class _Store:
    """What `_run_cycle` writes on a crash (its event) and on a state change."""

    def __init__(self) -> None:
        self.appended: list[NewEvent] = []

    async def append(self, event: NewEvent) -> None:
        self.appended.append(event)

    async def record_worker(self, **_: Any) -> None:
        return None


class _Probe(Worker):
    """Runs `body` as its cycle and keeps what it saw."""

    def __init__(self, body: Any) -> None:
        super().__init__("w", {})
        self.body = body
        self.seen: dict[str, Any] = {}
        self.ctx: CycleContext | None = None

    async def cycle(self, ctx: CycleContext) -> None:
        self.ctx = ctx
        self.seen = structlog.contextvars.get_contextvars()
        await self.body(ctx)


def _fleet(tmp_path: Path) -> tuple[Fleet, _Store]:
    store = _Store()
    fleet = Fleet(
        fleet="f", host="h", store=cast(Any, store), gate=cast(Any, None),
        windows=cast(Any, None), checkpoints=cast(Any, None), clock=VirtualClock(T0),
        profile=DEFAULTS["day"], timezone=ZoneInfo("UTC"), anchor=T0, run_end=None,
        effects=EffectLog(tmp_path / "effects.jsonl"), seed=SEED, stopping=anyio.Event(),
    )  # fmt: skip
    return fleet, store


def _session() -> Session:
    return Session(id="s1", fleet="f", window_key="2026-11-01", starts_at=T0, ends_at=T0,
                   status="open", max_cost=None, max_actions=None, used_cost=0.0,
                   used_actions=0, opened_by=None, opened_at=None, closed_by=None,
                   closed_at=None)  # fmt: skip


async def _nothing(ctx: CycleContext) -> None:
    return None


async def test_the_cycle_binds_its_log_context_and_gives_the_outer_one_back(
    tmp_path: Path,
) -> None:
    fleet, _ = _fleet(tmp_path)
    st = WorkerStatus(name="w", spec=WorkerSpec(name="w"))

    async def fails(ctx: CycleContext) -> None:
        raise RuntimeError("boom")

    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(worker="outer", run="r1")
    try:
        for cycle, body in ((3, _nothing), (4, fails)):
            probe = _Probe(body)
            await fleet._run_cycle(st, probe, cycle, _session())
            assert probe.seen == {
                "worker": "w", "run": "r1", "window": "2026-11-01", "cycle": cycle,
                "correlation_id": derive_id("f", "w", "cycle", str(cycle)),
            }  # fmt: skip
            # The cycle's keys are gone again, and the one it shadowed is back.
            assert structlog.contextvars.get_contextvars() == {"worker": "outer", "run": "r1"}
    finally:
        structlog.contextvars.clear_contextvars()


async def test_the_cycle_id_is_the_correlation_id_and_cycle_completeds_command_id(
    tmp_path: Path,
) -> None:
    fleet, _ = _fleet(tmp_path)
    st = WorkerStatus(name="w", spec=WorkerSpec(name="w"))
    probe = _Probe(_nothing)
    assert await fleet._run_cycle(st, probe, 5, _session())
    assert probe.ctx is not None
    completed, _at = st.pending[-1]
    assert completed.kind == ev.CYCLE_COMPLETED
    assert completed.command_id == probe.ctx.correlation_id == derive_id("f", "w", "cycle", "5")
    assert completed.payload == {"cycle": 5}
    assert (st.cycles, st.crashes, st.hangs) == (1, 0, 0)


async def test_a_cycle_past_its_deadline_is_a_hang_and_its_own_timeout_a_crash(
    tmp_path: Path,
) -> None:
    fleet, store = _fleet(tmp_path)
    st = WorkerStatus(name="w", spec=WorkerSpec(name="w", cycle_deadline=0.05))

    async def hangs(ctx: CycleContext) -> None:
        await anyio.sleep(30)  # real time: the deadline is on the event loop's clock

    async def times_out(ctx: CycleContext) -> None:
        raise TimeoutError("upstream call timed out")

    assert not await fleet._run_cycle(st, _Probe(hangs), 3, _session())
    assert (st.hangs, st.crashes) == (1, 1)
    assert st.last_error == "hung: cycle 3 passed its 0.05s deadline"
    assert store.appended[-1].reason == "hang"

    assert not await fleet._run_cycle(st, _Probe(times_out), 4, _session())
    assert (st.hangs, st.crashes) == (1, 2)
    assert st.last_error == "TimeoutError: upstream call timed out"
    assert store.appended[-1].reason == "crash"
    assert fleet.in_flight == 0 and fleet.idle.is_set()


async def test_the_cycle_rng_is_seeded_from_seed_worker_and_cycle(tmp_path: Path) -> None:
    fleet, _ = _fleet(tmp_path)
    st = WorkerStatus(name="w", spec=WorkerSpec(name="w"))
    drawn: list[float] = []

    async def draw(ctx: CycleContext) -> None:
        drawn.append(ctx.rng.random())

    for cycle in (0, 1, 0):
        await fleet._run_cycle(st, _Probe(draw), cycle, _session())
    assert drawn[0] == drawn[2] != drawn[1]
    assert drawn[:2] == [random.Random(f"{SEED}:w:{c}").random() for c in (0, 1)]
    # Pinned: a change of how the rng is seeded changes every simulated run's events.
    assert drawn[:2] == [0.2941194376964713, 0.2386469011820187]

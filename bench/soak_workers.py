"""Worker classes of the soak (bench/soak.py), importable as `bench.soak_workers:Name` with
PYTHONPATH set to the repository root.

Every fault is drawn from a hash of (seed, worker, cycle), never from a shared random stream, so a
cycle that is re-run after a daemon restart makes the same choice it made the first time, and the
schedule does not depend on how the tasks of the virtual clock interleave.

- `ChaosWorker`: one or two actions a cycle (mostly low and medium risk, some flagged critical so
  they may run under halt_noncritical, some high risk that policy denies). On its seeded schedule a
  cycle crashes (raises, before its actions or after the first one) or hangs (blocks in real time
  past the cycle deadline, before its actions or inside an effect after the effect happened, so
  the action is left started without an outcome).
- `ApprovalWorker`: asks for approval of several new keys every cycle and retries the keys of the
  cycles before; nobody approves most of them, so they are escalated and denied at the deadline.
  The soak's operator (bench/soak_daemon.py) approves a seeded share, which then runs once.
- A ChaosWorker given a `bait_cycle` (the soak's `bait` worker): in that cycle one critical
  action's effect happens and then blocks until the soak SIGKILLs the daemon, so one kill always
  lands with an action in flight (started, effect done, no outcome).

While a soak worker's cycle runs, `IN_CYCLE` holds (worker, cycle): bench/soak_daemon.py fails a
seeded share of the write transactions made under it (state-bearing writes of the gate).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import anyio

from supervisor.actions import Action, Risk
from supervisor.errors import ActionDenied, ApprovalPending
from supervisor.runtime.worker import ActionAlreadyDone, CycleContext, Worker

# (worker, cycle) while a soak worker's cycle runs; read by soak_daemon's write-failure hook.
IN_CYCLE: ContextVar[tuple[str, int] | None] = ContextVar("soak_in_cycle", default=None)

CRASH_MESSAGE = "soak: injected crash"


def draw(seed: int | str, *parts: object) -> float:
    """A uniform number in [0, 1) determined by its inputs alone."""
    text = "\x1f".join([str(seed), *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def log_fault(path: str | None, **entry: Any) -> None:
    """One JSON line per injected fault (what was injected, to compare with what was observed)."""
    if not path:
        return
    line = json.dumps({**entry, "pid": os.getpid()}, sort_keys=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _write_marker(path: str, data: Mapping[str, Any]) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(data)))
    os.replace(tmp, path)


def fault_for(params: Mapping[str, Any], worker: str, cycle: int) -> str | None:
    """The fault planned for this (worker, cycle): None, crash_before, crash_after, hang_before
    or hang_in_effect."""
    seed = params.get("seed", 0)
    u = draw(seed, "fault", worker, cycle)
    hang, crash = float(params.get("hang_rate", 0.0)), float(params.get("crash_rate", 0.0))
    where = draw(seed, "fault-where", worker, cycle) < 0.5
    if u < hang:
        return "hang_before" if where else "hang_in_effect"
    if u < hang + crash:
        return "crash_before" if where else "crash_after"
    return None


class _SoakWorker(Worker):
    def __init__(self, name: str, params: Mapping[str, Any]) -> None:
        super().__init__(name, params)
        self.seed = params.get("seed", 0)
        self.faults_log: str | None = params.get("faults_log")
        self.counts: dict[str, int] = {}

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    async def cycle(self, ctx: CycleContext) -> None:
        token = IN_CYCLE.set((self.name, ctx.cycle) if self.injectable(ctx.cycle) else None)
        try:
            await self.soak_cycle(ctx)
        finally:
            IN_CYCLE.reset(token)

    def injectable(self, cycle: int) -> bool:
        """Whether write failures may be injected into this cycle."""
        return True

    async def soak_cycle(self, ctx: CycleContext) -> None:
        raise NotImplementedError

    def snapshot(self) -> dict[str, Any]:
        return {"counts": dict(self.counts)}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.counts = {str(k): int(v) for k, v in dict(state.get("counts", {})).items()}


class ChaosWorker(_SoakWorker):
    """Ordinary work with seeded crashes and hangs."""

    def __init__(self, name: str, params: Mapping[str, Any]) -> None:
        super().__init__(name, params)
        self.cost = float(params.get("cost", 0.05))
        self.critical_share = float(params.get("critical_share", 0.15))
        self.high_share = float(params.get("high_share", 0.1))
        self.hang_for = float(params.get("hang_for", 30.0))  # real seconds; the deadline ends it
        self.bait_cycle = int(params.get("bait_cycle", -1))
        self.bait_marker: str | None = params.get("bait_marker")

    def injectable(self, cycle: int) -> bool:
        return cycle != self.bait_cycle

    async def bait(self, ctx: CycleContext) -> None:
        """One critical action whose effect happens and then blocks, in real time, until the soak
        kills the daemon (it watches the marker file): a SIGKILL with an action in flight."""
        action = Action(name="soak.bait", params={"worker": self.name, "cycle": ctx.cycle},
                        risk="low", cost=0.0, critical=True)  # fmt: skip

        async def effect(command_id: str) -> Any:
            ctx.record_effect(action.name, command_id, critical=True, risk="low")
            if self.bait_marker:
                _write_marker(self.bait_marker, {"pid": os.getpid(), "cycle": ctx.cycle,
                                                 "command_id": command_id})  # fmt: skip
            await anyio.sleep(float(self.params.get("bait_block", 30.0)))
            return {"done": True}

        try:
            await ctx.dispatch(action, effect)
        except ActionDenied as exc:
            self.count(f"denied:{exc.reason}")

    async def hang(self, ctx: CycleContext, where: str) -> None:
        log_fault(self.faults_log, kind="hang", where=where, worker=self.name, cycle=ctx.cycle)
        await anyio.sleep(self.hang_for)  # real time, even on the virtual clock

    async def soak_cycle(self, ctx: CycleContext) -> None:
        if ctx.cycle == self.bait_cycle:
            await self.bait(ctx)
            return
        fault = fault_for(self.params, self.name, ctx.cycle)
        if fault == "crash_before":
            log_fault(
                self.faults_log, kind="crash", where="before", worker=self.name, cycle=ctx.cycle
            )
            raise RuntimeError(f"{CRASH_MESSAGE} before the actions of cycle {ctx.cycle}")
        if fault == "hang_before":
            await self.hang(ctx, "before")
        n = 1 + int(draw(self.seed, "n", self.name, ctx.cycle) < 0.35)
        for i in range(n):
            u = draw(self.seed, "risk", self.name, ctx.cycle, i)
            risk: Risk = "high" if u < self.high_share else ("medium" if u < 0.45 else "low")
            critical = draw(self.seed, "critical", self.name, ctx.cycle, i) < self.critical_share
            action = Action(name="soak.work", params={"worker": self.name, "cycle": ctx.cycle, "i": i},
                            risk=risk, cost=self.cost, critical=critical)  # fmt: skip
            hang_here = fault == "hang_in_effect" and i == 0

            async def effect(
                command_id: str, action: Action = action, hang_here: bool = hang_here
            ) -> Any:
                ctx.record_effect(
                    action.name, command_id, critical=action.critical, risk=action.risk
                )
                if hang_here:  # the effect happened; its outcome will never be recorded
                    await self.hang(ctx, "in_effect")
                return {"done": True}

            try:
                outcome = await ctx.dispatch(action, effect)
            except ActionDenied as exc:
                self.count(f"denied:{exc.reason}")
                continue
            self.count("replayed" if outcome.replayed else outcome.status)
            if fault == "crash_after" and i == 0:
                log_fault(
                    self.faults_log, kind="crash", where="after", worker=self.name, cycle=ctx.cycle
                )
                raise RuntimeError(f"{CRASH_MESSAGE} after the first action of cycle {ctx.cycle}")


class ApprovalWorker(_SoakWorker):
    """A backlog of approvals: new keys every cycle, the keys of the last cycles retried."""

    def __init__(self, name: str, params: Mapping[str, Any]) -> None:
        super().__init__(name, params)
        self.keys = int(params.get("keys_per_cycle", 3))
        self.retry_cycles = int(params.get("retry_cycles", 2))
        self.cost = float(params.get("cost", 0.05))

    async def soak_cycle(self, ctx: CycleContext) -> None:
        for back in range(self.retry_cycles + 1):
            cycle = ctx.cycle - back
            if cycle < 0:
                continue
            for i in range(self.keys):
                key = f"soak:{self.name}:{cycle}:{i}"
                try:
                    async with ctx.guard("soak.approval.deploy", params={"key": key},
                                         idempotency_key=key, risk="medium",
                                         cost=self.cost) as permit:  # fmt: skip
                        ctx.record_effect("soak.approval.deploy", permit.command_id, key=key,
                                          critical=False, approval=permit.approval_id)  # fmt: skip
                    self.count("ran")
                except ApprovalPending:
                    self.count("pending")
                except ActionAlreadyDone:
                    self.count("already_done")
                except ActionDenied as exc:
                    self.count(f"denied:{exc.reason}")

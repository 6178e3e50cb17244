"""Kill-switch drill: how fast a halt takes hold under load, and whether anything slips through.

50 in-process workers dispatch no-op actions continuously through the full gate (kill switch,
idempotency, policy, approval, budget, durable started record, last look, effect, outcome) on a
SQLite store in a temp directory, on the real clock. Each trial engages `halt_all` through the
CLI's own code path (`commands.killswitch_engage`: the signed file written and renamed into place,
then the event recorded), run on another thread with its own event loop and store connection, as
a separate `acp-supervisor killswitch engage` process would. Then it counts, from the store and
from the effects, what started after the engage returned (the promise: nothing), and how long
idle tasks waiting on the gate's `switch_changed` (as a halted worker waits) took to wake: the
switch is watched by the daemon's own `SwitchKeeper`. Then it disengages and lets the
workers resume before the next trial.

    .venv/bin/python bench/killswitch.py [--workers 50] [--trials 20] [--waiters 10] [--json]

Exit status 1 if any action started or any effect ran after an engage returned.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from supervisor import events as ev  # noqa: E402
from supervisor.actions import Action  # noqa: E402
from supervisor.cli import commands  # noqa: E402
from supervisor.config import Config, load_config  # noqa: E402
from supervisor.errors import ActionDenied  # noqa: E402
from supervisor.governance.approvals import Approvals  # noqa: E402
from supervisor.governance.gate import Gate  # noqa: E402
from supervisor.killswitch import SECRET_ENV, HostSwitchFile, load_secret  # noqa: E402
from supervisor.killswitch.engage import host_switch_path  # noqa: E402
from supervisor.killswitch.keeper import SwitchKeeper  # noqa: E402
from supervisor.logging import configure  # noqa: E402
from supervisor.ops.alerts import Alerts  # noqa: E402
from supervisor.store import Session, Store, open_store  # noqa: E402
from supervisor.timing.clock import SystemClock  # noqa: E402

CONTEXT = "a widely cited kill-switch library promises a fleet halt in under two seconds"


@dataclass
class Trial:
    engage_ms: float
    started_after: int  # ACTION_STARTED events created after the engage returned
    effects_after: int  # effects run after the engage returned
    halted_at_last_look: int
    refused: int
    wake_ms: list[float]  # per idle waiter: wake instant minus engage return (negative: before)
    actions_before: int  # actions completed in this trial's running phase


@dataclass
class Bench:
    store: Store
    gate: Gate
    session: Session
    keeper: SwitchKeeper
    config: Config
    effects: list[datetime] = field(default_factory=list)
    done: int = 0
    stop: bool = False


def _cli(handler: Any, config: Config, **args: Any) -> None:
    """One CLI subcommand, on this (worker) thread with its own event loop, output captured."""
    namespace = argparse.Namespace(scope=["host"], reason="bench drill", by="bench", **args)
    with contextlib.redirect_stdout(io.StringIO()):
        code = anyio.run(handler, namespace, config)
    if code != 0:
        raise SystemExit(f"killswitch command failed with exit code {code}")


async def setup(tmp: Path, watch_interval: float) -> Bench:
    os.environ.setdefault(SECRET_ENV, "bench-secret")
    config = load_config(None, db=f"sqlite:///{tmp / 'bench.db'}", state_dir=tmp, env={})
    clock = SystemClock()
    store = await open_store(config.db_url, clock, migrate=True)
    secret = load_secret(os.environ, None)
    switch = HostSwitchFile(host_switch_path(config.state_dir), secret)
    gate = Gate(store=store, fleet=config.fleet, policy=config.policy,
                approvals=Approvals(store, config.approvals, config.fleet), host_switch=switch,
                token_budgets=config.token_budgets, models=config.models,
                timezone=config.timezone)  # fmt: skip
    now = clock.now()
    session, _ = await store.open_window(
        fleet=config.fleet, key="bench", starts_at=now - timedelta(minutes=1),
        ends_at=now + timedelta(days=1), max_cost=None, max_actions=None, by="bench",
    )  # fmt: skip
    keeper = SwitchKeeper(
        store=store, gate=gate, host_switch=switch, clock=clock, fleet=config.fleet,
        alerts=Alerts(store, fleet=config.fleet, config=config.alerts, clock=clock),
        host_id=config.host_id, state_dir=config.state_dir, watch_interval=watch_interval,
        store_poll=config.killswitch_store_poll,
    )  # fmt: skip
    return Bench(store, gate, session, keeper, config)


async def worker(bench: Bench, index: int) -> None:
    name = f"bench-{index}"
    n = 0

    async def effect() -> None:
        bench.effects.append(bench.store.clock.now())

    while not bench.stop:
        n += 1
        try:
            action = Action("bench.noop", params={"w": index, "n": n})
            await bench.gate.run(action, effect, worker=name, session=bench.session,
                                 command_id=f"{name}-{n}")  # fmt: skip
            bench.done += 1
        except ActionDenied:
            # Halted: an idle worker waits for the switch to change rather than spinning.
            with anyio.move_on_after(0.5):
                await bench.gate.switch_changed.wait()
        await anyio.lowlevel.checkpoint()


async def events_since(store: Store, session: Session, after: int) -> list[Any]:
    return await store.replay(session.id, after=after, limit=1_000_000)


async def trial(bench: Bench, waiters: int, run_for: float, settle: float) -> Trial:
    done_before = bench.done
    await anyio.sleep(run_for)
    actions_before = bench.done - done_before
    last_seq = max((e.seq for e in await events_since(bench.store, bench.session, 0)), default=0)

    woke: list[float] = []
    all_awake = anyio.Event()

    async def idle() -> None:
        await bench.gate.switch_changed.wait()
        woke.append(time.perf_counter())
        if len(woke) == waiters:
            all_awake.set()

    async with anyio.create_task_group() as tg:
        for _ in range(waiters):
            tg.start_soon(idle)
        await anyio.sleep(0.01)  # let the waiters block
        effects_mark = len(bench.effects)
        t_call = time.perf_counter()
        await anyio.to_thread.run_sync(_engage_sync, bench.config)
        t_return = time.perf_counter()
        returned_at = bench.store.clock.now()
        with anyio.fail_after(5):
            await all_awake.wait()
        await anyio.sleep(settle)  # the fleet runs on, halted

    events = await events_since(bench.store, bench.session, last_seq)
    started_after = sum(1 for e in events
                        if e.kind == ev.ACTION_STARTED and e.created_at > returned_at)  # fmt: skip
    refused = sum(1 for e in events if e.kind == ev.ACTION_DENIED and e.reason == "killswitch")
    halted = sum(1 for e in events if e.kind == ev.ACTION_FAILED and e.reason == "killswitch")
    effects_after = sum(1 for at in bench.effects[effects_mark:] if at > returned_at)

    await anyio.to_thread.run_sync(_disengage_sync, bench.config)
    return Trial(
        engage_ms=(t_return - t_call) * 1000,
        started_after=started_after,
        effects_after=effects_after,
        halted_at_last_look=halted,
        refused=refused,
        wake_ms=[(w - t_return) * 1000 for w in woke],
        actions_before=actions_before,
    )


def _engage_sync(config: Config) -> None:
    _cli(commands.killswitch_engage, config, mode="halt_all")


def _disengage_sync(config: Config) -> None:
    _cli(commands.killswitch_disengage, config)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="acp-ks-bench-") as tmp:
        bench = await setup(Path(tmp), args.watch_interval)
        trials: list[Trial] = []
        t0 = time.perf_counter()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(bench.keeper.watch_host)
                for i in range(args.workers):
                    tg.start_soon(worker, bench, i)
                for _ in range(args.trials):
                    trials.append(await trial(bench, args.waiters, args.run_for, args.settle))
                bench.stop = True
                tg.cancel_scope.cancel()
        finally:
            await bench.store.close()
        elapsed = time.perf_counter() - t0
    return summarize(args, trials, elapsed)


def _ms(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 2), "max": round(max(values), 2),
            "min": round(min(values), 2)}  # fmt: skip


def summarize(args: argparse.Namespace, trials: list[Trial], elapsed: float) -> dict[str, Any]:
    wake = [w for t in trials for w in t.wake_ms]
    running = sum(t.actions_before for t in trials)
    return {
        "context": CONTEXT,
        "workers": args.workers,
        "trials": len(trials),
        "idle_waiters_per_trial": args.waiters,
        "watch_interval_ms": args.watch_interval * 1000,
        "store": "sqlite (WAL, synchronous=FULL)",
        "actions_per_second_running": round(running / (len(trials) * args.run_for), 1),
        "engage_call_ms": _ms([t.engage_ms for t in trials]),
        "started_after_engage_returned": sum(t.started_after for t in trials),
        "effects_after_engage_returned": sum(t.effects_after for t in trials),
        "halted_at_last_look": sum(t.halted_at_last_look for t in trials),
        "refused_killswitch": sum(t.refused for t in trials),
        "idle_wake_after_return_ms": _ms(wake),
        "idle_wake_samples": len(wake),
        "elapsed_s": round(elapsed, 1),
    }


def render(r: dict[str, Any]) -> str:
    def ms(d: dict[str, float]) -> str:
        return f"median {d['median']:.1f}  max {d['max']:.1f}  min {d['min']:.1f}"

    rows = [
        ("trials", f"{r['trials']} (engage halt_all, settle, disengage)"),
        ("actions/s while running", f"{r['actions_per_second_running']}"),
        ("engage call -> return (ms)", ms(r["engage_call_ms"])),
        ("started records after engage returned", str(r["started_after_engage_returned"])),
        ("effects after engage returned", str(r["effects_after_engage_returned"])),
        ("halted at the last look", str(r["halted_at_last_look"])),
        ("refusals with reason killswitch", str(r["refused_killswitch"])),
        ("idle waiter wake after return (ms)", ms(r["idle_wake_after_return_ms"])
         + f"  ({r['idle_wake_samples']} samples)"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    head = [
        f"Kill-switch drill: {r['workers']} workers, no-op actions through the full gate, "
        f"{r['store']}, real clock, watcher poll {r['watch_interval_ms']:g} ms",
        f"(context only: {r['context']})",
        "",
    ]
    tail = ["", "negative wake = the keeper saw the new file before the engage command returned"]
    return "\n".join(head + [f"{k:<{width}}  {v}" for k, v in rows] + tail)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--waiters", type=int, default=10, help="idle tasks per trial")
    parser.add_argument("--run-for", type=float, default=0.3, help="seconds of load before engage")
    parser.add_argument("--settle", type=float, default=0.2, help="seconds halted before counting")
    parser.add_argument("--watch-interval", type=float, default=0.05, help="watcher poll, seconds")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    configure(level="error", stream=sys.stderr)  # the gate logs every refusal at info
    result = anyio.run(run, args)
    print(json.dumps(result, indent=2) if args.json else render(result))
    slipped = result["started_after_engage_returned"] + result["effects_after_engage_returned"]
    return 1 if slipped else 0


if __name__ == "__main__":
    sys.exit(main())

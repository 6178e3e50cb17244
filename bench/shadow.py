"""The gate's cost with a shadow policy: the same actions through the gate without and with a
`[policy] shadow` candidate of the same size.

    .venv/bin/python bench/shadow.py [--actions 1000] [--rounds 5] [--rules 20]
                                     [--synchronous normal|full] [--json]

One in-process Gate over a SQLite store (a temporary file; `synchronous=normal` by default, so
the figure is the gate's CPU cost rather than the disk's commit rate), a live policy of --rules
rules and two candidates of as many, read from files as the daemon reads them: one that agrees
with the live policy on everything (the cost of deciding twice), and one that denies the
medium-risk actions the live policy allows, so it disagrees on a quarter of them and queues a
POLICY_SHADOW event for each.

Blocks of --actions actions rotate: no shadow, the agreeing one, the disagreeing one, --rounds
times each (rotating spreads a shared machine's noise over all three); the figures are the
median per-action gate CPU time (the process's, every thread: on a shared machine
wall-clock time mostly measures the neighbours) of each and the overheads against no shadow. The periodic flush that
writes the queued events runs outside the gate, in the daemon's own task, so it is timed apart
(per event written). The goal: at most 10% on the gate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402

from supervisor.actions import Action, Risk  # noqa: E402
from supervisor.config import load_config  # noqa: E402
from supervisor.governance.approvals import Approvals  # noqa: E402
from supervisor.governance.budgets import ModelGovernor, TokenBudgets  # noqa: E402
from supervisor.governance.escalation import EscalationChain  # noqa: E402
from supervisor.governance.gate import Gate  # noqa: E402
from supervisor.governance.policy import Policy  # noqa: E402
from supervisor.governance.replay import ShadowPolicy  # noqa: E402
from supervisor.killswitch import HostSwitchFile  # noqa: E402
from supervisor.store import open_store  # noqa: E402
from supervisor.timing.clock import SystemClock  # noqa: E402

FLEET = "bench"
RISKS: tuple[Risk, ...] = ("low", "medium", "low", "low")


def rules_toml(n: int, medium: str) -> str:
    """n - 1 rules that match nothing the bench proposes, and the risk table."""
    rules = "".join(
        f'[[policy.rules]]\nname = "r{i}"\naction = "never.{i}.*"\noutcome = "deny"\n'
        for i in range(n - 1)
    )
    return (
        rules
        + '[[policy.rules]]\nname = "last"\nrisk = "critical"\noutcome = "deny"\n'
        + (f'[policy.risk]\nmedium = "{medium}"\n')
    )


async def measure(actions: int, rounds: int, rules: int, sync: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="acp-shadow-bench-") as tmp:
        root = Path(tmp)
        (root / "live.toml").write_text(rules_toml(rules, "allow"))
        (root / "candidate.toml").write_text(rules_toml(rules, "deny"))
        (root / "same.toml").write_text(rules_toml(rules, "allow"))
        config = load_config(root / "live.toml", state_dir=root)
        store = await open_store(f"sqlite:///{root / 'b.db'}?synchronous={sync}", SystemClock(),
                                 migrate=True)  # fmt: skip
        try:
            gate = Gate(store=store, fleet=FLEET, policy=config.policy,
                        approvals=Approvals(store, EscalationChain.from_config(None), FLEET),
                        host_switch=HostSwitchFile(root / "killswitch.json", None),
                        token_budgets=TokenBudgets(), models=ModelGovernor(),
                        timezone=ZoneInfo("UTC"))  # fmt: skip
            shadow = ShadowPolicy(root / "candidate.toml", config)
            same = ShadowPolicy(root / "same.toml", config)
            assert isinstance(config.policy, Policy) and len(config.policy.rules) == rules
            now = store.clock.now()
            session, _ = await store.open_window(
                fleet=FLEET, key="bench", starts_at=now, ends_at=now + timedelta(days=1),
                max_cost=None, max_actions=None, by="bench",
            )  # fmt: skip

            async def effect() -> None:
                return None

            counter = 0

            flushed: list[float] = []

            async def block(which: ShadowPolicy | None) -> float:
                nonlocal counter
                gate.shadow = which
                t0 = time.process_time()
                for _ in range(actions):
                    counter += 1
                    action = Action(name=f"bench.op{counter % 10}", params={"n": counter},
                                    risk=RISKS[counter % 4])  # fmt: skip
                    await gate.run(action, effect, worker="w1", session=session,
                                   command_id=f"c{counter}")  # fmt: skip
                took = (time.process_time() - t0) / actions
                queued = len(store._telemetry)
                t0 = time.perf_counter()
                if await store.flush_telemetry() and queued:
                    flushed.append((time.perf_counter() - t0) / queued)
                return took

            await block(None)  # warm up the caches and the files
            plain: list[float] = []
            agreeing: list[float] = []
            shadowed: list[float] = []
            for _ in range(rounds):
                plain.append(await block(None))
                agreeing.append(await block(same))
                shadowed.append(await block(shadow))
        finally:
            await store.close()
    base, with_shadow = statistics.median(plain), statistics.median(shadowed)
    agree = statistics.median(agreeing)
    return {
        "actions_per_block": actions,
        "rounds": rounds,
        "rules": rules,
        "synchronous": sync,
        "gate_us": round(base * 1e6, 1),
        "gate_shadow_agreeing_us": round(agree * 1e6, 1),
        "gate_shadow_disagreeing_us": round(with_shadow * 1e6, 1),
        "overhead_agreeing_pct": round((agree / base - 1) * 100, 1),
        "overhead_disagreeing_pct": round((with_shadow / base - 1) * 100, 1),
        "flush_us_per_event": round(statistics.median(flushed) * 1e6, 1) if flushed else None,
        "disagreements": shadow.disagreements + same.disagreements,
        "shadow_errors": shadow.errors + same.errors,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actions", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rules", type=int, default=20)
    parser.add_argument("--synchronous", choices=["normal", "full"], default="normal")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = anyio.run(measure, args.actions, args.rounds, args.rules, args.synchronous)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:20} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

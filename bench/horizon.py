#!/usr/bin/env python
"""How long a simulated month takes, end to end.

For 1, 10 and 100 support agents (`--quick`: 1 and 10) this runs

    python -m supervisor --config bench.toml --state-dir DIR run --horizon month --simulate \\
        --start 2026-11-01T00:00:00Z --json

as a subprocess, each in a fresh temporary state directory, so the figure is honest: interpreter
start, imports, store creation and migration, the 30 days on the virtual clock, and the scorecard.
The config is the built-in one (its policy, approvals and budgets) with the workers replaced by
`replicas = N` support agents; the nightly maintenance agent is left out unless --maintenance.
The store is the simulation's own SQLite file with synchronous=normal, which is what
`run --simulate` uses (durable against a killed process); --sync full shows the cost of an fsync
per commit, which is what a real run pays.

Prints one row per size: workers, wall seconds, cycles, actions started, cycles per second.
The machine is shared and the figures noisy: `--repeat K` runs each size K times and prints the
best and the worst. `--profile DIR` runs the daemon under cProfile (slower) and keeps one
profile per run in DIR, with its top functions printed (`python -m pstats DIR/FILE` for more).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from supervisor.config import default_config_text  # noqa: E402

START = "2026-11-01T00:00:00Z"
MONTH_CYCLES = 30 * 24  # one cycle an hour for 30 days (DESIGN.md horizon table)
REFERENCE = (
    "a well-known governance library's own month example (720 cycles, one worker, SQLite) "
    "takes about 10 s on this machine"
)


@dataclass
class Row:
    workers: int
    wall: float
    cycles: int
    actions: int
    succeeded: int
    denials: int
    worst: float = 0.0  # the slowest of the --repeat runs (wall is the best)

    @property
    def rate(self) -> float:
        return self.cycles / self.wall if self.wall else 0.0


def config_text(workers: int, maintenance: bool, alerts_every: str | None = None) -> str:
    text = default_config_text()
    head = text[: text.index("[[workers]]")]
    if alerts_every is not None:
        head += f'[alerts]\nevaluate_every = "{alerts_every}"\n\n'
    body = (
        f'[[workers]]\nname = "support"\nclass = "workers.support:SupportAgent"\n'
        f"replicas = {workers}\n"
    )
    if maintenance:
        body += (
            '\n[[workers]]\nname = "maintenance"\nclass = "workers.maintenance:MaintenanceAgent"\n'
            'schedule = "0 3 * * *"\n'
        )
    return head + body


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_") and k != "NOTIFY_SOCKET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_month(workers: int, args: argparse.Namespace, run: int = 0) -> Row:
    with tempfile.TemporaryDirectory(prefix=f"acp-bench-month-{workers}-") as tmp:
        folder = Path(tmp)
        config = folder / "bench.toml"
        config.write_text(config_text(workers, args.maintenance, args.alerts_every))
        state = folder / "state"
        db = f"sqlite:///{state / 'simulate.db'}?synchronous={args.sync}"
        argv = [sys.executable, "-m", "supervisor", "--config", str(config), "--state-dir",
                str(state), "--db", db, "--log-level", args.log_level, "run", "--horizon",
                "month", "--simulate", "--start", START, "--json"]  # fmt: skip
        profile = None
        if args.profile is not None:
            profile = args.profile / f"horizon-{workers}-{run}.prof"
            argv[1:1] = ["-m", "cProfile", "-o", str(profile)]
        log = folder / "daemon.log"
        with open(log, "w") as err:
            t0 = time.perf_counter()
            done = subprocess.run(argv, cwd=folder, env=environment(), stdout=subprocess.PIPE,
                                  stderr=err, text=True)  # fmt: skip
            wall = time.perf_counter() - t0
        if done.returncode != 0:
            tail = log.read_text()[-3000:]
            raise SystemExit(
                f"month with {workers} workers failed (exit {done.returncode}):\n{tail}"
            )
        total = json.loads(done.stdout)["total"]
    if profile is not None:
        print_profile(profile)
    return Row(workers, wall, int(total["cycles"]), int(total["actions_started"]),
               int(total["actions_succeeded"]), int(total["denials"]))  # fmt: skip


def print_profile(path: Path, top: int = 25) -> None:
    print(f"profile {path} (top {top} by own time):", file=sys.stderr)
    stats = pstats.Stats(str(path), stream=sys.stderr)
    stats.sort_stats("tottime").print_stats(top)


def run_size(workers: int, args: argparse.Namespace) -> Row:
    """The best of --repeat runs, with the worst beside it."""
    rows = [run_month(workers, args, run) for run in range(args.repeat)]
    best = min(rows, key=lambda r: r.wall)
    best.worst = max(r.wall for r in rows)
    return best


def startup_seconds() -> float:
    """What a do-nothing invocation costs (interpreter, imports, argument parsing)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "supervisor", "run", "--help"], env=environment(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)  # fmt: skip
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 and 10 workers only")
    parser.add_argument("--workers", type=int, nargs="+", help="sizes to run (default 1 10 100)")
    parser.add_argument("--maintenance", action="store_true",
                        help="also run the nightly maintenance agent (30 more cycles)")  # fmt: skip
    parser.add_argument("--sync", choices=["full", "normal"], default="normal",
                        help="SQLite synchronous mode (default normal, as run --simulate)")  # fmt: skip
    parser.add_argument("--alerts-every", metavar="DURATION",
                        help="alerts.evaluate_every (default: the config's, 1m); evaluating "
                        "alerts costs the same per simulated minute whatever the workers")  # fmt: skip
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"],
                        help="the daemon's log level (default info, as a real run)")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=1, metavar="K",
                        help="run each size K times; the best wall time is shown, and the worst")  # fmt: skip
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="run the daemon under cProfile, one profile per run in DIR")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        args.profile = args.profile.absolute()
    sizes = args.workers or ([1, 10] if args.quick else [1, 10, 100])
    if args.json:
        measured = [run_size(n, args) for n in sizes]
        print(json.dumps({
            "sync": args.sync, "reference": REFERENCE, "repeat": args.repeat,
            "rows": [{"workers": r.workers, "wall_s": round(r.wall, 2), "cycles": r.cycles,
                      "actions": r.actions, "cycles_per_s": round(r.rate, 1),
                      **({"worst_wall_s": round(r.worst, 2)} if args.repeat > 1 else {})}
                     for r in measured],
        }))  # fmt: skip
        return 0

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"simulated month ({MONTH_CYCLES} cycles per worker, daily windows), each run a "
          f"subprocess in a fresh state dir")  # fmt: skip
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {load:.2f}; SQLite synchronous={args.sync}; log level {args.log_level}; "
          f"maintenance agent {'included' if args.maintenance else 'not included'}; alerts "
          f"evaluated every {args.alerts_every or '1m (the default)'}")  # fmt: skip
    print(f"process startup alone (`run --help`): {startup_seconds():.2f} s")
    if args.repeat > 1:
        print(f"each size run {args.repeat} times: wall s is the best, worst s the slowest")
    if args.profile is not None:
        print(f"under cProfile (slower than without), profiles in {args.profile}")
    print()
    header = f"{'workers':>7}  {'wall s':>8}  {'cycles':>7}  {'actions':>7}  {'cycles/s':>8}"
    if args.repeat > 1:
        header += f"  {'worst s':>8}"
    print(header)
    print("-" * len(header))
    rows: list[Row] = []
    for n in sizes:
        row = run_size(n, args)
        rows.append(row)
        worst = f"  {row.worst:>8.2f}" if args.repeat > 1 else ""
        print(f"{row.workers:>7}  {row.wall:>8.2f}  {row.cycles:>7}  {row.actions:>7}  "
              f"{row.rate:>8.1f}{worst}", flush=True)  # fmt: skip
        expected = MONTH_CYCLES * n + (30 if args.maintenance else 0)
        if row.cycles != expected:
            print(f"  ! expected {expected} cycles, the scorecard says {row.cycles}")
    print()
    print(f"actions = ACTION_STARTED (all succeeded: "
          f"{all(r.actions == r.succeeded for r in rows)}); high and critical cases are denied by "
          f"policy and not counted as actions")  # fmt: skip
    one = next((r for r in rows if r.workers == 1), None)
    if one is not None:
        print(f"for comparison: {REFERENCE}; here one worker's month took {one.wall:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Every benchmark in bench/, one table: `python bench/all.py [--quick] [--markdown FILE]`.

Each benchmark script prints JSON with --json; this runs them one after another (never in
parallel: they measure the same two cores), flattens what they print into rows and prints one
table. --markdown also writes the table, the machine and the command to a file
(docs/performance.md keeps the latest).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# (name, script, arguments for a full run, arguments for --quick)
# fmt: off
BENCHES: list[tuple[str, str, list[str], list[str]]] = [
    ("store", "bench/store.py", [], ["--rows", "500"]),
    ("gate, SQLite", "bench/fleet.py", ["--seconds", "10"],
     ["--seconds", "3", "--raw-seconds", "2"]),
    ("gate, Postgres", "bench/fleet.py", ["--seconds", "10", "--backend", "postgres",
                                          "--sizes", "1,50"],
     ["--seconds", "3", "--raw-seconds", "2", "--backend", "postgres", "--sizes", "1,50"]),
    ("gate, SQLite, 1M events", "bench/fleet.py",
     ["--seconds", "10", "--sizes", "1,50", "--history-events", "1000000"],
     ["--seconds", "3", "--raw-seconds", "2", "--sizes", "50", "--history-events", "100000"]),
    ("kill switch", "bench/killswitch.py", [], []),
    ("month simulation", "bench/horizon.py", [], ["--quick"]),
    ("month simulation's SQL", "bench/sqlfloor.py", [], ["--horizon", "week"]),
    ("recovery scan", "bench/recovery.py", [], ["--events", "100000"]),
    ("fleet on Postgres", "bench/fleet_pg.py", ["--seconds", "10"], ["--seconds", "3"]),
    ("soak", "bench/soak.py", [], ["--horizon", "week", "--workers", "10", "--kills", "2"]),
    ("policy replay", "bench/replay.py", [], ["--events", "100000"]),
    ("loop lag, SQLite", "bench/loop_lag.py", [], ["--quick"]),
    ("loop lag, Postgres", "bench/loop_lag.py", ["--backend", "postgres"],
     ["--quick", "--backend", "postgres"]),
    ("shadow policy", "bench/shadow.py", [], ["--actions", "300", "--rounds", "3"]),
    ("console pages, SQLite", "bench/console.py", [], ["--events", "100000"]),
    ("console pages, Postgres", "bench/console.py", ["--backend", "postgres"],
     ["--backend", "postgres", "--events", "100000"]),
]
# fmt: on


# The headline figures of each benchmark (regular expressions over the flattened names); each
# script's own output has the rest.
KEEP: dict[str, str] = {
    "store": r"results\[\w+\]\.(exactly_once_per_s|raw_per_s|ratio)$",
    "gate": r"results\[\d+\]\.(workers|actions_per_s|x_first|raw_commits_per_s|ratio_to_raw|raw_connections|admit_p50_ms|admit_p99_ms|dispatch_p50_ms|dispatch_p99_ms|cpu_ms_per_action|rss_mib|history_events)$",
    "kill switch": r"^(started_after_engage_returned|effects_after_engage_returned|engage_call_ms\.median|idle_wake_after_return_ms\.(median|max)|actions_per_second_running)$",
    "month simulation's SQL": r"^(workers|run_wall_s|statements|sql_in_daemon_s|sql_back_to_back_s|interleaving_cost_s)$",
    "month simulation": r"rows\[\d+\]\.(wall_s|cycles|actions|cycles_per_s)$",
    "recovery scan": r"results\[\w+\]\.(events|empty_ms|full_ms|history_ratio|under_1s|all_indexed)$",
    "fleet on Postgres": r".",
    "loop lag": r"^(events|worst_lag_ms|worst_engage_to_wake_ms)$|phases\[[^\]]+\]\.(worst_lag_ms|engage_to_wake_ms|call_to_wake_ms)$|phases\[(?!baseline)[^\]]+\]\.pass_ms_median$",
    "soak": r"^(pass|horizon|workers|kills|seconds)$|checks\[[^\]]+\]\.(pass|checked|first_week_median_mb|last_week_median_mb)$",
}


AIMS = [
    "The aims the figures answer to: no action or effect started after a kill-switch engage",
    "returns, idle waiters noticing within 100 ms; the startup recovery scan under 1 s at",
    "1,000,000 events on each backend; fleet halt propagation under 100 ms; the soak's promise",
    "checks all passing; the event loop's worst lag at most 50 ms and an engage reaching idle",
    "workers within 100 ms while the scorecard, a replay and the recovery scan run on 1,000,000",
    "events. The write path (synchronous=full, no cadence): SQLite at least 1,000 actions/s at 1",
    "worker and at least 2,500/s at 50 (aim 5,000), at least half the raw single-row commit rate",
    "of the same run and three times one worker, admit p99 at most 25 ms, within 10% at",
    "1,000,000 events of an empty store; Postgres at least 1,500/s at 50 workers (aim 3,000) and",
    "three times one worker. A simulated month of 10 workers in at most 3 s, of 100 in at most",
    "20 s. The gate's actions/s stand beside the raw single-row commit rate of the same database",
    "in the same run (ratio), and beside the first fleet size's (x_first). Month simulations use",
    "their own SQLite file with synchronous=normal (as `run --simulate`); the gate and store",
    "figures use synchronous=full (as a real run).",
]


def keep(name: str, metric: str) -> bool:
    pattern = next((p for key, p in KEEP.items() if name.startswith(key)), ".")
    return re.search(pattern, metric) is not None


def flatten(prefix: str, value: Any, out: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for item in value:
            label = next((str(item[k]) for k in ("workers", "backend", "name", "case", "label")
                          if k in item), str(value.index(item)))  # fmt: skip
            flatten(f"{prefix}[{label}]", {k: v for k, v in item.items() if str(v) != label}, out)
    elif isinstance(value, float):
        out.append((prefix, fmt(value)))
    else:
        out.append((prefix, json.dumps(value) if isinstance(value, list | bool) else str(value)))


def fmt(value: float) -> str:
    """Three significant digits, or whole numbers for large values: figures, not noise."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def run(name: str, script: str, args: list[str]) -> tuple[list[tuple[str, str]], float, str | None]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, script, *args, "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=3600)  # fmt: skip
    took = time.monotonic() - started
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return [], took, f"exit {proc.returncode}: {tail[0]}"
    # The JSON document is the last thing printed; it may span lines (indented).
    lines = proc.stdout.splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.startswith(("{", "["))]
    for start in reversed(starts):
        try:
            document = json.loads("\n".join(lines[start:]))
        except json.JSONDecodeError:
            continue
        rows: list[tuple[str, str]] = []
        flatten("", document, rows)
        return rows, took, None
    return [], took, "printed no JSON"


def machine() -> str:
    mem = ""
    try:
        kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines()
                      if ln.startswith("MemTotal")).split()[1])  # fmt: skip
        mem = f", {kb / 1024 / 1024:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{platform.machine()}, {os.cpu_count()} cores{mem}, Python {platform.python_version()}, {platform.system()} {platform.release()}"


def main() -> int:
    parser = argparse.ArgumentParser(description="run every benchmark, print one table")
    parser.add_argument("--quick", action="store_true", help="smaller runs (minutes, not tens)")
    parser.add_argument("--only", action="append", help="run only benchmarks whose name has this")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    table: list[tuple[str, str, str]] = []
    failures = 0
    for name, script, full, quick in BENCHES:
        if args.only and not any(o in name for o in args.only):
            continue
        if not (ROOT / script).exists():
            table.append((name, "missing", script))
            failures += 1
            continue
        print(f"running {name} ({script}) ...", file=sys.stderr, flush=True)
        rows, took, error = run(name, script, quick if args.quick else full)
        if error:
            failures += 1
            table.append((name, "FAILED", error))
            continue
        table.extend((name, metric, value) for metric, value in rows if keep(name, metric))
        table.append((name, "wall seconds (whole benchmark)", f"{took:.1f}"))
    width = max((len(m) for _, m, _ in table), default=10)
    text = [f"{'benchmark':<18} {'figure':<{width}}  value", "-" * (width + 40)]
    text += [f"{b:<18} {m:<{width}}  {v}" for b, m, v in table]
    print("\n".join(text))
    if args.markdown:
        command = "python bench/all.py" + (" --quick" if args.quick else "")
        md = ["# Performance", "",
              f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}, with `{command}`",
              "(or `make bench`). Every figure comes from the benchmark named; none is a test.", "",
              *AIMS, "",
              "| benchmark | figure | value |", "|---|---|---|"]  # fmt: skip
        md += [f"| {b} | {m} | {v} |" for b, m, v in table]
        args.markdown.write_text("\n".join(md) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

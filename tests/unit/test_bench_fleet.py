"""bench/fleet.py's table: it must render, since nothing else runs it but a benchmark."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

FLEET = Path(__file__).resolve().parents[2] / "bench" / "fleet.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_fleet", FLEET)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(workers: int, actions: float, raw: float) -> dict[str, Any]:
    return {
        "workers": workers, "actions_per_s": actions, "raw_commits_per_s": raw,
        "ratio_to_raw": actions / raw, "raw_connections": 1, "admit_p50_ms": 0.9,
        "admit_p99_ms": 5.2, "dispatch_p50_ms": 1.8, "dispatch_p99_ms": 9.3, "cpu_pct": 57.0,
        "cpu_ms_per_action": 1.65, "rss_mib": 39.5, "startup_s": 0.04, "shutdown_s": 0.03,
        "refused": 0, "crashes": 0,
    }  # fmt: skip


def test_render_prints_the_gate_beside_the_raw_commit_rate() -> None:
    fleet = load()
    args = argparse.Namespace(seconds=3.0, cadence="0", synchronous="full", backend="sqlite")
    text = fleet.render([row(1, 346.3, 2922.0), row(50, 500.0, 3000.0)], args)
    lines = text.splitlines()
    assert "cadence none (back to back)" in lines[0]
    assert "SQLite synchronous=full" in lines[0]
    header = lines[2].split()
    assert header[:5] == ["workers", "actions/s", "raw", "commits/s", "ratio"]
    first = lines[3].split()
    assert first[:4] == ["1", "346.3", "2922.0", "0.119"]
    assert lines[5].startswith("50 workers vs 1: throughput x1.44")


def test_cadence_zero_means_back_to_back() -> None:
    fleet = load()
    assert all(fleet.no_cadence(v) for v in ("0", "0s", "0ms", "0.0"))
    assert not any(fleet.no_cadence(v) for v in ("10ms", "1s", "0.5s", ""))

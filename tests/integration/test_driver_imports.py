"""Only the chosen backend's driver is imported: a SQLite daemon never loads asyncpg."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys
from supervisor.cli.program import main
code = main(["--state-dir", sys.argv[1], "--log-level", "error", "run", "--horizon", "hour",
             "--simulate", "--start", "2026-11-02T09:00:00Z"])
assert code == 0, code
print("asyncpg" in sys.modules, "prometheus_client" in sys.modules)
"""


def test_a_sqlite_run_never_imports_asyncpg(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "state")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    loaded_asyncpg, loaded_prometheus = done.stdout.strip().splitlines()[-1].split()
    assert loaded_asyncpg == "False"
    assert loaded_prometheus == "False", (
        "metrics are off by default: prometheus-client stays unloaded"
    )

"""The package's public surface: what `import supervisor` costs, and which names it offers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter: this test process has long since imported everything.
LAZY_PROBE = """
import json, sys
from supervisor import Action, CycleContext, Worker
heavy = ["supervisor.runtime.daemon", "supervisor.store.sqlite", "supervisor.store.postgres",
         "supervisor.console", "asyncpg", "apscheduler"]
loaded_early = [m for m in heavy if m in sys.modules]
import supervisor
missing = [n for n in supervisor.__all__ if getattr(supervisor, n, None) is None]
print(json.dumps({"loaded_early": loaded_early, "missing": missing,
                  "daemon_after": "supervisor.runtime.daemon" in sys.modules,
                  "in_dir": sorted(set(supervisor.__all__) - set(dir(supervisor)))}))
"""


def test_importing_a_worker_does_not_import_the_daemon() -> None:
    done = subprocess.run(
        [sys.executable, "-c", LAZY_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["loaded_early"] == []
    assert found["missing"] == [], "every name in __all__ is reachable"
    assert found["daemon_after"], "reaching supervisor.Daemon imports the daemon on first access"
    assert found["in_dir"] == []


def test_loading_a_config_imports_no_store() -> None:
    """`config check` and every command parse the config first; the alerts' config part keeps
    the store (and its driver) out of that."""
    probe = (
        "import json, sys; import supervisor.config; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('supervisor.store'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_an_unknown_name_is_an_attribute_error() -> None:
    import supervisor

    with pytest.raises(AttributeError, match="NoSuchThing"):
        supervisor.NoSuchThing  # noqa: B018


# The public API, pinned: adding, removing or renaming a public name is a deliberate edit here.
PUBLIC_API = [
    "Action",
    "ActionAlreadyDone",
    "ActionDenied",
    "ActionExpired",
    "ApprovalError",
    "ApprovalPending",
    "Clock",
    "Config",
    "ConfigError",
    "CycleContext",
    "Daemon",
    "Event",
    "Gate",
    "GovernedRefusal",
    "IdempotencyConflict",
    "Mode",
    "NewEvent",
    "Outcome",
    "Permit",
    "SchemaTooNew",
    "Scorecard",
    "Session",
    "StateWriteError",
    "Store",
    "StoreError",
    "SupervisorError",
    "SystemClock",
    "UsageError",
    "VirtualClock",
    "Worker",
    "WorkerSpec",
    "load_config",
    "open_store",
]


def test_the_public_api_is_pinned() -> None:
    import supervisor

    assert sorted(supervisor.__all__) == PUBLIC_API
    assert len(set(supervisor.__all__)) == len(supervisor.__all__), "no name listed twice"
    assert sorted(supervisor._HOMES) == PUBLIC_API, "every public name, and only those, is lazy"

"""The `postgres` marker splits the suite: `-m postgres` selects exactly the tests that need the
server, `-m "not postgres"` exactly the others, without any test file naming the marker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# One test of each kind: parametrized over both backends by a fixture (`store`), asking for
# `pg_url` itself, reaching `pg_url` through another fixture, and using no database server.
CONTRACT = (
    "tests/integration/test_store_contract.py::test_replay_order_after_and_independent_sequences"
)
MULTIHOST_DIRECT = "tests/acceptance/test_multihost.py::test_bad_multihost_input"
MULTIHOST_VIA_FIXTURE = "tests/acceptance/test_multihost.py::test_three_hosts_share_one_fleet"
NO_SERVER = "tests/unit/test_public_api.py::test_the_public_api_is_pinned"
SELECTION = [CONTRACT, MULTIHOST_DIRECT, MULTIHOST_VIA_FIXTURE, NO_SERVER]


def collect(marker: str) -> set[str]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            marker,
            *SELECTION,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return {line for line in done.stdout.splitlines() if "::" in line}


def test_postgres_selects_exactly_the_postgres_tests() -> None:
    assert collect("postgres") == {
        f"{CONTRACT}[postgres]",
        MULTIHOST_DIRECT,
        MULTIHOST_VIA_FIXTURE,
    }


def test_not_postgres_selects_exactly_the_rest() -> None:
    assert collect("not postgres") == {f"{CONTRACT}[sqlite]", NO_SERVER}

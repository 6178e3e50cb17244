"""The host kill switch against the real daemon: the CLI engages it while three support agents
run every 100 ms, and nothing starts after the command returned; a file that does not verify
(tampered, unsigned, an old one copied back) halts too; the CLI refuses bad input cleanly."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest

if TYPE_CHECKING:
    from tests.acceptance.conftest import Daemon

pytestmark = [pytest.mark.acceptance, pytest.mark.anyio]

DaemonFactory = Callable[..., "Daemon"]
HALTED_FOR = 0.6  # seconds the fleet keeps cycling (about 6 cycles per worker) while halted


def engage_args(mode: str = "halt_all", *extra: str) -> list[str]:
    return ["killswitch", "engage", "--mode", mode, "--scope", "host", "--reason", "drill",
            "--by", "test", *extra]  # fmt: skip


async def disengage(d: Daemon) -> datetime:
    await d.cli_ok("killswitch", "disengage", "--reason", "drill over", "--by", "test")
    return datetime.now(UTC)


async def assert_halted_since(d: Daemon, since: datetime) -> None:
    """All workers are refused for the kill switch after `since`, for a while; nothing starts."""
    await d.wait_until(d.refused_after(since, "killswitch", workers=3),
                       what="kill-switch refusals from all three workers")  # fmt: skip
    await anyio.sleep(HALTED_FOR)
    await d.nothing_started_after(since)


async def assert_resumes(d: Daemon, since: datetime) -> None:
    await d.wait_until(d.started_after(since, 3), what="actions to resume")
    await d.wait_until(lambda: d.effects(after=since), what="effects to resume")


async def test_halt_all_stops_every_action_until_disengaged(daemon: DaemonFactory) -> None:
    d = daemon()
    await d.running()

    result = await d.cli_ok(*engage_args())
    engaged_at = datetime.now(UTC)
    assert b"halt_all" in result.stdout

    await assert_halted_since(d, engaged_at)
    denied = await d.events("ACTION_DENIED", reason="killswitch", after=engaged_at)
    assert all("halt_all" in e.payload["detail"] for e in denied)
    [engaged] = await d.events("KILLSWITCH_ENGAGED")
    assert engaged.payload["by"] == "test" and engaged.payload["reason"] == "drill"
    assert engaged.payload["mode"] == "halt_all" and engaged.payload["scope"] == "host"
    status = json.loads((await d.cli_ok("killswitch", "status", "--json")).stdout)
    assert status[0] | {"mode": "halt_all", "valid": True, "by": "test"} == status[0]

    disengaged_at = await disengage(d)
    await assert_resumes(d, disengaged_at)
    [resumed] = await d.events("KILLSWITCH_DISENGAGED")
    assert resumed.payload["by"] == "test" and resumed.payload["reason"] == "drill over"

    assert await d.stop() == 0


ALLOW_CRITICAL = '[[policy.rules]]\nname = "critical-ok"\nrisk = "critical"\noutcome = "allow"\n'


async def test_halt_noncritical_lets_critical_actions_through(daemon: DaemonFactory) -> None:
    d = daemon(extra=ALLOW_CRITICAL)
    await d.running()
    await d.cli_ok(*engage_args("halt_noncritical"))
    engaged_at = datetime.now(UTC)
    await d.wait_until(d.refused_after(engaged_at, "killswitch", workers=3), what="refusals")
    # The support mix has 5% critical cases: those still run under halt_noncritical.
    critical = await d.wait_until(d.started_after(engaged_at), what="a critical action", within=12)
    rows = {r["command_id"]: r for r in await d.actions()}
    assert all(rows[e.command_id]["critical"] for e in critical)
    assert all(e["action"] == "support.resolve_case" for e in d.effects(after=engaged_at))
    assert await d.stop() == 0


# --- files that do not verify -----------------------------------------------------------------


def _install(path: Path, data: bytes) -> None:
    """Put bytes in place the way `mv` (or an attacker's script) would: a rename."""
    tmp = path.with_name("incoming.json")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def _tampered(d: Daemon) -> str:
    doc = json.loads(d.switch_path.read_bytes())
    doc["by"] = "someone else"
    _install(d.switch_path, json.dumps(doc).encode())
    return "bad signature"


async def _unsigned(d: Daemon) -> str:
    doc = json.loads(d.switch_path.read_bytes())
    del doc["sig"]
    _install(d.switch_path, json.dumps(doc).encode())
    return "unsigned"


async def _replayed(d: Daemon) -> str:
    """The valid seq-1 *disengaged* file, saved, then copied back after seq 2 and 3."""
    saved = d.root / "seq1.json"
    shutil.copyfile(d.switch_path, saved)
    await d.cli_ok(*engage_args())
    resumed_at = await disengage(d)  # seq 3
    await assert_resumes(d, resumed_at)
    _install(d.switch_path, saved.read_bytes())
    return "replayed"


@pytest.mark.parametrize(
    "spoil", [_tampered, _unsigned, _replayed], ids=["tampered", "unsigned", "replayed"]
)
async def test_a_switch_file_that_does_not_verify_halts(daemon: DaemonFactory, spoil: Any) -> None:
    d = daemon()
    await d.running()
    await disengage(d)  # seq 1: a valid, disengaged file; the fleet keeps running
    await assert_resumes(d, datetime.now(UTC))

    before = datetime.now(UTC)
    problem = await spoil(d)
    spoiled_at = datetime.now(UTC)
    await assert_halted_since(d, spoiled_at)
    # `before`: on a loaded machine the daemon may record it before this test reads the clock.
    invalid = await d.wait_until(lambda: d.events("KILLSWITCH_INVALID", after=before),
                                 what="a KILLSWITCH_INVALID event")  # fmt: skip
    assert problem in invalid[0].payload["problem"], invalid[0].payload
    denied = await d.events("ACTION_DENIED", reason="killswitch", after=spoiled_at)
    assert all(problem in e.payload["detail"] for e in denied)

    # The operator's way out: a fresh signed change with a higher seq.
    await assert_resumes(d, await disengage(d))
    assert await d.stop() == 0


# --- the CLI refuses bad input, writing nothing ------------------------------------------------


async def test_engage_without_secret_is_a_usage_error(daemon: DaemonFactory) -> None:
    d = daemon(start=False)
    result = await d.cli(*engage_args(), secret=False)
    assert result.returncode == 2
    line = d.one_line(result.stderr)
    assert "ACP_KILLSWITCH_SECRET" in line and line.startswith("acp-supervisor: error:")
    assert not d.switch_path.exists() and not d.switch_path.with_suffix(".seq").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (engage_args("pause"), "--mode"),
        (
            [
                "killswitch",
                "engage",
                "--mode",
                "halt_all",
                "--scope",
                "planet",
                "--reason",
                "r",
                "--by",
                "b",
            ],
            "unknown scope",
        ),
        (
            [
                "killswitch",
                "engage",
                "--mode",
                "halt_all",
                "--scope",
                "worker",
                "--reason",
                "r",
                "--by",
                "b",
            ],
            "unknown scope",
        ),
        (["killswitch", "engage", "--mode", "halt_all", "--by", "b"], "--reason"),
        (["killswitch", "engage", "--mode", "halt_all", "--reason", "r", "--by", " "], "--by"),
        (["killswitch", "disengage", "--by", "b"], "--reason"),
    ],
    # (no --by is not an error: it defaults to the invoking user, tests/integration/test_cli_tables)
    ids=["mode", "scope", "worker-without-name", "no-reason", "blank-by", "disengage-no-reason"],
)
async def test_bad_killswitch_arguments_exit_2(
    daemon: DaemonFactory, args: list[str], fragment: str
) -> None:
    d = daemon(start=False)
    result = await d.cli(*args)
    assert result.returncode == 2, result
    assert fragment in d.one_line(result.stderr)
    assert not d.switch_path.exists()


async def test_engage_works_while_the_store_is_unusable(daemon: DaemonFactory) -> None:
    """The host switch is a file so that it works without the database: here there is none."""
    d = daemon(start=False)
    result = await d.cli(*engage_args(), "--db", f"sqlite:///{d.root / 'missing' / 'x.db'}")
    assert result.returncode != 0
    assert "event was not recorded" in d.one_line(result.stderr)
    assert json.loads(d.switch_path.read_bytes())["mode"] == "halt_all"

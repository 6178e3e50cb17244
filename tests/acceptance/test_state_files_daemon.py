"""The file system under the real daemon: its SQLite database deleted while it runs, a named pipe
or a malformed file in place of the kill-switch file, the switch file (and its mark) deleted
during a halt. Each time the daemon halts every action, says why, and never hangs or crash-loops.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from supervisor.killswitch import Mode, signed_document

SECRET = "acceptance-kill-switch-secret"  # the daemon fixture's ACP_KILLSWITCH_SECRET

if TYPE_CHECKING:
    from tests.acceptance.conftest import Daemon, DaemonFactory

pytestmark = [pytest.mark.acceptance, pytest.mark.anyio]

HALTED_FOR = 0.6  # seconds the fleet keeps cycling (about 6 cycles per worker) while halted
ENGAGE = ["killswitch", "engage", "--mode", "halt_all", "--scope", "host", "--reason", "drill",
          "--by", "test"]  # fmt: skip
DISENGAGE = ["killswitch", "disengage", "--reason", "drill over", "--by", "test"]


def restart(d: Daemon) -> None:
    d.kill()
    d.proc, d._ready = None, False
    d.start()


async def exit_code(d: Daemon, within: float = 20.0) -> int:
    proc = d.proc
    assert proc is not None
    try:
        return await anyio.to_thread.run_sync(lambda: proc.wait(within))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"daemon still running after {within}s\n{d.log()[-3000:]}") from None


def logged(d: Daemon, event: str) -> list[dict[str, object]]:
    return [e for e in d.log_events() if e.get("event") == event]


async def assert_halted_since(d: Daemon, since: datetime, fragment: str) -> None:
    """All three workers refused for the kill switch after `since`, naming `fragment`; nothing
    starts for a while."""
    await d.wait_until(d.refused_after(since, "killswitch", workers=3),
                       what="kill-switch refusals from all three workers")  # fmt: skip
    await anyio.sleep(HALTED_FOR)
    await d.nothing_started_after(since)
    denied = await d.events("ACTION_DENIED", reason="killswitch", after=since)
    assert denied and all(fragment in e.payload["detail"] for e in denied), denied[:2]


async def assert_invalid_recorded(d: Daemon, since: datetime, fragment: str) -> None:
    """`since` is taken before the file is spoiled: the daemon may record it at once."""
    invalid = await d.wait_until(lambda: d.events("KILLSWITCH_INVALID", after=since),
                                 what="a KILLSWITCH_INVALID event")  # fmt: skip
    assert fragment in invalid[0].payload["problem"], invalid[0].payload


async def assert_resumes(d: Daemon) -> None:
    since = datetime.now(UTC)
    await d.cli_ok(*DISENGAGE)
    await d.wait_until(d.started_after(since, 3), what="actions to resume")


def install(path: Path, data: bytes) -> None:
    tmp = path.with_name(".spoil.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- the database deleted under the daemon ------------------------------------------------------


async def test_deleted_database_halts_alerts_exits_nonzero_and_is_not_recreated(
    daemon: DaemonFactory,
) -> None:
    d = daemon()
    await d.running()
    db = d.state_dir / "supervisor.db"
    # A second link keeps the inode the daemon writes into readable afterwards, as evidence.
    kept = d.root / "kept"
    kept.mkdir()
    for suffix in ("", "-wal"):
        os.link(db.with_name(db.name + suffix), kept / (db.name + suffix))
    for suffix in ("", "-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    deleted_at = datetime.now(UTC)

    code = await exit_code(d)
    assert code != 0, d.log()[-2000:]
    [lost] = logged(d, "store.lost")
    assert "deleted" in str(lost["problem"])
    alerts = [e for e in logged(d, "alert.raised") if e.get("condition") == "state_write_failed"]
    assert alerts, "no state_write_failed alert"
    # Nothing was started once the file was gone (every commit checks it first), and every
    # effect since belongs to an action started before.
    with sqlite3.connect(kept / db.name) as conn:
        started = dict(conn.execute("SELECT command_id, started_at FROM actions").fetchall())
    late = [cid for cid, at in started.items() if datetime.fromisoformat(at) > deleted_at]
    assert late == [], f"{len(late)} actions started after the database was deleted"
    assert all(e["command_id"] in started for e in d.effects(after=deleted_at))
    [error] = [ln for ln in d.log().splitlines() if ln.startswith("acp-supervisor: error:")]
    assert "deleted while in use" in error and "every action halted" in error
    assert "Traceback" not in d.log()

    # A restart refuses to begin an empty ledger where the old one was: exit 2, no new file.
    restart(d)
    assert await exit_code(d) == 2
    refusal = d.log().splitlines()[-1]
    assert refusal.startswith("acp-supervisor: error:") and "db migrate --new" in refusal
    assert not db.exists()

    # The operator's deliberate way out.
    await d.cli_ok("db", "migrate", "--new")
    restart(d)
    await d.running()
    assert await d.stop() == 0


# -- a named pipe in place of the switch file ---------------------------------------------------


async def test_fifo_switch_file_halts_and_never_hangs_daemon_or_cli(daemon: DaemonFactory) -> None:
    d = daemon()
    await d.running()
    fifo = d.state_dir / ".fifo"
    os.mkfifo(fifo)
    before = datetime.now(UTC)
    os.replace(fifo, d.switch_path)
    since = datetime.now(UTC)

    await assert_halted_since(d, since, "named pipe")
    await assert_invalid_recorded(d, before, "named pipe")
    with anyio.fail_after(20):  # the CLI answers, it does not block in open()
        status = await d.cli("killswitch", "status", "--json")
    assert status.returncode == 0, status.stderr
    host = json.loads(status.stdout)[0]
    assert host["mode"] == "halt_all" and host["valid"] is False
    assert "named pipe" in host["problem"]

    # A restart with the pipe still there: ready, halted, stops on SIGTERM.
    restart(d)
    await d.wait_until(d.ready, what="daemon.ready with a FIFO switch file")
    again = datetime.now(UTC)
    await assert_halted_since(d, again, "named pipe")
    assert await d.stop() == 0


# -- malformed switch files ---------------------------------------------------------------------


def _lone_surrogate_sig() -> bytes:
    doc = signed_document(Mode.DISENGAGED, seq=1, reason="r", by="b",
                          at="2026-03-01T12:00:00+00:00", secret=SECRET.encode())  # fmt: skip
    doc["sig"] = "\ud800"
    return json.dumps(doc).encode()


MALFORMED = {
    "deep-nesting": (b"[" * 60_000, "nested too deeply"),
    "lone-surrogate-sig": (_lone_surrogate_sig(), "bad signature"),
    "1e400": (b'{"mode": "disengaged", "seq": 1e400, "sig": "00"}', "canonical"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_malformed_switch_file_halts_without_crashing_or_crash_looping(
    daemon: DaemonFactory, case: str
) -> None:
    data, fragment = MALFORMED[case]
    d = daemon()
    await d.running()
    before = datetime.now(UTC)
    install(d.switch_path, data)
    since = datetime.now(UTC)

    await assert_halted_since(d, since, fragment)
    await assert_invalid_recorded(d, before, fragment)
    assert d.alive()
    status = await d.cli("killswitch", "status")
    assert status.returncode == 0 and b"Traceback" not in status.stderr, status.stderr
    [host] = [line for line in status.stdout.splitlines() if line.startswith(b"host ")]
    assert b"halt_all" in host and b"unverifiable: " in host, status.stdout
    recovered = await d.cli("recover")
    assert recovered.returncode == 0 and b"Traceback" not in recovered.stderr, recovered.stderr

    # Restarted with the file in place: the startup scan does not crash on it.
    restart(d)
    await d.wait_until(d.ready, what="daemon.ready with a malformed switch file")
    await assert_halted_since(d, datetime.now(UTC), fragment)
    await assert_resumes(d)  # a new signed change replaces it
    assert await d.stop() == 0


# -- a switch that was engaged stays engaged until disengaged -----------------------------------


async def test_switch_file_deleted_during_halt_all_keeps_the_host_halted(
    daemon: DaemonFactory,
) -> None:
    d = daemon()
    await d.running()
    await d.cli_ok(*ENGAGE)
    await d.wait_until(d.refused_after(datetime.now(UTC), "killswitch", workers=3),
                       what="the halt")  # fmt: skip

    before = datetime.now(UTC)
    d.switch_path.unlink()  # what a hostile child would do to resume itself
    deleted_at = datetime.now(UTC)
    await assert_halted_since(d, deleted_at, "unverifiable")
    await assert_invalid_recorded(d, before, "unverifiable")
    assert await d.events("KILLSWITCH_DISENGAGED") == []

    # The mark file gone too, and a restart: the store still remembers a file was accepted.
    d.switch_path.with_suffix(".seq").unlink()
    restart(d)
    await d.wait_until(d.ready, what="daemon.ready")
    await assert_halted_since(d, datetime.now(UTC), "unverifiable")

    await assert_resumes(d)
    assert await d.stop() == 0


async def test_old_disengage_copied_back_after_the_mark_file_is_deleted_is_a_replay(
    daemon: DaemonFactory,
) -> None:
    d = daemon()
    await d.running()
    await d.cli_ok(*DISENGAGE)  # seq 1: a valid disengaged file
    saved = d.root / "seq1.json"
    shutil.copyfile(d.switch_path, saved)
    await d.cli_ok(*ENGAGE)  # seq 2
    await d.wait_until(d.refused_after(datetime.now(UTC), "killswitch", workers=3),
                       what="the halt")  # fmt: skip
    assert await d.stop() == 0

    d.switch_path.with_suffix(".seq").unlink()
    install(d.switch_path, saved.read_bytes())
    restart(d)
    await d.wait_until(d.ready, what="daemon.ready")
    await assert_halted_since(d, datetime.now(UTC), "replayed")

    await assert_resumes(d)  # the CLI signs seq 3, above the store's mark
    assert json.loads(d.switch_path.read_bytes())["seq"] == 3
    assert await d.stop() == 0


async def test_cli_status_reports_a_missing_file_after_history_as_invalid(
    daemon: DaemonFactory,
) -> None:
    d = daemon(start=False)
    await d.cli_ok("db", "migrate")
    await d.cli_ok(*ENGAGE)
    d.switch_path.unlink()
    d.switch_path.with_suffix(".seq").unlink()
    result = await d.cli("killswitch", "status", "--json")
    assert result.returncode == 0, result.stderr
    host = json.loads(result.stdout)[0]
    assert host["mode"] == "halt_all" and not host["valid"] and "unverifiable" in host["problem"]

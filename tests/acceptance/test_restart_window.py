"""A restart in a later window, on the real clock: the workers go on at once.

A window boundary seconds away needs a zone whose hourly boundary falls there; the test writes
one (a TZif file with an offset of whole seconds, on PYTHONTZPATH for the daemon and the CLI).
The daemon runs 1 s cycles, stops before the boundary and starts again after it. Cycles must
resume within one cadence of the restart, with cycle numbers going on from the checkpoint, and
the slots missed while it was down counted in one CYCLES_SKIPPED event per worker.
"""

from __future__ import annotations

import json
import struct
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.acceptance.conftest import Daemon

    DaemonFactory = Callable[..., Daemon]


pytestmark = [pytest.mark.acceptance, pytest.mark.anyio]

CADENCE = 1.0
FLEET = "acceptance"  # the fleet the acceptance helpers read


def tzif(offset: int, abbr: str = "TST") -> bytes:
    """A TZif version 2 file with one fixed offset (seconds east of UTC) and no transitions."""
    chars = abbr.encode() + b"\0"
    header = b"TZif2" + b"\0" * 15 + struct.pack(">6l", 0, 0, 0, 0, 1, len(chars))
    block = header + struct.pack(">lBB", offset, 0, 0) + chars
    sign = "-" if offset > 0 else "+"  # POSIX TZ strings count west as positive
    a = abs(offset)
    footer = f"<{abbr}>{sign}{a // 3600}:{a % 3600 // 60:02d}:{a % 60:02d}"
    return block + block + b"\n" + footer.encode() + b"\n"


def boundary_zone(root: Path, seconds_ahead: int) -> tuple[str, datetime]:
    """A zone whose next hourly window boundary is `seconds_ahead` from now; (name, boundary)."""
    boundary = int(time.time()) + seconds_ahead
    offset = -boundary % 3600
    folder = root / "zones" / "Test"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Boundary").write_bytes(tzif(offset))
    return "Test/Boundary", datetime.fromtimestamp(boundary, UTC)


CONFIG = """
[daemon]
fleet = "{fleet}"
profile = "hour"
timezone = "{zone}"
shutdown_timeout = "5s"

[horizons.hour]
cycle_every = "{cadence}s"
checkpoint_every = 2
max_actions = 1000000
max_cost = 1000000.0

[[workers]]
name = "ticker"
class = "tests.fleet_workers:Ticker"
cycle_deadline = "5s"
"""


async def test_restart_across_a_window_boundary_resumes_within_one_cadence(
    daemon: DaemonFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    zone, boundary = boundary_zone(tmp_path, seconds_ahead=10)
    monkeypatch.setenv("PYTHONTZPATH", str(tmp_path / "zones"))
    d = daemon(start=False)
    d.config_path.write_text(CONFIG.format(fleet=FLEET, zone=zone, cadence=CADENCE))
    try:
        d.start()
        await d.wait_until(lambda: len(d.effects()) >= 2, what="two cycles before the boundary")
        assert datetime.now(UTC) < boundary, "the daemon started too slowly for this test"
        assert await d.stop() == 0
        before = d.effects()
        last_cycle = max(e["cycle"] for e in before)
        # Start again once the boundary is 1.5 s past: a later window, slots missed meanwhile.
        await anyio.sleep(max(0.0, (boundary - datetime.now(UTC)).total_seconds() + 1.5))

        d.kill()  # closes the first run's log handle
        d.proc = None
        started = readies(d)
        d.start()
        await d.wait_until(lambda: readies(d) > started, what="daemon.ready after the restart")
        ready_at = datetime.now(UTC)
        after = await d.wait_until(
            lambda: [e for e in d.effects() if e["cycle"] > last_cycle],
            what="a cycle after the restart", within=CADENCE + 4,
        )  # fmt: skip
        first = min(datetime.fromisoformat(e["at"]) for e in after)
        # The first cycle runs at the next slot of the real clock: within one cadence of ready.
        assert first - ready_at <= timedelta(seconds=CADENCE + 0.5), (first, ready_at)
        assert {e["session"] for e in after}.isdisjoint({e["session"] for e in before})
        cycles = [e["cycle"] for e in d.effects()]
        assert cycles == sorted(cycles) and len(set(cycles)) == len(cycles), cycles

        skipped = await d.wait_until(lambda: d.events("CYCLES_SKIPPED"), what="CYCLES_SKIPPED")
        assert [e.worker for e in skipped] == ["ticker"]
        # Down for at least the 1.5 s past the boundary: at least one 1 s slot went by.
        assert skipped[0].payload["skipped"] >= 1
        status = await d.cli_ok("status", "--json")
        worker = next(w for w in json.loads(status.stdout)["workers"] if w["name"] == "ticker")
        assert worker["state"] == "running"
        assert await d.stop() == 0
    finally:
        d.kill()


STALL_CONFIG = """
[daemon]
fleet = "{fleet}"
profile = "hour"
shutdown_timeout = "5s"

[horizons.hour]
cycle_every = "200ms"

[metrics]
enabled = true
port = 0

[[workers]]
name = "stuck"
class = "tests.acceptance.stall_worker:StuckInThread"
cycle_deadline = "1s"
params = {{ stall_file = "{marker}" }}
"""


def _healthz(port: int) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_a_worker_that_completes_no_cycle_is_reported_stalled(
    daemon: DaemonFactory, tmp_path: Path
) -> None:
    marker = tmp_path / "stall"
    marker.touch()
    d = daemon(start=False)
    d.config_path.write_text(STALL_CONFIG.format(fleet=FLEET, marker=marker))
    d.start()
    port = await d.wait_until(
        lambda: next((e["port"] for e in d.log_events() if e.get("event") == "metrics.serving"), None),
        what="the metrics port",
    )  # fmt: skip

    async def worker_state() -> str | None:
        result = await d.cli_ok("status", "--json")
        rows = json.loads(result.stdout)["workers"]
        return next((w["state"] for w in rows if w["name"] == "stuck"), None)

    # 2 x 200 ms + 1 s deadline: stalled after 1.4 s without a completed cycle.
    await d.wait_until(lambda: _healthz(port)[0] == 503, what="/healthz failing", within=10)
    _code, body = _healthz(port)
    assert body["stalled_workers"] == ["stuck"], body
    assert any("stuck" in r for r in body["reasons"]), body
    assert await worker_state() == "stalled"
    alerts = await d.wait_until(
        lambda: d.events("ALERT", reason="worker_stalled"), what="the alert"
    )
    assert alerts[0].payload["workers"] == ["stuck"]

    marker.unlink()  # the blocking call returns: cycles complete again and the stall clears
    await d.wait_until(lambda: _healthz(port)[0] == 200, what="/healthz healthy again", within=10)
    await d.wait_until(lambda: d.events("ALERT_RESOLVED", reason="worker_stalled"), what="resolved")
    assert await worker_state() in ("running", "backoff")
    assert await d.stop() == 0


def readies(d: Daemon) -> int:
    return len([e for e in d.log_events() if e.get("event") == "daemon.ready"])


def start_with(d: Daemon, *args: str) -> None:
    """`Daemon.start`, with other arguments than plain `run`."""
    import subprocess

    from tests.acceptance.conftest import REPO, _clean_env

    d._log = d.log_path.open("ab")
    d.proc = subprocess.Popen(d.argv(*args), cwd=REPO, env=_clean_env(secret=True),
                              stdout=d._log, stderr=subprocess.STDOUT)  # fmt: skip


async def test_cycle_numbers_go_on_across_continuous_and_horizon_runs(
    daemon: DaemonFactory,
) -> None:
    """Continuous, then an `hour` horizon run on the real clock, then continuous again: each
    start resumes within one cadence and every cycle number is new and larger."""
    d = daemon(start=False)
    d.config_path.write_text(CONFIG.format(fleet=FLEET, zone="UTC", cadence=0.5))
    for args in (("run",), ("run", "--horizon", "hour"), ("run",)):
        before, seen = readies(d), len(d.effects())
        start_with(d, *args)
        await d.wait_until(lambda b=before: readies(d) > b, what=f"daemon.ready of {args}")  # type: ignore[misc]
        ready_at = datetime.now(UTC)
        await d.wait_until(lambda n=seen: len(d.effects()) >= n + 3, what=f"cycles of {args}",  # type: ignore[misc]
                           within=5)  # fmt: skip
        first_new = datetime.fromisoformat(d.effects()[seen]["at"])
        assert first_new - ready_at <= timedelta(seconds=0.5 + 0.5), (args, first_new, ready_at)
        assert await d.stop() == 0
        d.kill()
        d.proc = None
    cycles = [e["cycle"] for e in d.effects()]
    assert cycles == sorted(cycles) and len(set(cycles)) == len(cycles), cycles

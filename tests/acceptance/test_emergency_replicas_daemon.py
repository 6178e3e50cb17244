"""An emergency engaged on a replicated command worker's configured name, against the real
daemon: the effects in flight of every replica are stopped (their children terminated, the
actions in-doubt), and no success is recorded after the engage returned."""

from __future__ import annotations

import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.acceptance.conftest import DaemonFactory

pytestmark = [pytest.mark.acceptance, pytest.mark.anyio]

# Each cycle: one approved effect that takes 30 s, deaf to SIGTERM, then reports success.
SLOW_CHILD = textwrap.dedent("""
    import json, signal, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    def send(m):
        sys.stdout.write(json.dumps(m) + "\\n"); sys.stdout.flush()
    def recv():
        line = sys.stdin.readline()
        if not line:
            sys.exit(0)
        return json.loads(line)
    recv()  # hello
    while True:
        c = recv()
        send({"type": "propose", "id": "s%d" % c["cycle"],
              "action": {"name": "slow.effect", "params": {"n": c["cycle"]}, "risk": "low"}})
        d = recv()
        if d["decision"] == "approved":
            for _ in range(300):
                time.sleep(0.1)
                send({"type": "heartbeat"})
            send({"type": "result", "id": d["id"], "ok": True, "result": {}})
        send({"type": "cycle_done", "state": {}})
""")


async def test_an_emergency_on_the_configured_name_stops_every_replicas_effect(
    daemon: DaemonFactory, tmp_path: Path
) -> None:
    script = tmp_path / "slow_child.py"
    script.write_text(SLOW_CHILD)
    workers = f"""
[[workers]]
name = "slow"
command = ["{sys.executable}", "{script}"]
replicas = 2
heartbeat_timeout = "10s"
cycle_deadline = "2m"
"""
    d = daemon(workers=workers)
    await d.running(n=2)  # both replicas have an effect in flight
    await d.cli_ok("killswitch", "engage", "--mode", "emergency", "--scope", "worker", "slow",
                   "--reason", "drill", "--by", "test")  # fmt: skip
    engaged = datetime.now(UTC)

    async def both_in_doubt() -> bool:
        rows = [r for r in await d.actions() if r["status"] == "in_doubt"]
        return {r["worker"] for r in rows} == {"slow-1", "slow-2"}

    await d.wait_until(both_in_doubt, what="both replicas' effects in-doubt", within=15)
    assert await d.events("ACTION_SUCCEEDED", after=engaged) == []
    assert d.alive()

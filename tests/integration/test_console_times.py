"""The console's pages show instants as the CLI's tables do (the configured zone, to the
second), not as raw ISO strings with microseconds that crowd a phone's width. The real
`acp-supervisor console` runs as a subprocess over a store the real CLI wrote."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from tests.waiting import eventually_sync

ROOT = Path(__file__).resolve().parents[2]


def test_pages_show_times_in_the_configured_zone_to_the_second(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_") and k != "NOTIFY_SOCKET"}
    env.update(PYTHONPATH=str(ROOT), ACP_KILLSWITCH_SECRET="s3cret")
    (tmp_path / "c.toml").write_text('[daemon]\ntimezone = "Asia/Kolkata"\n')
    base = [sys.executable, "-m", "supervisor", "--config", "c.toml", "--state-dir", "state"]

    def cli(*args: str) -> str:
        done = subprocess.run([*base, *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    cli("db", "migrate")
    secret = re.search(r"^secret: (\S+)$", cli("console", "add-operator", "v", "--role", "viewer"),
                       re.MULTILINE)  # fmt: skip
    assert secret
    cli("killswitch", "engage", "--mode", "halt_all", "--scope", "fleet", "--reason", "drill",
        "--by", "ops")  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    console = subprocess.Popen([*base, "console", "--listen", f"127.0.0.1:{port}"], cwd=tmp_path,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:

            def listening() -> bool:
                try:
                    client.get("/login")
                except httpx.TransportError:
                    return False
                return True

            def exited() -> str | None:
                if console.poll() is None:
                    return None
                return f"the console exited ({console.returncode}): {console.communicate()}"

            eventually_sync(listening, "the console listening", within=30, every=0.1,
                            abort=exited)  # fmt: skip
            login = client.post("/api/v1/login", json={"name": "v", "secret": secret.group(1)})
            assert login.status_code == 200, login.text
            page = client.get("/killswitch")
    finally:
        console.terminate()
        console.communicate(timeout=30)
    assert page.status_code == 200
    assert "drill" in page.text
    # the switch's since and the history's when, as `killswitch status` shows them
    assert len(re.findall(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d IST", page.text)) >= 2, page.text
    assert not re.search(r"\d\d:\d\d:\d\d\.\d+\+00:00", page.text), page.text

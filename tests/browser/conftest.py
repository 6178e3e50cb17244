"""Browser tests: the real daemon and the real console as subprocesses, driven through the
distribution's Chromium by Playwright (its own browser downloads are never used).

Under CI=true a missing Chromium fails these tests; elsewhere they skip with the reason.
Screenshots go to $ACP_TEST_OUTPUT or tests/browser/.output/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    # The acceptance helpers (the daemon as a subprocess) are shared; the daemon itself finds
    # `tests.*` workers the same way, through the repo root on its PYTHONPATH.
    sys.path.insert(0, str(REPO))

from tests.acceptance.conftest import Daemon, _clean_env, daemon  # noqa: E402
from tests.waiting import eventually  # noqa: E402

__all__ = ["Daemon", "daemon"]

IN_CI = os.environ.get("CI", "").lower() == "true"
CHROMIUM = os.environ.get("ACP_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}


def output_dir() -> Path:
    path = Path(os.environ.get("ACP_TEST_OUTPUT") or REPO / "tests" / "browser" / ".output")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def chromium_path() -> str:
    found = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if not found:
        message = f"Chromium not found at {CHROMIUM} (apt-get install chromium)"
        if IN_CI:
            pytest.fail(message + " (CI=true: browser tests must run)", pytrace=False)
        pytest.skip(message)
    try:
        import playwright  # noqa: F401
    except ImportError:
        message = "playwright is not installed (pip install -e '.[test]')"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


@pytest.fixture
async def browser(chromium_path: str) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=chromium_path, args=LAUNCH_ARGS,
                                     headless=True)  # fmt: skip
        try:
            yield b
        finally:
            await b.close()


@dataclass
class Console:
    """`acp-supervisor console` over a daemon's config, state directory and store."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


async def add_operator(d: Daemon, name: str, role: str) -> str:
    """`console add-operator` through the real CLI; returns the secret it prints once."""
    out = (await d.cli_ok("console", "add-operator", name, "--role", role)).stdout.decode()
    match = re.search(r"^secret: (\S+)$", out, re.MULTILINE)
    assert match, out
    return match.group(1)


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(argv, cwd=REPO, env=_clean_env(secret=True), stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip


async def start_console(d: Daemon, *extra: str) -> Console:
    """The console process on a free port of the loopback; returns once it serves."""
    log_path = d.root / "console.log"
    proc = _spawn(d.argv(*extra, "console", "--listen", "127.0.0.1:0"), log_path)

    def serving() -> Console | None:
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"console.serving"' in line:
                return Console(proc, json.loads(line)["url"], log_path)
        return None

    def exited() -> str | None:
        return None if proc.poll() is None else f"the console exited ({proc.returncode})"

    try:
        return await eventually(serving, "the console serving", abort=exited,
                                context=lambda: log_path.read_text()[-3000:])  # fmt: skip
    except AssertionError:
        proc.kill()
        raise


@pytest.fixture
def consoles() -> Iterator[list[Console]]:
    started: list[Console] = []
    yield started
    for c in started:
        if c.proc.poll() is None:
            c.proc.terminate()
            try:
                c.proc.wait(10)
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait(10)


async def login(page: Any, console: Console, name: str, secret: str) -> None:
    await page.goto(console.url + "/")
    assert "/login" in page.url  # not logged in: sent to the login page
    await page.fill("input[name=name]", name)
    await page.fill("input[name=secret]", secret)
    await page.click("button[type=submit]")
    await page.wait_for_url(console.url + "/")
    assert await page.locator("h1").first.inner_text() != "Log in"

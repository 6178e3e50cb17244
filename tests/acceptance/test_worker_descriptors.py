"""What an external worker holds of the daemon: its stdin, stdout and stderr, and nothing else.

The real daemon serves the console (a listening socket in its own process) and runs an external
worker that lists every descriptor it was started with. A governed agent holding the console's
socket could accept the operators' connections; one holding the store's files could write them.
Its stdin and stdout are pipes, so a worker that opens /dev/stdout (a shell script, jq) works.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor import events as ev
from tests.acceptance.conftest import DaemonFactory

pytestmark = [pytest.mark.acceptance, pytest.mark.anyio]

LISTER = r"""
import json, os, stat, sys
out = sys.argv[1]
held = {}
for name in os.listdir("/proc/self/fd"):
    try:
        target = os.readlink(f"/proc/self/fd/{name}")
    except OSError:
        continue  # listdir's own descriptor, closed by now
    if int(name) > 2 and not target.startswith("/proc/"):
        held[name] = target
pipes = {fd: stat.S_ISFIFO(os.fstat(fd).st_mode) for fd in (0, 1)}
with open(out + ".part", "w") as f:
    json.dump({"held": held, "pipes": pipes}, f)
os.replace(out + ".part", out)
with open("/dev/stdout", "w") as stdout:  # what a shell worker's `echo ... > /dev/stdout` does
    for line in sys.stdin:
        if json.loads(line)["type"] == "cycle":
            stdout.write(json.dumps({"type": "cycle_done", "state": {}}) + "\n")
            stdout.flush()
"""


async def test_an_external_worker_inherits_no_descriptor_of_the_daemons(
    daemon: DaemonFactory, tmp_path: Path
) -> None:
    lister, report = tmp_path / "lister.py", tmp_path / "held.json"
    lister.write_text(LISTER)
    command = json.dumps([sys.executable, str(lister), str(report)])
    workers = f'[[workers]]\nname = "lister"\ncommand = {command}\n'
    d = daemon(workers=workers, extra='[console]\nenabled = true\nlisten = "127.0.0.1:0"\n')

    def serving() -> bool:
        return any(e.get("event") == "console.serving" for e in d.log_events())

    await d.wait_until(serving, what="console.serving in the daemon's log")

    found: dict[str, Any] = await d.wait_until(
        lambda: json.loads(report.read_text()) if report.exists() else None,
        what="the worker's list of descriptors",
    )
    assert found["held"] == {}, f"the worker holds the daemon's descriptors: {found['held']}"
    assert found["pipes"] == {"0": True, "1": True}

    async def cycles() -> list[Any] | None:
        done = [e for e in await d.events(ev.CYCLE_COMPLETED) if e.worker == "lister"]
        return done or None

    await d.wait_until(cycles, what="a cycle the worker answered through /dev/stdout")
    assert await d.stop() == 0

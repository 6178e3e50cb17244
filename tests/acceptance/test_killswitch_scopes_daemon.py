"""Worker and session scopes do what the operator meant, against the real daemon: a replicated
worker's configured name halts all its replicas, an instance name one; a name or session that
does not exist is an error naming the known ones (exit 2), unless --force."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import anyio
import pytest

from tests import storetools

FLEET = "acceptance"  # the daemon fixture's fleet

if TYPE_CHECKING:
    from tests.acceptance.conftest import Daemon, DaemonFactory

pytestmark = [pytest.mark.acceptance, pytest.mark.anyio]

REPLICAS = ["support-1", "support-2", "support-3"]


def engage(*scope: str) -> list[str]:
    return ["killswitch", "engage", "--mode", "halt_all", "--scope", *scope, "--reason", "drill",
            "--by", "test"]  # fmt: skip


def disengage(*scope: str) -> list[str]:
    return ["killswitch", "disengage", "--scope", *scope, "--reason", "over", "--by", "test"]


async def workers_started_after(d: Daemon, since: datetime) -> set[str]:
    return {e.worker or "" for e in await d.events("ACTION_STARTED", after=since)}


async def test_configured_name_halts_every_replica_instance_name_one(daemon: DaemonFactory) -> None:
    d = daemon()
    await d.running()

    await d.cli_ok(*engage("worker", "support"))
    since = datetime.now(UTC)
    await d.wait_until(d.refused_after(since, "killswitch", workers=3),
                       what="all three replicas refused")  # fmt: skip
    await anyio.sleep(0.5)  # a window in which nothing may start (a negative check)
    await d.nothing_started_after(since)
    denied = await d.events("ACTION_DENIED", reason="killswitch", after=since)
    assert {e.worker for e in denied} == set(REPLICAS)

    await d.cli_ok(*disengage("worker", "support"))
    await d.cli_ok(*engage("worker", "support-2"))
    since = datetime.now(UTC)
    await d.wait_until(d.refused_after(since, "killswitch"), what="support-2 refused")

    async def others_run() -> bool:
        return {"support-1", "support-3"} <= await workers_started_after(d, since)

    await d.wait_until(others_run, what="support-1 and support-3 running")
    await anyio.sleep(0.3)  # a window in which support-2 must not start (a negative check)
    assert "support-2" not in await workers_started_after(d, since)

    # Disengaging the configured name resumes every replica, the one halted by name too.
    await d.cli_ok(*disengage("worker", "support"))
    since = datetime.now(UTC)

    async def all_run() -> bool:
        return set(REPLICAS) <= await workers_started_after(d, since)

    await d.wait_until(all_run, what="every replica running again")
    assert await d.stop() == 0


async def test_unknown_worker_or_session_is_an_error_naming_the_known_ones(
    daemon: DaemonFactory,
) -> None:
    d = daemon()
    await d.running()

    result = await d.cli(*engage("worker", "suport"))
    assert result.returncode == 2
    line = d.one_line(result.stderr)
    assert "unknown worker 'suport'" in line
    assert all(name in line for name in ["support", *REPLICAS]), line

    result = await d.cli(*engage("session", "no-such-session"))
    assert result.returncode == 2
    line = d.one_line(result.stderr)
    async with d.store() as store:
        [open_session] = await store.open_sessions(FLEET)
    assert "unknown session 'no-such-session'" in line and open_session.id in line, line

    async with d.store() as store:
        rows = await storetools.fetchall(store, "kill_switches", FLEET)
    assert [r["scope"] for r in rows] == ["fleet"]  # nothing written beside the fleet row

    # --force: a worker that is not configured yet; its switch can be cleared again.
    await d.cli_ok(*engage("worker", "later", "--force"))
    await d.cli_ok(*disengage("worker", "later"))
    # A known session by its id works without --force.
    await d.cli_ok(*engage("session", open_session.id))
    await d.wait_until(d.refused_after(datetime.now(UTC), "killswitch", workers=3),
                       what="the session halted")  # fmt: skip
    assert await d.stop() == 0

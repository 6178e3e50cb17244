"""The real daemon on Postgres while its connections are terminated (pg_terminate_backend):
workers do not crash, finished actions keep their outcome, and the fleet kill switch's LISTEN
comes back."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest

from supervisor.store.postgres import APPLICATION_NAME, LISTEN_APPLICATION_NAME

if TYPE_CHECKING:
    from tests.acceptance.conftest import Daemon, DaemonFactory

pytestmark = [pytest.mark.anyio, pytest.mark.acceptance, pytest.mark.postgres]


async def sql(pg_url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(pg_url, timeout=5)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def backends(pg_url: str, application: str) -> list[int]:
    rows = await sql(pg_url, "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                             "AND application_name = $1", application)  # fmt: skip
    return [int(r["pid"]) for r in rows]


async def terminate(pg_url: str, pids: list[int]) -> None:
    await sql(pg_url, "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", pids)


def observed(d: Daemon, mode: str, after: int) -> list[dict[str, Any]]:
    """`killswitch.observed` lines for the fleet switch in `mode`, past the first `after` lines."""
    lines = [e for e in d.log_events() if e.get("event") == "killswitch.observed"][after:]
    return [e for e in lines if e.get("scope") == "fleet" and e.get("mode") == mode]


async def test_fleet_switch_listen_comes_back_after_its_connection_is_terminated(
    daemon: DaemonFactory, pg_url: str
) -> None:
    # The poll behind LISTEN is a minute: a change seen within seconds came by NOTIFY.
    d = daemon(extra='[killswitch]\nstore_poll = "60s"\n', db=pg_url, start=False)
    await d.cli_ok("db", "migrate")
    d.start()
    await d.running()
    first = await d.wait_until(lambda: backends(pg_url, LISTEN_APPLICATION_NAME),
                               what="the LISTEN connection")  # fmt: skip
    latencies = []
    for round_ in ("as started", "after pg_terminate_backend"):
        if round_ != "as started":
            await terminate(pg_url, first)

            async def relistened() -> list[int]:
                pids = await backends(pg_url, LISTEN_APPLICATION_NAME)
                return pids if pids and not set(pids) & set(first) else []

            await d.wait_until(relistened, what="a new LISTEN connection", within=5)
        for mode, verb in (("halt_all", "engage"), ("disengaged", "disengage")):
            seen = len([e for e in d.log_events() if e.get("event") == "killswitch.observed"])
            extra = ["--mode", mode] if verb == "engage" else []
            await d.cli_ok("killswitch", verb, "--scope", "fleet", *extra,
                           "--reason", "listen drill", "--by", "pytest")  # fmt: skip
            lines = await d.wait_until(lambda m=mode, s=seen: observed(d, m, s),  # type: ignore[misc]
                                       what=f"{verb} observed {round_}", within=5)  # fmt: skip
            rows = await sql(pg_url, "SELECT updated_at FROM kill_switches WHERE scope = 'fleet'")
            row = rows[0]
            at = datetime.fromisoformat(lines[0]["timestamp"].replace("Z", "+00:00"))
            latencies.append((at - row["updated_at"]).total_seconds())
    # From the CLI's write to the daemon's log line, far below the one-minute poll.
    assert max(latencies) < 5.0, latencies
    assert any(e.get("event") == "killswitch.listening_again" for e in d.log_events())
    print(f"fleet switch seen after {', '.join(f'{s * 1000:.0f} ms' for s in latencies)}")
    assert await d.stop() == 0


async def test_connections_terminated_mid_run_crash_no_worker_and_lose_no_outcome(
    daemon: DaemonFactory, pg_url: str
) -> None:
    d = daemon(db=pg_url, start=False)
    await d.cli_ok("db", "migrate")
    d.start()
    await d.running()
    terminated = 0
    for _round in range(5):
        pids = await backends(pg_url, APPLICATION_NAME) + await backends(
            pg_url, LISTEN_APPLICATION_NAME
        )
        await terminate(pg_url, pids)
        terminated += len(pids)
        # the daemon goes on working after each loss
        await d.wait_until(d.started_after(datetime.now(UTC), n=3), what="actions after the loss")
    assert terminated >= 5
    assert await d.stop() == 0

    crashed = await d.events("WORKER_CRASHED")
    assert crashed == [], [e.payload for e in crashed]
    assert not [e for e in d.log_events() if e.get("event") == "worker.crashed"]
    # Every effect that ran has its outcome: nothing finished is left started or in-doubt.
    effects = {e["command_id"] for e in d.effects()}
    assert effects
    status = {r["command_id"]: r["status"] for r in await d.actions()}
    open_ = sorted(c for c in effects if status.get(c) != "succeeded")
    assert open_ == [], [(c, status.get(c)) for c in open_]
    counts = {s: sum(v == s for v in status.values()) for s in set(status.values())}
    print(json.dumps({"terminated": terminated, "effects": len(effects), "actions": counts}))

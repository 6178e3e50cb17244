"""Approvals against the real daemon: workers retry a guarded refund every 100 ms under one
idempotency key each; an operator lists, approves and denies through the CLI; an approval left
alone expires at its deadline while the daemon runs (deny by default)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from tests.acceptance.workers_fixture import refund_workers

if TYPE_CHECKING:
    from tests.acceptance.conftest import Daemon

pytestmark = [pytest.mark.acceptance, pytest.mark.anyio]

DaemonFactory = Callable[..., "Daemon"]
RETRIES = 0.6  # seconds of further retries (about 6 per worker) before counting effects


def pending_rows(d: Daemon, n: int) -> Callable[[], Any]:
    async def check() -> list[dict[str, Any]]:
        rows = [r for r in await d.approvals() if r["status"] == "pending"]
        return rows if len(rows) >= n else []

    return check


async def listed_pending(d: Daemon) -> dict[str, dict[str, Any]]:
    """`approvals list --pending --json`, by worker."""
    rows = json.loads((await d.cli_ok("approvals", "list", "--pending", "--json")).stdout)
    return {r["worker"]: r for r in rows}


def effects_of(d: Daemon, worker: str) -> list[dict[str, Any]]:
    return [e for e in d.effects() if e["worker"] == worker]


async def test_approve_runs_once_and_deny_refuses(daemon: DaemonFactory) -> None:
    d = daemon(workers=refund_workers(3))
    await d.wait_until(pending_rows(d, 3), what="three pending approvals")
    pending = await listed_pending(d)
    assert sorted(pending) == ["refunder-1", "refunder-2", "refunder-3"]
    assert {(r["action"], r["status"]) for r in pending.values()} == {("support.refund", "pending")}
    assert d.effects() == []  # nothing runs while pending, however often it is retried

    approve_id, deny_id = pending["refunder-1"]["id"], pending["refunder-2"]["id"]
    approved = await d.cli_ok("approvals", "approve", approve_id, "--by", "op")
    approved_at = datetime.now(UTC)
    assert f"approval {approve_id} approved by op" in approved.stdout.decode()
    await d.cli_ok("approvals", "deny", deny_id, "--by", "op", "--reason", "not this one")

    await d.wait_until(lambda: effects_of(d, "refunder-1"), what="the approved refund")
    await d.wait_until(d.refused_after(approved_at, "approval_denied"), what="the denied refund")
    await anyio.sleep(RETRIES)

    [effect] = effects_of(d, "refunder-1")  # retried every cycle, ran exactly once
    assert effect["approval"] == approve_id
    assert datetime.fromisoformat(effect["at"]) > approved_at - timedelta(seconds=1)
    succeeded = await d.events("ACTION_SUCCEEDED")
    assert [e.command_id for e in succeeded] == [effect["command_id"]]
    [started] = await d.events("ACTION_STARTED")
    assert started.worker == "refunder-1"
    [denied] = await d.events("ACTION_DENIED", reason="approval_denied")
    assert denied.worker == "refunder-2"
    assert "denied by op: not this one" in denied.payload["detail"]
    assert effects_of(d, "refunder-2") == [] and effects_of(d, "refunder-3") == []
    assert sorted(await listed_pending(d)) == ["refunder-3"]

    again = await d.cli("approvals", "approve", approve_id, "--by", "op")
    assert again.returncode == 1 and "already approved" in d.one_line(again.stderr)
    unknown = await d.cli("approvals", "deny", "no-such-approval", "--by", "op", "--reason", "x")
    assert unknown.returncode == 1 and "unknown approval" in d.one_line(unknown.stderr)
    assert await d.stop() == 0


async def test_approval_left_alone_expires_at_its_deadline(daemon: DaemonFactory) -> None:
    d = daemon(workers=refund_workers(1), extra='[approvals]\ntimeout = "2s"\n')
    [row] = await d.wait_until(pending_rows(d, 1), what="a pending approval")
    assert row["deadline"] - row["created_at"] == timedelta(seconds=2)

    [expired] = await d.wait_until(lambda: d.events("APPROVAL_EXPIRED"), what="APPROVAL_EXPIRED",
                                   within=6)  # fmt: skip
    assert expired.payload["approval"] == row["id"]
    assert row["deadline"] <= expired.created_at < row["deadline"] + timedelta(seconds=1)
    [decided] = [r for r in await d.approvals() if r["id"] == row["id"]]
    assert (decided["status"], decided["decided_by"]) == ("expired", "deadline")

    await d.wait_until(d.refused_after(row["created_at"], "approval_expired"), what="the refusal")
    late = await d.cli("approvals", "approve", row["id"], "--by", "op")
    assert late.returncode == 1 and "already expired" in d.one_line(late.stderr)
    assert d.effects() == []
    assert await d.events("ACTION_STARTED") == []
    assert await d.stop() == 0

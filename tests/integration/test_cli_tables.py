"""Tables a person reads: the list commands through the real command line (a subprocess), over
a store seeded here with a pending approval, an in-doubt action, a window, a worker that never
ran and token usage; times in the configured zone, ages, short ids that other commands take."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisor.actions import Action
from supervisor.cli.tables import relative, resolve_prefix, span, table
from supervisor.config import load_config
from supervisor.errors import UsageError
from supervisor.governance.approvals import Approvals
from supervisor.runtime import recovery
from supervisor.runtime.checkpoints import Checkpoints
from supervisor.store import open_store
from supervisor.timing.clock import SystemClock
from tests import storetools
from tests.storetools import NO_SWITCH_TARGET

ROOT = Path(__file__).resolve().parents[2]
SECRET = "table-test-secret"
CONFIG = '[daemon]\ntimezone = "Asia/Kolkata"\n'  # +05:30: local times differ from UTC


class Place:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.db = folder / "state" / "supervisor.db"
        (folder / "c.toml").write_text(CONFIG)

    def __call__(self, *args: str, code: int = 0, env: dict[str, str] | None = None) -> Any:
        base = {k: v for k, v in os.environ.items()
                if not k.startswith("ACP_") and k not in ("NOTIFY_SOCKET", "SUDO_USER")}  # fmt: skip
        base["PYTHONPATH"] = str(ROOT)
        done = subprocess.run(
            [sys.executable, "-m", "supervisor", "--config", "c.toml", "--state-dir", "state",
             *args], cwd=self.folder, env={**base, **(env or {})}, capture_output=True,
            text=True, timeout=60)  # fmt: skip
        assert done.returncode == code, (args, done.stdout[-2000:], done.stderr[-2000:])
        assert "Traceback" not in done.stderr
        if code == 0 and "--json" in args:
            return json.loads(done.stdout)
        return done.stdout if code == 0 else done.stderr


async def seed(db: Path) -> dict[str, str]:
    config = load_config(None, env={}, db=f"sqlite:///{db}")
    store = await open_store(config.db_url, SystemClock(), migrate=True)
    try:
        now = store.clock.now()
        session, _ = await store.open_window(
            fleet="default", key="table-window", starts_at=now - timedelta(minutes=12),
            ends_at=now + timedelta(hours=1), max_cost=None, max_actions=None, by="test",
        )  # fmt: skip
        approvals = Approvals(store, config.approvals, "default")
        row = await approvals.request(
            key="deploy-1", action=Action(name="deploy", params={"env": "prod", "n": 2},
                                          risk="high"),
            worker="deployer", session_id=session.id, escalate_now=False, correlation_id=None,
        )  # fmt: skip
        status, _ = await store.begin_action(
            command_id="c0ffee11" + "0" * 24, operation="refund", params={"case": 7},
            fleet="default", session_id=session.id, worker="support", name="support.refund",
            risk="low", cost=0.0, critical=False, safe_to_retry=False, rule="risk:low",
            correlation_id=None, agent_id=None, switches=NO_SWITCH_TARGET,
        )  # fmt: skip
        assert status == "started"
        await recovery.scan(store, fleet="default", approvals=approvals, host_switch=None,
                            by="test", started_before=now + timedelta(seconds=1))  # fmt: skip
        await Checkpoints(store, "default").save("support", cycle=11, session_id=session.id,
                                                  state={"n": 1}, counters={})  # fmt: skip
        # a worker that never ran: the fleet records cycle -1 before its first cycle
        await store.record_worker(fleet="default", name="idle-one", host="h", state="running",
                                  restarts=0, last_error=None, cycle=-1, session_id=None,
                                  at=now)  # fmt: skip
        async with storetools.transaction(store) as tx:
            await tx.execute("reserve_tokens", "user", "alice", "2026-11-01", 1200, 0.5, 10**6, 1e6)
        return {"session": session.id, "approval": row.id}
    finally:
        await store.close()


@pytest.fixture
def place(tmp_path: Path) -> tuple[Place, dict[str, str]]:
    p = Place(tmp_path)
    p("db", "migrate")
    ids = anyio.run(seed, p.db)
    return p, ids


HEADERS = {
    ("status",): ["WORKER", "STATE", "CYCLE", "RESTARTS", "UPDATED", "LAST ERROR"],
    ("sessions", "list"): ["ID", "WINDOW", "STATUS", "STARTS", "ENDS", "ACTIONS", "COST"],
    ("approvals", "list"): [
        "ID",
        "STATUS",
        "ACTION",
        "WORKER",
        "TIER",
        "CREATED",
        "WAIT",
        "PARAMS",
        "GRANT",
    ],
    ("checkpoints", "list"): ["ID", "WORKER", "CYCLE", "CREATED", "AGE"],
    ("actions", "in-doubt"): ["COMMAND ID", "NAME", "WORKER", "STARTED", "AGE", "SAFE TO RETRY"],
    ("killswitch", "status"): ["SCOPE", "TARGET", "MODE", "SINCE", "BY", "REASON"],
    ("tokens", "usage"): ["SCOPE", "IDENTITY", "PERIOD", "TOKENS", "COST"],
}


def header_and_rows(text: str, first: str) -> tuple[str, list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first + " "))
    block = []
    for line in lines[start:]:
        if not line.strip():
            break
        block.append(line)
    return block[0], block[1:]


@pytest.mark.parametrize("command", list(HEADERS), ids=" ".join)
def test_list_commands_print_a_header_row_and_aligned_columns(
    place: tuple[Place, dict[str, str]], command: tuple[str, ...]
) -> None:
    cli, _ = place
    names = HEADERS[command]
    header, rows = header_and_rows(cli(*command), names[0])
    assert re.split(r"\s{2,}", header.strip()) == names
    starts = [header.index(name) for name in names]
    for row in rows:
        # every column starts where its header does
        for col in starts[1:]:
            assert row[col - 2 : col] == "  " and row[col] != " ", (header, row)


def test_times_are_local_to_the_second_with_ages(place: tuple[Place, dict[str, str]]) -> None:
    cli, ids = place
    approvals = cli("approvals", "list")
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d IST", approvals), approvals
    assert re.search(r"pending (\d+s|0s|1m), deadline in \d+", approvals), approvals
    sessions = cli("sessions", "list")
    assert ids["session"][:8] in sessions and ids["session"] not in sessions
    assert "IST" in sessions and "UTC" not in sessions
    in_doubt = cli("actions", "in-doubt")
    assert "c0ffee11" in in_doubt and re.search(r"\d+s ago", in_doubt)


def test_short_ids_are_accepted_back(place: tuple[Place, dict[str, str]]) -> None:
    cli, ids = place
    short_session = ids["session"][:8]
    replay = cli("events", "replay", "--session", short_session, "--json")
    assert replay and {e["session_id"] for e in replay} == {ids["session"]}
    said = cli("approvals", "approve", ids["approval"][:8], "--reason", "looks fine")
    assert ids["approval"] in said and "approved" in said
    said = cli("actions", "resolve", "c0ffee11", "--as", "failed", "--by", "ops")
    assert "c0ffee11" + "0" * 24 in said
    cli("killswitch", "engage", "--mode", "halt_all", "--scope", "session", short_session,
        "--reason", "r", "--by", "b")  # fmt: skip
    scoped = [s for s in cli("killswitch", "status", "--json") if s["scope"] == "session"]
    assert [s["target"] for s in scoped] == [ids["session"]]
    too_short = cli("approvals", "deny", ids["approval"][:4], "--reason", "x", code=2)
    assert "at least 6" in too_short


def test_an_ambiguous_prefix_names_the_candidates(tmp_path: Path) -> None:
    cli = Place(tmp_path)
    for _ in range(2):
        cli("run", "--horizon", "hour", "--simulate", "--start", "2026-11-01T00:00:00Z", "--json")
    names = sorted(p.name for p in (tmp_path / "state" / "simulations").iterdir())
    said = cli("scorecard", "--run", names[0][:9], code=2)
    assert "ambiguous" in said and names[0] in said and names[1] in said
    assert len(said.strip().splitlines()) == 1


def test_event_payloads_print_as_json(place: tuple[Place, dict[str, str]]) -> None:
    cli, ids = place
    text = cli("events", "replay", "--session", ids["session"])
    payloads = [line[line.index("{") :] for line in text.splitlines()[1:] if "{" in line]
    assert payloads
    for payload in payloads:
        assert isinstance(json.loads(payload), dict)  # Python's repr would not parse
    assert "'" not in "".join(payloads)


def test_approval_params_are_a_json_object(place: tuple[Place, dict[str, str]]) -> None:
    cli, _ = place
    (row,) = cli("approvals", "list", "--json")
    assert row["params"] == {"env": "prod", "n": 2}
    (action,) = cli("actions", "in-doubt", "--json")
    assert action["params"] == {"case": 7}


def test_killswitch_status_shows_since_by_and_why(place: tuple[Place, dict[str, str]]) -> None:
    cli, _ = place
    env = {"ACP_KILLSWITCH_SECRET": SECRET}
    cli("killswitch", "engage", "--mode", "halt_noncritical", "--reason", "disk full",
        "--by", "maria", env=env)  # fmt: skip
    (host,) = [s for s in cli("killswitch", "status", "--json", env=env) if s["scope"] == "host"]
    assert host["mode"] == "halt_noncritical" and host["by"] == "maria"
    assert host["reason"] == "disk full" and host["since"]
    text = cli("killswitch", "status", env=env)
    line = next(ln for ln in text.splitlines() if ln.startswith("host"))
    assert re.search(r"halt_noncritical\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d IST\s+maria\s+disk full",
                     line), line  # fmt: skip


def test_status_says_why_the_switch_is_unverifiable(place: tuple[Place, dict[str, str]]) -> None:
    cli, _ = place
    cli("killswitch", "engage", "--mode", "halt_all", "--reason", "r", "--by", "b",
        env={"ACP_KILLSWITCH_SECRET": SECRET})  # fmt: skip
    text = cli("status")  # no secret here
    line = next(ln for ln in text.splitlines() if ln.startswith("kill switch:"))
    assert "host halt_all (unverifiable: no kill-switch secret configured" in line
    data = cli("status", "--json")
    host = next(s for s in data["killswitch"] if s["scope"] == "host")
    assert host["valid"] is False and "no kill-switch secret" in host["problem"]


def test_by_defaults_to_the_invoking_user(place: tuple[Place, dict[str, str]]) -> None:
    cli, ids = place
    env = {"ACP_KILLSWITCH_SECRET": SECRET, "LOGNAME": "logan", "USER": "logan"}
    assert "by logan" in cli("killswitch", "engage", "--mode", "halt_all", "--reason", "r", env=env)
    sudo = {**env, "SUDO_USER": "sudoer"}
    assert "by sudoer" in cli("killswitch", "disengage", "--reason", "ok", env=sudo)
    assert "by chosen" in cli("approvals", "deny", ids["approval"], "--reason", "no", "--by",
                              "chosen", env=sudo)  # fmt: skip
    modes = [(s["by"], s["mode"]) for s in cli("killswitch", "status", "--json", env=env)
             if s["scope"] == "host"]  # fmt: skip
    assert modes == [("sudoer", "disengaged")]


def test_a_worker_that_never_ran_shows_no_cycle(place: tuple[Place, dict[str, str]]) -> None:
    cli, _ = place
    text = cli("status")
    line = next(ln for ln in text.splitlines() if ln.startswith("idle-one"))
    assert re.split(r"\s{2,}", line)[:3] == ["idle-one", "running", "-"], line
    (worker,) = cli("status", "--json")["workers"]
    assert worker["cycle"] is None


def test_table_helpers() -> None:
    assert table(["A", "BB"], [["xxx", 1], ["y", None]], "none") == "A    BB\nxxx  1\ny"
    assert table(["A"], [], "none") == "none"
    assert [span(timedelta(seconds=s)) for s in (5, 720, 3 * 3600 + 300, 2 * 86400 + 4 * 3600)] == [
        "5s", "12m", "3h05m", "2d04h"]  # fmt: skip
    now = SystemClock().now()
    assert relative(now + timedelta(minutes=48, seconds=5), now) == "in 48m"
    assert relative(now - timedelta(minutes=12), now) == "12m ago"


def test_resolve_prefix_like_git() -> None:
    ids = ["abcdef0123", "abcdef9876", "fedcba0000"]
    assert resolve_prefix(ids, "fedcba", "session") == "fedcba0000"
    assert resolve_prefix(ids, "abcdef0123", "session") == "abcdef0123"
    assert resolve_prefix(ids, "999999", "session") is None
    with pytest.raises(
        UsageError, match=r"ambiguous session prefix 'abcdef'.*abcdef0123, abcdef9876"
    ):
        resolve_prefix(ids, "abcdef", "session")
    with pytest.raises(UsageError, match="at least 6"):
        resolve_prefix(ids, "fed", "session")

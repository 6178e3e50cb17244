"""`policy explain` and `policy replay` through the real command line.

Replay: a simulated week is recorded with one policy (the daemon on a virtual clock), then
replayed with a stricter and a looser candidate; the transitions the command prints are checked
against a count made here from the recorded events, by risk, with the candidates' tables written
out by hand (no policy code involved).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from supervisor import events as ev
from supervisor.simruns import find
from supervisor.store import open_store
from supervisor.timing.clock import SystemClock

REPO = Path(__file__).resolve().parents[2]

RECORDED = """
[daemon]
fleet = "replay"
seed = 11

[horizons.week]
cycle_every = "2h"

[policy.risk]
high = "require_approval"

[[policy.rules]]
name = "support-critical-denied"
worker = "support*"
risk = "critical"
outcome = "deny"

[[workers]]
name = "support"
class = "workers.support:SupportAgent"
replicas = 2
params = { cases_per_cycle = 3 }
"""
# What the recording policy gives each risk, and what each candidate should give (by hand).
RECORDED_BY_RISK = {
    "low": "allow",
    "medium": "allow",
    "high": "require_approval",
    "critical": "deny",
}
STRICT = """
[policy.risk]
medium = "require_approval"
high = "deny"
"""
STRICT_BY_RISK = {"low": "allow", "medium": "require_approval", "high": "deny", "critical": "deny"}
LOOSE = """
[policy.risk]
high = "allow"
critical = "require_approval"
"""
LOOSE_BY_RISK = {"low": "allow", "medium": "allow", "high": "allow", "critical": "require_approval"}
APPROVALS = {"require_approval", "escalate"}


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def one_error_line(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# --- explain -------------------------------------------------------------------------------------

EXPLAIN_CONFIG = """
[[policy.rules]]
name = "no-prod-deletes"
action = "db.delete*"
when = [ { param = "target.env", op = "==", value = "prod" } ]
outcome = "deny"
"""


def test_explain_prints_the_decision_and_its_path(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(EXPLAIN_CONFIG)
    args = ["--config", str(cfg), "policy", "explain", "--action", "db.delete_user",
            "--risk", "high", "--params", '{"target": {"env": "dev"}}', "--worker", "ops"]  # fmt: skip
    result = run_cli(tmp_path, *args, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["outcome"], data["rule"]) == ("require_approval", "risk:high")
    assert [(s["name"], s["matched"]) for s in data["path"]] == [
        ("no-prod-deletes", False), ("risk:high", True)]  # fmt: skip
    assert data["path"][0]["why"] == "target.env == 'prod' is false (target.env is 'dev')"
    text = run_cli(tmp_path, *args).stdout
    assert text.startswith("decision: require_approval (rule risk:high)")
    assert "rule 'no-prod-deletes': no match: target.env == 'prod' is false" in text
    assert not list(tmp_path.rglob("*.db"))  # explain reads the config only


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--params", "[1, 2]"], ["--params must be a JSON object"]),
        (["--params", "{oops"], ["--params is not JSON"]),
        (["--identity", "nobody"], ["--identity", "scope:name"]),
    ],
    ids=["not-an-object", "not-json", "bad-identity"],
)
def test_explain_bad_input_is_one_line(tmp_path: Path, extra: list[str], words: list[str]) -> None:
    result = run_cli(tmp_path, "policy", "explain", "--action", "x", *extra)
    one_error_line(result, 2, *words)


# --- replay: bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[policy.risk]\nhigh = \n", ["not valid TOML", "line 2"]),
        ("[policy]\nunmatched = 'deny'\n\n[daemon]\nfleet = 'x'\n", ["line 4", "'daemon'"]),
        ("[policy.risk]\nlow = 'allow'\nextreme = 'deny'\n", ["line 3", "'extreme'"]),
        ("[[policy.rules]]\nname = 'r'\noutcome = 'deny'\nactoin = 'x'\n", ["line 4", "'actoin'"]),
        ("[policy]\nshadow = 'other.toml'\n", ["line 2", "'shadow'"]),
        ("[policy.risk]\nhigh = 'maybe'\n", ["policy.risk.high", "'maybe'"]),
    ],
    ids=["toml", "top-level", "risk-key", "rule-key", "no-shadow-in-candidate", "bad-outcome"],
)
def test_a_bad_candidate_is_one_line_exit_2_nothing_written(
    tmp_path: Path, text: str, words: list[str]
) -> None:
    candidate = tmp_path / "candidate.toml"
    candidate.write_text(text)
    db = tmp_path / "fleet.db"
    result = run_cli(tmp_path, "--db", f"sqlite:///{db}", "policy", "replay",
                     "--candidate", str(candidate))  # fmt: skip
    one_error_line(result, 2, str(candidate), *words)
    assert not db.exists() and not list(tmp_path.rglob("*.db*"))


def test_an_unknown_window_exits_1_naming_it(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    assert run_cli(tmp_path, "--db", db, "db", "migrate").returncode == 0
    candidate = tmp_path / "candidate.toml"
    candidate.write_text(STRICT)
    result = run_cli(tmp_path, "--db", db, "policy", "replay", "--candidate", str(candidate),
                     "--window", "feedfacecafe")  # fmt: skip
    one_error_line(result, 1, "unknown window 'feedfacecafe'")


# --- replay of a simulated week ------------------------------------------------------------------


@pytest.fixture(scope="module")
def week(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A week on the virtual clock, recorded with RECORDED; its folder."""
    root = tmp_path_factory.mktemp("week")
    (root / "recorded.toml").write_text(RECORDED)
    (root / "strict.toml").write_text(STRICT)
    (root / "loose.toml").write_text(LOOSE)
    result = run_cli(root, "--config", "recorded.toml", "--state-dir", "state",
                     "run", "--simulate", "--horizon", "week")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return root


async def recorded_proposals(root: Path) -> dict[str, list[tuple[str, str]]]:
    """Per window, (risk, recorded decision) of each proposal, from the event log alone."""
    store = await open_store(find(root / "state", "latest").db_url, SystemClock())
    try:
        out: dict[str, list[tuple[str, str]]] = {}
        for session in await store.list_sessions("replay"):
            seen: dict[str, tuple[str, str]] = {}
            for e in await store.replay(session.id):
                if e.kind == ev.APPROVAL_REQUESTED:
                    seen.setdefault(
                        e.payload["command_id"], (e.payload["risk"], "require_approval")
                    )
                elif e.kind == ev.ACTION_DENIED and e.reason == "policy":
                    assert e.command_id is not None
                    seen.setdefault(e.command_id, (e.payload["risk"], "deny"))
                elif e.kind == ev.ACTION_STARTED:
                    assert e.command_id is not None
                    seen.setdefault(e.command_id, (e.payload["risk"], "allow"))
            out[session.window_key] = list(seen.values())
        return out
    finally:
        await store.close()


def replay(root: Path, candidate: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli(root, "--config", "recorded.toml", "--state-dir", "state", "--run", "latest",
                   "policy", "replay", "--candidate", candidate, *extra)  # fmt: skip


@pytest.mark.anyio
@pytest.mark.parametrize(("candidate", "table"), [("strict.toml", STRICT_BY_RISK),
                                                  ("loose.toml", LOOSE_BY_RISK)])  # fmt: skip
async def test_replay_counts_match_the_recorded_rows(
    week: Path, candidate: str, table: dict[str, str]
) -> None:
    recorded = await recorded_proposals(week)
    flat = [p for window in recorded.values() for p in window]
    assert len(flat) > 300 and {risk for risk, _ in flat} == set(RECORDED_BY_RISK)
    # The recording policy decided each risk as configured: the log is what we think it is.
    assert all(RECORDED_BY_RISK[risk] == decision for risk, decision in flat)

    result = replay(week, candidate, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    expected = Counter((decision, table[risk]) for risk, decision in flat)
    got = Counter({(t["from"], t["to"]): t["count"] for t in data["transitions"]})
    assert got == expected
    assert data["proposals"] == len(flat)
    assert data["changed"] == sum(n for (a, b), n in expected.items() if a != b)
    assert data["approvals_spared"] == sum(
        n for (a, b), n in expected.items() if a in APPROVALS and b not in APPROVALS)  # fmt: skip
    assert data["approvals_added"] == sum(
        n for (a, b), n in expected.items() if a not in APPROVALS and b in APPROVALS)  # fmt: skip
    assert [w["window"] for w in data["windows"]] == sorted(recorded)
    for w in data["windows"]:
        rows = recorded[w["window"]]
        assert w["proposals"] == len(rows)
        assert w["candidate"]["deny"] == sum(table[r] == "deny" for r, _ in rows)
        # Spend: 0.05 per proposal the candidate does not deny (approvals assumed granted).
        assert w["candidate"]["cost"] == pytest.approx(
            0.05 * sum(table[r] != "deny" for r, _ in rows))  # fmt: skip
    # Nothing was written: replay is read-only.
    again = await recorded_proposals(week)
    assert again == recorded


def test_replay_fail_on_gates_a_change_and_prints_tables(week: Path) -> None:
    strict = replay(week, "strict.toml", "--fail-on", "deny-increase")
    assert strict.returncode == 3
    assert "deny-increase:" in strict.stderr and "more denials" in strict.stderr
    assert "allow             require_approval" in strict.stdout
    assert "changes by candidate rule" in strict.stdout and "risk:medium" in strict.stdout
    loose = replay(week, "loose.toml", "--fail-on", "deny-increase")
    assert loose.returncode == 0, loose.stderr
    assert replay(week, "loose.toml", "--fail-on", "allow-increase").returncode == 3


def test_replaying_the_recording_policy_changes_nothing(week: Path) -> None:
    section = RECORDED.split("[policy.risk]", 1)[1].split("[[workers]]", 1)[0]
    (week / "same.toml").write_text("[policy.risk]" + section)
    result = replay(week, "same.toml", "--fail-on", "any-change", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["changed"] == 0 and data["proposals"] > 300


def test_replay_one_window_by_prefix(week: Path) -> None:
    full: dict[str, Any] = json.loads(replay(week, "strict.toml", "--json").stdout)
    first = full["windows"][0]
    one = replay(week, "strict.toml", "--window", first["session_id"][:8], "--json")
    assert one.returncode == 0, one.stderr
    data = json.loads(one.stdout)
    assert [w["session_id"] for w in data["windows"]] == [first["session_id"]]
    assert data["windows"][0] == first
    since = json.loads(replay(week, "strict.toml", "--since", "2d", "--json").stdout)
    assert len(since["windows"]) == 2  # daily windows ending within two days of the newest end

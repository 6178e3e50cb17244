"""The console over HTTP, route by route: login required, roles enforced, CSRF enforced, and
each operation's effect in the store, on SQLite and on Postgres.

The app runs in-process (httpx's ASGI transport) over the test's store on the virtual clock;
decisions go through the same code as the CLI's, so the checks read the same rows and events.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from supervisor import events as ev
from supervisor.actions import Action
from supervisor.config import Config, load_config
from supervisor.console.app import COOKIE, create_app
from supervisor.console.auth import OperatorsFile, Role
from supervisor.governance.approvals import Approvals
from supervisor.killswitch import HostSwitchFile
from supervisor.runtime.checkpoints import Checkpoints
from supervisor.store import Store, system_stream
from supervisor.timing.clock import VirtualClock
from tests import storetools
from tests.storetools import NO_SWITCH_TARGET

pytestmark = pytest.mark.anyio

FLEET = "default"
SECRET = "console-test-secret"


@dataclass
class Env:
    store: Store
    clock: VirtualClock
    config: Config
    app: Any
    secrets: dict[str, str]
    session_id: str
    approvals: list[str]

    def client(self, base: str = "http://testserver") -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url=base)

    async def login(self, client: httpx.AsyncClient, name: str) -> str:
        r = await client.post("/api/v1/login", json={"name": name, "secret": self.secrets[name]})
        assert r.status_code == 200, r.text
        csrf: str = r.json()["csrf"]
        return csrf

    async def approval(self, approval_id: str) -> dict[str, Any]:
        row = await self.store.approval(approval_id)
        assert row is not None
        return row.as_row()

    async def system_events(self, kind: str) -> list[Any]:
        return [e for e in await self.store.replay(system_stream(FLEET)) if e.kind == kind]


@pytest.fixture
async def env(
    store: Store,
    clock: VirtualClock,
    store_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Env]:
    monkeypatch.setenv("ACP_KILLSWITCH_SECRET", SECRET)
    config = load_config(None, env={}, db=store_url, state_dir=tmp_path / "state")
    config.state_dir.mkdir(parents=True)
    operators = OperatorsFile(config.console.operators_path(config.state_dir))
    secrets = {name: operators.add(name, Role(name), created_at="2026-11-02T09:00:00+00:00")
               for name in ("viewer", "approver", "admin")}  # fmt: skip
    now = clock.now()
    session, _ = await store.open_window(fleet=FLEET, key="2026-11-02T09", starts_at=now,
                                         ends_at=now + timedelta(hours=1), max_cost=100.0,
                                         max_actions=1000, by="test")  # fmt: skip
    approvals = Approvals(store, config.approvals, FLEET)
    ids = []
    for i in range(3):
        row = await approvals.request(
            key=f"refund-{i}", action=Action("support.refund", {"order": i}, risk="high", cost=2.0),
            worker=f"refunder-{i}", session_id=session.id, escalate_now=False, correlation_id=None,
        )  # fmt: skip
        ids.append(row.id)
    yield Env(store, clock, config, create_app(config, store), secrets, session.id, ids)


# -- authentication required, everywhere -----------------------------------------------------

PAGES = ["/", "/approvals", "/killswitch", "/windows", "/events", "/repair", "/sessions/x/events"]
API_GETS = ["/api/v1/overview", "/api/v1/approvals", "/api/v1/killswitch", "/api/v1/windows",
            "/api/v1/events", "/api/v1/sessions/x/events", "/api/v1/repair"]  # fmt: skip
API_POSTS = ["/api/v1/approvals/{a}/approve", "/api/v1/approvals/{a}/deny", "/api/v1/killswitch",
             "/api/v1/actions/x/resolve", "/api/v1/checkpoints/1/restore", "/api/v1/logout"]  # fmt: skip
FORM_POSTS = ["/approvals/{a}/approve", "/approvals/{a}/deny", "/killswitch",
              "/repair/actions/x/resolve", "/repair/checkpoints/1/restore"]  # fmt: skip


async def test_every_route_needs_a_login(env: Env) -> None:
    a = env.approvals[0]
    async with env.client() as c:
        for path in PAGES:
            r = await c.get(path)
            assert r.status_code == 303 and r.headers["location"].startswith("/login"), path
        for path in API_GETS:
            r = await c.get(path)
            assert r.status_code == 401 and "not logged in" in r.json()["error"], path
        for path in API_POSTS:
            r = await c.post(path.format(a=a), json={"reason": "x", "mode": "halt_all"})
            assert r.status_code == 401, path
        for path in FORM_POSTS:
            r = await c.post(path.format(a=a), data={"reason": "x", "mode": "halt_all"})
            assert r.status_code == 303 and r.headers["location"] == "/login", path
        assert (await c.get("/login")).status_code == 200
        assert (await c.get("/static/console.css")).status_code == 200
    assert (await env.approval(a))["status"] == "pending"
    assert await env.system_events(ev.KILLSWITCH_ENGAGED) == []


async def test_login_sets_a_strict_httponly_cookie_secure_over_tls(env: Env) -> None:
    async with env.client("https://console.example") as c:
        r = await c.post("/login", data={"name": "viewer", "secret": env.secrets["viewer"],
                                         "next": "/approvals"})  # fmt: skip
        assert r.status_code == 303 and r.headers["location"] == "/approvals"
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=")
        for flag in ("HttpOnly", "SameSite=strict", "Secure", "Path=/"):
            assert flag.lower() in cookie.lower(), cookie
        assert (await c.get("/approvals")).status_code == 200
    async with env.client() as c:
        r = await c.post("/api/v1/login", json={"name": "viewer", "secret": env.secrets["viewer"]})
        assert "secure" not in r.headers["set-cookie"].lower()  # plain HTTP on loopback
        # next= never sends the browser to another site
        r = await c.post("/login", data={"name": "viewer", "secret": env.secrets["viewer"],
                                         "next": "//evil.example/"})  # fmt: skip
        assert r.headers["location"] == "/"
    [ok, *_] = await env.system_events(ev.CONSOLE_LOGIN)
    assert ok.payload["operator"] == "viewer"


async def test_failed_logins_are_recorded_and_rate_limited(env: Env) -> None:
    async with env.client() as c:
        for _ in range(5):
            r = await c.post("/api/v1/login", json={"name": "admin", "secret": "wrong"})
            assert r.status_code == 401 and r.json()["error"] == "unknown operator or wrong secret"
        r = await c.post("/api/v1/login", json={"name": "admin", "secret": env.secrets["admin"]})
        assert r.status_code == 429 and "too many failed logins" in r.json()["error"]
        assert COOKIE not in r.headers.get("set-cookie", "")
        page = await c.post("/login", data={"name": "nobody", "secret": "x"})
        assert page.status_code == 429  # the same client, another name: still limited
    failed = await env.system_events(ev.CONSOLE_LOGIN_FAILED)
    assert [e.reason for e in failed] == ["bad_credentials"] * 5 + ["rate_limited"] * 2
    assert {e.payload["operator"] for e in failed} == {"admin", "nobody"}
    assert await env.system_events(ev.CONSOLE_LOGIN) == []


async def test_an_expired_session_is_refused(env: Env) -> None:
    console = env.app.state.console
    async with env.client() as c:
        csrf = await env.login(c, "approver")
        assert (await c.get("/api/v1/overview")).status_code == 200
        now = console.sessions._now()
        console.sessions._now = lambda: now + env.config.console.session_ttl + 1
        r = await c.post(f"/api/v1/approvals/{env.approvals[0]}/approve", json={},
                         headers={"X-CSRF-Token": csrf})  # fmt: skip
        assert r.status_code == 401 and "expired" in r.json()["error"]
        assert (await c.get("/approvals")).status_code == 303
    assert (await env.approval(env.approvals[0]))["status"] == "pending"


async def test_logout_ends_the_session(env: Env) -> None:
    async with env.client() as c:
        csrf = await env.login(c, "viewer")
        assert (await c.post("/api/v1/logout", headers={"X-CSRF-Token": csrf})).status_code == 200
        assert (await c.get("/api/v1/overview")).status_code == 401


# -- CSRF ------------------------------------------------------------------------------------


async def test_state_changes_need_the_csrf_token(env: Env) -> None:
    a = env.approvals[0]
    async with env.client() as c:
        csrf = await env.login(c, "admin")
        for headers in ({}, {"X-CSRF-Token": "forged"}):
            r = await c.post(f"/api/v1/approvals/{a}/approve", json={}, headers=headers)
            assert r.status_code == 403 and "CSRF" in r.json()["error"]
            r = await c.post("/api/v1/killswitch", headers=headers,
                             json={"scope": "host", "mode": "halt_all", "reason": "x"})  # fmt: skip
            assert r.status_code == 403
        for form in ({}, {"csrf": "forged"}):
            r = await c.post(f"/approvals/{a}/approve", data=form)
            assert r.status_code == 403 and "CSRF" in r.text and "Nothing was changed" in r.text
            r = await c.post("/killswitch", data={**form, "scope": "host", "mode": "halt_all",
                                                  "reason": "x"})  # fmt: skip
            assert r.status_code == 403
        # the token belongs to the session: another operator's token is refused too
        async with env.client() as other:
            other_csrf = await env.login(other, "approver")
        r = await c.post(f"/api/v1/approvals/{a}/deny", json={"reason": "x"},
                         headers={"X-CSRF-Token": other_csrf})  # fmt: skip
        assert r.status_code == 403
        assert csrf != other_csrf
    assert (await env.approval(a))["status"] == "pending"
    assert await env.system_events(ev.KILLSWITCH_ENGAGED) == []
    assert HostSwitchFile(env.config.state_dir / "killswitch.json", None).path.exists() is False


# -- roles -----------------------------------------------------------------------------------


async def test_roles_are_enforced(env: Env) -> None:
    a = env.approvals[0]
    async with env.client() as c:
        csrf = await env.login(c, "viewer")
        h = {"X-CSRF-Token": csrf}
        assert (await c.get("/api/v1/approvals")).status_code == 200
        r = await c.post(f"/api/v1/approvals/{a}/approve", json={}, headers=h)
        assert r.status_code == 403 and "needs the approver role" in r.json()["error"]
        r = await c.post("/api/v1/killswitch", headers=h,
                         json={"scope": "worker", "target": "w", "mode": "halt_all", "reason": "x"})  # fmt: skip
        assert r.status_code == 403
        page = await c.get("/approvals")
        assert "Approve once" not in page.text  # no buttons for what the role cannot do
    async with env.client() as c:
        h = {"X-CSRF-Token": await env.login(c, "approver")}
        r = await c.post("/api/v1/killswitch", headers=h,
                         json={"scope": "host", "mode": "halt_all", "reason": "x"})  # fmt: skip
        assert r.status_code == 403 and "needs the admin role" in r.json()["error"]
        r = await c.post("/api/v1/actions/x/resolve", json={"as": "done"}, headers=h)
        assert r.status_code == 403
        r = await c.post("/api/v1/checkpoints/1/restore", json={}, headers=h)
        assert r.status_code == 403
        assert "Restore" not in (await c.get("/repair")).text
    assert (await env.approval(a))["status"] == "pending"
    assert await env.system_events(ev.KILLSWITCH_ENGAGED) == []


# -- approvals -------------------------------------------------------------------------------


async def test_approve_and_deny_through_the_api(env: Env) -> None:
    once, window, denied = env.approvals
    async with env.client() as c:
        h = {"X-CSRF-Token": await env.login(c, "approver")}
        r = await c.post(f"/api/v1/approvals/{once}/approve", json={"reason": "ok"}, headers=h)
        assert r.status_code == 200, r.text
        assert (r.json()["status"], r.json()["decided_by"]) == ("approved", "approver")
        r = await c.post(f"/api/v1/approvals/{window}/approve", headers=h,
                         json={"scope": "window", "max_uses": 3, "max_cost": 10})  # fmt: skip
        assert r.status_code == 200, r.text
        r = await c.post(f"/api/v1/approvals/{denied}/deny", json={}, headers=h)
        assert r.status_code == 400 and "needs a reason" in r.json()["error"]
        r = await c.post(f"/api/v1/approvals/{denied}/deny", json={"reason": "no"}, headers=h)
        assert r.status_code == 200

        again = await c.post(f"/api/v1/approvals/{once}/deny", json={"reason": "x"}, headers=h)
        assert again.status_code == 409 and "already approved" in again.json()["error"]
        unknown = await c.post("/api/v1/approvals/nope/approve", json={}, headers=h)
        assert unknown.status_code == 404 and "unknown approval" in unknown.json()["error"]
        bad = await c.post(f"/api/v1/approvals/{once}/approve", content=b"{", headers=h)
        assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]
        listed = (await c.get("/api/v1/approvals")).json()
        assert listed["pending"] == []
        assert {r["id"]: r["decided_by"] for r in listed["decided"]} == dict.fromkeys(
            env.approvals, "approver"
        )

    row = await env.approval(once)
    assert (row["status"], row["decided_by"], row["reason"], row["scope"]) == (
        "approved", "approver", "ok", "once")  # fmt: skip
    row = await env.approval(window)
    assert (row["scope"], row["max_uses"], float(row["max_cost"])) == ("window", 3, 10.0)
    row = await env.approval(denied)
    assert (row["status"], row["decided_by"], row["reason"]) == ("denied", "approver", "no")
    events = await env.store.replay(env.session_id)
    granted = [e for e in events if e.kind == ev.APPROVAL_GRANTED]
    assert [(e.payload["approval"], e.payload["by"]) for e in granted] == [
        (once, "approver"), (window, "approver")]  # fmt: skip
    [deny_event] = [e for e in events if e.kind == ev.APPROVAL_DENIED]
    assert deny_event.payload == {"approval": denied, "by": "approver", "reason": "no",
                                  "scope": "once"}  # fmt: skip


async def test_approve_through_the_page_form(env: Env) -> None:
    a = env.approvals[1]
    async with env.client() as c:
        await c.post("/login", data={"name": "approver", "secret": env.secrets["approver"]})
        page = await c.get("/approvals")
        assert page.status_code == 200 and f"approval-{a}" in page.text
        assert "support.refund" in page.text and "deadline in" in page.text
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None
        r = await c.post(f"/approvals/{a}/approve", data={"csrf": csrf.group(1), "scope": "once"})
        assert r.status_code == 303 and r.headers["location"].startswith("/approvals?msg=")
        followed = await c.get(r.headers["location"])
        assert "approved (once) by approver" in followed.text
        r = await c.post(f"/approvals/{a}/deny", data={"csrf": csrf.group(1), "reason": "late"})
        assert r.status_code == 409 and "already approved" in r.text
    row = await env.approval(a)
    assert (row["status"], row["decided_by"]) == ("approved", "approver")


async def test_an_expired_approval_cannot_be_approved(env: Env) -> None:
    a = env.approvals[0]
    env.clock.advance(timedelta(hours=2))  # past the 60 min deadline of the default chain
    async with env.client() as c:
        h = {"X-CSRF-Token": await env.login(c, "approver")}
        r = await c.post(f"/api/v1/approvals/{a}/approve", json={}, headers=h)
        assert r.status_code == 409 and "expired" in r.json()["error"]
    row = await env.approval(a)
    assert (row["status"], row["decided_by"]) == ("expired", "deadline")


# -- kill switch -----------------------------------------------------------------------------


async def test_killswitch_at_each_scope(env: Env) -> None:
    async with env.client() as c:
        h = {"X-CSRF-Token": await env.login(c, "approver")}
        r = await c.post("/api/v1/killswitch", headers=h, json={
            "scope": "worker", "target": "refunder-1", "mode": "halt_all", "reason": "looping"})  # fmt: skip
        assert r.status_code == 400 and "unknown worker 'refunder-1'" in r.json()["error"], r.text
        r = await c.post("/api/v1/killswitch", headers=h, json={
            "scope": "worker", "target": "refunder-1", "mode": "halt_all", "reason": "looping",
            "force": True})  # fmt: skip
        assert r.status_code == 200, r.text
        r = await c.post("/api/v1/killswitch", headers=h,
                         json={"scope": "worker", "mode": "halt_all", "reason": "x"})  # fmt: skip
        assert r.status_code == 400 and "needs a target" in r.json()["error"]
        r = await c.post("/api/v1/killswitch", headers=h,
                         json={"scope": "planet", "mode": "halt_all", "reason": "x"})  # fmt: skip
        assert r.status_code == 400 and "unknown scope" in r.json()["error"]
        r = await c.post("/api/v1/killswitch", headers=h, json={
            "scope": "session", "target": env.session_id, "mode": "halt_noncritical"})  # fmt: skip
        assert r.status_code == 400 and "needs a reason" in r.json()["error"]
    async with env.client() as c:
        h = {"X-CSRF-Token": await env.login(c, "admin")}
        r = await c.post("/api/v1/killswitch", headers=h,
                         json={"scope": "host", "mode": "halt_all", "reason": "incident 42"})  # fmt: skip
        assert r.status_code == 200, r.text
        r = await c.post("/api/v1/killswitch", headers=h,
                         json={"scope": "fleet", "mode": "halt_all", "reason": "all stop"})  # fmt: skip
        assert r.status_code == 400 and "confirm" in r.json()["error"]
        r = await c.post("/api/v1/killswitch", headers=h, json={
            "scope": "fleet", "mode": "halt_all", "reason": "all stop", "confirm": FLEET})  # fmt: skip
        assert r.status_code == 200, r.text
        status = (await c.get("/api/v1/killswitch")).json()
        modes = {(s["scope"], s["target"]): s["mode"] for s in status["switches"]}
        assert modes == {("host", ""): "halt_all", ("fleet", ""): "halt_all",
                         ("worker", "refunder-1"): "halt_all"}  # fmt: skip
        assert [e["payload"]["by"] for e in status["history"]] == ["admin", "admin", "approver"]
        r = await c.post("/api/v1/killswitch", headers=h,
                         json={"scope": "host", "mode": "disengaged", "reason": "fixed"})  # fmt: skip
        assert r.status_code == 200

    state = HostSwitchFile(env.config.state_dir / "killswitch.json", SECRET.encode()).read()
    assert (state.valid, state.mode.value, state.by, state.reason) == (
        True,
        "disengaged",
        "admin",
        "fixed",
    )
    rows = {
        (r["scope"], r["target"]): r
        for r in await storetools.fetchall(env.store, "kill_switches", FLEET)
    }
    assert (rows[("fleet", "")]["mode"], rows[("fleet", "")]["changed_by"]) == ("halt_all", "admin")
    worker = rows[("worker", "refunder-1")]
    assert (worker["mode"], worker["changed_by"], worker["reason"]) == (
        "halt_all",
        "approver",
        "looping",
    )
    engaged = await env.system_events(ev.KILLSWITCH_ENGAGED)
    assert [(e.payload["scope"], e.payload["by"]) for e in engaged] == [
        ("worker", "approver"), ("host", "admin"), ("fleet", "admin")]  # fmt: skip
    [off] = await env.system_events(ev.KILLSWITCH_DISENGAGED)
    assert (off.payload["scope"], off.payload["by"], off.payload["reason"]) == (
        "host",
        "admin",
        "fixed",
    )


async def test_killswitch_page_asks_to_confirm_fleet_and_emergency(env: Env) -> None:
    async with env.client() as c:
        await c.post("/login", data={"name": "admin", "secret": env.secrets["admin"]})
        csrf = env.app.state.console.sessions.get(c.cookies[COOKIE]).csrf
        form = {"csrf": csrf, "scope": "host", "mode": "emergency", "reason": "runaway"}
        r = await c.post("/killswitch", data=form)
        assert r.status_code == 200 and "Type the fleet name" in r.text
        assert env.config.state_dir.joinpath("killswitch.json").exists() is False
        r = await c.post("/killswitch", data={**form, "confirm": "wrong"})
        assert r.status_code == 400 and "confirm" in r.text
        r = await c.post("/killswitch", data={**form, "confirm": FLEET})
        assert r.status_code == 303 and "emergency" in r.headers["location"]
        page = await c.get("/killswitch")
        assert "runaway" in page.text and "emergency" in page.text
    state = HostSwitchFile(env.config.state_dir / "killswitch.json", SECRET.encode()).read()
    assert (state.mode.value, state.by) == ("emergency", "admin")


async def test_the_host_switch_needs_the_secret(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ACP_KILLSWITCH_SECRET")
    async with env.client() as c:
        h = {"X-CSRF-Token": await env.login(c, "admin")}
        r = await c.post("/api/v1/killswitch", headers=h,
                         json={"scope": "host", "mode": "halt_all", "reason": "x"})  # fmt: skip
        assert r.status_code == 400 and "no kill-switch secret" in r.json()["error"]
    assert not (env.config.state_dir / "killswitch.json").exists()


# -- repair, windows, events -----------------------------------------------------------------


async def _in_doubt_action(env: Env) -> str:
    cid = "cmd-in-doubt-1"
    status, _ = await env.store.begin_action(
        command_id=cid, operation="support.refund", params={"order": 9}, fleet=FLEET,
        session_id=env.session_id, worker="refunder-9", name="support.refund", risk="low", cost=1.0,
        critical=False, safe_to_retry=False, rule="test", correlation_id=None, agent_id=None,
        switches=NO_SWITCH_TARGET,
    )  # fmt: skip
    assert status == "started"
    async with storetools.transaction(env.store) as tx:
        await tx.execute("mark_in_doubt", cid)
    return cid


async def test_repair_resolves_in_doubt_and_restores_checkpoints(env: Env) -> None:
    cid = await _in_doubt_action(env)
    cp = await Checkpoints(env.store, FLEET).save("refunder-9", cycle=7, session_id=env.session_id,
                                                  state={"n": 7}, counters={})  # fmt: skip
    async with env.client() as c:
        h = {"X-CSRF-Token": await env.login(c, "admin")}
        repair = (await c.get("/api/v1/repair")).json()
        assert [a["command_id"] for a in repair["in_doubt"]] == [cid]
        assert [x["id"] for x in repair["checkpoints"]] == [cp]
        page = await c.get("/repair")
        assert cid in page.text and "Restore" in page.text
        r = await c.post(f"/api/v1/actions/{cid}/resolve", json={"as": "maybe"}, headers=h)
        assert r.status_code == 400
        r = await c.post(f"/api/v1/actions/{cid}/resolve", json={"as": "done"}, headers=h)
        assert r.status_code == 200, r.text
        r = await c.post(f"/api/v1/actions/{cid}/resolve", json={"as": "done"}, headers=h)
        assert r.status_code == 409  # no longer in doubt
        assert (await c.post("/api/v1/actions/nope/resolve", json={"as": "done"},
                             headers=h)).status_code == 404  # fmt: skip
        r = await c.post(f"/api/v1/checkpoints/{cp}/restore", json={}, headers=h)
        assert r.status_code == 200 and r.json()["worker"] == "refunder-9"
        assert (await c.post("/api/v1/checkpoints/999/restore", json={},
                             headers=h)).status_code == 404  # fmt: skip
    action = await env.store.get_action(cid)
    assert action is not None and (action.status, action.resolved_by) == (
        "resolved_done",
        "admin",
    )
    resume = await env.store.resume_point(fleet=FLEET, worker="refunder-9")
    assert resume is not None and resume.id == cp
    [rollback] = await env.system_events(ev.ROLLBACK)
    assert rollback.payload["by"] == "admin"


async def test_overview_windows_and_events_show_the_store(env: Env) -> None:
    await _in_doubt_action(env)
    async with env.client() as c:
        await env.login(c, "viewer")
        o = (await c.get("/api/v1/overview")).json()
        assert o["pending_approvals"] == 3 and o["in_doubt"] == 1
        assert [w["window_key"] for w in o["open_windows"]] == ["2026-11-02T09"]
        assert o["killswitch"][0] == {**o["killswitch"][0], "scope": "host", "mode": "disengaged"}
        page = await c.get("/")
        assert page.status_code == 200 and 'id="pending-count">3<' in page.text
        windows = (await c.get("/api/v1/windows")).json()["windows"]
        assert [w["window_key"] for w in windows] == ["2026-11-02T09"]
        assert (await c.get("/windows")).text.count("<svg") >= 7
        tail = (await c.get("/api/v1/events", params={"kind": ev.APPROVAL_REQUESTED})).json()
        assert [e["worker"] for e in tail["events"]] == ["refunder-2", "refunder-1", "refunder-0"]
        one = (await c.get("/api/v1/events", params={"worker": "refunder-1"})).json()["events"]
        assert {e["worker"] for e in one} == {"refunder-1"}
        by_cmd = (await c.get("/api/v1/events", params={"command_id": "cmd-in-doubt-1"})).json()
        assert [e["kind"] for e in by_cmd["events"]] == [ev.ACTION_STARTED]
        assert (await c.get("/api/v1/events", params={"limit": "x"})).status_code == 400
        page = await c.get("/events", params={"worker": "refunder-1"})
        assert (
            page.status_code == 200 and "refunder-1" in page.text and "refunder-2" not in page.text
        )
        replay = (await c.get(f"/api/v1/sessions/{env.session_id}/events")).json()["events"]
        assert [e["seq"] for e in replay] == list(range(1, len(replay) + 1))
        assert (await c.get(f"/sessions/{env.session_id}/events")).status_code == 200
        assert (await c.get("/api/v1/sessions/nope/events")).status_code == 404
        assert (await c.get("/sessions/nope/events")).status_code == 404
        assert json.loads((await c.get("/api/v1/approvals")).text)["pending"][0]["params"] == {
            "order": 0
        }


async def test_workers_of_a_silent_host_show_as_stalled(env: Env) -> None:
    now = env.clock.now()
    await env.store.take_host(fleet=FLEET, host_id="host-a", instance="i1", pid=1, at=now)
    await env.store.take_host(fleet=FLEET, host_id="host-b", instance="i2", pid=2,
                              at=now - timedelta(minutes=5))  # fmt: skip
    for name, host, state in (("w-a", "host-a", "running"), ("w-b", "host-b", "running"),
                              ("w-q", "host-b", "quarantined")):  # fmt: skip
        await env.store.record_worker(fleet=FLEET, name=name, host=host, state=state, restarts=0,
                                      last_error=None, cycle=3, session_id=None, at=now)  # fmt: skip
    async with env.client() as c:
        await env.login(c, "viewer")
        workers = {
            w["name"]: w["state"] for w in (await c.get("/api/v1/overview")).json()["workers"]
        }
        assert workers == {"w-a": "running", "w-b": "stalled", "w-q": "quarantined"}
        assert 'class="state-stalled"' in (await c.get("/")).text


async def test_a_store_failure_is_a_clear_503(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from supervisor.errors import StoreUnavailable

    async with env.client() as c:
        h = {"X-CSRF-Token": await env.login(c, "approver")}

        def down(*_args: Any) -> Any:
            raise StoreUnavailable("connection refused")

        # The database goes away under the store: every read and write fails at the backend.
        monkeypatch.setattr(env.store.backend, "reader", down)
        monkeypatch.setattr(env.store.backend, "transaction", down)
        monkeypatch.setattr(env.store.backend, "read_off_loop", down)
        r = await c.get("/api/v1/overview")
        assert r.status_code == 503 and "store failed" in r.json()["error"]
        r = await c.post(f"/api/v1/approvals/{env.approvals[0]}/approve", json={}, headers=h)
        assert r.status_code == 503
        page = await c.get("/approvals")
        assert page.status_code == 503 and "connection refused" in page.text

"""The console's ASGI app: pages (HTML forms, readable without JavaScript) and /api/v1 (JSON).

Every operation is written once (`_op_*`) and reached from both a page form and the API. Each
state-changing request needs a logged-in operator with the right role and the session's CSRF
token (form field `csrf`, or header `X-CSRF-Token`); decisions go through the CLI's own code
(Approvals.decide, commands.set_switch, recovery.resolve_in_doubt, Checkpoints.restore) with
the operator's name as `by`.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any
from urllib.parse import quote

import anyio
import structlog
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import events as ev
from ..cli import tables
from ..config import Config
from ..errors import StoreError, SupervisorError
from ..governance.approvals import Approvals
from ..killswitch import Mode
from ..runtime.checkpoints import Checkpoints
from ..store import NewEvent, Store, open_store, system_stream
from ..store import console as q
from ..timing.clock import SystemClock
from . import charts
from .auth import (
    LoginLimiter,
    LoginSession,
    OperatorsFile,
    Role,
    Sessions,
    allows,
    csrf_ok,
    hash_secret,
)

log = structlog.get_logger("supervisor.console")

COOKIE = "acp_console"
_PACKAGE = resources.files("supervisor.console")
SCOPES = ("worker", "session", "host", "fleet")
MODES = tuple(m.value for m in Mode)


class ConsoleError(Exception):
    """A request the console refuses: a status and one clear message; nothing was changed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Caller:
    """Who is asking: the logged-in operator and their session."""

    session: LoginSession

    @property
    def name(self) -> str:
        return self.session.operator

    @property
    def role(self) -> Role:
        return self.session.role


class Console:
    """The state one console process holds: config, store, operators, sessions, limiter."""

    def __init__(self, config: Config, store: Store | None = None) -> None:
        self.config = config
        self.store_: Store | None = store
        self._own_store = store is None
        self.operators = OperatorsFile(config.console.operators_path(config.state_dir))
        self.sessions = Sessions(config.console.session_ttl)
        self.limiter = LoginLimiter(config.console.login_attempts, config.console.login_window)
        self.templates = Environment(
            loader=FileSystemLoader(str(_PACKAGE / "templates")),
            autoescape=select_autoescape(["html", "svg"]),
        )
        self.templates.filters["age"] = _age
        # instants as the CLI's tables show them: the configured zone, to the second
        self.templates.filters["when"] = lambda v: tables.when(v, config.timezone)
        self.templates.filters["json"] = lambda v: json.dumps(v, sort_keys=True)

    @property
    def store(self) -> Store:
        assert self.store_ is not None, "the console's store is opened by its lifespan"
        return self.store_

    @property
    def fleet(self) -> str:
        return self.config.fleet

    async def open(self) -> None:
        if self.store_ is None:
            self.store_ = await open_store(self.config.db_url, SystemClock())

    async def close(self) -> None:
        if self._own_store and self.store_ is not None:
            await self.store_.close()
            self.store_ = None

    def now(self) -> datetime:
        return self.store.clock.now()

    # -- authentication ----------------------------------------------------------------------

    def caller(
        self, request: Request, needed: Role, *, write: bool, csrf: str | None = None
    ) -> Caller:
        session = self.sessions.get(request.cookies.get(COOKIE))
        if session is None:
            raise ConsoleError(401, "not logged in, or the session expired: log in again")
        if not allows(session.role, needed):
            raise ConsoleError(403, f"operator {session.operator} ({session.role}) may not do "
                                    f"this: it needs the {needed} role")  # fmt: skip
        if write:
            presented = csrf if csrf is not None else request.headers.get("x-csrf-token")
            if not csrf_ok(session, presented):
                raise ConsoleError(403, "missing or wrong CSRF token: reload the page and retry")
        return Caller(session)

    async def login(self, request: Request, name: str, secret: str) -> LoginSession:
        client = request.client.host if request.client else "unknown"
        keys = (f"client:{client}", f"name:{name}")
        wait = self.limiter.retry_after(*keys)
        if wait > 0:
            await self._record_login(
                ev_kind=LOGIN_FAILED, name=name, client=client, why="rate_limited"
            )
            raise ConsoleError(429, f"too many failed logins: try again in {int(wait) + 1} s")
        operator = self.operators.load().get(name)
        # scrypt takes tens of milliseconds: in a thread, so other requests go on meanwhile. An
        # unknown name costs the same as a wrong secret, so timing does not tell names apart.
        check = operator or _DECOY
        ok = await anyio.to_thread.run_sync(check.verify, secret)
        if operator is None or not ok:
            self.limiter.failed(*keys)
            await self._record_login(
                ev_kind=LOGIN_FAILED, name=name, client=client, why="bad_credentials"
            )
            raise ConsoleError(401, "unknown operator or wrong secret")
        session = self.sessions.create(operator)
        await self._record_login(ev_kind=LOGIN, name=name, client=client, why="ok")
        return session

    async def _record_login(self, *, ev_kind: str, name: str, client: str, why: str) -> None:
        (log.info if why == "ok" else log.warning)(
            "console.login", operator=name, client=client, outcome=why
        )
        try:
            await self.store.append(NewEvent(kind=ev_kind, session_id=system_stream(self.fleet),
                                             reason=why, payload={"operator": name[:64], "client": client}))  # fmt: skip
        except StoreError as exc:
            # A store outage must not lock operators out: the host kill switch works without it.
            log.warning("console.login_unrecorded", operator=name, error=str(exc))

    # -- reads -------------------------------------------------------------------------------

    async def host_switch(self) -> dict[str, Any]:
        from ..killswitch import engage

        state = engage.host_switch(self.config).read()
        return {"scope": "host", "target": "", "mode": state.mode.value, "valid": state.valid,
                "problem": state.problem, "changed_by": state.by, "reason": state.reason,
                "updated_at": state.at, "seq": state.seq}  # fmt: skip

    async def switches(self) -> list[dict[str, Any]]:
        return [await self.host_switch(), *await q.store_switches(self.store, self.fleet)]

    async def overview(self) -> dict[str, Any]:
        store, fleet = self.store, self.fleet
        open_windows = await store.open_sessions(fleet)
        pending, oldest = await q.pending_summary(store, fleet)
        now = self.now()
        hosts = await q.hosts(store, fleet)
        return {
            "fleet": fleet,
            "now": now.isoformat(),
            "hosts": hosts,
            "workers": self._stalled(await q.workers(store, fleet), hosts, now),
            "open_windows": [w.as_dict() for w in open_windows],
            "killswitch": await self.switches(),
            "pending_approvals": pending,
            "oldest_pending_at": oldest.isoformat() if oldest else None,
            "oldest_pending_age": (now - oldest).total_seconds() if oldest else None,
            "in_doubt": await q.in_doubt_count(store, fleet),
            "alerts": [e.as_dict() for e in await q.active_alerts(store, fleet, open_windows)],
        }

    def _stalled(self, workers: list[dict[str, Any]], hosts: list[dict[str, Any]],
                 now: datetime) -> list[dict[str, Any]]:  # fmt: skip
        """A worker whose host stopped sending heartbeats is shown `stalled`, whatever it last
        reported: nobody is running it until its slot is adopted or the host comes back."""
        silent = {h["host_id"] for h in hosts if h["status"] == "running"
                  and (now - datetime.fromisoformat(h["heartbeat_at"])).total_seconds()
                  > self.config.lease_ttl}  # fmt: skip
        for w in workers:
            if w["host"] in silent and w["state"] in ("starting", "running", "backoff"):
                w["reported_state"], w["state"] = w["state"], "stalled"
        return workers

    async def approvals_view(self) -> dict[str, Any]:
        now = self.now()
        pending = await q.pending_approvals(self.store, self.fleet)
        for row in pending:
            row["params"] = json.loads(row["params"])
            row["seconds_left"] = (datetime.fromisoformat(row["deadline"]) - now).total_seconds()
            row["age"] = (now - datetime.fromisoformat(row["created_at"])).total_seconds()
        decided = await q.decided_approvals(self.store, self.fleet)
        for row in decided:
            row["params"] = json.loads(row["params"])
        return {"pending": pending, "decided": decided}

    # -- operations (one each, for the pages and the API) -------------------------------------

    async def op_decide(self, caller: Caller, approval_id: str, data: Mapping[str, Any],
                        *, approve: bool) -> dict[str, Any]:  # fmt: skip
        row = await q.approval(self.store, approval_id)
        if row is None or row["fleet"] != self.fleet:
            raise ConsoleError(404, f"unknown approval {approval_id!r}")
        reason = _text(data.get("reason"))
        if not approve and not reason:
            raise ConsoleError(400, "a denial needs a reason")
        scope = _text(data.get("scope")) or "once"
        if scope not in ("once", "window"):
            raise ConsoleError(400, f"unknown approval scope {scope!r} (once, window)")
        max_uses = _number(data.get("max_uses"), int, "max_uses")
        max_cost = _number(data.get("max_cost"), float, "max_cost")
        if scope == "once" and (max_uses is not None or max_cost is not None):
            raise ConsoleError(400, "max_uses and max_cost bound a window-scoped grant only")
        approvals = Approvals(self.store, self.config.approvals, self.fleet)
        try:
            decided = await approvals.decide(approval_id, approve=approve, by=caller.name,
                                             reason=reason, scope=scope, max_uses=max_uses,
                                             max_cost=max_cost)  # fmt: skip
        except SupervisorError as exc:  # already decided, expired, decided meanwhile
            raise ConsoleError(409, str(exc)) from None
        log.info("console.approval", approval=approval_id, status=decided.status, by=caller.name)
        return {**decided.as_dict(), "params": decided.params}

    async def op_switch(self, caller: Caller, data: Mapping[str, Any]) -> dict[str, Any]:
        from ..killswitch.engage import set_switch

        scope = _text(data.get("scope")) or "host"
        target = _text(data.get("target")) or ""
        mode_text = _text(data.get("mode")) or ""
        reason = _text(data.get("reason"))
        if scope not in SCOPES:
            raise ConsoleError(400, f"unknown scope {scope!r} ({', '.join(SCOPES)})")
        if mode_text not in MODES:
            raise ConsoleError(400, f"unknown mode {mode_text!r} ({', '.join(MODES)})")
        if scope in ("worker", "session") and not target:
            raise ConsoleError(400, f"scope {scope} needs a target ({scope} name or id)")
        if scope in ("host", "fleet"):
            target = ""
        if not reason:
            raise ConsoleError(400, "a kill-switch change needs a reason")
        if scope in ("host", "fleet") and not allows(caller.role, Role.ADMIN):
            raise ConsoleError(403, f"operator {caller.name} ({caller.role}) may not change the "
                                    f"{scope} switch: it needs the admin role")  # fmt: skip
        mode = Mode(mode_text)
        if needs_confirm(scope, mode) and _text(data.get("confirm")) != self.fleet:
            raise ConsoleError(400, f"{scope} scope and emergency mode need confirm = the fleet "
                                    f"name ({self.fleet!r})")  # fmt: skip
        try:
            # `force`: a worker or session this config does not know yet (the CLI's --force).
            await set_switch(self.config, scope=scope, target=target, mode=mode,
                             reason=reason, by=caller.name, force=data.get("force") is True)  # fmt: skip
        except SupervisorError as exc:
            raise ConsoleError(409 if exc.exit_code != 2 else 400, str(exc)) from None
        log.info("console.killswitch", scope=scope, target=target, mode=mode.value, by=caller.name)
        return {"scope": scope, "target": target, "mode": mode.value, "by": caller.name,
                "reason": reason}  # fmt: skip

    async def op_resolve(
        self, caller: Caller, command_id: str, data: Mapping[str, Any]
    ) -> dict[str, Any]:
        from ..runtime import recovery

        verdict = _text(data.get("as"))
        if verdict not in ("done", "failed"):
            raise ConsoleError(400, "resolve needs as = done or failed")
        row = await self.store.get_action(command_id)
        if row is None or row.fleet != self.fleet:
            raise ConsoleError(404, f"unknown action {command_id!r}")
        try:
            await recovery.resolve_in_doubt(self.store, command_id, done=verdict == "done",
                                            by=caller.name)  # fmt: skip
        except SupervisorError as exc:
            raise ConsoleError(409, str(exc)) from None
        return {"command_id": command_id, "as": verdict, "by": caller.name}

    async def op_restore(self, caller: Caller, checkpoint_id: str) -> dict[str, Any]:
        if not checkpoint_id.isdigit():
            raise ConsoleError(404, f"unknown checkpoint {checkpoint_id!r}")
        try:
            cp = await Checkpoints(self.store, self.fleet).restore(
                int(checkpoint_id), by=caller.name
            )
        except SupervisorError as exc:
            raise ConsoleError(404 if exc.reason == "not_found" else 409, str(exc)) from None
        return {"checkpoint": cp.id, "worker": cp.worker, "cycle": cp.cycle, "by": caller.name}


_DECOY = hash_secret("decoy", Role.VIEWER, secrets.token_urlsafe(16), created_at="")
LOGIN = ev.CONSOLE_LOGIN
LOGIN_FAILED = ev.CONSOLE_LOGIN_FAILED


def needs_confirm(scope: str, mode: Mode) -> bool:
    """The fleet scope and emergency mode are the two big hammers: a second, typed step."""
    return scope == "fleet" or mode is Mode.EMERGENCY


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConsoleError(400, f"expected text, got {type(value).__name__}")
    return value.strip() or None


def _number(value: Any, kind: type[int] | type[float], name: str) -> Any:
    if value is None or value == "":
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConsoleError(400, f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or number <= 0:
        raise ConsoleError(400, f"{name} must be positive, got {value!r}")
    return number


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    sign = "-" if seconds < 0 else ""
    s = abs(int(seconds))
    if s < 120:
        return f"{sign}{s}s"
    if s < 7200:
        return f"{sign}{s // 60}m {s % 60:02d}s"
    if s < 172800:
        return f"{sign}{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{sign}{s // 86400}d {s % 86400 // 3600}h"


# -- the ASGI app -----------------------------------------------------------------------------

Handler = Callable[[Request], Awaitable[Response]]


def create_app(config: Config, store: Store | None = None) -> Starlette:
    """The console app; with `store` given (tests, the daemon) it uses that store and leaves
    closing it to the caller, else it opens its own in its lifespan."""
    console = Console(config, store)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await console.open()
        try:
            yield
        finally:
            await console.close()

    def secure(request: Request) -> bool:
        return request.url.scheme == "https"

    def set_cookie(request: Request, response: Response, session: LoginSession) -> None:
        response.set_cookie(COOKIE, session.token, max_age=int(config.console.session_ttl),
                            httponly=True, samesite="strict", secure=secure(request), path="/")  # fmt: skip

    def render(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        session = console.sessions.get(request.cookies.get(COOKIE))
        body = console.templates.get_template(name).render(
            request=request, me=session, fleet=console.fleet, message=request.query_params.get("msg"),
            error=request.query_params.get("err"), **ctx,
        )  # fmt: skip
        return HTMLResponse(body, status_code=status, headers=_SECURITY_HEADERS)

    def page(needed: Role = Role.VIEWER) -> Callable[[Callable[..., Awaitable[Response]]], Handler]:
        def wrap(fn: Callable[..., Awaitable[Response]]) -> Handler:
            async def handler(request: Request) -> Response:
                try:
                    caller = console.caller(request, needed, write=False)
                except ConsoleError as exc:
                    if exc.status == 401:
                        return RedirectResponse(f"/login?next={quote(request.url.path)}", 303)
                    return render(request, "error.html", exc.status, problem=exc.message)
                try:
                    return await fn(request, caller)
                except ConsoleError as exc:
                    return render(request, "error.html", exc.status, problem=exc.message)

            return handler

        return wrap

    def action(needed: Role, back: str) -> Callable[[Callable[..., Awaitable[str]]], Handler]:
        """A form POST: CSRF and role checked, the operation run, then back to `back` with a
        message (303, so a reload does not post again) or the error page with its status."""

        def wrap(fn: Callable[..., Awaitable[str]]) -> Handler:
            async def handler(request: Request) -> Response:
                form = await request.form()
                data = {k: v for k, v in form.items() if isinstance(v, str)}
                try:
                    caller = console.caller(request, needed, write=True, csrf=data.get("csrf"))
                    done = await fn(request, caller, data)
                except ConsoleError as exc:
                    if exc.status == 401:
                        return RedirectResponse("/login", 303)
                    return render(request, "error.html", exc.status, problem=exc.message, back=back)
                if done.startswith("/"):
                    return RedirectResponse(done, 303)
                return RedirectResponse(f"{back}?msg={quote(done)}", 303)

            return handler

        return wrap

    def api(
        needed: Role, *, write: bool = False
    ) -> Callable[[Callable[..., Awaitable[Any]]], Handler]:
        def wrap(fn: Callable[..., Awaitable[Any]]) -> Handler:
            async def handler(request: Request) -> Response:
                try:
                    caller = console.caller(request, needed, write=write)
                    data: Mapping[str, Any] = {}
                    if write:
                        data = await _json_body(request)
                    result = await fn(request, caller, data)
                except ConsoleError as exc:
                    return JSONResponse({"error": exc.message}, exc.status)
                return JSONResponse(result)

            return handler

        return wrap

    # -- login --------------------------------------------------------------------------------

    async def login_page(request: Request) -> Response:
        return render(request, "login.html", next=_safe_next(request.query_params.get("next")))

    async def login_post(request: Request) -> Response:
        form = await request.form()
        name, secret = str(form.get("name") or "").strip(), str(form.get("secret") or "")
        target = _safe_next(str(form.get("next") or ""))
        try:
            session = await console.login(request, name, secret)
        except ConsoleError as exc:
            return render(request, "login.html", exc.status, problem=exc.message, next=target)
        response = RedirectResponse(target, 303)
        set_cookie(request, response, session)
        return response

    async def logout_post(request: Request) -> Response:
        form = await request.form()
        session = console.sessions.get(request.cookies.get(COOKIE))
        if session is not None and csrf_ok(session, str(form.get("csrf") or "")):
            console.sessions.end(session.token)
        response = RedirectResponse("/login", 303)
        response.delete_cookie(COOKIE, path="/")
        return response

    async def api_login(request: Request) -> Response:
        try:
            data = await _json_body(request)
            session = await console.login(request, _text(data.get("name")) or "",
                                          str(data.get("secret") or ""))  # fmt: skip
        except ConsoleError as exc:
            return JSONResponse({"error": exc.message}, exc.status)
        response = JSONResponse({"operator": session.operator, "role": session.role.value,
                                 "csrf": session.csrf,
                                 "expires_in": int(config.console.session_ttl)})  # fmt: skip
        set_cookie(request, response, session)
        return response

    @api(Role.VIEWER, write=True)
    async def api_logout(request: Request, caller: Caller, _data: Mapping[str, Any]) -> Any:
        console.sessions.end(caller.session.token)
        return {"logged_out": caller.name}

    # -- pages --------------------------------------------------------------------------------

    @page()
    async def overview_page(request: Request, caller: Caller) -> Response:
        return render(request, "overview.html", o=await console.overview(), refresh=10)

    @page()
    async def approvals_page(request: Request, caller: Caller) -> Response:
        return render(request, "approvals.html", a=await console.approvals_view(),
                      can_decide=allows(caller.role, Role.APPROVER), refresh=None)  # fmt: skip

    @action(Role.APPROVER, "/approvals")
    async def approve_post(request: Request, caller: Caller, data: dict[str, str]) -> str:
        row = await console.op_decide(caller, request.path_params["id"], data, approve=True)
        return f"approval {row['id'][:12]} approved ({row['scope']}) by {caller.name}"

    @action(Role.APPROVER, "/approvals")
    async def deny_post(request: Request, caller: Caller, data: dict[str, str]) -> str:
        row = await console.op_decide(caller, request.path_params["id"], data, approve=False)
        return f"approval {row['id'][:12]} denied by {caller.name}"

    @page()
    async def killswitch_page(request: Request, caller: Caller) -> Response:
        history = [e.as_dict() for e in await q.killswitch_history(console.store, console.fleet)]
        return render(request, "killswitch.html", switches=await console.switches(),
                      history=history, scopes=SCOPES, modes=MODES[1:],
                      can_switch=allows(caller.role, Role.APPROVER),
                      is_admin=allows(caller.role, Role.ADMIN))  # fmt: skip

    async def killswitch_post(request: Request) -> Response:
        form = await request.form()
        data = {k: v for k, v in form.items() if isinstance(v, str)}
        try:
            caller = console.caller(request, Role.APPROVER, write=True, csrf=data.get("csrf"))
            mode = data.get("mode", "")
            if (mode in MODES and needs_confirm(data.get("scope", ""), Mode(mode))
                    and "confirm" not in data):  # fmt: skip
                # The second step: show what will happen and ask for the fleet's name.
                return render(request, "confirm.html", d=data)
            done = await console.op_switch(caller, data)
        except ConsoleError as exc:
            if exc.status == 401:
                return RedirectResponse("/login", 303)
            return render(
                request, "error.html", exc.status, problem=exc.message, back="/killswitch"
            )
        where = done["scope"] + (f" {done['target']}" if done["target"] else "")
        msg = f"kill switch {where}: {done['mode']} (by {caller.name})"
        return RedirectResponse(f"/killswitch?msg={quote(msg)}", 303)

    @page()
    async def windows_page(request: Request, caller: Caller) -> Response:
        rows = await q.windows(console.store, console.fleet)
        return render(request, "windows.html", windows=rows, charts=charts.trend_charts(rows))

    @page()
    async def events_page(request: Request, caller: Caller) -> Response:
        f = _filters(request)
        events = [e.as_dict() for e in await q.tail(console.store, console.fleet, **f)]
        return render(request, "events.html", events=events, f=f, refresh=5, replay=None)

    @page()
    async def replay_page(request: Request, caller: Caller) -> Response:
        session_id = request.path_params["id"]
        events = [e.as_dict() for e in await console.store.replay(session_id, 0, 10_000)]
        if not events and await console.store.get_session(session_id) is None:
            return render(request, "error.html", 404, problem=f"unknown session {session_id!r}")
        return render(request, "events.html", events=events, f={}, refresh=None, replay=session_id)

    @page()
    async def repair_page(request: Request, caller: Caller) -> Response:
        return render(request, "repair.html",
                      in_doubt=await q.in_doubt_actions(console.store, console.fleet),
                      checkpoints=await q.checkpoints(console.store, console.fleet),
                      is_admin=allows(caller.role, Role.ADMIN))  # fmt: skip

    @action(Role.ADMIN, "/repair")
    async def resolve_post(request: Request, caller: Caller, data: dict[str, str]) -> str:
        done = await console.op_resolve(caller, request.path_params["id"], data)
        return f"action {done['command_id'][:12]} resolved as {done['as']} by {caller.name}"

    @action(Role.ADMIN, "/repair")
    async def restore_post(request: Request, caller: Caller, data: dict[str, str]) -> str:
        done = await console.op_restore(caller, request.path_params["id"])
        return (f"worker {done['worker']} resumes from checkpoint {done['checkpoint']} "
                f"(cycle {done['cycle']}) at its next start")  # fmt: skip

    # -- the JSON API -------------------------------------------------------------------------

    @api(Role.VIEWER)
    async def api_overview(request: Request, caller: Caller, _d: Any) -> Any:
        return await console.overview()

    @api(Role.VIEWER)
    async def api_approvals(request: Request, caller: Caller, _d: Any) -> Any:
        return await console.approvals_view()

    @api(Role.APPROVER, write=True)
    async def api_approve(request: Request, caller: Caller, data: Mapping[str, Any]) -> Any:
        return await console.op_decide(caller, request.path_params["id"], data, approve=True)

    @api(Role.APPROVER, write=True)
    async def api_deny(request: Request, caller: Caller, data: Mapping[str, Any]) -> Any:
        return await console.op_decide(caller, request.path_params["id"], data, approve=False)

    @api(Role.VIEWER)
    async def api_killswitch(request: Request, caller: Caller, _d: Any) -> Any:
        history = await q.killswitch_history(console.store, console.fleet)
        return {"switches": await console.switches(), "history": [e.as_dict() for e in history]}

    @api(Role.APPROVER, write=True)
    async def api_killswitch_post(request: Request, caller: Caller, data: Mapping[str, Any]) -> Any:
        return await console.op_switch(caller, data)

    @api(Role.VIEWER)
    async def api_windows(request: Request, caller: Caller, _d: Any) -> Any:
        return {"windows": await q.windows(console.store, console.fleet)}

    @api(Role.VIEWER)
    async def api_events(request: Request, caller: Caller, _d: Any) -> Any:
        events = await q.tail(console.store, console.fleet, **_filters(request))
        return {"events": [e.as_dict() for e in events]}

    @api(Role.VIEWER)
    async def api_replay(request: Request, caller: Caller, _d: Any) -> Any:
        session_id = request.path_params["id"]
        after = _int_param(request, "after", 0)
        events = await console.store.replay(session_id, after, 10_000)
        if not events and await console.store.get_session(session_id) is None \
                and session_id != system_stream(console.fleet):  # fmt: skip
            raise ConsoleError(404, f"unknown session {session_id!r}")
        return {"session": session_id, "events": [e.as_dict() for e in events]}

    @api(Role.VIEWER)
    async def api_repair(request: Request, caller: Caller, _d: Any) -> Any:
        return {"in_doubt": await q.in_doubt_actions(console.store, console.fleet),
                "checkpoints": await q.checkpoints(console.store, console.fleet)}  # fmt: skip

    @api(Role.ADMIN, write=True)
    async def api_resolve(request: Request, caller: Caller, data: Mapping[str, Any]) -> Any:
        return await console.op_resolve(caller, request.path_params["id"], data)

    @api(Role.ADMIN, write=True)
    async def api_restore(request: Request, caller: Caller, _data: Mapping[str, Any]) -> Any:
        return await console.op_restore(caller, request.path_params["id"])

    routes = [
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login_post, methods=["POST"]),
        Route("/logout", logout_post, methods=["POST"]),
        Route("/", overview_page, methods=["GET"]),
        Route("/approvals", approvals_page, methods=["GET"]),
        Route("/approvals/{id}/approve", approve_post, methods=["POST"]),
        Route("/approvals/{id}/deny", deny_post, methods=["POST"]),
        Route("/killswitch", killswitch_page, methods=["GET"]),
        Route("/killswitch", killswitch_post, methods=["POST"]),
        Route("/windows", windows_page, methods=["GET"]),
        Route("/events", events_page, methods=["GET"]),
        Route("/sessions/{id}/events", replay_page, methods=["GET"]),
        Route("/repair", repair_page, methods=["GET"]),
        Route("/repair/actions/{id}/resolve", resolve_post, methods=["POST"]),
        Route("/repair/checkpoints/{id}/restore", restore_post, methods=["POST"]),
        Route("/api/v1/login", api_login, methods=["POST"]),
        Route("/api/v1/logout", api_logout, methods=["POST"]),
        Route("/api/v1/overview", api_overview, methods=["GET"]),
        Route("/api/v1/approvals", api_approvals, methods=["GET"]),
        Route("/api/v1/approvals/{id}/approve", api_approve, methods=["POST"]),
        Route("/api/v1/approvals/{id}/deny", api_deny, methods=["POST"]),
        Route("/api/v1/killswitch", api_killswitch, methods=["GET"]),
        Route("/api/v1/killswitch", api_killswitch_post, methods=["POST"]),
        Route("/api/v1/windows", api_windows, methods=["GET"]),
        Route("/api/v1/events", api_events, methods=["GET"]),
        Route("/api/v1/sessions/{id}/events", api_replay, methods=["GET"]),
        Route("/api/v1/repair", api_repair, methods=["GET"]),
        Route("/api/v1/actions/{id}/resolve", api_resolve, methods=["POST"]),
        Route("/api/v1/checkpoints/{id}/restore", api_restore, methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(_PACKAGE / "static")), name="static"),
    ]

    async def store_failed(request: Request, exc: Exception) -> Response:
        message = f"the store failed, nothing was changed: {exc}"
        log.warning("console.store_failed", path=request.url.path, error=str(exc))
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, 503)
        return render(request, "error.html", 503, problem=message)

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={StoreError: store_failed})
    app.state.console = console
    return app


_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


async def _json_body(request: Request) -> Mapping[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ConsoleError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConsoleError(400, "the body must be a JSON object")
    return data


def _safe_next(value: str | None) -> str:
    # Only a path on this console: never an open redirect to another site.
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/"


def _int_param(request: Request, name: str, default: int) -> int:
    value = request.query_params.get(name)
    if value in (None, ""):
        return default
    if not value.isdigit():
        raise ConsoleError(400, f"{name} must be a whole number, got {value!r}")
    return int(value)


def _filters(request: Request) -> dict[str, Any]:
    p = request.query_params
    limit = min(_int_param(request, "limit", 200), 1000)
    before = _int_param(request, "before", q.NEWEST)
    return {"worker": p.get("worker", "").strip(), "kind": p.get("kind", "").strip(),
            "session": p.get("session", "").strip(), "command_id": p.get("command_id", "").strip(),
            "before": before, "limit": limit}  # fmt: skip

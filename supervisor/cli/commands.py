"""What each CLI subcommand does. Parsing lives in cli.py; each handler returns an exit code."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from datetime import datetime, timedelta
from typing import Any

import structlog

from .. import simruns
from ..config import Config
from ..errors import NotFound, StoreConfigError, UsageError
from ..governance.approvals import Approvals
from ..killswitch import Mode, engage, load_secret
from ..ops.scorecard import compute
from ..runtime import recovery
from ..runtime.checkpoints import Checkpoints
from ..runtime.daemon import Daemon
from ..simruns import open_fleet_store
from ..statedir import make_state_dir
from ..store import open_store, system_stream
from ..store.records import ActionStatus
from ..timing.clock import SystemClock
from . import tables
from .tables import emit

log = structlog.get_logger(__name__)


def ensure_state_dir(config: Config) -> None:
    """The state directory, created when missing; a path that cannot be made is a config error."""
    try:
        make_state_dir(config.state_dir)
    except OSError as exc:
        raise StoreConfigError(
            f"cannot create the state directory {config.state_dir}: {exc.strerror or exc}"
        ) from None


async def run(args: argparse.Namespace, config: Config) -> int:
    if args.start is not None and not args.simulate:
        raise UsageError("--start goes with --simulate")
    if args.simulate and args.horizon is None:
        raise UsageError("--simulate needs --horizon hour|day|week|month")
    start = args.start
    if start is not None and start.tzinfo is None:
        start = start.replace(tzinfo=config.timezone)  # a local time in the configured zone
    sim = None
    if args.simulate and not config.db_explicit:
        # A simulation writes windows in simulated time; it never shares the real fleet's store,
        # nor another simulation's: each run has its own database (see simruns).
        import os

        from ..runtime.daemon import build_factories

        build_factories(config)  # config problems before the run's folder is made
        load_secret(dict(os.environ), config.killswitch_secret_file)
        ensure_state_dir(config)
        sim, resumed = simruns.begin(
            config.state_dir, horizon=args.horizon, start=start,
            seed=config.seed if args.seed is None else args.seed, config=config.path,
            now=SystemClock().now(),
        )  # fmt: skip
        log.info("run.simulation", run=sim.id, path=str(sim.path), resumed=resumed)
        config = dataclasses.replace(config, db_url=sim.db_url)

    def reload() -> Config:
        import os

        from ..config import load_config

        return load_config(args.config or os.environ.get("ACP_CONFIG") or None, db=args.db,
                           state_dir=args.state_dir)  # fmt: skip

    daemon = Daemon(config, horizon=args.horizon, simulate=args.simulate, start=start,
                    seed=args.seed, reload_config=None if args.simulate else reload,
                    effects_dir=sim.path if sim else None)  # fmt: skip
    card = await daemon.run()
    if sim is not None and daemon.finished:
        simruns.finish(sim, SystemClock().now(), clock=daemon.clock.now())
    # The daemon logged the scorecard (`run.scorecard`); stdout gets it only when asked for JSON
    # or when a person is watching, so a pipe or the journal never mixes text into the log stream.
    if card is not None and (args.json or sys.stdout.isatty()):
        data, text = card.as_dict(), card.render()
        if sim is not None:
            data["run"] = sim.id
            text += f"\nsimulated run {sim.id}: read it again with --run {sim.id} (or --run latest)"
        emit(args, data, text)
    return 0


def _reading_now(config: Config) -> datetime:
    """What ages in a table count from: now, or a finished simulated run's clock at its end."""
    return simruns.clock_at_end(config.db_url) or SystemClock().now()


async def db_migrate(args: argparse.Namespace, config: Config) -> int:
    ensure_state_dir(config)
    store = await open_store(config.db_url, SystemClock(), migrate=True,
                             new=getattr(args, "new", False))  # fmt: skip
    try:
        versions = await store.backend.schema_versions() or []
        print(f"schema at version {max(versions)} ({config.db_url.split('?')[0]})")
    finally:
        await store.close()
    return 0


async def status(args: argparse.Namespace, config: Config) -> int:
    store = await open_fleet_store(config)
    try:
        workers = [w.as_dict() for w in await store.list_workers(config.fleet)]
        for w in workers:
            if w["cycle"] is not None and w["cycle"] < 0:
                w["cycle"] = None  # a worker that never ran has no cycle yet
        windows = [s.as_dict() for s in await store.open_sessions(config.fleet)]
        backlog = await store.approval_backlog(fleet=config.fleet)
        actions = {
            status.value: n
            for status, n in (await store.count_actions_by_status(config.fleet)).items()
        }
        switches = await engage.switch_states(store, config)
        hosts = [h.as_dict() for h in await store.host_views(config.fleet)]
    finally:
        await store.close()
    data = {"fleet": config.fleet, "hosts": hosts, "workers": workers, "open_windows": windows,
            "pending_approvals": backlog.pending,
            "oldest_pending_at": backlog.oldest_at.isoformat() if backlog.oldest_at else None,
            "actions": actions, "killswitch": switches}  # fmt: skip
    tz, now = config.timezone, _reading_now(config)
    oldest = backlog.oldest_at
    lines = [
        f"fleet {config.fleet}",
        "kill switch: " + "; ".join(_switch_summary(s) for s in switches),
        "open windows: " + (", ".join(w["window_key"] for w in windows) or "none"),
        f"pending approvals: {data['pending_approvals']}"
        + (f" (oldest {tables.relative(oldest, now)})" if oldest else "")
        + f"   in-doubt actions: {actions.get('in_doubt', 0)}",
    ]
    if hosts:
        lines += ["", tables.table(
            ["HOST", "STATUS", "HEARTBEAT", "LEADER", "SLOTS"],
            ([h["host_id"], h["status"], f"{tables.when(h['heartbeat_at'], tz)} "
              f"({tables.relative(h['heartbeat_at'], now)})", "yes" if h["leader"] else "-",
              ", ".join(h["slots"]) or "-"] for h in hosts), "")]  # fmt: skip
    lines += ["", tables.table(
        ["WORKER", "STATE", "CYCLE", "RESTARTS", "UPDATED", "LAST ERROR"],
        ([w["name"], w["state"], "-" if w["cycle"] is None else w["cycle"], w["restarts"],
          tables.when(w["updated_at"], tz), w["last_error"] or "-"] for w in workers),
        "no workers")]  # fmt: skip
    emit(args, data, "\n".join(lines))
    return 0


async def scorecard(args: argparse.Namespace, config: Config) -> int:
    store = await open_fleet_store(config)
    if args.shadow:
        from ..ops.scorecard import render_shadow, shadow

        try:
            data = await shadow(store, config.fleet)
        finally:
            await store.close()
        emit(args, data, render_shadow(data))
        return 0
    try:
        card = await compute(store, config.fleet)
    finally:
        await store.close()
    emit(args, card.as_dict(), card.render())
    return 0


async def sessions_list(args: argparse.Namespace, config: Config) -> int:
    store = await open_fleet_store(config)
    try:
        sessions = await store.list_sessions(config.fleet)
    finally:
        await store.close()
    rows = [s.as_dict() for s in sessions]
    tz = config.timezone
    text = tables.table(
        ["ID", "WINDOW", "STATUS", "STARTS", "ENDS", "ACTIONS", "COST"],
        ([tables.short(s["id"]), s["window_key"], s["status"], tables.when(s["starts_at"], tz),
          tables.when(s["ends_at"], tz), s["used_actions"], f"{s['used_cost']:.2f}"] for s in rows),
        "no sessions")  # fmt: skip
    emit(args, rows, text)
    return 0


async def events_replay(args: argparse.Namespace, config: Config) -> int:
    store = await open_fleet_store(config)
    try:
        session_id = args.session
        if session_id != system_stream(config.fleet):
            session_id = await tables.resolve_id(store, "session", session_id, config.fleet)
        events = await store.replay(session_id, args.after)
    finally:
        await store.close()
    if not events and await _missing_session(config, session_id):
        raise NotFound(f"unknown session {args.session!r}")
    rows = [e.as_dict() for e in events]
    text = tables.table(
        ["SEQ", "TIME", "KIND", "REASON", "WORKER", "PAYLOAD"],
        ([e["seq"], tables.when(e["created_at"], config.timezone), e["kind"], e["reason"] or "-",
          e["worker"] or "-", tables.payload_json(e["payload"])] for e in rows),
        "no events")  # fmt: skip
    emit(args, rows, text)
    return 0


async def _missing_session(config: Config, session_id: str) -> bool:
    store = await open_fleet_store(config)
    try:
        return await store.get_session(session_id) is None and session_id != system_stream(
            config.fleet
        )
    finally:
        await store.close()


async def checkpoints_list(args: argparse.Namespace, config: Config) -> int:
    store = await open_fleet_store(config)
    try:
        cps = await Checkpoints(store, config.fleet).list()
    finally:
        await store.close()
    rows = [c.as_dict() for c in cps]
    now = _reading_now(config)
    emit(args, rows, tables.table(
        ["ID", "WORKER", "CYCLE", "CREATED", "AGE"],
        ([c["id"], c["worker"], c["cycle"], tables.when(c["created_at"], config.timezone),
          tables.relative(c["created_at"], now)] for c in rows),
        "no checkpoints"))  # fmt: skip
    return 0


async def checkpoints_restore(args: argparse.Namespace, config: Config) -> int:
    store = await open_fleet_store(config)
    try:
        cp = await Checkpoints(store, config.fleet).restore(args.id, by=args.by)
    finally:
        await store.close()
    print(
        f"worker {cp.worker} resumes from checkpoint {cp.id} (cycle {cp.cycle}) at its next start; "
        "effects already done are not undone"
    )
    return 0


async def approvals_list(args: argparse.Namespace, config: Config) -> int:
    store = await open_fleet_store(config)
    try:
        read = store.pending_approvals if args.pending else store.list_approvals
        # params as the object they are (the row keeps them as JSON text), for --json
        rows = [{**a.as_dict(), "params": a.params}
                for a in await read(fleet=config.fleet, limit=10_000)]  # fmt: skip
    finally:
        await store.close()
    now = _reading_now(config)
    text = tables.table(
        ["ID", "STATUS", "ACTION", "WORKER", "TIER", "CREATED", "WAIT", "PARAMS", "GRANT"],
        ([tables.short(r["id"]), r["status"], r["action"], r["worker"], r["tier"],
          tables.when(r["created_at"], config.timezone), _approval_wait(r, now),
          json.dumps(r["params"], sort_keys=True, separators=(",", ":")), _grant_bounds(r)]
         for r in rows),
        "no approvals")  # fmt: skip
    emit(args, rows, text)
    return 0


def _approval_wait(row: dict[str, Any], now: datetime) -> str:
    """`pending 12m, deadline in 48m`, or who decided and when."""
    if row["status"] == "pending":
        return (f"pending {tables.elapsed(row['created_at'], now)}, "
                f"deadline {tables.relative(row['deadline'], now)}")  # fmt: skip
    by = f" by {row['decided_by']}" if row.get("decided_by") else ""
    at = f" {tables.relative(row['decided_at'], now)}" if row.get("decided_at") else ""
    return f"{row['status']}{by}{at}"


def _grant_bounds(r: dict[str, Any]) -> str:
    """A window grant's bounds: which params it matches, uses and cost spent of the allowed."""
    if r.get("scope") != "window":
        return "-"
    match = ",".join(json.loads(r["match_keys"])) if r.get("match_keys") else "all params"
    uses = (
        f"{r['used_count']}/{r['max_uses']}"
        if r.get("max_uses") is not None
        else str(r["used_count"])
    )
    cost = f", cost {r['used_cost']}/{r['max_cost']}" if r.get("max_cost") is not None else ""
    return f"window: match {match}, uses {uses}{cost}"


async def _decide(args: argparse.Namespace, config: Config, approve: bool) -> int:
    store = await open_fleet_store(config)
    try:
        approvals = Approvals(store, config.approvals, config.fleet)
        approval_id = await tables.resolve_id(store, "approval", args.id, config.fleet)
        row = await approvals.decide(
            approval_id, approve=approve, by=args.by, reason=args.reason,
            scope=getattr(args, "scope", "once"), max_uses=getattr(args, "max_uses", None),
            max_cost=getattr(args, "max_cost", None), match=getattr(args, "match", None),
        )  # fmt: skip
    finally:
        await store.close()
    print(f"approval {row.id} {row.status} by {row.decided_by}")
    return 0


async def approvals_approve(args: argparse.Namespace, config: Config) -> int:
    return await _decide(args, config, True)


async def approvals_deny(args: argparse.Namespace, config: Config) -> int:
    return await _decide(args, config, False)


def _scope(words: list[str]) -> tuple[str, str]:
    kind = words[0]
    if kind in ("host", "fleet") and len(words) == 1:
        return kind, ""
    if kind in ("session", "worker") and len(words) == 2 and words[1]:
        return kind, words[1]
    raise UsageError(
        f"unknown scope {' '.join(words)!r}: use host, fleet, session ID or worker NAME"
    )


async def _set_switch(args: argparse.Namespace, config: Config, mode: Mode) -> int:
    scope, target = _scope(args.scope)
    await engage.set_switch(config, scope=scope, target=target, mode=mode, reason=args.reason, by=args.by,
                     force=getattr(args, "force", False))  # fmt: skip
    where = scope + (f" {target}" if target else "")
    print(f"kill switch {where}: {mode.value} (by {args.by}: {args.reason})")
    return 0


async def killswitch_engage(args: argparse.Namespace, config: Config) -> int:
    return await _set_switch(args, config, Mode(args.mode))


async def killswitch_disengage(args: argparse.Namespace, config: Config) -> int:
    return await _set_switch(args, config, Mode.DISENGAGED)


def _switch_summary(s: dict[str, Any]) -> str:
    """`host halt_all (unverifiable: why)` when the switch cannot be verified, else `host mode`."""
    where = s["scope"] + (f" {s['target']}" if s["target"] else "")
    return f"{where} {s['mode']}" + ("" if s["valid"] else f" (unverifiable: {s['problem']})")


async def killswitch_status(args: argparse.Namespace, config: Config) -> int:
    store = await open_fleet_store(config)
    try:
        switches = await engage.switch_states(store, config)
    finally:
        await store.close()
    text = tables.table(
        ["SCOPE", "TARGET", "MODE", "SINCE", "BY", "REASON"],
        ([s["scope"], s["target"] or "-", s["mode"], tables.when(s["since"], config.timezone),
          s["by"] or "-", s["reason"] if s["valid"] else f"unverifiable: {s['problem']}"]
         for s in switches), "")  # fmt: skip
    emit(args, switches, text)
    return 0


async def recover(args: argparse.Namespace, config: Config) -> int:
    store = await open_fleet_store(config)
    try:
        report = await recovery.scan(
            store, fleet=config.fleet, approvals=Approvals(store, config.approvals, config.fleet),
            host_switch=await engage.marked_host_switch(store, config),
            by="cli", started_before=store.clock.now(), dry_run=args.dry_run,
            host=config.host_id, live_after=await store.db_now() - timedelta(seconds=config.lease_ttl),
        )  # fmt: skip
    finally:
        await store.close()
    verb = "would repair" if args.dry_run else "repaired"
    emit(args, report.as_dict(),
         f"{verb}: {report.windows_closed} windows closed, {report.in_doubt} actions in-doubt, "
         f"{report.approvals_escalated} approvals escalated, {report.approvals_expired} expired"
         + ("; kill-switch file does not verify" if report.killswitch_invalid else ""))  # fmt: skip
    return 0


async def actions_in_doubt(args: argparse.Namespace, config: Config) -> int:
    store = await open_fleet_store(config)
    try:
        rows = [a.as_dict() for a in await store.actions_with_status(
            fleet=config.fleet, status=ActionStatus.IN_DOUBT)]  # fmt: skip
    finally:
        await store.close()
    now = _reading_now(config)
    emit(args, rows, tables.table(
        ["COMMAND ID", "NAME", "WORKER", "STARTED", "AGE", "SAFE TO RETRY"],
        ([tables.short(r["command_id"]), r["name"], r["worker"],
          tables.when(r["started_at"], config.timezone), tables.relative(r["started_at"], now),
          "yes" if r["safe_to_retry"] else "no"] for r in rows),
        "no in-doubt actions"))  # fmt: skip
    return 0


async def actions_resolve(args: argparse.Namespace, config: Config) -> int:
    store = await open_fleet_store(config)
    try:
        command_id = await tables.resolve_id(store, "action", args.id, config.fleet)
        await recovery.resolve_in_doubt(store, command_id, done=args.as_ == "done", by=args.by)
    finally:
        await store.close()
    print(f"action {command_id} resolved as {args.as_} by {args.by}")
    return 0


async def tokens_usage(args: argparse.Namespace, config: Config) -> int:
    period_prefix = {"day": "daily", "week": "weekly", "month": "monthly"}
    store = await open_fleet_store(config)
    try:
        rows = [dataclasses.asdict(u) for u in await store.list_token_usage()]
    finally:
        await store.close()
    if args.scope:
        rows = [r for r in rows if r["scope"] == args.scope]
    if args.period:
        want = period_prefix[args.period]
        rows = [r for r in rows if _period_of(r["period_key"]) == want]
    emit(args, rows, tables.table(
        ["SCOPE", "IDENTITY", "PERIOD", "TOKENS", "COST"],
        ([r["scope"], r["identity"], r["period_key"], r["tokens"], f"{r['cost']:.2f}"] for r in rows),
        "no token usage"))  # fmt: skip
    return 0


def _period_of(key: str) -> str:
    if "W" in key:
        return "weekly"
    return "daily" if key.count("-") == 2 else "monthly"


async def drill_killswitch(args: argparse.Namespace, config: Config) -> int:
    from ..ops.drills import killswitch_drill

    report = await killswitch_drill(config, workers=args.workers, seconds=args.seconds)
    emit(args, report.as_dict(), report.render())
    return 0 if report.passed else 1


async def drill_approval_backlog(args: argparse.Namespace, config: Config) -> int:
    from ..ops.drills import approval_backlog_drill

    report = await approval_backlog_drill(config, count=args.count)
    emit(args, report.as_dict(), report.render())
    return 0 if report.passed else 1


async def policy_explain(args: argparse.Namespace, config: Config) -> int:
    from ..actions import Action
    from ..governance.budgets import parse_identity_key

    try:
        params = json.loads(args.params)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--params is not JSON: {exc}") from None
    if not isinstance(params, dict):
        raise UsageError(f"--params must be a JSON object, got {type(params).__name__}")
    identity: dict[str, str] = {}
    for text in args.identity:
        scope, name = parse_identity_key(text, "--identity")
        identity[scope] = name
    action = Action(name=args.action, params=params, risk=args.risk, model=args.model,
                    identity=identity)  # fmt: skip
    decision = config.policy.decide(action, args.worker)
    data = {"action": args.action, "worker": args.worker, "risk": args.risk, **decision.as_dict()}
    text = decision.render()
    if args.model is not None and decision.outcome != "deny":
        allowed, detail = config.models.check(args.model, identity)
        data["model"] = {"model": args.model, "allowed": allowed, "detail": detail}
        text += f"\nmodel:    {'allowed' if allowed else 'denied (the gate denies)'}: {detail}"
    emit(args, data, text)
    return 0


async def policy_replay(args: argparse.Namespace, config: Config) -> int:
    import sys

    from ..config import load_candidate
    from ..configparse import parse_duration
    from ..governance.replay import run_replay

    # Everything the user gave is checked before the store is opened; nothing is ever written.
    candidate = load_candidate(args.candidate, config)
    since = parse_duration(args.since, "--since") if args.since is not None else None
    store = await open_fleet_store(config)
    try:
        report = await run_replay(store, config, candidate, ids=args.window, since=since)
    finally:
        await store.close()
    emit(args, report.as_dict(), report.render())
    failures = report.failures(args.fail_on)
    for line in failures:
        print(f"acp-supervisor: policy replay: {line}", file=sys.stderr)
    return 3 if failures else 0

"""What each CLI subcommand does. Parsing lives in cli.py; each handler returns an exit code."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from datetime import datetime, timedelta
from typing import Any

import structlog

from . import recovery, simruns, tables
from .approvals import Approvals
from .checkpoints import Checkpoints
from .cli import emit
from .clock import SystemClock
from .config import Config
from .daemon import Daemon, host_switch_path, killswitch_command_id
from .errors import DatabaseMissing, NotFound, StoreConfigError, StoreError, UsageError
from .killswitch import HostSwitchFile, Mode, SwitchState, load_secret
from .scorecard import compute
from .simruns import simulations_dir
from .statedir import make_state_dir
from .store import NewEvent, Store, open_store, system_stream
from .store.base import plain_row

log = structlog.get_logger("supervisor.commands")


def ensure_state_dir(config: Config) -> None:
    """The state directory, created when missing; a path that cannot be made is a config error."""
    try:
        make_state_dir(config.state_dir)
    except OSError as exc:
        raise StoreConfigError(
            f"cannot create the state directory {config.state_dir}: {exc.strerror or exc}"
        ) from None


async def _store(config: Config) -> Store:
    try:
        return await open_store(config.db_url, SystemClock())
    except DatabaseMissing as exc:
        raise DatabaseMissing(
            f"{exc}; simulated runs are kept under {simulations_dir(config.state_dir)} "
            "(read one with --run ID|latest); `acp-supervisor db migrate` creates a fleet's database",
            exc.path,
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

        from .daemon import build_factories

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

        from .config import load_config

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
    store = await _store(config)
    try:
        workers = [plain_row(r) for r in await store.fetchall("list_workers", config.fleet)]
        for w in workers:
            if w["cycle"] is not None and w["cycle"] < 0:
                w["cycle"] = None  # a worker that never ran has no cycle yet
        windows = [s.as_dict() for s in await store.open_sessions(config.fleet)]
        pending = await store.fetchrow("count_pending_approvals", config.fleet)
        actions = {
            r["status"]: int(r["n"])
            for r in await store.fetchall("count_actions_by_status", config.fleet)
        }
        switches = await _switches(store, config)
        hosts = [plain_row(r) for r in await store.fetchall("list_hosts", config.fleet)]
        leases = [plain_row(r) for r in await store.fetchall("list_leases", f"%:{config.fleet}%")]
        db_now = await store.db_now()
    finally:
        await store.close()
    for host in hosts:
        held = [lease for lease in leases if lease["holder"].split("/")[0] == host["host_id"]
                and lease["expires_at"] > db_now.isoformat()]  # fmt: skip
        host["leader"] = any(lease["name"].startswith("leader:") for lease in held)
        host["slots"] = sorted(
            lease["name"].split(":", 2)[2] for lease in held if lease["name"].startswith("slot:")
        )
    data = {"fleet": config.fleet, "hosts": hosts, "workers": workers, "open_windows": windows,
            "pending_approvals": int(pending["n"]) if pending else 0,
            "oldest_pending_at": pending["oldest_at"].isoformat() if pending and pending["oldest_at"] else None,
            "actions": actions, "killswitch": switches}  # fmt: skip
    tz, now = config.timezone, _reading_now(config)
    oldest = pending["oldest_at"] if pending else None
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
    store = await _store(config)
    if args.shadow:
        from .scorecard import render_shadow, shadow

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
    store = await _store(config)
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
    store = await _store(config)
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
    store = await _store(config)
    try:
        return await store.get_session(session_id) is None and session_id != system_stream(
            config.fleet
        )
    finally:
        await store.close()


async def checkpoints_list(args: argparse.Namespace, config: Config) -> int:
    store = await _store(config)
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
    store = await _store(config)
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
    store = await _store(config)
    try:
        query = "pending_approvals" if args.pending else "list_approvals"
        rows = [
            _params_object(plain_row(r)) for r in await store.fetchall(query, config.fleet, 10_000)
        ]
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


def _params_object(row: dict[str, Any]) -> dict[str, Any]:
    """The stored params (JSON text) as the object they are, for --json."""
    if isinstance(row.get("params"), str):
        with contextlib.suppress(ValueError):  # not JSON: shown as stored
            row["params"] = json.loads(row["params"])
    return row


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
    store = await _store(config)
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
    print(f"approval {row['id']} {row['status']} by {row['decided_by']}")
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
    await set_switch(config, scope=scope, target=target, mode=mode, reason=args.reason, by=args.by,
                     force=getattr(args, "force", False))  # fmt: skip
    where = scope + (f" {target}" if target else "")
    print(f"kill switch {where}: {mode.value} (by {args.by}: {args.reason})")
    return 0


async def set_switch(
    config: Config,
    *,
    scope: str,
    target: str,
    mode: Mode,
    reason: str,
    by: str,
    force: bool = False,
) -> SwitchState | None:
    """Engage or disengage one scope and record who and why: the CLI's and the console's one
    path. The host scope is this host's signed file (returned as read back); the others are
    rows in the store, written under the fleet row's lock."""
    state = None
    if scope == "host":
        # The file first: the host switch must work while the store is down or unmigrated.
        # write() refuses (KillSwitchError, exit 2) when no secret is configured: nothing unsigned.
        switch = _host_switch(config)
        switch.adopt_mark(await _stored_mark(config))  # the next seq exceeds the store's mark too
        state = switch.write(mode, reason=reason, by=by,
                             at=SystemClock().now().isoformat())  # fmt: skip
    try:
        store = await _store(config)
    except (StoreError, StoreConfigError) as exc:
        if state is None:
            raise
        raise StoreError(f"kill switch host is {mode.value} (seq {state.seq}), but the event was "
                         f"not recorded (a running daemon records it): {exc}") from exc  # fmt: skip
    try:
        from . import events as ev

        if scope == "session":  # the short id `sessions list` shows names its session
            target = await tables.resolve_id(store, "session", target, config.fleet)
        kind = ev.KILLSWITCH_DISENGAGED if mode == Mode.DISENGAGED else ev.KILLSWITCH_ENGAGED
        event = NewEvent(
            kind=kind, session_id=system_stream(config.fleet), reason=mode.value,
            payload={"scope": scope, "target": target, "mode": mode.value, "by": by,
                     "reason": reason},
        )  # fmt: skip
        if state is not None:
            await store.once(killswitch_command_id(config.fleet, "host", state.seq), event)
            await store.raise_host_switch_mark(config.fleet, config.host_id, state.seq)
        else:
            targets = await _check_target(store, config, scope, target, mode,
                                          force=force)  # fmt: skip
            async with store.transaction() as tx:
                # Lock the fleet row first: starts in flight hold it FOR SHARE, so this engage
                # returns only after them, and no start can begin after it. The switch and its
                # event (who and why) commit together.
                await tx.execute("ensure_fleet_switch", config.fleet, store.clock.now())
                await tx.execute("lock_fleet_switch", config.fleet)
                for each in targets:
                    await tx.execute("upsert_kill_switch", config.fleet, scope, each, mode.value,
                                     reason, by, store.clock.now())  # fmt: skip
                await store.append_in(tx, event)
                await store.backend.notify_in(tx, "acp_killswitch", config.fleet)
    finally:
        await store.close()
    return state


async def _check_target(store: Store, config: Config, scope: str, target: str, mode: Mode, *,
                        force: bool) -> list[str]:  # fmt: skip
    """The targets a store-scope change writes. A worker or session scope must name one that
    exists, or the switch would stop nothing. A worker is its configured name (all its replicas)
    or an instance name (`name-2`: one); disengaging the configured name clears its replicas'
    own switches too, so it resumes all of them."""
    rows = await store.fetchall("kill_switches", config.fleet)
    set_here = {r["target"]: r["mode"] for r in rows if r["scope"] == scope}
    targets = [target]
    if scope == "worker" and mode is Mode.DISENGAGED:
        for spec in config.workers:
            if spec.name == target and spec.replicas > 1:
                targets += [n for n in spec.instance_names()
                            if set_here.get(n, "disengaged") != "disengaged"]  # fmt: skip
    if force or scope not in ("worker", "session") or target in set_here:
        return targets  # a switch already set there can always be changed or cleared
    if scope == "worker":
        known = sorted({s.name for s in config.workers}
                       | {n for s in config.workers for n in s.instance_names()})  # fmt: skip
        if target not in known:
            raise UsageError(f"unknown worker {target!r}: known workers are "
                             f"{', '.join(known) or 'none'} (--force for one not configured yet)")  # fmt: skip
        return targets
    sessions = await store.list_sessions(config.fleet)
    if target not in {s.id for s in sessions}:
        open_ = [f"{s.id} ({s.window_key})" for s in sessions if s.status == "open"]
        raise UsageError(f"unknown session {target!r}: open sessions are "
                         f"{', '.join(open_) or 'none'} (--force for one not opened yet)")  # fmt: skip
    return targets


async def killswitch_engage(args: argparse.Namespace, config: Config) -> int:
    return await _set_switch(args, config, Mode(args.mode))


async def killswitch_disengage(args: argparse.Namespace, config: Config) -> int:
    return await _set_switch(args, config, Mode.DISENGAGED)


def _host_switch(config: Config) -> HostSwitchFile:
    """This host's switch file, with the secret from the environment or the secret file."""
    import os

    secret = load_secret(dict(os.environ), config.killswitch_secret_file)
    return HostSwitchFile(host_switch_path(config.state_dir), secret)


async def _stored_mark(config: Config) -> int:
    """The store's host kill-switch mark; 0 when the store is unusable (the file still works)."""
    try:
        store = await _store(config)
    except (StoreError, StoreConfigError):
        return 0
    try:
        return await store.host_switch_mark(config.fleet, config.host_id)
    except StoreError:
        return 0
    finally:
        await store.close()


async def _marked_host_switch(store: Store, config: Config) -> HostSwitchFile:
    """The host switch with the store's replay mark: a missing file after history is halt_all."""
    switch = _host_switch(config)
    switch.adopt_mark(await store.host_switch_mark(config.fleet, config.host_id))
    return switch


async def _switches(store: Store, config: Config) -> list[dict[str, Any]]:
    """Every scope's switch: mode, since when, by whom and why (the same fields in JSON)."""
    state = (await _marked_host_switch(store, config)).read()
    out = [{"scope": "host", "target": "", "mode": state.mode.value, "valid": state.valid,
            "problem": state.problem, "since": state.at or None, "by": state.by or None,
            "reason": state.reason, "seq": state.seq}]  # fmt: skip
    for row in await store.fetchall("kill_switches", config.fleet):
        out.append({"scope": row["scope"], "target": row["target"], "mode": row["mode"],
                    "valid": True, "problem": None, "since": row["updated_at"].isoformat(),
                    "by": row["changed_by"], "reason": row["reason"]})  # fmt: skip
    return out


def _switch_summary(s: dict[str, Any]) -> str:
    """`host halt_all (unverifiable: why)` when the switch cannot be verified, else `host mode`."""
    where = s["scope"] + (f" {s['target']}" if s["target"] else "")
    return f"{where} {s['mode']}" + ("" if s["valid"] else f" (unverifiable: {s['problem']})")


async def killswitch_status(args: argparse.Namespace, config: Config) -> int:
    store = await _store(config)
    try:
        switches = await _switches(store, config)
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
    store = await _store(config)
    try:
        report = await recovery.scan(
            store, fleet=config.fleet, approvals=Approvals(store, config.approvals, config.fleet),
            host_switch=await _marked_host_switch(store, config),
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
    store = await _store(config)
    try:
        rows = [
            _params_object(plain_row(r))
            for r in await store.fetchall("actions_with_status", config.fleet, "in_doubt", 10_000)
        ]
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
    store = await _store(config)
    try:
        command_id = await tables.resolve_id(store, "action", args.id, config.fleet)
        await recovery.resolve_in_doubt(store, command_id, done=args.as_ == "done", by=args.by)
    finally:
        await store.close()
    print(f"action {command_id} resolved as {args.as_} by {args.by}")
    return 0


async def tokens_usage(args: argparse.Namespace, config: Config) -> int:
    period_prefix = {"day": "daily", "week": "weekly", "month": "monthly"}
    store = await _store(config)
    try:
        rows = [plain_row(r) for r in await store.fetchall("list_token_usage")]
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
    from .drills import killswitch_drill

    report = await killswitch_drill(config, workers=args.workers, seconds=args.seconds)
    emit(args, report.as_dict(), report.render())
    return 0 if report.passed else 1


async def drill_approval_backlog(args: argparse.Namespace, config: Config) -> int:
    from .drills import approval_backlog_drill

    report = await approval_backlog_drill(config, count=args.count)
    emit(args, report.as_dict(), report.render())
    return 0 if report.passed else 1


async def policy_explain(args: argparse.Namespace, config: Config) -> int:
    from .actions import Action
    from .governance import parse_identity_key

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

    from .config import load_candidate
    from .escalation import parse_duration
    from .replay import run_replay

    # Everything the user gave is checked before the store is opened; nothing is ever written.
    candidate = load_candidate(args.candidate, config)
    since = parse_duration(args.since, "--since") if args.since is not None else None
    store = await _store(config)
    try:
        report = await run_replay(store, config, candidate, ids=args.window, since=since)
    finally:
        await store.close()
    emit(args, report.as_dict(), report.render())
    failures = report.failures(args.fail_on)
    for line in failures:
        print(f"acp-supervisor: policy replay: {line}", file=sys.stderr)
    return 3 if failures else 0

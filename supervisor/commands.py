"""What each CLI subcommand does. Parsing lives in cli.py; each handler returns an exit code."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from . import recovery
from .approvals import Approvals
from .checkpoints import Checkpoints
from .cli import emit
from .clock import SystemClock
from .config import Config
from .daemon import Daemon, host_switch_path, killswitch_command_id
from .errors import NotFound, StoreConfigError, StoreError, UsageError
from .killswitch import HostSwitchFile, Mode, load_secret
from .scorecard import compute
from .store import NewEvent, Store, open_store, system_stream
from .store.base import plain_row


def ensure_state_dir(config: Config) -> None:
    """The state directory, created when missing; a path that cannot be made is a config error."""
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreConfigError(f"cannot create the state directory {config.state_dir}: {exc.strerror or exc}") from None


async def _store(config: Config) -> Store:
    return await open_store(config.db_url, SystemClock())




async def run(args: argparse.Namespace, config: Config) -> int:
    if args.start is not None and not args.simulate:
        raise UsageError("--start goes with --simulate")
    if args.simulate and args.horizon is None:
        raise UsageError("--simulate needs --horizon hour|day|week|month")
    if args.simulate and not config.db_explicit:
        # A simulation writes windows in simulated time; it never shares the real fleet's store.
        # Its own file is durable against a killed process (WAL, synchronous=normal: what the
        # crash tests exercise); power-loss durability (synchronous=full) is for real fleets.
        db_url = f"sqlite:///{config.state_dir / 'simulate.db'}?synchronous=normal"
        config = dataclasses.replace(config, db_url=db_url)

    def reload() -> Config:
        import os

        from .config import load_config

        return load_config(args.config or os.environ.get("ACP_CONFIG") or None, db=args.db,
                           state_dir=args.state_dir)  # fmt: skip

    daemon = Daemon(config, horizon=args.horizon, simulate=args.simulate, start=args.start,
                    seed=args.seed, reload_config=None if args.simulate else reload)  # fmt: skip
    card = await daemon.run()
    if card is not None:
        emit(args, card.as_dict(), card.render())
    return 0


async def db_migrate(args: argparse.Namespace, config: Config) -> int:
    ensure_state_dir(config)
    store = await open_store(config.db_url, SystemClock(), migrate=True)
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
    lines = [f"fleet {config.fleet}"]
    lines.append(
        "kill switch: "
        + "; ".join(
            f"{s['scope']}{' ' + s['target'] if s['target'] else ''} {s['mode']}" for s in switches
        )
    )
    lines.append("open windows: " + (", ".join(w["window_key"] for w in windows) or "none"))
    lines.append(
        f"pending approvals: {data['pending_approvals']}   in-doubt actions: {actions.get('in_doubt', 0)}"
    )
    for h in hosts:
        lines.append(f"host {h['host_id']:<16} {h['status']:<8} heartbeat {h['heartbeat_at']}"
                     f"{'  leader' if h['leader'] else ''}  slots: {', '.join(h['slots']) or '-'}")  # fmt: skip
    for w in workers:
        lines.append(f"  {w['name']:<24} {w['state']:<12} cycle {w['cycle']:<6} restarts {w['restarts']:<4} "
                     f"{'last error: ' + w['last_error'] if w['last_error'] else ''}")  # fmt: skip
    emit(args, data, "\n".join(lines))
    return 0


async def scorecard(args: argparse.Namespace, config: Config) -> int:
    store = await _store(config)
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
    text = (
        "\n".join(
            f"{s['id']}  {s['window_key']:<27} {s['status']:<9} actions {s['used_actions']:<5} cost {s['used_cost']:.2f}"
            for s in rows
        )
        or "no sessions"
    )
    emit(args, rows, text)
    return 0


async def events_replay(args: argparse.Namespace, config: Config) -> int:
    store = await _store(config)
    try:
        events = await store.replay(args.session, args.after)
    finally:
        await store.close()
    if not events and await _missing_session(config, args.session):
        raise NotFound(f"unknown session {args.session!r}")
    rows = [e.as_dict() for e in events]
    text = (
        "\n".join(
            f"{e['seq']:>6}  {e['created_at']}  {e['kind']:<20} {e['reason'] or '':<16} {e['worker'] or '':<16} {e['payload']}"
            for e in rows
        )
        or "no events"
    )
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
    emit(
        args,
        rows,
        "\n".join(
            f"{c['id']:>6}  {c['worker']:<20} cycle {c['cycle']:<6} {c['created_at']}" for c in rows
        )
        or "no checkpoints",
    )
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
        rows = [plain_row(r) for r in await store.fetchall(query, config.fleet, 10_000)]
    finally:
        await store.close()
    text = "\n".join(_approval_line(r) for r in rows) or "no approvals"
    emit(args, rows, text)
    return 0


def _approval_line(r: dict[str, Any]) -> str:
    """One approval: what it asks (with its params), and for a window grant its bounds."""
    line = (f"{r['id']}  {r['status']:<9} {r['action']:<28} {r['worker']:<16} tier {r['tier']:<10} "
            f"deadline {r['deadline']}  params {r['params']}")  # fmt: skip
    if r.get("scope") == "window":
        match = ",".join(json.loads(r["match_keys"])) if r.get("match_keys") else "all params"
        uses = f"{r['used_count']}/{r['max_uses']}" if r.get("max_uses") is not None else str(r["used_count"])
        cost = f", cost {r['used_cost']}/{r['max_cost']}" if r.get("max_cost") is not None else ""
        line += f"  window grant: match {match}, uses {uses}{cost}"
    return line


async def _decide(args: argparse.Namespace, config: Config, approve: bool) -> int:
    store = await _store(config)
    try:
        approvals = Approvals(store, config.approvals, config.fleet)
        row = await approvals.decide(
            args.id, approve=approve, by=args.by, reason=args.reason,
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
    state = None
    if scope == "host":
        # The file first: the host switch must work while the store is down or unmigrated.
        # write() refuses (KillSwitchError, exit 2) when no secret is configured: nothing unsigned.
        state = _host_switch(config).write(mode, reason=args.reason, by=args.by,
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

        kind = ev.KILLSWITCH_DISENGAGED if mode == Mode.DISENGAGED else ev.KILLSWITCH_ENGAGED
        event = NewEvent(
            kind=kind, session_id=system_stream(config.fleet), reason=mode.value,
            payload={"scope": scope, "target": target, "mode": mode.value, "by": args.by,
                     "reason": args.reason},
        )  # fmt: skip
        if state is not None:
            await store.once(killswitch_command_id(config.fleet, "host", state.seq), event)
        else:
            async with store.transaction() as tx:
                # Lock the fleet row first: starts in flight hold it FOR SHARE, so this engage
                # returns only after them, and no start can begin after it. The switch and its
                # event (who and why) commit together.
                await tx.execute("ensure_fleet_switch", config.fleet, store.clock.now())
                await tx.execute("lock_fleet_switch", config.fleet)
                await tx.execute("upsert_kill_switch", config.fleet, scope, target, mode.value,
                                 args.reason, args.by, store.clock.now())  # fmt: skip
                await store.append_in(tx, event)
                await store.backend.notify_in(tx, "acp_killswitch", config.fleet)
    finally:
        await store.close()
    where = scope + (f" {target}" if target else "")
    print(f"kill switch {where}: {mode.value} (by {args.by}: {args.reason})")
    return 0


async def killswitch_engage(args: argparse.Namespace, config: Config) -> int:
    return await _set_switch(args, config, Mode(args.mode))


async def killswitch_disengage(args: argparse.Namespace, config: Config) -> int:
    return await _set_switch(args, config, Mode.DISENGAGED)


def _host_switch(config: Config) -> HostSwitchFile:
    """This host's switch file, with the secret from the environment or the secret file."""
    import os

    secret = load_secret(dict(os.environ), config.killswitch_secret_file)
    return HostSwitchFile(host_switch_path(config.state_dir), secret)


async def _switches(store: Store, config: Config) -> list[dict[str, Any]]:
    state = _host_switch(config).read()
    out = [{"scope": "host", "target": "", "mode": state.mode.value, "valid": state.valid,
            "problem": state.problem, "by": state.by, "reason": state.reason, "seq": state.seq}]  # fmt: skip
    for row in await store.fetchall("kill_switches", config.fleet):
        out.append({"scope": row["scope"], "target": row["target"], "mode": row["mode"],
                    "valid": True, "problem": None, "by": row["changed_by"], "reason": row["reason"]})  # fmt: skip
    return out


async def killswitch_status(args: argparse.Namespace, config: Config) -> int:
    store = await _store(config)
    try:
        switches = await _switches(store, config)
    finally:
        await store.close()
    text = "\n".join(
        f"{s['scope']}{' ' + s['target'] if s['target'] else '':<10} {s['mode']:<17}"
        + (
            f" INVALID: {s['problem']}"
            if not s["valid"]
            else (f" by {s['by']}: {s['reason']}" if s["by"] else "")
        )
        for s in switches
    )
    emit(args, switches, text)
    return 0


async def recover(args: argparse.Namespace, config: Config) -> int:
    store = await _store(config)
    try:
        report = await recovery.scan(
            store, fleet=config.fleet, approvals=Approvals(store, config.approvals, config.fleet),
            host_switch=_host_switch(config),
            by="cli", started_before=store.clock.now(), dry_run=args.dry_run,
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
            plain_row(r)
            for r in await store.fetchall("actions_with_status", config.fleet, "in_doubt", 10_000)
        ]
    finally:
        await store.close()
    emit(args, rows, "\n".join(
        f"{r['command_id']}  {r['name']:<28} {r['worker']:<16} started {r['started_at']}"
        f"{'  safe to retry' if r['safe_to_retry'] else ''}" for r in rows) or "no in-doubt actions")  # fmt: skip
    return 0


async def actions_resolve(args: argparse.Namespace, config: Config) -> int:
    store = await _store(config)
    try:
        await recovery.resolve_in_doubt(store, args.id, done=args.as_ == "done", by=args.by)
    finally:
        await store.close()
    print(f"action {args.id} resolved as {args.as_} by {args.by}")
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
    emit(args, rows, "\n".join(
        f"{r['scope']}:{r['identity']:<20} {r['period_key']:<10} tokens {r['tokens']:<10} cost {r['cost']:.2f}"
        for r in rows) or "no token usage")  # fmt: skip
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

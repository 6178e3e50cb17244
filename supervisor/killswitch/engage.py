"""The engage protocol, the one path of the CLI and the console: the host switch is this host's
signed file, written first (it works while the store is down), then its event recorded; a fleet,
session or worker switch is a row written with its event under the fleet row's lock, so the
engage returns only after the starts in flight, and no start begins after it returns."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .. import events as ev
from ..actions import derive_id
from ..cli import tables
from ..config import Config
from ..errors import StoreConfigError, StoreError, UsageError
from ..simruns import open_fleet_store
from ..store import NewEvent, Store, system_stream
from ..timing.clock import SystemClock
from .hostfile import HostSwitchFile, SwitchState, load_secret
from .modes import Mode


def host_switch_path(state_dir: Path) -> Path:
    return state_dir / "killswitch.json"


def killswitch_command_id(fleet: str, scope: str, seq: int | str) -> str:
    return derive_id("killswitch", fleet, scope, str(seq))


def host_switch_mtime(state_dir: Path) -> int:
    try:
        return host_switch_path(state_dir).stat().st_mtime_ns
    except OSError:
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
        switch = host_switch(config)
        switch.adopt_mark(await stored_mark(config))  # the next seq exceeds the store's mark too
        state = switch.write(mode, reason=reason, by=by,
                             at=SystemClock().now().isoformat())  # fmt: skip
    try:
        store = await open_fleet_store(config)
    except (StoreError, StoreConfigError) as exc:
        if state is None:
            raise
        raise StoreError(f"kill switch host is {mode.value} (seq {state.seq}), but the event was "
                         f"not recorded (a running daemon records it): {exc}") from exc  # fmt: skip
    try:
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
            await store.set_switches(fleet=config.fleet, scope=scope, targets=targets,
                                     mode=mode, reason=reason, by=by, event=event)  # fmt: skip
    finally:
        await store.close()
    return state


async def _check_target(store: Store, config: Config, scope: str, target: str, mode: Mode, *,
                        force: bool) -> list[str]:  # fmt: skip
    """The targets a store-scope change writes. A worker or session scope must name one that
    exists, or the switch would stop nothing. A worker is its configured name (all its replicas)
    or an instance name (`name-2`: one); disengaging the configured name clears its replicas'
    own switches too, so it resumes all of them."""
    set_here = {r.target: r.stored_mode for r in await store.kill_switches(config.fleet)
                if r.scope == scope}  # fmt: skip
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


def host_switch(config: Config) -> HostSwitchFile:
    """This host's switch file, with the secret from the environment or the secret file."""

    secret = load_secret(dict(os.environ), config.killswitch_secret_file)
    return HostSwitchFile(host_switch_path(config.state_dir), secret)


async def stored_mark(config: Config) -> int:
    """The store's host kill-switch mark; 0 when the store is unusable (the file still works)."""
    try:
        store = await open_fleet_store(config)
    except (StoreError, StoreConfigError):
        return 0
    try:
        return await store.host_switch_mark(config.fleet, config.host_id)
    except StoreError:
        return 0
    finally:
        await store.close()


async def marked_host_switch(store: Store, config: Config) -> HostSwitchFile:
    """The host switch with the store's replay mark: a missing file after history is halt_all."""
    switch = host_switch(config)
    switch.adopt_mark(await store.host_switch_mark(config.fleet, config.host_id))
    return switch


async def switch_states(store: Store, config: Config) -> list[dict[str, Any]]:
    """Every scope's switch: mode, since when, by whom and why (the same fields in JSON)."""
    state = (await marked_host_switch(store, config)).read()
    out = [{"scope": "host", "target": "", "mode": state.mode.value, "valid": state.valid,
            "problem": state.problem, "since": state.at or None, "by": state.by or None,
            "reason": state.reason, "seq": state.seq}]  # fmt: skip
    for r in await store.kill_switches(config.fleet):
        out.append({"scope": r.scope, "target": r.target, "mode": r.stored_mode, "valid": True,
                    "problem": None, "since": r.updated_at.isoformat() if r.updated_at else None,
                    "by": r.changed_by, "reason": r.reason})  # fmt: skip
    return out

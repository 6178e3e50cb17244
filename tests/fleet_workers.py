"""Test workers for the fleet tests, importable as `tests.fleet_workers:Class`.

They are used in-process (tests/integration/test_fleet.py) and by a daemon subprocess started with
cwd=/work/main and PYTHONPATH=/work/main (tests/acceptance/test_signals.py), so everything they
need to remember across a restart (the fleet builds a fresh instance after each crash) lives in a
file named in their params, never in the instance.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import anyio

from supervisor.actions import Action
from supervisor.errors import ActionDenied, NotFound
from supervisor.runtime.worker import CycleContext, Worker


def _append(path: str | os.PathLike[str], line: str) -> None:
    """One O_APPEND write: whole lines even when the process is killed."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _next_attempt(counter: str) -> int:
    """Count the attempts of a worker in a file: 0 on the first call, then 1, 2, ..."""
    path = Path(counter)
    n = int(path.read_text() or 0) if path.exists() else 0
    path.write_text(str(n + 1))
    return n


class Scripted(Worker):
    """Each cycle follows the next letter of `plan`: "C" raises, "H" hangs (sleeps forever, so
    only the cycle deadline ends it), "T" raises its own TimeoutError, "N" raises NotFound (an
    expected error of the project, but no governed refusal), "D" raises ActionDenied, "." completes
    (dispatching one low-risk action when `act` is true). Past the end of the plan it follows
    `after` (default ".").

    params: plan (str), counter (a file path that holds the attempt count), after (str),
    act (bool).
    """

    async def cycle(self, ctx: CycleContext) -> None:
        plan = str(self.params.get("plan", ""))
        n = _next_attempt(self.params["counter"])
        step = plan[n] if n < len(plan) else str(self.params.get("after", "."))
        if step == "C":
            raise RuntimeError(f"scripted crash at attempt {n}")
        if step == "H":
            await anyio.sleep_forever()
        if step == "T":
            raise TimeoutError("upstream call timed out")  # the worker's own timeout, not a hang
        if step == "N":
            raise NotFound("no in-doubt action 'x'")  # the project's error, not the gate's answer
        if step == "D":
            raise ActionDenied("test.tick: kill switch: halt_all", reason="killswitch")
        if self.params.get("act", False):
            await ctx.dispatch(Action(name="test.tick", params={"attempt": n}, risk="low"))


class AlwaysCrash(Worker):
    """Raises in every cycle."""

    async def cycle(self, ctx: CycleContext) -> None:
        raise RuntimeError(f"boom in cycle {ctx.cycle}")


class Hang(Worker):
    """Never finishes a cycle: only the cycle deadline (real seconds) ends it."""

    async def cycle(self, ctx: CycleContext) -> None:
        await anyio.sleep_forever()


class Ticker(Worker):
    """One low-risk action per cycle through the gate; its effect is a line in the effect log."""

    async def cycle(self, ctx: CycleContext) -> None:
        await ctx.dispatch(Action(name="test.tick", params={"cycle": ctx.cycle}, risk="low"))


class SlowEffect(Worker):
    """One action per cycle whose effect takes `effect_seconds` (default 1 s) of real time.

    The effect appends "start <command_id> <unix time>" and "end <command_id> <unix time>" lines
    to the file `trace`, so a test can send a signal while an effect is known to be running, and
    see that it finished after the signal.
    """

    async def cycle(self, ctx: CycleContext) -> None:
        seconds = float(self.params.get("effect_seconds", 1.0))
        trace = str(self.params["trace"])

        async def effect(command_id: str) -> dict[str, Any]:
            _append(trace, f"start {command_id} {time.time():.6f}")
            await anyio.sleep(seconds)
            _append(trace, f"end {command_id} {time.time():.6f}")
            return {"slept": seconds}

        await ctx.dispatch(
            Action(name="test.slow", params={"cycle": ctx.cycle}, risk="low"), effect
        )


class Noop(Worker):
    """One no-op low-risk action per cycle, through the whole gate (used by bench/fleet.py too)."""

    async def cycle(self, ctx: CycleContext) -> None:
        async def effect() -> None:
            return None

        await ctx.dispatch(Action(name="bench.noop", risk="low"), effect)


class Observer(Worker):
    """Each cycle, copies the fleet status (the workers table `status` shows) to the JSON-lines
    file `log`: {"at": <clock now>, "workers": {name: {state, restarts, cycle, last_error}}}.
    It runs on the daemon's clock, so on the virtual clock its samples are deterministic."""

    async def cycle(self, ctx: CycleContext) -> None:
        workers = {
            w.name: {"state": w.state, "restarts": w.restarts, "cycle": w.cycle,
                     "last_error": w.last_error}
            for w in await ctx.gate.store.list_workers(ctx.fleet)
            if w.name != self.name
        }  # fmt: skip
        line = json.dumps({"at": ctx.now.isoformat(), "workers": workers}, sort_keys=True)
        _append(self.params["log"], line)


class NotAWorker:
    """Has a cycle, but does not subclass supervisor.Worker: the config check must refuse it."""

    def __init__(self, name: str, params: dict[str, Any]) -> None:
        self.name = name

    async def cycle(self, ctx: CycleContext) -> None:  # pragma: no cover - never runs
        return None


def read_json_lines(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


class BrokenInit(Worker):
    """Cannot even be built: the fleet must quarantine it, not stop the daemon."""

    def __init__(self, name: str, params: dict[str, Any]) -> None:
        raise RuntimeError("cannot connect to my backend")

    async def cycle(self, ctx: CycleContext) -> None:  # pragma: no cover - never built
        raise AssertionError("unreachable")


class DiskFull(Worker):
    """Every cycle's state write fails, as on a full disk (the store raises StateWriteError)."""

    async def cycle(self, ctx: CycleContext) -> None:
        from supervisor.errors import StateWriteError

        raise StateWriteError("database or disk is full")


class RealWait(Worker):
    """Waits a little real time (0 to 2 ms, as a network call would) before one action per
    cycle: a class that does not say its cycles await only the gate."""

    async def cycle(self, ctx: CycleContext) -> None:
        await anyio.sleep(int.from_bytes(os.urandom(1)) / 128_000)
        await ctx.dispatch(Action(name="test.after_wait", params={"cycle": ctx.cycle}, risk="low"))

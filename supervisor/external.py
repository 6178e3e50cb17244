"""External workers: any executable is a worker when it speaks JSON lines on stdin/stdout.

The daemon writes one JSON object per line to the child's stdin and reads one per line from its
stdout; the child's stderr is forwarded to the log line by line. The full protocol, with examples,
is docs/worker-protocol.md. In short, per cycle:

    daemon -> child   {"type":"cycle","cycle":7,"window":"...","now":"..."}
    child  -> daemon  {"type":"propose","id":"a1","action":{"name":..,"params":{..},"risk":"low"}}
    daemon -> child   {"type":"decision","id":"a1","decision":"approved","command_id":"..."}
    child  -> daemon  {"type":"result","id":"a1","ok":true,"result":{..}}
    child  -> daemon  {"type":"cycle_done","state":{..}}

Every action goes through the same gate as an in-process worker's (`ctx.dispatch`): the child
runs a side effect only after an "approved" decision, and the outcome is recorded from its result.

The child is untrusted input. Anything it writes that is not the protocol (bad JSON, a line over
`max_line`, an unknown type, a result nobody asked for, a flood of messages, silence past
`heartbeat_timeout`, exiting mid-action) raises `WorkerProtocolError` and the child is killed.
`WorkerProtocolError` is deliberately *not* a `SupervisorError`: the fleet counts it as a crash
and restarts the worker with backoff (a SupervisorError would be read as a governed outcome).
When the child fails while an action's effect is in flight, no outcome is recorded: the started
record stays open and the recovery scan marks it in-doubt, exactly as for a cancelled effect.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, TypeAlias

import anyio
import anyio.abc
import structlog

from . import events as ev
from .actions import RISKS, Action, derive_id
from .errors import ActionDenied, ActionExpired, ApprovalPending, StoreError, SupervisorError
from .sandbox import Identity, launch_argv
from .store import NewEvent
from .worker import CycleContext, Worker

log = structlog.get_logger("supervisor.external")

PROTOCOL_VERSION: Final = 1

#: Hard limits on what one message may contain (beyond the line length).
MAX_ID_LENGTH: Final = 128
MAX_DEPTH: Final = 32  # JSON nesting; deeper values are refused before they reach the store

LOG_LEVELS: Final = frozenset({"debug", "info", "warning", "error"})
_ACTION_KEYS: Final = frozenset(
    {"name", "params", "risk", "cost", "critical", "safe_to_retry", "key"}
)

# Environment variables of the daemon that a child never inherits: the kill-switch secret and
# the rest of the daemon's own settings, the database's connection settings and credentials
# (libpq's PG*), the systemd sockets (a child must not notify for the daemon) and credentials
# directory. `env=` can still set any of them explicitly.
_SCRUB_PREFIXES: Final = ("ACP_", "PG")
_SCRUB_NAMES: Final = frozenset({"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                                 "LISTEN_PID", "LISTEN_FDNAMES", "CREDENTIALS_DIRECTORY",
                                 "DATABASE_URL"})  # fmt: skip

_CHUNK: Final = 64 * 1024
_STDERR_DRAIN_READS: Final = 16  # at most 1 MiB read at a cycle's end
_STDERR_LINES_PER_CYCLE: Final = 1000


class WorkerProtocolError(Exception):
    """The child broke the protocol, hung, or went away. The fleet counts it as a crash.

    `reason` is a short machine-readable code: malformed, oversized, unknown_type, invalid,
    unexpected, flood, exited, hung, start_failed.
    """

    def __init__(self, message: str, *, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


class WorkerHung(WorkerProtocolError):
    """No message from the child for `heartbeat_timeout` seconds."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="hung")


class ExternalActionFailed(Exception):
    """The child reported `ok: false` for an approved action: recorded as a failed outcome."""


# -- messages (child -> daemon) -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Propose:
    id: str
    action: Action
    key: str | None = None


@dataclass(frozen=True, slots=True)
class Result:
    id: str
    ok: bool
    result: dict[str, Any] | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class CycleDone:
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    pass


@dataclass(frozen=True, slots=True)
class Log:
    level: str
    message: str


Message: TypeAlias = Propose | Result | CycleDone | Heartbeat | Log


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf, which no store or encoder accepts
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _too_deep(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _bad(kind: str, what: str, expected: str, value: object) -> WorkerProtocolError:
    return WorkerProtocolError(
        f"{kind}: {what} must be {expected}, got {_type_name(value)}", reason="invalid"
    )


def _ident(kind: str, obj: Mapping[str, Any], key: str = "id") -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise _bad(kind, key, "a non-empty string", value)
    if len(value) > MAX_ID_LENGTH:
        raise WorkerProtocolError(f"{kind}: {key} is longer than {MAX_ID_LENGTH} characters")
    return value


def _object(kind: str, obj: Mapping[str, Any], key: str, *, required: bool) -> dict[str, Any]:
    if key not in obj and not required:
        return {}
    value = obj.get(key)
    if not isinstance(value, dict):
        raise _bad(kind, key, "an object", value)
    return value


def _flag(kind: str, obj: Mapping[str, Any], key: str) -> bool:
    value = obj.get(key, False)
    if not isinstance(value, bool):
        raise _bad(kind, key, "true or false", value)
    return value


def _parse_action(raw: Mapping[str, Any]) -> tuple[Action, str | None]:
    kind = "propose.action"
    unknown = sorted(set(raw) - _ACTION_KEYS)
    if unknown:
        # Fail closed: a field the gate would not see (a model, an identity...) is not ignored.
        raise WorkerProtocolError(f"{kind}: unknown field {unknown[0]!r}", reason="invalid")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _bad(kind, "name", "a non-empty string", name)
    if len(name) > 200:
        raise WorkerProtocolError(f"{kind}: name is longer than 200 characters")
    if not name.isprintable():
        # A name is shown to the operator who approves it: no terminal escapes, carriage
        # returns or bidi overrides that could make `approvals list` show another action.
        raise WorkerProtocolError(f"{kind}: name holds a control or format character")
    params = _object(kind, raw, "params", required=False)
    risk = raw.get("risk")
    if not isinstance(risk, str) or risk not in RISKS:
        shown = repr(risk) if isinstance(risk, str) else _type_name(risk)
        raise WorkerProtocolError(
            f"{kind}: risk must be one of {', '.join(RISKS)}, got {shown[:40]}", reason="invalid"
        )
    cost = raw.get("cost", 0)
    if isinstance(cost, bool) or not isinstance(cost, int | float):
        raise _bad(kind, "cost", "a number", cost)
    try:
        cost_f = float(cost)
    except OverflowError:
        raise WorkerProtocolError(f"{kind}: cost is out of range") from None
    if not math.isfinite(cost_f) or cost_f < 0:
        raise WorkerProtocolError(f"{kind}: cost must be a finite number >= 0")
    key = raw.get("key")
    if key is not None:
        key = _ident(kind, raw, "key")
    try:
        action = Action(name=name, params=params, risk=risk, cost=cost_f,
                        critical=_flag(kind, raw, "critical"),
                        safe_to_retry=_flag(kind, raw, "safe_to_retry"))  # fmt: skip
    except SupervisorError as exc:  # UsageError from Action's own checks
        raise WorkerProtocolError(f"{kind}: {exc}", reason="invalid") from None
    return action, key


def parse_message(line: bytes, max_line: int) -> Message:
    """Parse one line the child wrote. Returns a Message or raises WorkerProtocolError; never
    anything else, whatever the bytes."""
    if len(line) > max_line:
        raise WorkerProtocolError(
            f"line of {len(line)} bytes is over the {max_line}-byte limit", reason="oversized"
        )
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WorkerProtocolError(
            f"not UTF-8: {exc.reason} at byte {exc.start}", reason="malformed"
        ) from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant,
                          parse_float=_finite)  # fmt: skip
        if "\\u" in text:
            # A lone surrogate escape (\ud800) is valid JSON but no UTF-8 text: the store and
            # the log would fail on it later, outside the protocol's error handling.
            json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise WorkerProtocolError("a string holds a lone surrogate (\\ud800-\\udfff)",
                                  reason="malformed") from None  # fmt: skip
    except RecursionError:
        raise WorkerProtocolError("JSON nested too deeply", reason="malformed") from None
    except ValueError as exc:  # JSONDecodeError, duplicate keys, NaN, huge integers
        raise WorkerProtocolError(f"not valid JSON: {str(exc)[:200]}", reason="malformed") from None
    if not isinstance(data, dict):
        raise WorkerProtocolError(
            f"a message must be a JSON object, got {_type_name(data)}", reason="malformed"
        )
    if _too_deep(data, MAX_DEPTH):
        raise WorkerProtocolError(f"JSON nested deeper than {MAX_DEPTH}", reason="malformed")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise WorkerProtocolError(
            f"message without a string 'type' (got {_type_name(kind)})", reason="malformed"
        )
    if kind == "heartbeat":
        return Heartbeat()
    if kind == "propose":
        ident = _ident(kind, data)
        action, key = _parse_action(_object(kind, data, "action", required=True))
        return Propose(id=ident, action=action, key=key)
    if kind == "result":
        ident = _ident(kind, data)
        ok = data.get("ok")
        if not isinstance(ok, bool):
            raise _bad(kind, "ok", "true or false", ok)
        result = data.get("result")
        if result is not None and not isinstance(result, dict):
            raise _bad(kind, "result", "an object or null", result)
        error = data.get("error")
        if error is not None and not isinstance(error, str):
            raise _bad(kind, "error", "a string or null", error)
        return Result(id=ident, ok=ok, result=result, error=error)
    if kind == "cycle_done":
        return CycleDone(state=_object(kind, data, "state", required=True))
    if kind == "log":
        level = data.get("level", "info")
        if not isinstance(level, str) or level not in LOG_LEVELS:
            shown = repr(level)[:40] if isinstance(level, str) else _type_name(level)
            raise WorkerProtocolError(
                f"log: level must be one of {', '.join(sorted(LOG_LEVELS))}, got {shown}",
                reason="invalid",
            )
        message = data.get("message")
        if not isinstance(message, str):
            raise _bad(kind, "message", "a string", message)
        return Log(level=level, message=message)
    raise WorkerProtocolError(f"unknown message type {kind[:60]!r}", reason="unknown_type")


# -- helpers ---------------------------------------------------------------------------------------


def _printable(text: str) -> str:
    """Child-controlled text goes into our log lines: no control characters (terminal escapes,
    carriage returns) get through."""
    return "".join(ch if ch == "\t" or (ch >= " " and ch != "\x7f") else "\ufffd" for ch in text)


def child_environment(
    env: Mapping[str, str] | None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment a child starts with: the daemon's, minus its secrets, plus `env`."""
    source = os.environ if base is None else base
    out = {k: v for k, v in source.items()
           if not k.startswith(_SCRUB_PREFIXES) and k not in _SCRUB_NAMES}  # fmt: skip
    out.update(env or {})
    return out


def _encode(message: Mapping[str, Any]) -> bytes:
    return (
        json.dumps(message, separators=(",", ":"), allow_nan=False, default=str) + "\n"
    ).encode()


class _LineReader:
    """Reads lines of at most `max_line` bytes in bounded chunks; never buffers more than
    max_line plus one chunk."""

    def __init__(self, stream: anyio.abc.ByteReceiveStream, max_line: int) -> None:
        self.stream = stream
        self.max_line = max_line
        self.buffer = bytearray()

    async def readline(self) -> bytes | None:
        """The next line without its newline, or None at end of stream (a partial last line is
        dropped: the writer went away before finishing it)."""
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 1]
                if len(line) > self.max_line:
                    raise WorkerProtocolError(
                        f"line of {len(line)} bytes is over the {self.max_line}-byte limit",
                        reason="oversized",
                    )
                return line
            if len(self.buffer) > self.max_line:
                raise WorkerProtocolError(
                    f"line over the {self.max_line}-byte limit (no newline in "
                    f"{len(self.buffer)} bytes)",
                    reason="oversized",
                )
            try:
                chunk = await self.stream.receive(_CHUNK)
            except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                return None
            self.buffer += chunk


class _Abandon(BaseException):
    """Carries a protocol failure out of an action's effect *past* the gate.

    The gate records any Exception from an effect as a failed outcome. When the child broke the
    protocol or died mid-action we do not know whether the effect happened, so no outcome may be
    recorded: like a cancellation, this BaseException leaves the started record open, and the
    recovery scan marks it in-doubt. `ExternalWorker` turns it back into the WorkerProtocolError.
    """

    def __init__(self, error: WorkerProtocolError) -> None:
        super().__init__(str(error))
        self.error = error


# -- the worker ------------------------------------------------------------------------------------


class ExternalWorker(Worker):
    """A worker whose cycles run in a child process speaking docs/worker-protocol.md."""

    def __init__(
        self,
        name: str,
        params: Mapping[str, Any],
        *,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        max_line: int = 64 * 1024,
        heartbeat_timeout: float = 30.0,
        shutdown_timeout: float = 5.0,
        max_messages: int = 10_000,
        max_proposals: int = 1_000,
        cwd: str | os.PathLike[str] | None = None,
        identity: Identity | None = None,
        max_log_lines: int = _STDERR_LINES_PER_CYCLE,
        max_pending_approvals: int = 20,
    ) -> None:
        super().__init__(name, params)
        if not argv:
            raise ValueError("argv must name a command")
        if max_line < 64:
            raise ValueError("max_line must be at least 64 bytes")
        self.argv = [str(a) for a in argv]
        self.env = dict(env) if env is not None else None
        self.max_line = max_line
        self.heartbeat_timeout = heartbeat_timeout
        self.shutdown_timeout = shutdown_timeout
        self.max_messages = max_messages
        self.max_proposals = max_proposals
        self.cwd = cwd
        self.identity = identity or Identity()
        self.max_log_lines = max_log_lines
        self.max_pending_approvals = max_pending_approvals
        self._state: dict[str, Any] = {}
        self._process: anyio.abc.Process | None = None
        self._stdout: _LineReader | None = None
        self._stderr_buffer = bytearray()
        self._stderr_skipping = False
        self._stderr_budget = max_log_lines
        self._stderr_dropped = 0
        self._stderr_fd: int | None = None
        self._stderr_eof = False
        self._messages = 0
        self._needs_hello = False
        self._stopping = False

    # -- state -----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The last state the child reported in cycle_done (or the restored one)."""
        return copy.deepcopy(self._state)

    def restore(self, state: Mapping[str, Any]) -> None:
        """Kept and sent to the child in its hello when it (re)starts."""
        self._state = copy.deepcopy(dict(state))

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    # -- the cycle -------------------------------------------------------------------------------

    async def cycle(self, ctx: CycleContext) -> None:
        completed = False
        try:
            await self._ensure_started()
            error: Exception | None = None
            self._messages = 0
            self._stderr_budget = self.max_log_lines
            self._stderr_dropped = 0
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump_stderr, name=f"{self.name}.stderr")
                try:
                    await self._converse(ctx)
                except Exception as exc:  # re-raised outside the task group, unwrapped
                    error = exc
                tg.cancel_scope.cancel()
            # What the child wrote to stderr before it ended its cycle is in the pipe by now:
            # it belongs to this cycle's budget, however far behind the pump was.
            self._drain_stderr()
            if self._stderr_dropped:
                await ctx.gate.cap_hit("log_lines", worker=self.name, session=ctx.session,
                                       limit=self.max_log_lines, dropped=self._stderr_dropped)  # fmt: skip
            self._report_dropped()
            if error is not None:
                raise error
            completed = True
        finally:
            if not completed:
                # A violation, a crash, a governed error that escaped, or cancellation by the
                # fleet's deadline: the child does not outlive a failed cycle.
                with anyio.CancelScope(shield=True):
                    await self._terminate()

    async def _converse(self, ctx: CycleContext) -> None:
        if self._needs_hello:
            # Sent once per child, with stderr already being drained (a chatty child blocked on
            # a full stderr pipe would otherwise never read its hello).
            self._needs_hello = False
            await self._send({"type": "hello", "worker": self.name, "protocol": PROTOCOL_VERSION,
                              "state": self._state, "params": self.params})  # fmt: skip
        await self._send({"type": "cycle", "cycle": ctx.cycle, "window": ctx.session.window_key,
                          "now": _iso(ctx.now)})  # fmt: skip
        seen: set[str] = set()
        while True:
            message = await self._receive()
            if isinstance(message, CycleDone):
                self._state = message.state
                return
            if isinstance(message, Propose):
                if message.id in seen:
                    raise WorkerProtocolError(
                        f"propose: id {message.id!r} was already used this cycle",
                        reason="unexpected",
                    )
                seen.add(message.id)
                if len(seen) > self.max_proposals:
                    await ctx.gate.cap_hit("proposals", worker=self.name, session=ctx.session,
                                           limit=self.max_proposals)  # fmt: skip
                    raise WorkerProtocolError(
                        f"more than {self.max_proposals} proposals in one cycle", reason="flood"
                    )
                await self._handle_propose(ctx, message)
                continue
            if isinstance(message, Result):
                raise WorkerProtocolError(
                    f"result for action {message.id!r}, which has no approved decision pending",
                    reason="unexpected",
                )
            # Heartbeat and Log are handled in _receive and never returned.
            raise AssertionError(f"unhandled message {message!r}")  # pragma: no cover

    async def _handle_propose(self, ctx: CycleContext, message: Propose) -> None:
        ident = message.id

        approved: list[str] = []

        async def effect(command_id: str) -> Any:
            ctx.gate.on_terminate(command_id, self._stop_child)
            approved.append(command_id)
            try:
                await self._send({"type": "decision", "id": ident, "decision": "approved",
                                  "command_id": command_id})  # fmt: skip
                result = await self._await_result(ident)
            except WorkerProtocolError as exc:
                raise _Abandon(exc) from exc
            if not result.ok:
                raise ExternalActionFailed(result.error or "the worker reported ok: false")
            return result.result

        # Keys are namespaced per worker instance: a child cannot replay, or claim and so block,
        # another worker's idempotency keys. A restarted instance keeps its name, so its retries
        # still find their own outcomes.
        key = f"external:{self.name}:{message.key}" if message.key is not None else None
        action = await self._without_claims(ctx, message.action)
        try:
            outcome = await ctx.dispatch(action, effect, key=key,
                                         pending_cap=self.max_pending_approvals)  # fmt: skip
        except _Abandon as abandoned:
            raise abandoned.error from None
        except ApprovalPending as exc:
            await self._decide(ident, "pending", exc.reason, str(exc), approval_id=exc.approval_id,
                               command_id=exc.command_id)  # fmt: skip
            return
        except ActionExpired as exc:
            await self._decide(ident, "expired", exc.reason, str(exc), command_id=exc.command_id)
            return
        except ActionDenied as exc:
            if self._stopping:
                # An emergency stopped this child's effect: the child goes (SIGKILL after the
                # shutdown timeout if SIGTERM is not enough) and the cycle ends governed.
                self._stopping = False
                log.error("worker.child_terminated", worker=self.name, pid=self.pid,
                          reason=str(exc))  # fmt: skip
                with anyio.CancelScope(shield=True):
                    await self._terminate()
                raise
            if approved:
                # The child was told "approved" and answered; the outcome was then recorded
                # in-doubt (an emergency landed meanwhile). It gets no second decision.
                log.warning("worker.outcome_in_doubt", worker=self.name, id=ident, reason=str(exc))
                return
            await self._decide(ident, "denied", exc.reason, str(exc), command_id=exc.command_id)
            return
        except StoreError:
            raise  # fail-closed: the store is in trouble, the fleet must see it
        except SupervisorError as exc:  # an idempotency conflict, bad params: refused
            await self._decide(ident, "denied", exc.reason, str(exc))
            return
        if outcome.replayed:
            await self._decide(ident, "done", "already_done",
                               f"command {outcome.command_id} already {outcome.status}",
                               command_id=outcome.command_id, status=outcome.status,
                               result=outcome.result, error=outcome.error)  # fmt: skip

    def _stop_child(self) -> None:
        """Called by the gate when a switch stops effects in flight: SIGTERM to the group now."""
        process = self._process
        if process is not None and process.returncode is None:
            self._stopping = True
            self._signal(process, signal.SIGTERM)

    async def _without_claims(self, ctx: CycleContext, action: Action) -> Action:
        """`critical` and `safe_to_retry` from a child are claims: policy decides them. A claim
        is recorded (once per window, worker, action and claim) for audit, and dropped."""
        claims = {k: True for k in ("critical", "safe_to_retry") if getattr(action, k)}
        if not claims:
            return action
        log.warning("worker.claim_ignored", worker=self.name, action=action.name, claims=claims)
        await ctx.gate.store.once(
            derive_id("claim", ctx.session.id, self.name, action.name, *sorted(claims)),
            NewEvent(kind=ev.WORKER_CLAIM_IGNORED, session_id=ctx.session.id, worker=self.name,
                     reason="claim", payload={"action": action.name, "claims": claims,
                                              "decided_by": "policy"}),
        )  # fmt: skip
        return dataclasses.replace(action, critical=False, safe_to_retry=False)

    async def _decide(
        self, ident: str, decision: str, reason: str, detail: str, **extra: Any
    ) -> None:
        log.info("worker.decision", worker=self.name, id=ident, decision=decision, reason=reason)
        await self._send({"type": "decision", "id": ident, "decision": decision, "reason": reason,
                          "detail": detail, **extra})  # fmt: skip

    async def _await_result(self, ident: str) -> Result:
        while True:
            message = await self._receive()
            if isinstance(message, Result) and message.id == ident:
                return message
            if isinstance(message, Result):
                raise WorkerProtocolError(
                    f"result for action {message.id!r} while {ident!r} is in flight (never "
                    "approved)", reason="unexpected",
                )  # fmt: skip
            raise WorkerProtocolError(
                f"{_kind_of(message)} while action {ident!r} is in flight (expected its result)",
                reason="unexpected",
            )

    # -- I/O -------------------------------------------------------------------------------------

    async def _receive(self) -> Message:
        """The next protocol message that is not a heartbeat or a log line."""
        assert self._stdout is not None
        while True:
            line: bytes | None = None
            with anyio.move_on_after(self.heartbeat_timeout) as scope:
                line = await self._stdout.readline()
            if scope.cancelled_caught:
                raise WorkerHung(
                    f"worker {self.name}: no message for {self.heartbeat_timeout}s (hung)"
                )
            if line is None:
                code = await self._exit_code()
                raise WorkerProtocolError(
                    f"worker {self.name}: the child closed its output (exit code {code})",
                    reason="exited",
                )
            self._messages += 1
            if self._messages > self.max_messages:
                raise WorkerProtocolError(
                    f"more than {self.max_messages} messages in one cycle", reason="flood"
                )
            message = parse_message(line, self.max_line)
            if isinstance(message, Heartbeat):
                continue
            if isinstance(message, Log):
                # Log messages share the stderr lines' budget: a flood of either cannot drown
                # the daemon's own lines in the journal's rate limit. The rest are counted.
                if self._stderr_budget <= 0:
                    self._stderr_dropped += 1
                    continue
                self._stderr_budget -= 1
                getattr(log, message.level)("worker.log", worker=self.name,
                                            message=_printable(message.message))  # fmt: skip
                continue
            return message

    async def _send(self, message: Mapping[str, Any]) -> None:
        process = self._process
        if process is None or process.stdin is None:
            raise WorkerProtocolError(f"worker {self.name}: no child process", reason="exited")
        data = _encode(message)
        try:
            with anyio.fail_after(self.heartbeat_timeout):
                await process.stdin.send(data)
        except TimeoutError:
            raise WorkerHung(
                f"worker {self.name}: the child has not read its input "
                f"for {self.heartbeat_timeout}s"
            ) from None
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            code = await self._exit_code()
            raise WorkerProtocolError(
                f"worker {self.name}: cannot write to the child ({type(exc).__name__}; exit code "
                f"{code})", reason="exited",
            ) from None  # fmt: skip

    async def _exit_code(self) -> int | None:
        process = self._process
        if process is None:
            return None
        with anyio.move_on_after(min(1.0, self.shutdown_timeout)):
            await process.wait()
        return process.returncode

    # -- process lifecycle -------------------------------------------------------------------------

    async def _ensure_started(self) -> anyio.abc.Process:
        if self._process is not None:
            return self._process
        # The child's stderr is a pipe we read by descriptor: at the end of a cycle, what it
        # wrote before its cycle_done is read at once, not when the loop gets round to it.
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        try:
            process = await anyio.open_process(
                launch_argv(self.argv, self.identity), env=child_environment(self.env),
                cwd=self.cwd, start_new_session=True, stderr=write_end,
            )  # fmt: skip
        except OSError as exc:
            os.close(read_end)
            raise WorkerProtocolError(
                f"worker {self.name}: cannot start {self.argv[0]!r}: {exc.strerror or exc}",
                reason="start_failed",
            ) from None
        finally:
            os.close(write_end)
        self._stderr_fd = read_end
        self._stderr_eof = False
        assert process.stdout is not None
        self._process = process
        self._stdout = _LineReader(process.stdout, self.max_line)
        self._stderr_buffer = bytearray()
        self._stderr_skipping = False
        self._needs_hello = True
        log.info("worker.child_started", worker=self.name, pid=process.pid, argv=self.argv,
                 user=self.identity.user, sandbox=self.identity.sandbox)  # fmt: skip
        return process

    async def close(self) -> None:
        """Stop the child: EOF on its stdin and SIGTERM, SIGKILL after shutdown_timeout."""
        with anyio.CancelScope(shield=True):
            await self._terminate()

    aclose = close

    def _signal(self, process: anyio.abc.Process, sig: signal.Signals) -> None:
        # The child leads its own process group (start_new_session): signal the group, so
        # whatever it started goes too. Fall back to the child alone.
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)

    async def _terminate(self) -> None:
        process, self._process, self._stdout = self._process, None, None
        if process is None:
            return
        code = process.returncode
        if code is None:
            if process.stdin is not None:
                with anyio.move_on_after(0.1):
                    with contextlib.suppress(anyio.BrokenResourceError, OSError):
                        await process.stdin.aclose()
            self._signal(process, signal.SIGTERM)
            with anyio.move_on_after(self.shutdown_timeout):
                await process.wait()
            if process.returncode is None:
                log.warning("worker.child_killed", worker=self.name, pid=process.pid,
                            after=self.shutdown_timeout)  # fmt: skip
                self._signal(process, signal.SIGKILL)
                with anyio.move_on_after(max(self.shutdown_timeout, 1.0)):
                    await process.wait()
            else:
                # The group may outlive its leader; it goes down with it. Only right after we
                # saw the leader exit: once it is long gone, its pid (the group id) may have
                # been reused by a stranger's group, which must never get our SIGKILL.
                self._signal_group_only(process, signal.SIGKILL)
        # What the child said on its way out (a traceback) is worth a log line.
        if self._stderr_fd is not None:
            self._stderr_budget = self.max_log_lines  # its last words get their own budget
            with anyio.move_on_after(0.5):
                await self._pump_stderr()
            self._drain_stderr()
            self._report_dropped()
            fd, self._stderr_fd = self._stderr_fd, None
            anyio.notify_closing(fd)
            os.close(fd)
        if process.returncode is not None:
            with anyio.move_on_after(1.0):
                await process.aclose()
        log.info("worker.child_stopped", worker=self.name, pid=process.pid,
                 exit_code=process.returncode)  # fmt: skip

    @staticmethod
    def _signal_group_only(process: anyio.abc.Process, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)

    # -- stderr ------------------------------------------------------------------------------------

    async def _pump_stderr(self) -> None:
        """Forward stderr line by line until it ends; bounded per line and per cycle."""
        fd = self._stderr_fd
        while fd is not None and not self._stderr_eof:
            try:
                await anyio.wait_readable(fd)
            except (anyio.ClosedResourceError, anyio.BusyResourceError, OSError):
                break
            self._drain_stderr(reads=1)
        self._end_stderr_line()

    def _drain_stderr(self, reads: int = _STDERR_DRAIN_READS) -> None:
        """Read what the pipe holds now, without waiting (bounded: a child writing as fast as
        we read cannot keep us here; its lines are over budget anyway)."""
        fd = self._stderr_fd
        for _ in range(reads):
            if fd is None or self._stderr_eof:
                return
            try:
                chunk = os.read(fd, _CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._stderr_eof = True
                self._end_stderr_line()
                return
            self._stderr_feed(chunk)

    def _end_stderr_line(self) -> None:
        if self._stderr_buffer and not self._stderr_skipping:
            self._stderr_line(bytes(self._stderr_buffer))
        self._stderr_buffer.clear()
        self._stderr_skipping = False

    def _stderr_feed(self, chunk: bytes) -> None:
        buffer = self._stderr_buffer
        buffer += chunk
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                break
            if not self._stderr_skipping:
                self._stderr_line(bytes(buffer[:end]))
            self._stderr_skipping = False
            del buffer[: end + 1]
        if len(buffer) > self.max_line:
            if not self._stderr_skipping:
                self._stderr_line(bytes(buffer[: self.max_line]), truncated=True)
            self._stderr_skipping = True  # the rest of this line is dropped
            buffer.clear()

    def _stderr_line(self, raw: bytes, *, truncated: bool = False) -> None:
        if len(raw) > self.max_line:
            raw, truncated = raw[: self.max_line], True
        if self._stderr_budget <= 0:
            self._stderr_dropped += 1
            return
        self._stderr_budget -= 1
        line = _printable(raw.decode("utf-8", errors="replace").rstrip("\r"))
        if truncated:
            log.info("worker.stderr", worker=self.name, line=line, truncated=True)
        else:
            log.info("worker.stderr", worker=self.name, line=line)

    def _report_dropped(self) -> None:
        if self._stderr_dropped:
            log.warning("worker.stderr_dropped", worker=self.name, lines=self._stderr_dropped,
                        limit=self.max_log_lines)  # fmt: skip
            self._stderr_dropped = 0


def _kind_of(message: Message) -> str:
    return {Propose: "propose", Result: "result", CycleDone: "cycle_done", Heartbeat: "heartbeat",
            Log: "log"}[type(message)]  # fmt: skip


def _iso(instant: datetime) -> str:
    return instant.isoformat()

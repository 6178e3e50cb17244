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
import os
import signal
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Final

import anyio
import anyio.abc
import structlog

from .. import events as ev
from ..actions import Action, derive_id
from ..errors import ActionDenied, ActionExpired, ApprovalPending, StoreError, SupervisorError
from ..store import NewEvent
from .protocol import (
    CHUNK,
    PROTOCOL_VERSION,
    CycleDone,
    ExternalActionFailed,
    Heartbeat,
    LineReader,
    Log,
    Message,
    Propose,
    Result,
    WorkerHung,
    WorkerProtocolError,
    encode,
    parse_message,
    printable,
)
from .sandbox import Identity, launch_argv
from .worker import CycleContext, Worker

log = structlog.get_logger(__name__)

# Environment variables of the daemon that a child never inherits: the kill-switch secret and
# the rest of the daemon's own settings, the database's connection settings and credentials
# (libpq's PG*), the systemd sockets (a child must not notify for the daemon) and credentials
# directory. `env=` can still set any of them explicitly.
_SCRUB_PREFIXES: Final = ("ACP_", "PG")
_SCRUB_NAMES: Final = frozenset({"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                                 "LISTEN_PID", "LISTEN_FDNAMES", "CREDENTIALS_DIRECTORY",
                                 "DATABASE_URL"})  # fmt: skip

_STDERR_DRAIN_READS: Final = 16  # at most 1 MiB read at a cycle's end
_STDERR_LINES_PER_CYCLE: Final = 1000


def child_environment(
    env: Mapping[str, str] | None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment a child starts with: the daemon's, minus its secrets, plus `env`."""
    source = os.environ if base is None else base
    out = {k: v for k, v in source.items()
           if not k.startswith(_SCRUB_PREFIXES) and k not in _SCRUB_NAMES}  # fmt: skip
    out.update(env or {})
    return out


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
        self._stdout: LineReader | None = None
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
                                            message=printable(message.message))  # fmt: skip
                continue
            return message

    async def _send(self, message: Mapping[str, Any]) -> None:
        process = self._process
        if process is None or process.stdin is None:
            raise WorkerProtocolError(f"worker {self.name}: no child process", reason="exited")
        data = encode(message)
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
        self._stdout = LineReader(process.stdout, self.max_line)
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
                chunk = os.read(fd, CHUNK)
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
        line = printable(raw.decode("utf-8", errors="replace").rstrip("\r"))
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

"""The alerts engine: raise and resolve once per condition and scope, evaluate the approval and
rate conditions, and push deliveries to the sinks without ever blocking the gate."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import anyio
import anyio.to_thread
import structlog
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ... import events as ev
from ...actions import derive_id
from ...runtime.sandbox import without_capabilities
from ...store import NewEvent, Store, system_stream
from ...timing.clock import Clock
from .config import (
    APPROVAL_AGE,
    APPROVAL_BACKLOG,
    APPROVAL_RATE_CHANGE,
    DENIAL_RATE_CHANGE,
    AlertConfig,
    Sink,
    WebhookSink,
)
from .delivery import Delivery, command_environment, plain, post

log = structlog.get_logger(__name__)

DEFAULT_QUEUE_SIZE = 1000
DEFAULT_BACKOFF = 0.2  # real seconds; attempt n waits backoff * n before the next attempt
ERROR_TAIL = 300  # characters of a failing command's stderr kept in the failure record

RATE_KINDS = (ev.ACTION_DENIED, ev.ACTION_STARTED, ev.APPROVAL_REQUESTED, ev.APPROVAL_GRANTED)


class Alerts:
    """Raise, resolve and evaluate alerts for one fleet, and deliver them to the sinks."""

    def __init__(
        self,
        store: Store,
        *,
        fleet: str,
        config: AlertConfig,
        clock: Clock,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        backoff: float = DEFAULT_BACKOFF,
    ) -> None:
        self.store = store
        self.fleet = fleet
        self.config = config
        self.clock = clock
        self.backoff = backoff
        self.sinks: tuple[Sink, ...] = config.sinks
        self._queues: list[
            tuple[MemoryObjectSendStream[Delivery], MemoryObjectReceiveStream[Delivery]]
        ] = [
            anyio.create_memory_object_stream[Delivery](max_buffer_size=queue_size)
            for _ in self.sinks
        ]
        # Counters (also for metrics): deliveries that succeeded, failed after retries, dropped.
        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        # The last evaluate()'s view of the approval backlog (for metrics).
        self.pending_approvals = 0
        self.oldest_pending_age = 0.0
        self._outstanding = 0
        self._idle: anyio.Event | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._consuming = False
        # Alerts told to the sinks but not recorded (the store failed), per (condition, stream).
        self._unrecorded: set[tuple[str, str]] = set()
        self._unrecorded_resolves: set[str] = set()

    # -- raise and resolve -------------------------------------------------------------------

    def _alert_id(self, condition: str, session_id: str | None, episode: int) -> str:
        scope = session_id or "fleet"
        if episode == 0:
            return derive_id("alert", self.fleet, condition, scope)
        return derive_id("alert", self.fleet, condition, scope, str(episode))

    async def _counts(self, condition: str, stream: str) -> tuple[int, int]:
        """(ALERT events, ALERT_RESOLVED events) of this condition on this stream."""
        return await self.store.alert_episodes(stream=stream, condition=condition)

    def _announce(
        self, state: str, condition: str, session_id: str | None, stream: str,
        payload: dict[str, Any], *, recorded: bool, error: BaseException | None = None,
    ) -> None:  # fmt: skip
        """Log the change (a raise is a warning, a resolve is info) and queue it for the sinks."""
        fields: dict[str, Any] = {"condition": condition, "session_id": session_id,
                                  "detail": payload, "recorded": recorded}  # fmt: skip
        if error is not None:
            fields["error"] = f"{type(error).__name__}: {error}"
        if state == "raised":  # each event name literal, so a search finds it
            log.warning("alert.raised", **fields)
        else:
            log.info("alert.resolved", **fields)
        self._enqueue(condition, state, session_id, stream, payload)

    async def _record(
        self, kind: str, command_id: str, stream: str, condition: str, payload: dict[str, Any]
    ) -> bool:
        """The ALERT or ALERT_RESOLVED event, exactly once for its id."""
        return await self.store.once(
            command_id,
            NewEvent(kind=kind, session_id=stream, reason=condition, payload=payload,
                     state_bearing=True, command_id=command_id),
        )  # fmt: skip

    async def raise_alert(
        self, condition: str, *, session_id: str | None, detail: Mapping[str, Any]
    ) -> bool:
        """Record, log and deliver the alert unless it is already raised. True when recorded
        now. A failing store still logs and delivers (once) and returns False; never raises."""
        payload = plain(detail)
        stream = session_id or system_stream(self.fleet)
        key = (condition, stream)
        try:
            raised, resolved = await self._counts(condition, stream)
            if raised > resolved:
                self._unrecorded.discard(key)
                return False
            alert_id = self._alert_id(condition, session_id, resolved)
            fresh = await self._record(ev.ALERT, alert_id, stream, condition, payload)
        except Exception as exc:
            if key in self._unrecorded:
                return False
            self._unrecorded.add(key)
            self._announce(
                "raised", condition, session_id, stream, payload, recorded=False, error=exc
            )
            return False
        if not fresh:
            return False
        if key in self._unrecorded:
            # The sinks heard of it while the store was failing; now it is on record too.
            self._unrecorded.discard(key)
            log.info("alert.recorded", condition=condition, session_id=session_id)
            return True
        self._announce("raised", condition, session_id, stream, payload, recorded=True)
        return True

    async def resolve(
        self, condition: str, *, session_id: str | None, detail: Mapping[str, Any]
    ) -> bool:
        """Record ALERT_RESOLVED once for a raised alert, log and deliver. True when recorded
        now; False when nothing was raised (or the store failed). Never raises."""
        payload = plain(detail)
        stream = session_id or system_stream(self.fleet)
        key = (condition, stream)
        try:
            raised, resolved = await self._counts(condition, stream)
        except Exception as exc:
            if key in self._unrecorded:
                self._unrecorded.discard(key)
                self._announce(
                    "resolved", condition, session_id, stream, payload, recorded=False, error=exc
                )
            return False
        if raised <= resolved:
            if key in self._unrecorded:  # raised while the store failed: tell the sinks it is over
                self._unrecorded.discard(key)
                self._announce("resolved", condition, session_id, stream, payload, recorded=False)
            return False
        alert_id = self._alert_id(condition, session_id, resolved)
        resolve_id = derive_id("alert.resolved", alert_id)
        try:
            fresh = await self._record(ev.ALERT_RESOLVED, resolve_id, stream, condition, payload)
        except Exception as exc:
            if resolve_id not in self._unrecorded_resolves:
                self._unrecorded_resolves.add(resolve_id)
                self._announce(
                    "resolved", condition, session_id, stream, payload, recorded=False, error=exc
                )
            return False
        self._unrecorded.discard(key)
        if not fresh:
            return False
        if resolve_id in self._unrecorded_resolves:
            self._unrecorded_resolves.discard(resolve_id)
            return True
        self._announce("resolved", condition, session_id, stream, payload, recorded=True)
        return True

    # -- evaluated conditions ----------------------------------------------------------------

    async def evaluate(self) -> None:
        """approval_age and approval_backlog from one indexed query; raise or resolve each."""
        try:
            backlog = await self.store.approval_backlog(fleet=self.fleet)
        except Exception as exc:
            log.warning("alerts.evaluate_failed", error=f"{type(exc).__name__}: {exc}")
            return
        pending, oldest = backlog.pending, backlog.oldest_at
        age = max(0.0, (self.clock.now() - oldest).total_seconds()) if oldest else 0.0
        self.pending_approvals, self.oldest_pending_age = pending, age
        cfg = self.config
        detail = {
            "pending": pending,
            "oldest_age_seconds": round(age, 3),
            "approval_age_seconds": cfg.approval_age,
            "approval_backlog": cfg.approval_backlog,
        }
        if oldest is not None and age > cfg.approval_age:
            await self.raise_alert(APPROVAL_AGE, session_id=None, detail=detail)
        else:
            await self.resolve(APPROVAL_AGE, session_id=None, detail=detail)
        if pending > cfg.approval_backlog:
            await self.raise_alert(APPROVAL_BACKLOG, session_id=None, detail=detail)
        else:
            await self.resolve(APPROVAL_BACKLOG, session_id=None, detail=detail)

    async def on_window_closed(self, session_id: str) -> None:
        """Compare the closed window's denial and approval rates with the trailing windows'."""
        cfg = self.config
        try:
            session = await self.store.get_session(session_id)
            if session is None:
                return
            found = await self.store.rate_counts(
                fleet=self.fleet, session_id=session_id, starts_at=session.starts_at,
                trailing_windows=cfg.trailing_windows, kinds=RATE_KINDS,
            )  # fmt: skip
        except Exception as exc:
            log.warning(
                "alerts.rates_failed", session_id=session_id, error=f"{type(exc).__name__}: {exc}"
            )
            return
        current, trailing = found.current, found.trailing

        def denial(c: Mapping[str, int]) -> tuple[int, int]:
            denied = c.get(ev.ACTION_DENIED, 0)
            return denied, denied + c.get(ev.ACTION_STARTED, 0)

        def approval(c: Mapping[str, int]) -> tuple[int, int]:
            return c.get(ev.APPROVAL_GRANTED, 0), c.get(ev.APPROVAL_REQUESTED, 0)

        for condition, ratio in ((DENIAL_RATE_CHANGE, denial), (APPROVAL_RATE_CHANGE, approval)):
            hits, samples = ratio(current)
            if samples < cfg.rate_min_samples:
                continue
            rates = []
            for counts in trailing.values():
                t_hits, t_samples = ratio(counts)
                if t_samples >= cfg.rate_min_samples:
                    rates.append(t_hits / t_samples)
            if not rates:
                continue
            rate = hits / samples
            mean = sum(rates) / len(rates)
            if abs(rate - mean) > cfg.rate_change:
                await self.raise_alert(
                    condition,
                    session_id=session_id,
                    detail={
                        "rate": round(rate, 6),
                        "trailing_mean": round(mean, 6),
                        "samples": samples,
                        "trailing_windows": len(rates),
                        "rate_change": cfg.rate_change,
                    },
                )

    # -- sinks -------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Deliveries waiting or in progress."""
        return self._outstanding

    def _enqueue(
        self,
        condition: str,
        state: str,
        session_id: str | None,
        stream: str,
        detail: dict[str, Any],
    ) -> None:
        if not self._queues:
            return
        body = json.dumps(
            {
                "fleet": self.fleet,
                "condition": condition,
                "state": state,
                "session_id": session_id,
                "detail": detail,
                "at": self.clock.now().isoformat(),
            },
            sort_keys=True,
        ).encode()
        item = Delivery(condition, state, session_id, stream, body)
        for sink, (send, _receive) in zip(self.sinks, self._queues, strict=True):
            try:
                send.send_nowait(item)
            except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError) as exc:
                self.dropped += 1
                why = "queue_full" if isinstance(exc, anyio.WouldBlock) else "closed"
                log.warning(
                    "alert.dropped",
                    sink=sink.describe(),
                    condition=condition,
                    state=state,
                    reason=why,
                    dropped=self.dropped,
                )
            else:
                self._outstanding += 1

    async def run_sinks(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Deliver queued alerts, one task per sink. Runs until cancelled, or until close() was
        called and the queues are drained (at once when there are no sinks)."""
        self._limiter = anyio.CapacityLimiter(max(1, len(self.sinks)))
        self._consuming = True
        try:
            async with anyio.create_task_group() as tg:
                for index, (sink, (_send, receive)) in enumerate(
                    zip(self.sinks, self._queues, strict=True)
                ):
                    try:
                        mine = receive.clone()
                    except anyio.ClosedResourceError:
                        continue  # close() came first
                    tg.start_soon(self._consume, sink, mine, name=f"alert-sink-{index}")
                task_status.started()
        finally:
            self._consuming = False

    def close(self) -> None:
        """No more deliveries: later alerts are dropped; run_sinks() ends once drained."""
        for send, receive in self._queues:
            send.close()
            receive.close()  # consumers read from their clones
        if not self._consuming:  # nobody will drain what is queued: it is dropped
            self.dropped += self._outstanding
            self._outstanding = 0

    async def flush(self) -> None:
        """Wait until every queued delivery has been attempted (bound it with a timeout)."""
        while self._outstanding > 0:
            if self._idle is None or self._idle.is_set():
                self._idle = anyio.Event()
            await self._idle.wait()

    async def _consume(self, sink: Sink, receive: MemoryObjectReceiveStream[Delivery]) -> None:
        async with receive:
            async for item in receive:
                try:
                    await self._deliver(sink, item)
                finally:
                    self._outstanding -= 1
                    if self._outstanding <= 0 and self._idle is not None:
                        self._idle.set()

    async def _attempt(self, sink: Sink, body: bytes) -> str | None:
        """One delivery attempt: None when it worked, else why not."""
        if isinstance(sink, WebhookSink):
            # The socket timeout bounds each read; fail_after bounds a slow trickle. An
            # abandoned thread ends at its own socket timeout.
            with anyio.fail_after(sink.timeout + 1.0):
                status = await anyio.to_thread.run_sync(
                    post,
                    sink.url,
                    body,
                    sink.timeout,
                    sink.signing_secret,
                    abandon_on_cancel=True,
                    limiter=self._limiter,
                )
            return None if 200 <= status < 300 else f"HTTP {status}"
        with anyio.fail_after(sink.timeout):
            done = await anyio.run_process(
                without_capabilities(sink.argv), input=body, check=False, env=command_environment()
            )
        if done.returncode == 0:
            return None
        tail = (done.stderr or b"").decode(errors="replace").strip()[-ERROR_TAIL:]
        return f"exit status {done.returncode}" + (f": {tail}" if tail else "")

    async def _deliver(self, sink: Sink, item: Delivery) -> None:
        attempts = 1 + sink.retries
        error = "not attempted"
        for attempt in range(1, attempts + 1):
            try:
                problem = await self._attempt(sink, item.body)
            except TimeoutError:
                problem = f"timed out after {sink.timeout:g}s"
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if problem is not None and isinstance(sink, WebhookSink):
                problem = sink.redact(problem)  # logged and stored: no credentials in either
            if problem is None:
                self.delivered += 1
                log.debug(
                    "alert.delivered",
                    sink=sink.describe(),
                    condition=item.condition,
                    state=item.state,
                    attempt=attempt,
                )
                return
            error = problem
            if attempt < attempts:
                await anyio.sleep(self.backoff * attempt)
        self.failed += 1
        log.warning(
            "alert.delivery_failed",
            sink=sink.describe(),
            condition=item.condition,
            state=item.state,
            attempts=attempts,
            error=error,
        )
        try:
            await self.store.append(
                NewEvent(
                    kind=ev.ALERT_DELIVERY_FAILED,
                    session_id=item.stream,
                    reason=item.condition,
                    payload={
                        "condition": item.condition,
                        "state": item.state,
                        "sink": sink.describe(),
                        "attempts": attempts,
                        "error": error,
                    },
                    state_bearing=True,
                )
            )
        except Exception as exc:
            log.error(
                "alert.delivery_failure_unrecorded",
                sink=sink.describe(),
                condition=item.condition,
                error=f"{type(exc).__name__}: {exc}",
            )

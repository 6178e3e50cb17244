"""Alerts: recorded once in the store, logged, and pushed to operator sinks without blocking.

An alert is a *condition* (a short name) raised for a scope: a session window (`session_id`) or
the whole fleet (`session_id=None`, recorded on the fleet's system stream). Raising is
idempotent: while an alert is raised, raising it again records nothing and notifies nobody, so
there is one ALERT event per condition per window (and one per fleet-level episode). Resolving
records ALERT_RESOLVED once, only for an alert that is raised; after that, the next raise of the
same condition and scope is a new alert (a new episode with its own command id). The episode
number is the count of ALERT_RESOLVED events of that condition on that stream, so it survives
restarts and agrees between hosts; command ids are deterministic (`derive_id`), so two hosts
raising the same alert write one event.

Conditions
----------
Raised by the daemon when the thing happens (event-driven)::

    budget_exhausted         a window's cost or action budget ran out (per window)
    token_budget_exhausted   a token budget (user, team, org) ran out
    worker_quarantined       a worker restarted too often and was quarantined
    worker_stalled           a running worker completed no cycle within twice its cadence plus
                             its deadline (fleet-wide; resolved when no worker is stalled)
    restart_intensity        restarts are piling up (before quarantine)
    killswitch_engaged       a kill switch was engaged (any scope)
    state_write_failed       a state-bearing write did not commit (the store is failing)
    recovery_in_doubt        the recovery scan found actions started without an outcome

Evaluated here, from indexed queries::

    approval_age             the oldest pending approval is older than `approval_age`
                             (`evaluate()`; resolved when it clears)
    approval_backlog         more than `approval_backlog` approvals are pending
                             (`evaluate()`; resolved when it clears)
    denial_rate_change       ACTION_DENIED / (ACTION_DENIED + ACTION_STARTED) of the window just
                             closed moved more than `rate_change` away from the mean of the
                             trailing windows (`on_window_closed()`; per window, not resolved)
    approval_rate_change     the same for APPROVAL_GRANTED / APPROVAL_REQUESTED

A rate is only computed from a window with at least `rate_min_samples` decisions (denial rate:
denials + starts; approval rate: requests); the trailing mean is the mean of the rates of those
of the previous `trailing_windows` closed windows of the fleet that have enough samples
themselves. No such trailing window: no comparison.

When the store cannot record an alert (the condition may well be `state_write_failed`), the
alert is still logged and delivered to the sinks, once per condition and scope until it is
recorded or resolved, and `raise_alert` returns False. Nothing here raises to the caller.

Sinks
-----
Deliveries go to a bounded in-memory queue per sink (`queue_size`, default 1000); a full queue
drops the delivery (counted in `dropped`, logged). `run_sinks()` drains the queues, one task
per sink so a slow sink delays only itself. A webhook gets an HTTP POST of JSON
``{"fleet", "condition", "state": "raised"|"resolved", "session_id", "detail", "at"}``; a
command gets the same JSON on stdin. Each attempt has the sink's timeout; a failed attempt
(exception, timeout, non-2xx status, non-zero exit) is retried `retries` times with a short
real-time backoff; a delivery that still fails is an ALERT_DELIVERY_FAILED event (state-bearing,
on the alert's stream) and a log warning.

Config (section ``[alerts]``, every key optional)::

    approval_age = "30m"        # pending approval older than this
    approval_backlog = 50       # more pending approvals than this
    rate_change = 0.3           # absolute change of a rate vs the trailing mean, in (0, 1]
    rate_min_samples = 20       # decisions a window needs before its rate counts
    trailing_windows = 6        # closed windows the trailing mean looks back over
    evaluate_every = "1m"       # cadence of evaluate() (the daemon schedules it)

    [[alerts.sinks]]
    type = "webhook"
    url = "https://hooks.example.com/acp"
    timeout = "5s"              # per attempt (default 5s)
    retries = 3                 # extra attempts after the first (default 3)

    [[alerts.sinks]]
    type = "command"
    argv = ["/usr/bin/logger", "-t", "acp"]
    timeout = "10s"             # per attempt (default 10s); the process is killed after it
    retries = 0                 # (default 0)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import structlog
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import events as ev
from .actions import derive_id
from .clock import Clock
from .configparse import array, check_keys, nonempty_str, parse_duration, table, type_name
from .errors import ConfigError
from .sandbox import without_capabilities
from .schema import keys
from .store import NewEvent, Store, system_stream

log = structlog.get_logger("supervisor.alerts")

# Event-driven conditions (the daemon raises them) and evaluated ones (raised here).
BUDGET_EXHAUSTED = "budget_exhausted"
TOKEN_BUDGET_EXHAUSTED = "token_budget_exhausted"
WORKER_QUARANTINED = "worker_quarantined"
WORKER_STALLED = "worker_stalled"
RESTART_INTENSITY = "restart_intensity"
KILLSWITCH_ENGAGED = "killswitch_engaged"
STATE_WRITE_FAILED = "state_write_failed"
RECOVERY_IN_DOUBT = "recovery_in_doubt"
APPROVAL_AGE = "approval_age"
APPROVAL_BACKLOG = "approval_backlog"
DENIAL_RATE_CHANGE = "denial_rate_change"
APPROVAL_RATE_CHANGE = "approval_rate_change"
WORKER_CAP = "worker_cap"
CONDITIONS: tuple[str, ...] = (
    BUDGET_EXHAUSTED,
    TOKEN_BUDGET_EXHAUSTED,
    WORKER_QUARANTINED,
    WORKER_STALLED,
    RESTART_INTENSITY,
    KILLSWITCH_ENGAGED,
    STATE_WRITE_FAILED,
    RECOVERY_IN_DOUBT,
    APPROVAL_AGE,
    APPROVAL_BACKLOG,
    DENIAL_RATE_CHANGE,
    APPROVAL_RATE_CHANGE,
    WORKER_CAP,
)

DEFAULT_QUEUE_SIZE = 1000
DEFAULT_BACKOFF = 0.2  # real seconds; attempt n waits backoff * n before the next attempt
_ERROR_TAIL = 300  # characters of a failing command's stderr kept in the failure record

_RATE_KINDS = (ev.ACTION_DENIED, ev.ACTION_STARTED, ev.APPROVAL_REQUESTED, ev.APPROVAL_GRANTED)


# --- config ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WebhookSink:
    url: str
    timeout: float = 5.0
    retries: int = 3
    # HMAC-SHA256 key for the X-ACP-Signature header (read from `signing_secret_file`).
    signing_secret: bytes | None = field(default=None, repr=False)
    type: ClassVar[str] = "webhook"

    def redact(self, text: str) -> str:
        """`text` with the URL's credentials, query and fragment taken out (an error message
        from the HTTP stack may quote the URL)."""
        parts = urlsplit(self.url)
        text = text.replace(self.url, self.describe().removeprefix("webhook "))
        for secret in (parts.password, parts.username, parts.query, parts.fragment):
            if secret:
                text = text.replace(secret, "***")
        return text

    def describe(self) -> str:
        """The URL without credentials, query or fragment (they may hold a token)."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return f"webhook {parts.scheme}://{host}{port}{parts.path}"


@dataclass(frozen=True, slots=True)
class CommandSink:
    argv: tuple[str, ...]
    timeout: float = 10.0
    retries: int = 0
    type: ClassVar[str] = "command"

    def describe(self) -> str:
        return f"command {self.argv[0]}"


Sink = WebhookSink | CommandSink

_SINK_KEYS = {kind: keys(f'alerts.sinks[] (type = "{kind}")') for kind in ("webhook", "command")}
_ALERT_KEYS = keys("alerts")


def _integer(value: object, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        got = repr(value) if isinstance(value, float) else type_name(value)
        raise ConfigError(f"{where}: expected an integer, got {got}")
    if value < minimum:
        raise ConfigError(f"{where}: must be >= {minimum}, got {value}")
    return value


def _fraction(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: expected a number, got {type_name(value)}")
    number = float(value)
    if not (math.isfinite(number) and 0 < number <= 1):
        raise ConfigError(f"{where}: must be > 0 and <= 1, got {value!r}")
    return number


def _http_url(value: object, where: str) -> str:
    url = nonempty_str(value, where)
    try:
        parts = urlsplit(url)
        ok = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
        _ = parts.port  # a malformed port raises ValueError
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"{where}: must be an http:// or https:// URL with a host, got {url!r}")
    return url


def _sink(raw: object, where: str) -> Sink:
    entry = table(raw, where)
    if "type" not in entry:
        raise ConfigError(f"{where}: missing 'type' (webhook or command)")
    kind = entry["type"]
    if not isinstance(kind, str) or kind not in _SINK_KEYS:
        shown = repr(kind) if isinstance(kind, str) else type_name(kind)
        raise ConfigError(f"{where}.type: unknown sink type {shown} (webhook, command)")
    check_keys(entry, _SINK_KEYS[kind], where)
    if kind == "webhook":
        if "url" not in entry:
            raise ConfigError(f"{where}: missing 'url'")
        url = _http_url(entry["url"], f"{where}.url")
        timeout = parse_duration(entry.get("timeout", 5.0), f"{where}.timeout")
        retries = _integer(entry.get("retries", 3), f"{where}.retries", 0)
        signing: bytes | None = None
        if "signing_secret_file" in entry:
            path = nonempty_str(entry["signing_secret_file"], f"{where}.signing_secret_file")
            try:
                signing = Path(path).read_bytes().rstrip(b"\r\n")
            except OSError as exc:
                raise ConfigError(f"{where}.signing_secret_file: cannot read {path}: "
                                  f"{exc.strerror or exc}") from None  # fmt: skip
            if not signing:
                raise ConfigError(f"{where}.signing_secret_file: {path} is empty")
        return WebhookSink(url=url, timeout=timeout, retries=retries, signing_secret=signing)
    if "argv" not in entry:
        raise ConfigError(f"{where}: missing 'argv'")
    argv = array(entry["argv"], f"{where}.argv")
    if not argv:
        raise ConfigError(f"{where}.argv: must not be empty")
    args = tuple(nonempty_str(a, f"{where}.argv[{i}]") for i, a in enumerate(argv))
    timeout = parse_duration(entry.get("timeout", 10.0), f"{where}.timeout")
    retries = _integer(entry.get("retries", 0), f"{where}.retries", 0)
    return CommandSink(argv=args, timeout=timeout, retries=retries)


@dataclass(frozen=True, slots=True)
class AlertConfig:
    approval_age: float = 1800.0  # seconds
    approval_backlog: int = 50
    rate_change: float = 0.3
    rate_min_samples: int = 20
    trailing_windows: int = 6
    evaluate_every: float = 60.0  # seconds
    sinks: tuple[Sink, ...] = ()

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> AlertConfig:
        """The `[alerts]` table; None gives the defaults. ConfigError names the bad item."""
        if section is None:
            return cls()
        section = table(section, "alerts")
        check_keys(section, _ALERT_KEYS, "alerts")
        d = cls()
        sinks = tuple(
            _sink(raw, f"alerts.sinks[{i}]")
            for i, raw in enumerate(array(section.get("sinks", []), "alerts.sinks"))
        )
        return cls(
            approval_age=parse_duration(
                section.get("approval_age", d.approval_age), "alerts.approval_age"
            ),
            approval_backlog=_integer(
                section.get("approval_backlog", d.approval_backlog), "alerts.approval_backlog", 1
            ),
            rate_change=_fraction(section.get("rate_change", d.rate_change), "alerts.rate_change"),
            rate_min_samples=_integer(
                section.get("rate_min_samples", d.rate_min_samples), "alerts.rate_min_samples", 1
            ),
            trailing_windows=_integer(
                section.get("trailing_windows", d.trailing_windows), "alerts.trailing_windows", 1
            ),
            evaluate_every=parse_duration(
                section.get("evaluate_every", d.evaluate_every), "alerts.evaluate_every"
            ),
            sinks=sinks,
        )


# --- alerts ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Delivery:
    condition: str
    state: str  # "raised" | "resolved"
    session_id: str | None
    stream: str
    body: bytes


def _plain(detail: Mapping[str, Any]) -> dict[str, Any]:
    """`detail` as plain JSON data (what the store and the sinks can carry); never raises."""
    try:
        text = json.dumps(dict(detail), default=str, allow_nan=False)
    except (TypeError, ValueError):
        return {"detail": repr(detail)[:1000]}
    plain: dict[str, Any] = json.loads(text)
    return plain


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as the failure it is (its 3xx status): the body and its signature
    go to the configured receiver or nowhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)

#: What an alert command inherits of the daemon's environment; nothing else (no ACP_*, no
#: database or cloud credentials, no systemd sockets).
_COMMAND_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")


def command_environment(source: Mapping[str, str] | None = None) -> dict[str, str]:
    source = os.environ if source is None else source
    return {k: source[k] for k in _COMMAND_ENV if k in source}


def signature(secret: bytes, body: bytes) -> str:
    """The X-ACP-Signature header: `sha256=` and the hex HMAC-SHA256 of the exact body."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _post(url: str, body: bytes, timeout: float, secret: bytes | None = None) -> int:
    """One HTTP POST (in a worker thread); the response status, 3xx/4xx/5xx included."""
    headers = {"Content-Type": "application/json", "User-Agent": "acp-supervisor"}
    if secret is not None:
        headers["X-ACP-Signature"] = signature(secret, body)
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            response.read(65536)
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code


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
            tuple[MemoryObjectSendStream[_Delivery], MemoryObjectReceiveStream[_Delivery]]
        ] = [
            anyio.create_memory_object_stream[_Delivery](max_buffer_size=queue_size)
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
        payload = _plain(detail)
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
        payload = _plain(detail)
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
                trailing_windows=cfg.trailing_windows, kinds=_RATE_KINDS,
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
        item = _Delivery(condition, state, session_id, stream, body)
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

    async def _consume(self, sink: Sink, receive: MemoryObjectReceiveStream[_Delivery]) -> None:
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
                    _post,
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
        tail = (done.stderr or b"").decode(errors="replace").strip()[-_ERROR_TAIL:]
        return f"exit status {done.returncode}" + (f": {tail}" if tail else "")

    async def _deliver(self, sink: Sink, item: _Delivery) -> None:
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

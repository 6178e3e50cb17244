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

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from ...configparse import array, check_keys, nonempty_str, parse_duration, table, type_name
from ...errors import ConfigError
from ...schema import keys

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

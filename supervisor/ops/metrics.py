"""Prometheus metrics and a health check, served from a thread of their own.

The HTTP server (wsgiref, one thread per request) runs beside the event loop, so it keeps
answering when the loop is stuck: that is what makes `/healthz` useful. The loop calls `tick()`
whenever it makes progress; `/healthz` answers 503 once no tick came for `stall_after` seconds,
or while `set_store_ok(False)` says the store is failing.

Paths::

    /metrics   Prometheus text format (this Metrics' own registry, nothing process-global)
    /healthz   200 {"ok": true, ...} or 503 {"ok": false, "reasons": [...], ...}

Metrics: the table `METRICS` below; docs/metrics.md is generated from it
(`python -m supervisor.docgen`) and a test checks both against the registry.

`prometheus_client` is imported when a `Metrics` is built (metrics enabled), not when this
module is imported, so `MetricsConfig` parses `[metrics]` without it.

Config (section ``[metrics]``, every key optional)::

    enabled = false          # off by default
    host = "127.0.0.1"
    port = 9464              # 0 picks a free port (tests)
    stall_after = "30s"      # /healthz fails when the main loop made no progress for this long
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import platform
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, Literal
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ..configparse import check_keys, nonempty_str, parse_duration, table, type_name
from ..errors import ConfigError
from ..schema import keys
from ..timing.clock import SystemClock

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

KILLSWITCH_MODES = ("disengaged", "halt_noncritical", "halt_all", "emergency")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass(frozen=True, slots=True)
class MetricDef:
    """One exposed metric: its full name (as scraped), type, labels and help text."""

    name: str
    kind: Literal["gauge", "counter", "histogram"]
    labels: tuple[str, ...]
    help: str


# Prometheus conventions: one unit per metric, named in its suffix (`_seconds`); counters end
# in `_total`; no `_created` series. Counters count since this process started.
METRICS: tuple[MetricDef, ...] = (
    MetricDef("acp_build_info", "gauge", ("version", "python"),
              "Always 1; the labels name the running build."),
    MetricDef("acp_workers", "gauge", ("state",), "Worker instances per state."),
    MetricDef("acp_actions_total", "counter", ("outcome", "reason"),
              "Actions through the gate, by outcome (succeeded, failed, denied) and reason."),
    MetricDef("acp_approvals_pending", "gauge", (), "Pending approvals of the fleet."),
    MetricDef("acp_oldest_pending_approval_seconds", "gauge", (),
              "Age of the oldest pending approval at scrape time (0 when none)."),
    MetricDef("acp_window_budget_used_actions", "gauge", (),
              "Actions charged to the current window's budget."),
    MetricDef("acp_window_budget_used_cost", "gauge", (),
              "Cost units charged to the current window's budget."),
    MetricDef("acp_gate_latency_seconds", "histogram", (),
              "Gate latency per admitted action, 0.5 ms to 1 s buckets."),
    MetricDef("acp_killswitch_mode", "gauge", ("mode",),
              "1 for the current host kill-switch mode, 0 for the others."),
    MetricDef("acp_progress_age_seconds", "gauge", (),
              "Real seconds since the main loop last made progress (/healthz fails past stall_after)."),
    MetricDef("acp_store_ok", "gauge", (), "1 while the store answers, 0 when it fails."),
    MetricDef("acp_worker_restarts_total", "counter", ("worker",),
              "Worker restarts after a crash or a hang, per worker instance."),
    MetricDef("acp_worker_quarantines_total", "counter", ("worker",),
              "Times a worker instance went to quarantine."),
    MetricDef("acp_windows_opened_total", "counter", (), "Governance windows this host opened."),
    MetricDef("acp_windows_closed_total", "counter", (), "Governance windows this host closed."),
    MetricDef("acp_alert_deliveries_total", "counter", ("result",),
              "Alert deliveries to sinks: sent, failed (after its retries) or dropped (queue full)."),
)  # fmt: skip
_BY_NAME = {m.name: m for m in METRICS}
# Counters read at scrape time from counts the daemon keeps anyway (windows, alerts, workers).
_SCRAPED = (
    "acp_worker_restarts_total", "acp_worker_quarantines_total", "acp_windows_opened_total",
    "acp_windows_closed_total", "acp_alert_deliveries_total",
)  # fmt: skip
CountSource = Callable[[], Mapping[str, float]]  # label value ("" without a label) -> count


def metrics_markdown() -> str:
    """docs/metrics.md, from METRICS."""
    lines = [
        "# Metrics",
        "",
        "<!-- generated by `python -m supervisor.docgen`; do not edit by hand -->",
        "",
        "Served at `/metrics` when `[metrics] enabled = true` (see docs/config.md), in the",
        "Prometheus text format. Every counter ends in `_total` and counts since the daemon",
        "process started; every time is in seconds and says so in its name; no `_created`",
        "series are exported. `/healthz` answers 200 or 503 with the reasons as JSON.",
        "",
        "| metric | type | labels | meaning |",
        "|---|---|---|---|",
    ]
    for m in METRICS:
        labels = ", ".join(f"`{label}`" for label in m.labels) or "-"
        lines.append(f"| `{m.name}` | {m.kind} | {labels} | {m.help} |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9464
    stall_after: float = 30.0  # seconds
    # The listener holds at most this many connections (one thread each); more are closed at
    # once. A client that sends nothing for read_timeout seconds is dropped.
    max_connections: int = 16
    read_timeout: float = 5.0

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> MetricsConfig:
        """The `[metrics]` table; None gives the defaults (disabled). ConfigError names the key."""
        if section is None:
            return cls()
        section = table(section, "metrics")
        check_keys(section, keys("metrics"), "metrics")
        d = cls()
        enabled = section.get("enabled", d.enabled)
        if not isinstance(enabled, bool):
            raise ConfigError(f"metrics.enabled: expected a boolean, got {type_name(enabled)}")
        host = nonempty_str(section.get("host", d.host), "metrics.host").strip()
        port = section.get("port", d.port)
        if isinstance(port, bool) or not isinstance(port, int):
            raise ConfigError(f"metrics.port: expected an integer, got {type_name(port)}")
        if not 0 <= port <= 65535:
            raise ConfigError(f"metrics.port: must be between 0 and 65535, got {port}")
        stall_after = parse_duration(
            section.get("stall_after", d.stall_after), "metrics.stall_after"
        )
        max_connections = section.get("max_connections", d.max_connections)
        if (
            isinstance(max_connections, bool)
            or not isinstance(max_connections, int)
            or max_connections < 1
        ):
            raise ConfigError(
                f"metrics.max_connections: expected an integer >= 1, got {max_connections!r}"
            )
        read_timeout = parse_duration(
            section.get("read_timeout", d.read_timeout), "metrics.read_timeout"
        )
        return cls(enabled=enabled, host=host, port=port, stall_after=stall_after,
                   max_connections=max_connections, read_timeout=read_timeout)  # fmt: skip


class _QuietHandler(WSGIRequestHandler):
    """No per-request line on stderr (the daemon logs to stdout as JSON)."""

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(getattr(self.server, "read_timeout", 5.0))  # per read

    def log_message(self, format: str, *args: Any) -> None:
        return


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # the listen backlog: a burst is accepted (and refused) at once
    read_timeout = 5.0
    slots = threading.BoundedSemaphore(16)
    refused = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        # One thread per connection, at most `slots`: past that the connection is closed at
        # once, so idle clients cannot pile up threads.
        if not self.slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        # read_timeout bounds each read, and the whole connection too: a client sending a byte
        # just under the timeout each time would otherwise hold its slot for ever.
        with self._lock:
            self._deadlines[request] = time.monotonic() + self.read_timeout
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(request)

    def _done(self, request: Any) -> None:
        with self._lock:
            self._deadlines.pop(request, None)
        self.slots.release()

    def service_actions(self) -> None:
        """Called by serve_forever at each poll: cut the connections past their deadline."""
        now = time.monotonic()
        with self._lock:
            late = [r for r, deadline in self._deadlines.items() if deadline <= now]
        for request in late:
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_RDWR)

    @property
    def _lock(self) -> threading.Lock:
        return self.__dict__.setdefault("_lock_", threading.Lock())  # type: ignore[no-any-return]

    @property
    def _deadlines(self) -> dict[Any, float]:
        return self.__dict__.setdefault("_deadlines_", {})  # type: ignore[no-any-return]

    def handle_error(self, request: Any, client_address: Any) -> None:
        return  # a scraper hanging up mid-answer is not worth a traceback


class _Server6(_Server):
    address_family = socket.AF_INET6


class Metrics:
    """One registry of the daemon's metrics, plus the health state `/healthz` reports."""

    def __init__(
        self,
        config: MetricsConfig,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        try:
            import prometheus_client as prom
        except ImportError as exc:  # pragma: no cover - an optional dependency
            raise ConfigError(
                "metrics.enabled: prometheus-client is not installed "
                "(pip install 'acp-supervisor[metrics]')"
            ) from exc
        # process-wide, but the daemon has this one registry and wants no `_created` series
        prom.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.config = config
        self._monotonic = monotonic
        self._now = now or SystemClock().now
        self._prom = prom
        self.registry = prom.CollectorRegistry(auto_describe=True)
        r = self.registry

        def gauge(name: str) -> Any:
            d = _BY_NAME[name]
            return prom.Gauge(d.name, d.help, list(d.labels), registry=r)

        build = gauge("acp_build_info")
        build.labels(version=_version(), python=platform.python_version()).set(1)
        self.workers = gauge("acp_workers")
        d = _BY_NAME["acp_actions_total"]
        self.actions = prom.Counter(d.name, d.help, list(d.labels), registry=r)
        self.approvals_pending = gauge("acp_approvals_pending")
        self.oldest_pending = gauge("acp_oldest_pending_approval_seconds")
        self.oldest_pending.set_function(self.oldest_pending_age)
        self.budget_used_actions = gauge("acp_window_budget_used_actions")
        self.budget_used_cost = gauge("acp_window_budget_used_cost")
        d = _BY_NAME["acp_gate_latency_seconds"]
        self.gate_latency = prom.Histogram(d.name, d.help, buckets=LATENCY_BUCKETS, registry=r)
        self.killswitch_mode = gauge("acp_killswitch_mode")
        self.since_progress = gauge("acp_progress_age_seconds")
        self.since_progress.set_function(self.seconds_since_tick)
        self.store_ok_gauge = gauge("acp_store_ok")
        self._sources: dict[str, CountSource] = {}
        r.register(_ScrapedCounters(self._sources))
        self.set_killswitch_mode("disengaged")
        self._worker_states: set[str] = set()
        self._pending = 0
        self._oldest_at: datetime | None = None
        self._last_tick = monotonic()
        self._store_ok = True
        self._store_problem: str | None = None
        self._stalled: list[str] = []
        self.store_ok_gauge.set(1)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # -- recording ----------------------------------------------------------------------------

    def set_workers(self, counts: Mapping[str, int]) -> None:
        """Workers per state; a state seen before and missing now goes to 0."""
        for state in self._worker_states - set(counts):
            self.workers.labels(state=state).set(0)
        for state, n in counts.items():
            self.workers.labels(state=state).set(n)
        self._worker_states |= set(counts)

    def observe_action(self, outcome: str, reason: str = "") -> None:
        """One gate outcome, e.g. ("succeeded", ""), ("denied", "policy"), ("failed", "error")."""
        self.actions.labels(outcome=outcome, reason=reason or "").inc()

    def observe_latency(self, seconds: float) -> None:
        self.gate_latency.observe(seconds)

    def set_approvals(self, pending: int, oldest_at: datetime | None) -> None:
        """The backlog as last read from the store; the age is computed at each scrape."""
        self.approvals_pending.set(pending)
        self._pending, self._oldest_at = pending, oldest_at

    def oldest_pending_age(self) -> float:
        oldest = self._oldest_at
        if not self._pending or oldest is None:
            return 0.0
        return max(0.0, (self._now() - oldest).total_seconds())

    def set_budget_used(self, *, cost: float, actions: float) -> None:
        self.budget_used_cost.set(cost)
        self.budget_used_actions.set(actions)

    def count_from(self, name: str, source: CountSource) -> None:
        """Read counter `name` (one of the scraped counters in METRICS) from `source` at each
        scrape. `source` runs in the server's thread: it must only read (e.g. copy a dict)."""
        if name not in _SCRAPED:
            raise ValueError(f"not a scraped counter: {name}")
        self._sources[name] = source

    def set_killswitch_mode(self, mode: str) -> None:
        """`mode` is a kill-switch Mode (a str enum) or its value."""
        current = str(getattr(mode, "value", mode))
        for name in _modes(current):
            self.killswitch_mode.labels(mode=name).set(1 if name == current else 0)

    def tick(self) -> None:
        """The main loop made progress (real monotonic time, also under a virtual clock)."""
        self._last_tick = self._monotonic()

    def seconds_since_tick(self) -> float:
        return max(0.0, self._monotonic() - self._last_tick)

    def set_store_ok(self, ok: bool, problem: str | None = None) -> None:
        self._store_ok = ok
        self._store_problem = None if ok else problem
        self.store_ok_gauge.set(1 if ok else 0)

    def set_stalled_workers(self, names: Iterable[str]) -> None:
        """Workers that completed no cycle within their stall limit (the fleet decides)."""
        self._stalled = sorted(names)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, the JSON /healthz answers)."""
        since = self.seconds_since_tick()
        reasons: list[str] = []
        if since > self.config.stall_after:
            reasons.append(
                f"main loop stalled: no progress for {since:.1f}s "
                f"(stall_after {self.config.stall_after:g}s)"
            )
        if not self._store_ok:
            reasons.append(
                "store failing" + (f": {self._store_problem}" if self._store_problem else "")
            )
        if self._stalled:
            reasons.append("workers stalled: " + ", ".join(self._stalled))
        body: dict[str, Any] = {
            "ok": not reasons,
            "seconds_since_progress": round(since, 3),
            "stall_after": self.config.stall_after,
            "store_ok": self._store_ok,
            "stalled_workers": list(self._stalled),
        }
        if reasons:
            body["reasons"] = reasons
        return not reasons, body

    def render(self) -> bytes:
        data: bytes = self._prom.generate_latest(self.registry)
        return data

    # -- serving ------------------------------------------------------------------------------

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        body = self._route(environ, start_response)
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else body

    def _route(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        path = environ.get("PATH_INFO", "/")
        method = environ.get("REQUEST_METHOD", "GET")
        if path not in ("/metrics", "/healthz"):
            return _answer(start_response, "404 Not Found", "text/plain", b"not found\n")
        if method not in ("GET", "HEAD"):
            return _answer(
                start_response,
                "405 Method Not Allowed",
                "text/plain",
                b"method not allowed\n",
                [("Allow", "GET, HEAD")],
            )
        if path == "/metrics":
            try:
                body = self.render()
            except Exception as exc:
                return _answer(
                    start_response,
                    "500 Internal Server Error",
                    "text/plain",
                    f"{type(exc).__name__}: {exc}\n".encode(),
                )
            return _answer(start_response, "200 OK", self._prom.CONTENT_TYPE_LATEST, body)
        ok, report = self.health()
        status = "200 OK" if ok else "503 Service Unavailable"
        return _answer(
            start_response,
            status,
            "application/json",
            json.dumps(report, sort_keys=True).encode() + b"\n",
        )

    def serve(self) -> int:
        """Start the HTTP server in a daemon thread; returns the bound port."""
        if self._server is not None:
            return self.port
        host = self.config.host
        server_class = _Server6 if ":" in host else _Server
        try:
            server = make_server(
                host.strip("[]"),
                self.config.port,
                self._app,
                server_class=server_class,
                handler_class=_QuietHandler,
            )
        except OSError as exc:  # in use, not an address of this host, no permission
            where = f"[{host.strip('[]')}]" if ":" in host else host
            raise ConfigError(
                f"metrics: cannot listen on {where}:{self.config.port}: {exc.strerror or exc}"
            ) from None
        server.read_timeout = self.config.read_timeout
        server.slots = threading.BoundedSemaphore(self.config.max_connections)
        self._server = server
        self.tick()  # the grace period starts now
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="acp-metrics",
            daemon=True,
        )
        self._thread.start()
        return self.port

    @property
    def port(self) -> int:
        if self._server is None:
            return 0
        port: int = self._server.server_address[1]
        return port

    def close(self) -> None:
        """Stop serving (idempotent)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class _ScrapedCounters:
    """The counters the daemon keeps as plain numbers, turned into samples at scrape time."""

    def __init__(self, sources: Mapping[str, CountSource]) -> None:
        self._sources = sources

    def describe(self) -> list[Any]:
        return []  # families are known only at collect(); nothing to check up front

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        for name in _SCRAPED:
            d = _BY_NAME[name]
            family = CounterMetricFamily(d.name.removesuffix("_total"), d.help, labels=d.labels)
            source = self._sources.get(name)
            counts = dict(source()) if source is not None else {}
            if not d.labels:
                family.add_metric([], float(counts.get("", 0)))
            else:
                for value, count in sorted(counts.items()):
                    family.add_metric([value], float(count))
            yield family


def _version() -> str:
    try:
        return importlib.metadata.version("acp-supervisor")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def _modes(current: str) -> tuple[str, ...]:
    return KILLSWITCH_MODES if current in KILLSWITCH_MODES else (*KILLSWITCH_MODES, current)


def _answer(
    start_response: StartResponse,
    status: str,
    content_type: str,
    body: bytes,
    extra: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
        *(extra or []),
    ]
    start_response(status, headers)
    return [body]

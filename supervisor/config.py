"""Configuration: a TOML file, then the environment, then the command line (each wins over the last).

Every problem is one ConfigError line naming the file, the key and, where it can be found, the
line. Nothing is written anywhere before the whole config has been checked.
"""

from __future__ import annotations

import math
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

from .configparse import check_keys, parse_duration
from .console.settings import ConsoleConfig
from .errors import ConfigError
from .governance.budgets import ModelGovernor, TokenBudgets
from .governance.escalation import EscalationChain
from .governance.policy import Policy
from .ops.alerts import AlertConfig
from .ops.metrics import MetricsConfig
from .schema import keys, suggestion
from .timing.horizons import DEFAULTS, HORIZONS, HorizonProfile, profile_from_config
from .timing.windows import parse_timezone

RestartPolicy = Literal["permanent", "transient", "temporary"]

_TOP = set(keys("(top level)"))
_DAEMON = set(keys("daemon"))
_KILLSWITCH = set(keys("killswitch"))
_WORKER = set(keys("workers[]"))
_BACKOFF = set(keys("workers[].backoff"))
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True, slots=True)
class Backoff:
    initial: float = 1.0
    max: float = 60.0
    multiplier: float = 2.0


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    name: str
    target: str | None = None  # "module:Class" for an in-process worker
    command: tuple[str, ...] | None = None  # argv for an external worker
    replicas: int = 1
    restart: RestartPolicy = "permanent"
    schedule: str | None = None  # crontab; None means the horizon cadence
    cycle_every: float | None = None  # seconds; overrides the horizon cadence
    params: Mapping[str, Any] = field(default_factory=dict)
    backoff: Backoff = Backoff()
    stable_after: float = 60.0
    max_restarts: int = 5
    restart_window: float = 300.0
    quarantine_for: float = 600.0
    heartbeat_timeout: float = 120.0
    cycle_deadline: float = 300.0
    # The trust boundary of an external worker (see docs/security.md).
    user: str | None = None
    group: str | None = None
    sandbox: str = "none"
    max_pending_approvals: int = 20
    max_proposals: int = 1000
    max_log_lines: int = 1000  # stderr lines and protocol log messages per cycle, together
    writable: tuple[str, ...] = ()  # directories a bwrap-sandboxed worker may write

    def instance_names(self) -> list[str]:
        if self.replicas == 1:
            return [self.name]
        return [f"{self.name}-{i}" for i in range(1, self.replicas + 1)]


@dataclass(frozen=True, slots=True)
class Config:
    path: Path | None
    fleet: str
    host_id: str
    timezone: ZoneInfo
    state_dir: Path
    db_url: str
    db_explicit: bool  # given by flag, env or file (else the default SQLite file)
    profile: str
    horizons: Mapping[str, HorizonProfile]
    shutdown_timeout: float
    recovery_every: float
    escalation_every: float
    flush_every: float
    seed: int
    lease_ttl: float
    heartbeat: float
    fleet_switch_grace: float
    killswitch_secret_file: str | None
    killswitch_watch_interval: float
    halt_in_flight: str  # "terminate": halt_all also stops effects in flight (emergency always)
    policy: Policy
    approvals: EscalationChain
    token_budgets: TokenBudgets
    models: ModelGovernor
    workers: tuple[WorkerSpec, ...]
    alerts: AlertConfig
    metrics: MetricsConfig
    query_timeout: float  # on a networked store; shorter than the lease (see load_config)
    killswitch_store_poll: float  # while LISTEN works, the switches are re-read this often too
    policy_shadow: Path | None = None  # [policy] shadow: a candidate evaluated beside the policy
    console: ConsoleConfig = field(default_factory=ConsoleConfig)

    def horizon(self, name: str) -> HorizonProfile:
        return self.horizons[name]


def default_config_text() -> str:
    return (resources.files("supervisor") / "default.toml").read_text(encoding="utf-8")


def _unknown_key(exc: ConfigError) -> str | None:
    """The key an "unknown key 'x'" error from a section's own parser names, for its line."""
    match = re.search(r"unknown key '([^']+)'", str(exc))
    return match.group(1) if match else None


def _line_of(text: str, key: str) -> str:
    # `key = ...`, `[key]`, `[[key]]` or a dotted table header ending in it: `[horizons.key]`
    pattern = re.compile(
        rf"^[ \t]*(\[+\s*([\w\"-]+\.)*)?\"?{re.escape(key)}\"?\s*(=|\]|\.)", re.MULTILINE
    )
    match = pattern.search(text)
    return f", line {text.count(chr(10), 0, match.start()) + 1}" if match else ""


class _Checker:
    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.text = text

    def fail(self, where: str, message: str, key: str | None = None) -> ConfigError:
        line = _line_of(self.text, key) if key else ""
        if not where or message.startswith(where):
            return ConfigError(f"{self.source}{line}: {message}")
        return ConfigError(f"{self.source}{line}: {where}: {message}")

    def known(self, section: Mapping[str, Any], allowed: set[str], where: str) -> None:
        for key in section:
            if key not in allowed:
                hint = suggestion(key, sorted(allowed))
                found = f" (did you mean {hint!r}?)" if hint else ""
                raise self.fail(where, f"unknown key {key!r}{found}", key)

    def table(self, data: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(where, f"{key!r} must be a table", key)
        return value

    def duration(self, section: Mapping[str, Any], key: str, default: float, where: str) -> float:
        if key not in section:
            return default
        try:
            return parse_duration(section[key], f"{where}.{key}")
        except ConfigError as exc:
            raise self.fail(where, str(exc), key) from None

    def positive_int(self, section: Mapping[str, Any], key: str, default: int, where: str) -> int:
        value = section.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise self.fail(where, f"{key} must be a whole number >= 1, got {value!r}", key)
        return value


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    db: str | None = None,
    state_dir: str | Path | None = None,
) -> Config:
    """Read the config file (or the built-in default), then apply env and CLI overrides."""
    env = os.environ if env is None else env
    file, text, source = read_config_text(path)
    data = parse_config_text(text, source)
    return build_config(data, text, source, file, env, db, state_dir)


def read_config_text(path: str | Path | None) -> tuple[Path | None, str, str]:
    """(file, its text, how errors name it); the built-in default without a path."""
    if path is None:
        return None, default_config_text(), "built-in default config"
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {file}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{file}: not valid UTF-8 at byte offset {exc.start} (0x{raw[exc.start]:02x})"
        ) from None
    return file, text, str(file)


def parse_config_text(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None


def build_config(
    data: dict[str, Any],
    text: str,
    source: str,
    file: Path | None,
    env: Mapping[str, str],
    db: str | None = None,
    state_dir: str | Path | None = None,
) -> Config:
    """A Config from parsed file data (`text` is kept to name lines in errors)."""
    c = _Checker(source, text)
    c.known(data, _TOP, "top level")
    daemon = c.table(data, "daemon", "daemon")
    c.known(daemon, _DAEMON, "daemon")

    for text_key in ("fleet", "host_id", "timezone", "state_dir", "db", "profile"):
        if text_key in daemon and not isinstance(daemon[text_key], str):
            raise c.fail(
                f"daemon.{text_key}", f"must be a string, got {daemon[text_key]!r}", text_key
            )
    fleet = str(daemon.get("fleet", "default"))
    if not _NAME.match(fleet):
        raise c.fail("daemon.fleet", f"invalid fleet name {fleet!r}", "fleet")
    host_id = str(daemon.get("host_id") or socket.gethostname())
    try:
        tz = parse_timezone(str(daemon.get("timezone", "UTC")))
    except ConfigError as exc:
        raise c.fail("daemon.timezone", str(exc), "timezone") from None

    chosen_state = state_dir or env.get("ACP_STATE_DIR") or daemon.get("state_dir") or "state"
    state_path = Path(chosen_state)
    if (
        not state_path.is_absolute()
        and file is not None
        and state_dir is None
        and not env.get("ACP_STATE_DIR")
        and daemon.get("state_dir")
    ):
        state_path = file.parent / state_path  # a path in the file is relative to the file
    state_path = state_path.absolute()
    db_url = (
        db or env.get("ACP_DB") or daemon.get("db") or f"sqlite:///{state_path / 'supervisor.db'}"
    )
    if daemon.get("db") and not db and not env.get("ACP_DB"):
        scheme = str(daemon["db"]).partition("://")[0]
        if scheme not in ("sqlite", "postgresql", "postgres"):
            raise c.fail(
                "daemon.db", f"unknown database scheme {scheme!r} (sqlite, postgresql)", "db"
            )

    profile = str(daemon.get("profile", "day"))
    if profile not in HORIZONS:
        raise c.fail(
            "daemon.profile", f"unknown horizon {profile!r} ({', '.join(HORIZONS)})", "profile"
        )
    horizons_section = c.table(data, "horizons", "horizons")
    horizons = dict(DEFAULTS)
    for name, section in horizons_section.items():
        if name not in HORIZONS:
            raise c.fail("horizons", f"unknown horizon {name!r} ({', '.join(HORIZONS)})", name)
        if not isinstance(section, dict):
            raise c.fail(f"horizons.{name}", "must be a table", name)
        try:
            horizons[name] = profile_from_config(name, section, f"horizons.{name}")
        except ConfigError as exc:
            raise c.fail(f"horizons.{name}", str(exc), _unknown_key(exc) or name) from None

    seed = daemon.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise c.fail("daemon.seed", "must be an integer", "seed")

    ks = c.table(data, "killswitch", "killswitch")
    c.known(ks, _KILLSWITCH, "killswitch")
    secret_file = ks.get("secret_file")
    if secret_file is not None and not isinstance(secret_file, str):
        raise c.fail("killswitch.secret_file", "must be a path", "secret_file")
    halt_in_flight = ks.get("halt_in_flight", "finish")
    if halt_in_flight not in ("finish", "terminate"):
        raise c.fail("killswitch.halt_in_flight",
                     f"must be 'finish' or 'terminate', got {halt_in_flight!r}", "halt_in_flight")  # fmt: skip

    def section_of(name: str) -> Any:
        try:
            return name, data.get(name)
        except ConfigError as exc:  # pragma: no cover - get() does not raise
            raise c.fail(name, str(exc)) from None

    policy_section, shadow = _shadow_of(c, section_of("policy")[1], file)
    try:
        policy = Policy.from_config(policy_section)
        approvals = EscalationChain.from_config(section_of("approvals")[1])
        token_budgets = _token_budgets(data)
        models = ModelGovernor.from_config(data.get("models"))
        alerts = AlertConfig.from_config(data.get("alerts"))
        metrics = MetricsConfig.from_config(data.get("metrics"))
        console = ConsoleConfig.from_config(data.get("console"))
    except ConfigError as exc:
        key = _unknown_key(exc)
        raise ConfigError(f"{source}{_line_of(text, key) if key else ''}: {exc}") from None

    workers = _workers(c, data.get("workers", []))
    lease_ttl = c.duration(daemon, "lease_ttl", 15.0, "daemon")
    heartbeat = c.duration(daemon, "heartbeat", 3.0, "daemon")
    if lease_ttl <= heartbeat:
        raise c.fail(
            "daemon.lease_ttl",
            f"the lease time ({lease_ttl}s) must be longer than the heartbeat ({heartbeat}s)",
            "lease_ttl",
        )
    # A statement may not outlast the lease: a stuck heartbeat must fail while the lease holds.
    query_timeout = c.duration(daemon, "query_timeout", min(5.0, lease_ttl / 2), "daemon")
    if not 0 < query_timeout < lease_ttl:
        raise c.fail(
            "daemon.query_timeout",
            f"the query timeout ({query_timeout}s) must be above 0 and shorter than the lease "
            f"time ({lease_ttl}s)",
            "query_timeout",
        )
    return Config(
        path=file,
        fleet=fleet,
        host_id=host_id,
        timezone=tz,
        state_dir=state_path,
        db_url=str(db_url),
        db_explicit=bool(db or env.get("ACP_DB") or daemon.get("db")),
        profile=profile,
        horizons=horizons,
        shutdown_timeout=c.duration(daemon, "shutdown_timeout", 30.0, "daemon"),
        recovery_every=c.duration(daemon, "recovery_every", 3600.0, "daemon"),
        escalation_every=c.duration(daemon, "escalation_every", 60.0, "daemon"),
        flush_every=c.duration(daemon, "flush_every", 1.0, "daemon"),
        seed=seed,
        lease_ttl=lease_ttl,
        heartbeat=heartbeat,
        fleet_switch_grace=c.duration(daemon, "fleet_switch_grace", 10.0, "daemon"),
        killswitch_secret_file=secret_file,
        killswitch_watch_interval=c.duration(ks, "watch_interval", 0.05, "killswitch"),
        query_timeout=query_timeout,
        killswitch_store_poll=c.duration(ks, "store_poll", 1.0, "killswitch"),
        halt_in_flight=str(halt_in_flight),
        policy=policy,
        approvals=approvals,
        token_budgets=token_budgets,
        models=models,
        workers=workers,
        alerts=alerts,
        metrics=metrics,
        console=console,
        policy_shadow=shadow,
    )


def _token_budgets(data: Mapping[str, Any]) -> TokenBudgets:
    tokens = data.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise ConfigError("tokens: must be a table")
    check_keys(tokens, keys("tokens"), "tokens")
    return TokenBudgets.from_config(tokens.get("budgets"))


def _shadow_of(c: _Checker, section: Any, file: Path | None) -> tuple[Any, Path | None]:
    """`[policy] shadow = "candidate.toml"`: taken out of the section the policy parses. A path
    in the file is relative to the file. The candidate itself is read by the daemon, which never
    lets it stop or block anything (see replay.ShadowPolicy)."""
    if not isinstance(section, dict) or "shadow" not in section:
        return section, None
    rest = {k: v for k, v in section.items() if k != "shadow"}
    raw = section["shadow"]
    if not isinstance(raw, str) or not raw.strip():
        raise c.fail(
            "policy.shadow", f"must be the path of a candidate policy file, got {raw!r}", "shadow"
        )
    path = Path(raw).expanduser()
    if not path.is_absolute() and file is not None:
        path = file.parent / path
    return rest, path.absolute()


# What a candidate policy file may hold: the sections that decide an action.
CANDIDATE_SECTIONS = ("policy", "tokens", "models")


@dataclass(frozen=True, slots=True)
class Candidate:
    """A policy to try against history (replay) or beside the live one (shadow). Sections the
    file leaves out are the live config's."""

    source: str
    policy: Policy
    models: ModelGovernor
    token_budgets: TokenBudgets


def load_candidate(path: str | Path, base: Config) -> Candidate:
    """Read and check a candidate file; every problem is one ConfigError naming file, line, key."""
    file = Path(path)
    source = str(file)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read candidate policy file {file}: {exc.strerror or exc}"
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text: {exc.reason}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    c = _Checker(source, text)
    for key in data:
        if key not in CANDIDATE_SECTIONS:
            raise c.fail(
                "top level",
                f"unknown key {key!r} (a candidate holds {', '.join(CANDIDATE_SECTIONS)})",
                key,
            )
    try:
        policy = Policy.from_config(data["policy"]) if "policy" in data else base.policy
        tokens = _token_budgets(data) if "tokens" in data else base.token_budgets
        models = ModelGovernor.from_config(data["models"]) if "models" in data else base.models
    except ConfigError as exc:
        bad = _unknown_key(exc)
        raise ConfigError(f"{source}{_line_of(text, bad) if bad else ''}: {exc}") from None
    return Candidate(source, policy, models, tokens)


def _workers(c: _Checker, raw: Any) -> tuple[WorkerSpec, ...]:
    if not isinstance(raw, list):
        raise c.fail("workers", "must be an array of tables ([[workers]])", "workers")
    specs: list[WorkerSpec] = []
    seen: set[str] = set()
    for index, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise c.fail(f"workers[{index}]", "must be a table")
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise c.fail(f"workers[{index}]", f"invalid or missing name {name!r}", "workers")
        where = f"worker {name!r}"
        c.known(entry, _WORKER, where)
        if name in seen:
            raise c.fail(where, "duplicate worker name", "name")
        seen.add(name)
        target, command = entry.get("class"), entry.get("command")
        if (target is None) == (command is None):
            raise c.fail(where, "give exactly one of 'class' (module:Class) or 'command' (argv)")
        if target is not None and (not isinstance(target, str) or ":" not in target):
            raise c.fail(where, f"class must be 'module:Class', got {target!r}", "class")
        if command is not None and (
            not isinstance(command, list)
            or not command
            or not all(isinstance(a, str) and a for a in command)
        ):
            raise c.fail(where, "command must be a non-empty list of strings", "command")
        replicas = entry.get("replicas", 1)
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
            raise c.fail(where, f"replicas must be >= 1, got {replicas!r}", "replicas")
        restart = entry.get("restart", "permanent")
        if restart not in ("permanent", "transient", "temporary"):
            raise c.fail(where, f"unknown restart policy {restart!r}", "restart")
        schedule = entry.get("schedule")
        if schedule is not None:
            from .timing.windows import CronSchedule

            try:
                CronSchedule(str(schedule), ZoneInfo("UTC"))
            except ConfigError as exc:
                raise c.fail(where, str(exc), "schedule") from None
        params = entry.get("params", {})
        if not isinstance(params, dict):
            raise c.fail(where, "params must be a table", "params")
        backoff_raw = entry.get("backoff", {})
        if not isinstance(backoff_raw, dict):
            raise c.fail(where, "backoff must be a table", "backoff")
        c.known(backoff_raw, _BACKOFF, f"{where} backoff")
        initial = c.duration(backoff_raw, "initial", 1.0, f"{where} backoff")
        maximum = c.duration(backoff_raw, "max", 60.0, f"{where} backoff")
        multiplier = backoff_raw.get("multiplier", 2.0)
        if maximum < initial:
            raise c.fail(
                where, f"backoff max ({maximum}s) is below its initial ({initial}s)", "max"
            )
        if (
            not isinstance(multiplier, int | float)
            or isinstance(multiplier, bool)
            or not math.isfinite(multiplier)  # NaN passes `< 1` and would make every delay NaN
            or multiplier < 1
        ):
            raise c.fail(where, "backoff multiplier must be a finite number >= 1", "multiplier")
        cycle_every = entry.get("cycle_every")
        user, group, sandbox = entry.get("user"), entry.get("group"), entry.get("sandbox", "none")
        for key, value in (("user", user), ("group", group)):
            if value is not None and (not isinstance(value, str) or not value):
                raise c.fail(where, f"{key} must be a user or group name", key)
        if sandbox not in ("none", "bwrap"):
            raise c.fail(where, f"unknown sandbox {sandbox!r} (none, bwrap)", "sandbox")
        writable = entry.get("writable", [])
        if not isinstance(writable, list) or not all(
            isinstance(w, str) and w.startswith("/") for w in writable
        ):
            raise c.fail(where, "writable must be a list of absolute paths", "writable")
        if command is None and (user is not None or sandbox != "none"):
            # An in-process worker is the daemon's own code: it cannot run as someone else.
            raise c.fail(where, "user, group and sandbox apply to command workers only", "user")
        specs.append(
            WorkerSpec(
                name=name,
                target=target,
                command=tuple(command) if command else None,
                replicas=replicas,
                restart=restart,
                schedule=str(schedule) if schedule is not None else None,
                cycle_every=(
                    c.duration(entry, "cycle_every", 0.0, where)
                    if cycle_every is not None
                    else None
                ),
                params=params,
                backoff=Backoff(initial, maximum, float(multiplier)),
                stable_after=c.duration(entry, "stable_after", 60.0, where),
                max_restarts=c.positive_int(entry, "max_restarts", 5, where),
                restart_window=c.duration(entry, "restart_window", 300.0, where),
                quarantine_for=c.duration(entry, "quarantine_for", 600.0, where),
                heartbeat_timeout=c.duration(entry, "heartbeat_timeout", 120.0, where),
                cycle_deadline=c.duration(entry, "cycle_deadline", 300.0, where),
                user=user,
                group=group,
                sandbox=str(sandbox),
                max_pending_approvals=c.positive_int(entry, "max_pending_approvals", 20, where),
                max_proposals=c.positive_int(entry, "max_proposals", 1000, where),
                max_log_lines=c.positive_int(entry, "max_log_lines", 1000, where),
                writable=tuple(writable),
            )
        )

    # Replicas are named NAME-1, NAME-2, ...: those must not collide with another worker's name,
    # or two instances would share checkpoints, slots and kill-switch scopes.
    def side(spec: WorkerSpec, instance: str) -> str:
        if instance == spec.name:
            return f"worker {instance!r}"
        return f"replica {instance!r} of worker {spec.name!r}"

    owner: dict[str, WorkerSpec] = {}
    for spec in specs:
        for instance in spec.instance_names():
            if instance in owner:
                named = re.search(rf"^\s*name\s*=\s*[\"']{re.escape(spec.name)}[\"']", c.text, re.M)
                line = f", line {c.text.count(chr(10), 0, named.start()) + 1}" if named else ""
                raise ConfigError(
                    f"{c.source}{line}: workers: instance names clash: "
                    f"{side(owner[instance], instance)} and {side(spec, instance)} "
                    "(replicas are named NAME-1, NAME-2, ...); rename one"
                )
            owner[instance] = spec
    return tuple(specs)

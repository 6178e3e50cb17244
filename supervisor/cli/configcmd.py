"""`acp-supervisor config check` and `config show`.

`check` validates a config the way `run` would before it writes anything: the file (every
unknown key, with a suggestion, then the first invalid value), then every worker (its class
imports and implements the worker API, its command is an executable), the kill-switch secret,
the state directory and the metrics dependency. It prints `ok`, or one line per problem and
exits 2. It does not connect to the database and writes nothing.

`show` prints the effective configuration (the file, then the environment, then the flags) as
TOML that `--config` accepts again, with secrets masked: passwords in URLs, credentials in
worker params and argv, and the kill-switch secret (only where it comes from is shown).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..config import (
    Config,
    _line_of,
    build_config,
    default_config_text,
    load_config,
    parse_config_text,
    read_config_text,
)
from ..errors import ConfigError
from ..schema import unknown_keys_in

MASK = "***"
_SECRET_KEY = re.compile(
    r"(^|[_-])(password|passwd|secret|token|api[_-]?key|authorization|credentials?)$", re.I
)
_SECRET_ARG = re.compile(
    r"^(--?[\w-]*(password|passwd|secret|token|api[_-]?key|credentials?)[\w-]*=).+$", re.I
)


def register(
    sub: Any, parser_class: type[argparse.ArgumentParser], add_globals: Callable[[Any], None]
) -> None:
    """Add the `config` group to the CLI's subcommands. Its handlers take no loaded Config:
    reporting what is wrong with one is their job."""
    group = sub.add_parser("config", help="check and show the configuration").add_subparsers(
        dest="config_command", metavar="ACTION", parser_class=parser_class
    )
    group.required = True
    for name, help_, handler in (
        ("check", "validate the config as `run` would; print ok or every problem", check_cmd),
        ("show", "print the effective config (file, environment, flags) as TOML", show_cmd),
    ):
        p = group.add_parser(name, help=help_, description=help_)
        add_globals(p)
        p.set_defaults(handler=None, config_handler=handler)


def _config_path(args: argparse.Namespace) -> str | None:
    return args.config or os.environ.get("ACP_CONFIG") or None


def check_cmd(args: argparse.Namespace) -> int:
    problems = check(_config_path(args), env=os.environ, db=args.db, state_dir=args.state_dir)
    print("\n".join(problems) if problems else "ok")
    return 2 if problems else 0


def show_cmd(args: argparse.Namespace) -> int:
    env = os.environ
    config = load_config(_config_path(args), env=env, db=args.db, state_dir=args.state_dir)
    sys.stdout.write(show(config, env))
    return 0


# -- check ------------------------------------------------------------------------------------


def check(
    path: str | Path | None,
    *,
    env: Mapping[str, str],
    db: str | None = None,
    state_dir: str | Path | None = None,
) -> list[str]:
    """Every problem `run` would stop at, one line each; [] when the config is good."""
    try:
        file, text, source = read_config_text(path)
        data = parse_config_text(text, source)
    except ConfigError as exc:
        return [str(exc)]  # nothing more can be read from this file
    problems = []
    for where, key, hint, table in unknown_keys_in(data):
        guess = f" (did you mean {hint!r}?)" if hint else ""
        problems.append(f"{source}{_line_of(text, key)}: {where}: unknown key {key!r}{guess}")
        del table[key]  # reported: the rest of the file is still checked
    try:
        config = build_config(data, text, source, file, env, db, state_dir)
    except ConfigError as exc:  # the parsers stop at the first invalid value
        return [*problems, str(exc)]
    return problems + _runtime_problems(config, env)


def _runtime_problems(config: Config, env: Mapping[str, str]) -> list[str]:
    from ..killswitch import load_secret
    from ..runtime.daemon import build_factories

    problems = []
    for spec in config.workers:
        try:
            build_factories(dataclasses.replace(config, workers=(spec,)))  # each on its own
        except ConfigError as exc:
            problems.append(str(exc))
    try:
        load_secret(env, config.killswitch_secret_file)
    except ConfigError as exc:
        problems.append(str(exc))
    problem = _state_dir_problem(config.state_dir)
    if problem:
        problems.append(problem)
    problem = _database_problem(config)
    if problem:
        problems.append(problem)
    if config.metrics.enabled:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            problems.append(
                "metrics.enabled needs prometheus-client: pip install 'acp-supervisor[metrics]'"
            )
    return problems


def _database_problem(config: Config) -> str | None:
    """The database URL as `run` would read it (without connecting)."""
    from ..errors import StoreConfigError
    from ..store import make_backend

    try:
        make_backend(config.db_url)
        if config.db_url.startswith("sqlite:"):
            from ..store.sqlite import parse_sqlite_url

            # realpath: the default URL `sqlite:////abs/...` reads as `//abs/...`
            folder = Path(os.path.realpath(parse_sqlite_url(config.db_url)[0])).parent
            if folder != Path(os.path.realpath(config.state_dir)) and not folder.is_dir():
                return f"sqlite database directory {folder} does not exist"
    except StoreConfigError as exc:
        return str(exc)
    return None


def _state_dir_problem(state_dir: Path) -> str | None:
    """Whether `run` could create and write the state directory (nothing is created here)."""
    folder = state_dir
    while not folder.exists():
        if folder.parent == folder:
            break
        folder = folder.parent
    if not folder.is_dir():
        return f"cannot create the state directory {state_dir}: {folder} is not a directory"
    if not os.access(folder, os.W_OK | os.X_OK):
        what = "write to" if folder == state_dir else "create"
        return f"cannot {what} the state directory {state_dir}: {folder} is not writable"
    return None


# -- show -------------------------------------------------------------------------------------


def show(config: Config, env: Mapping[str, str]) -> str:
    """The effective configuration as TOML, secrets masked."""
    from ..killswitch import SECRET_ENV

    raw = _raw(config)
    daemon = {
        "fleet": config.fleet,
        "host_id": config.host_id,
        "timezone": str(config.timezone),
        "state_dir": str(config.state_dir),
        "db": mask_url(config.db_url),
        "profile": config.profile,
        "shutdown_timeout": _seconds(config.shutdown_timeout),
        "recovery_every": _seconds(config.recovery_every),
        "escalation_every": _seconds(config.escalation_every),
        "flush_every": _seconds(config.flush_every),
        "seed": config.seed,
        "lease_ttl": _seconds(config.lease_ttl),
        "heartbeat": _seconds(config.heartbeat),
        "fleet_switch_grace": _seconds(config.fleet_switch_grace),
    }
    horizons = {}
    for name, h in config.horizons.items():
        profile: dict[str, Any] = {
            "run_length": _seconds(h.run_length.total_seconds()),
            "cycle_every": _seconds(h.cycle_every.total_seconds()),
            "window": h.window,
            "checkpoint_every": h.checkpoint_every,
        }
        if h.max_cost is not None:
            profile["max_cost"] = h.max_cost
        if h.max_actions is not None:
            profile["max_actions"] = h.max_actions
        horizons[name] = profile
    killswitch: dict[str, Any] = {"watch_interval": _seconds(config.killswitch_watch_interval)}
    if config.killswitch_secret_file is not None:
        killswitch["secret_file"] = config.killswitch_secret_file
    policy = dict(raw.get("policy") or {})
    policy["unmatched"] = config.policy.unmatched
    policy["risk"] = dict(config.policy.risk)
    chain = config.approvals
    approvals: dict[str, Any] = {"timeout": _seconds(chain.timeout),
                                 "initial_tier": chain.initial_tier}  # fmt: skip
    if chain.steps:
        approvals["escalation"] = [
            {"after": _seconds(s.after), "tier": s.tier} for s in chain.steps
        ]
    a = config.alerts
    alerts: dict[str, Any] = {
        "approval_age": _seconds(a.approval_age),
        "approval_backlog": a.approval_backlog,
        "rate_change": a.rate_change,
        "rate_min_samples": a.rate_min_samples,
        "trailing_windows": a.trailing_windows,
        "evaluate_every": _seconds(a.evaluate_every),
    }
    sinks = (raw.get("alerts") or {}).get("sinks") or []
    if sinks:
        alerts["sinks"] = [_masked_sink(s) for s in sinks]
    m = config.metrics
    out: dict[str, Any] = {
        "daemon": daemon,
        "horizons": horizons,
        "killswitch": killswitch,
        "policy": policy,
        "approvals": approvals,
    }
    for name in ("tokens", "models"):
        if raw.get(name):
            out[name] = raw[name]
    out["alerts"] = alerts
    out["metrics"] = {"enabled": m.enabled, "host": m.host, "port": m.port,
                      "stall_after": _seconds(m.stall_after)}  # fmt: skip
    out["workers"] = [_worker(spec) for spec in config.workers]
    if not out["workers"]:
        del out["workers"]
    source = str(config.path) if config.path is not None else "the built-in default config"
    if env.get(SECRET_ENV):
        secret = f"from the environment ({SECRET_ENV}), {MASK}"
    elif config.killswitch_secret_file:
        secret = f"from {config.killswitch_secret_file}, {MASK}"
    else:
        secret = "none configured"
    header = (
        f"# effective configuration: {source}, then the environment, then the flags\n"
        f"# kill-switch secret: {secret}\n"
    )
    return header + to_toml(out)


def _raw(config: Config) -> dict[str, Any]:
    text = config.path.read_text(encoding="utf-8") if config.path else default_config_text()
    return tomllib.loads(text)


def _seconds(value: float) -> str:
    """A duration as the config writes it (`90s`, `15m`, `1h`, `2d`, `500ms`)."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if value >= size and value % size == 0:
            return f"{value / size:g}{unit}"
    if value < 1 and (value * 1000) == int(value * 1000):
        return f"{value * 1000:g}ms"
    return f"{value:g}s"


def _worker(spec: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": spec.name}
    if spec.target is not None:
        entry["class"] = spec.target
    if spec.command is not None:
        entry["command"] = [_mask_arg(a) for a in spec.command]
    entry["replicas"] = spec.replicas
    entry["restart"] = spec.restart
    if spec.schedule is not None:
        entry["schedule"] = spec.schedule
    if spec.cycle_every is not None:
        entry["cycle_every"] = _seconds(spec.cycle_every)
    for key in ("stable_after", "restart_window", "quarantine_for", "heartbeat_timeout",
                "cycle_deadline"):  # fmt: skip
        entry[key] = _seconds(getattr(spec, key))
    entry["max_restarts"] = spec.max_restarts
    entry["backoff"] = {"initial": _seconds(spec.backoff.initial),
                        "max": _seconds(spec.backoff.max),
                        "multiplier": spec.backoff.multiplier}  # fmt: skip
    if spec.params:
        entry["params"] = mask_secrets(dict(spec.params))
    return entry


def mask_url(url: str) -> str:
    """The URL with its password and credential-looking query values replaced by ***."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return MASK  # unparseable: show nothing of it
    netloc, query = parts.netloc, parts.query
    if password is not None:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}:{MASK}@{host}"
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_KEY.search(k) for k, _ in pairs):
            masked = [(k, MASK if _SECRET_KEY.search(k) else v) for k, v in pairs]
            query = urlencode(masked, safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # nothing to hide; unsplit would drop the empty host of sqlite:///path
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def mask_secrets(value: Any) -> Any:
    """Tables with credential-looking keys (password, token, api_key, ...) masked, recursively."""
    if isinstance(value, dict):
        return {k: MASK if _SECRET_KEY.search(str(k)) and not isinstance(v, dict | list)
                else mask_secrets(v) for k, v in value.items()}  # fmt: skip
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    if isinstance(value, str) and "://" in value:
        return mask_url(value)
    return value


def _mask_arg(arg: str) -> str:
    if "://" in arg:
        return mask_url(arg)
    return _SECRET_ARG.sub(lambda m: m.group(1) + MASK, arg)


def _masked_sink(sink: Any) -> Any:
    if not isinstance(sink, dict):
        return sink
    masked = mask_secrets(sink)
    if isinstance(sink.get("argv"), list):
        masked["argv"] = [_mask_arg(a) if isinstance(a, str) else a for a in sink["argv"]]
    return masked


# -- a small TOML writer ------------------------------------------------------------------------

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def to_toml(data: Mapping[str, Any]) -> str:
    lines: list[str] = []
    _table(lines, (), data)
    return "\n".join(lines).strip() + "\n"


def _key(key: str) -> str:
    return key if _BARE.match(key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    if hasattr(value, "isoformat"):
        return str(value.isoformat())
    raise ConfigError(f"cannot write {type(value).__name__} as TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _table(lines: list[str], path: tuple[str, ...], data: Mapping[str, Any]) -> None:
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict) and not _is_table_array(v)}
    if path and (scalars or not data):
        lines += ["", f"[{'.'.join(_key(p) for p in path)}]"]
    for key, value in scalars.items():
        lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in data.items():
        if isinstance(value, dict):
            _table(lines, (*path, key), value)
        elif _is_table_array(value):
            for entry in value:
                lines += ["", f"[[{'.'.join(_key(p) for p in (*path, key))}]]"]
                for k, v in entry.items():
                    lines.append(f"{_key(k)} = {_value(v)}")

"""The configuration schema: every key of the config file, its type, default and meaning.

One table for three uses: the parsers take their lists of known keys from it (so a key cannot
be parsed without being documented), `config check` walks a file with it to report every
unknown key with a suggestion, and docs/config.md is generated from it
(`python -m supervisor.docgen`). Nothing here imports the rest of the package.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Key:
    name: str
    type: str
    default: str  # as written in TOML; "required" or "-" (unset) where there is none
    meaning: str


@dataclass(frozen=True, slots=True)
class Section:
    path: str  # as written in the docs: `daemon`, `workers[]`, `horizons.NAME`
    meaning: str
    keys: tuple[Key, ...]

    def names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.keys)


_DUR = "duration"  # seconds, or "500ms", "90s", "15m", "1h", "2d"

SECTIONS: tuple[Section, ...] = (
    Section("(top level)", "The tables of the file.", (
        Key("daemon", "table", "-", "The process: fleet, host, zone, store, cadences."),
        Key("horizons", "table", "-", "Overrides of the horizon profiles (`horizons.NAME`)."),
        Key("killswitch", "table", "-", "Where the kill-switch secret comes from; watch cadence."),
        Key("policy", "table", "-", "What the gate does with an action."),
        Key("approvals", "table", "-", "Approval deadline and escalation chain."),
        Key("tokens", "table", "-", "Token budgets."),
        Key("models", "table", "-", "Model governance; absent means every model is allowed."),
        Key("workers", "array of tables", "[]", "The supervised workers (`[[workers]]`)."),
        Key("alerts", "table", "-", "Alert thresholds and sinks."),
        Key("metrics", "table", "-", "The Prometheus endpoint and /healthz."),
        Key("console", "table", "-", "The operator web console (docs/console.md)."),
    )),
    Section("daemon", "The daemon process.", (
        Key("fleet", "string", '"default"', "Fleet name; hosts sharing a database and a fleet "
            "govern together."),
        Key("host_id", "string", "the host name", "This host's id in the fleet; unique per host."),
        Key("timezone", "string", '"UTC"', "IANA zone for window boundaries and `--start`."),
        Key("state_dir", "path", '"state"', "State directory (switch file, SQLite file, "
            "effects log); in the file, relative to the file. Env `ACP_STATE_DIR`, flag `--state-dir`."),
        Key("db", "URL", "sqlite:///STATE_DIR/supervisor.db", "`sqlite:///path` or "
            "`postgresql://...`. Env `ACP_DB`, flag `--db`."),
        Key("profile", "string", '"day"', "Horizon whose cadence and windows apply without "
            "`--horizon`: hour, day, week, month."),
        Key("shutdown_timeout", _DUR, '"30s"', "How long SIGTERM waits for in-flight actions."),
        Key("recovery_every", _DUR, '"1h"', "Cadence of the recovery scan (it also runs at "
            "startup)."),
        Key("escalation_every", _DUR, '"1m"', "Longest wait between approval escalation passes."),
        Key("flush_every", _DUR, '"1s"', "Cadence of the telemetry flush."),
        Key("seed", "integer", "0", "Seed of simulated runs and backoff jitter."),
        Key("lease_ttl", _DUR, '"15s"', "Leader and worker-slot lease time; must exceed "
            "`heartbeat`."),
        Key("heartbeat", _DUR, '"3s"', "Lease renewal cadence."),
        Key("fleet_switch_grace", _DUR, '"10s"', "An unreachable store for this long makes the "
            "fleet switch count as halt_all."),
        Key("query_timeout", _DUR, "5s, or half `lease_ttl` when that is shorter than 10s",
            "Bound of every statement and pool wait on Postgres; shorter than `lease_ttl`."),
    )),
    Section("horizons.NAME", "Overrides of one horizon profile (NAME: hour, day, week, month); "
            "defaults are the horizon table of docs/design.md.", (
        Key("run_length", _DUR, "per horizon", "How long a `run --horizon NAME` lasts."),
        Key("cycle_every", _DUR, "per horizon", "Worker cycle cadence."),
        Key("window", "string", "per horizon", "Window length: hourly or daily."),
        Key("checkpoint_every", "integer", "per horizon", "Checkpoint every N cycles (>= 1)."),
        Key("max_cost", "number", "50.0 (hour, day), 500.0 (week, month)", "Cost budget per "
            "window; finite, >= 0."),
        Key("max_actions", "integer", "500 (hour, day), 5000 (week, month)", "Action budget per "
            "window; >= 0."),
    )),
    Section("killswitch", "The host kill switch. The secret itself is never in this file.", (
        Key("secret_file", "path", "-", "File holding the signing secret (else env "
            "`ACP_KILLSWITCH_SECRET`)."),
        Key("watch_interval", _DUR, '"50ms"', "How often the switch file is checked."),
        Key("halt_in_flight", "string", '"finish"', "On halt_all: `finish` lets effects in "
            "flight finish, `terminate` stops them like emergency does."),
        Key("store_poll", _DUR, '"1s"', "How often the store's switches are re-read beside "
            "LISTEN (Postgres), which is re-established when its connection is lost."),
    )),
    Section("policy", "First matching rule wins, then the risk table, then `unmatched`.", (
        Key("unmatched", "outcome", '"require_approval"', "Outcome when nothing else decides: "
            "allow, deny, require_approval, escalate."),
        Key("risk", "table", "see policy.risk", "Outcome per risk."),
        Key("rules", "array of tables", "[]", "Explicit rules (`[[policy.rules]]`)."),
        Key("critical", "array of globs", "[]", "Action names that run under halt_noncritical; "
            "a worker's own claim is recorded and ignored."),
        Key("safe_to_retry", "array of globs", "[]", "Action names an in-doubt recovery may "
            "re-run; a worker's own claim is recorded and ignored."),
        Key("shadow", "path", "-", "A candidate policy file decided beside the live one; "
            "disagreements are POLICY_SHADOW events (docs/policy.md). Relative to this file."),
    )),
    Section("policy.risk", "Outcome per risk level.", (
        Key("low", "outcome", '"allow"', "Outcome for low-risk actions."),
        Key("medium", "outcome", '"allow"', "Outcome for medium-risk actions."),
        Key("high", "outcome", '"require_approval"', "Outcome for high-risk actions."),
        Key("critical", "outcome", '"deny"', "Outcome for critical actions."),
    )),
    Section("policy.rules[]", "One rule; it matches when every matcher it has matches.", (
        Key("name", "string", "required", "Unique rule name (recorded with each decision)."),
        Key("action", "glob", "-", "fnmatch glob on the action name."),
        Key("risk", "string or array", "-", "One risk or a list."),
        Key("worker", "glob", "-", "fnmatch glob on the worker name."),
        Key("when", "array of tables", "[]", "Conditions on the action's params."),
        Key("outcome", "outcome", "required", "allow, deny, require_approval, escalate."),
    )),
    Section("policy.rules[].when[]", "A condition on one param.", (
        Key("param", "string", "required", "Param name; dots walk nested tables."),
        Key("op", "string", "required", "==, !=, >, >=, <, <=, in, not_in, exists."),
        Key("value", "any", "required (not for exists)", "The value compared with."),
    )),
    Section("approvals", "Pending approvals: deadline and escalation; deny by default.", (
        Key("timeout", _DUR, '"60m"', "Deadline after creation; then denied."),
        Key("initial_tier", "string", '"operators"', "Tier a new approval starts at."),
        Key("escalation", "array of tables", "[]", "Steps `{ after, tier }`, strictly "
            "increasing, below the timeout."),
    )),
    Section("approvals.escalation[]", "One escalation step.", (
        Key("after", _DUR, "required", "Time after creation when the step applies."),
        Key("tier", "string", "required", "Tier the approval moves to."),
    )),
    Section("tokens", "Token governance.", (
        Key("budgets", "array of tables", "[]", "Token budgets (`[[tokens.budgets]]`)."),
    )),
    Section("tokens.budgets[]", "One token budget; the narrowest scope wins.", (
        Key("scope", "string", "required", "user, team or org."),
        Key("identity", "string", "required", "The user, team or org name."),
        Key("period", "string", "required", "daily, weekly or monthly."),
        Key("max_tokens", "integer", "required", "Tokens per period; 0 blocks all use."),
        Key("max_cost", "number", "-", "Cost per period; finite, >= 0."),
    )),
    Section("models", "Model governance; absent entirely, every model is allowed.", (
        Key("unknown", "string", '"deny"', "Only `deny`: an unknown model is never allowed."),
        Key("tiers", "table", "{}", "Tier -> globs of model names."),
        Key("access", "table", "{}", "Identity (`team:support`) -> allowed tiers."),
        Key("overrides", "table", "{}", "Identity -> `{ allow, deny }` exact models."),
    )),
    Section("models.overrides.IDENTITY", "Exact models for one identity; deny beats allow.", (
        Key("allow", "array of strings", "[]", "Models allowed beyond the tiers."),
        Key("deny", "array of strings", "[]", "Models denied whatever the tiers say."),
    )),
    Section("alerts", "Alert thresholds; alerts are recorded once per condition and window.", (
        Key("approval_age", _DUR, '"30m"', "Alert when the oldest pending approval is older."),
        Key("approval_backlog", "integer", "50", "Alert when more approvals are pending."),
        Key("rate_change", "number", "0.3", "Alert when a window's denial or approval rate moves "
            "this far from the trailing mean; in (0, 1]."),
        Key("rate_min_samples", "integer", "20", "Decisions a window needs before its rate "
            "counts."),
        Key("trailing_windows", "integer", "6", "Closed windows the trailing mean looks back "
            "over."),
        Key("evaluate_every", _DUR, '"1m"', "Cadence of the approval alert evaluation."),
        Key("sinks", "array of tables", "[]", "Where alerts are delivered (`[[alerts.sinks]]`)."),
    )),
    Section('alerts.sinks[] (type = "webhook")', "An HTTP POST of the alert as JSON.", (
        Key("type", "string", "required", '"webhook".'),
        Key("url", "URL", "required", "http:// or https:// URL."),
        Key("timeout", _DUR, '"5s"', "Per attempt."),
        Key("retries", "integer", "3", "Extra attempts after the first."),
        Key("signing_secret_file", "path", "-", "File with a key: each POST carries "
            "`X-ACP-Signature`, the HMAC-SHA256 of its body (docs/security.md)."),
    )),
    Section('alerts.sinks[] (type = "command")', "A command given the alert as JSON on stdin.", (
        Key("type", "string", "required", '"command".'),
        Key("argv", "array of strings", "required", "The command and its arguments."),
        Key("timeout", _DUR, '"10s"', "Per attempt; the process is killed after it."),
        Key("retries", "integer", "0", "Extra attempts after the first."),
    )),
    Section("metrics", "The Prometheus endpoint (docs/metrics.md) and /healthz.", (
        Key("enabled", "boolean", "false", "Serve /metrics and /healthz."),
        Key("host", "string", '"127.0.0.1"', "Listen address."),
        Key("port", "integer", "9464", "Listen port (0 picks a free one)."),
        Key("stall_after", _DUR, '"30s"', "/healthz fails when the main loop made no progress "
            "for this long."),
        Key("max_connections", "integer", "16", "Connections served at once; more are closed."),
        Key("read_timeout", _DUR, '"5s"', "A client silent this long is dropped; no connection is held longer."),
    )),
    Section("workers[]", "One supervised worker (`[[workers]]`): give `class` or `command`.", (
        Key("name", "string", "required", "Unique name; replicas are NAME-1, NAME-2, ..."),
        Key("class", "string", "-", "`module:Class` of an in-process worker; the module is "
            "found on the Python path, in the config file's directory or the working "
            "directory."),
        Key("command", "array of strings", "-", "argv of an external worker "
            "(docs/worker-protocol.md)."),
        Key("replicas", "integer", "1", "Instances of this worker."),
        Key("restart", "string", '"permanent"', "permanent, transient or temporary."),
        Key("schedule", "string", "-", "Crontab line; without it the horizon cadence."),
        Key("cycle_every", _DUR, "-", "Cadence of this worker; overrides the horizon's."),
        Key("params", "table", "{}", "Passed to the worker as it is."),
        Key("backoff", "table", "see workers[].backoff", "Restart backoff."),
        Key("stable_after", _DUR, '"60s"', "Running this long resets the backoff."),
        Key("max_restarts", "integer", "5", "Restarts within `restart_window` before "
            "quarantine."),
        Key("restart_window", _DUR, '"5m"', "Window over which restarts are counted."),
        Key("quarantine_for", _DUR, '"10m"', "Cool-down of a quarantined worker."),
        Key("heartbeat_timeout", _DUR, '"2m"', "An external worker silent this long is hung."),
        Key("cycle_deadline", _DUR, '"5m"', "A cycle running longer is a hang."),
        Key("user", "string", "-", "Command workers: the unprivileged user the child runs as "
            "(docs/security.md)."),
        Key("group", "string", "the user's group", "Command workers: the child's group."),
        Key("sandbox", "string", '"none"', "Command workers: `none` or `bwrap` (bubblewrap)."),
        Key("writable", "array of paths", "[]", "With `sandbox = \"bwrap\"`: absolute paths "
            "the child may write."),
        Key("max_pending_approvals", "integer", "20", "Pending approvals per worker; more are "
            "refused as `approval_cap`."),
        Key("max_proposals", "integer", "1000", "Proposals per cycle of a command worker."),
        Key("max_log_lines", "integer", "1000", "Stderr lines and protocol log messages per "
            "cycle, together; the rest are counted and dropped."),
    )),
    Section("console", "The operator web console (docs/console.md).", (
        Key("enabled", "boolean", "false", "The daemon serves the console too, on its own "
            "thread and store connection."),
        Key("listen", "string", '"127.0.0.1:8787"', "HOST:PORT; `console --listen` wins."),
        Key("operators_file", "path", "STATE_DIR/console-operators.json", "Operators and their "
            "hashed secrets (written 0600)."),
        Key("session_ttl", _DUR, '"8h"', "A login lasts this long."),
        Key("tls_cert", "path", "-", "Certificate to serve HTTPS directly (with `tls_key`)."),
        Key("tls_key", "path", "-", "Private key of `tls_cert`."),
        Key("login_attempts", "integer", "5", "Failed logins per client and name within "
            "`login_window` before logins are refused (429)."),
        Key("login_window", _DUR, '"5m"', "Window of `login_attempts`."),
    )),
    Section("workers[].backoff", "Exponential restart backoff with jitter.", (
        Key("initial", _DUR, '"1s"', "First delay."),
        Key("max", _DUR, '"60s"', "Largest delay; >= initial."),
        Key("multiplier", "number", "2.0", "Growth per restart; >= 1."),
    )),
)  # fmt: skip

_BY_PATH = {s.path: s for s in SECTIONS}


def keys(path: str) -> tuple[str, ...]:
    """The known keys of one section, by its path in SECTIONS."""
    return _BY_PATH[path].names()


def suggestion(key: str, known: Iterable[str]) -> str | None:
    """The known key `key` is most likely a typo of, if one is close enough."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_keys(data: Mapping[str, Any]) -> list[tuple[str, str, str | None]]:
    """Every unknown key of a parsed config file: (where, key, suggestion), in file order.

    Only tables of the expected shape are walked; a value of the wrong kind is left to the
    parsers, which name it."""
    return [(where, key, hint) for where, key, hint, _ in unknown_keys_in(data)]


def unknown_keys_in(
    data: Mapping[str, Any],
) -> list[tuple[str, str, str | None, dict[str, Any]]]:
    """unknown_keys(), each with the table that holds the key (to take it out)."""
    found: list[tuple[str, str, str | None, dict[str, Any]]] = []

    def check(where: str, table: object, path: str) -> None:
        if not isinstance(table, dict):
            return
        known = keys(path)
        for key in table:
            if key not in known:
                found.append((where, key, suggestion(key, known), table))

    def rows(value: object) -> list[tuple[int, dict[str, Any]]]:
        return (
            [(i, v) for i, v in enumerate(value) if isinstance(v, dict)]
            if isinstance(value, list)
            else []
        )

    check("top level", data, "(top level)")
    for name in ("daemon", "killswitch", "policy", "approvals", "tokens", "models", "alerts",
                 "metrics", "console"):  # fmt: skip
        check(name, data.get(name), name)
    horizons = data.get("horizons")
    if isinstance(horizons, dict):
        for name, section in horizons.items():
            check(f"horizons.{name}", section, "horizons.NAME")
    policy = _table(data, "policy")
    check("policy.risk", policy.get("risk"), "policy.risk")
    for i, rule in rows(policy.get("rules")):
        check(f"policy.rules[{i}]", rule, "policy.rules[]")
        for j, cond in rows(rule.get("when")):
            check(f"policy.rules[{i}].when[{j}]", cond, "policy.rules[].when[]")
    approvals = _table(data, "approvals")
    for i, step in rows(approvals.get("escalation")):
        check(f"approvals.escalation[{i}]", step, "approvals.escalation[]")
    tokens = _table(data, "tokens")
    for i, budget in rows(tokens.get("budgets")):
        check(f"tokens.budgets[{i}]", budget, "tokens.budgets[]")
    models = _table(data, "models")
    overrides = models.get("overrides")
    if isinstance(overrides, dict):
        for identity, entry in overrides.items():
            check(f"models.overrides.{identity}", entry, "models.overrides.IDENTITY")
    alerts = _table(data, "alerts")
    for i, sink in rows(alerts.get("sinks")):
        kind = sink.get("type")
        if kind in ("webhook", "command"):
            check(f"alerts.sinks[{i}]", sink, f'alerts.sinks[] (type = "{kind}")')
    for i, worker in rows(data.get("workers")):
        where = (
            f"worker {worker['name']!r}"
            if isinstance(worker.get("name"), str)
            else (f"workers[{i}]")
        )
        check(where, worker, "workers[]")
        check(f"{where} backoff", worker.get("backoff"), "workers[].backoff")
    return found


def _table(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = data.get(name)
    return value if isinstance(value, dict) else {}


def markdown() -> str:
    """docs/config.md, from SECTIONS."""
    out = [
        "# Configuration reference",
        "",
        "<!-- generated by `python -m supervisor.docgen` from supervisor/schema.py; "
        "do not edit by hand -->",
        "",
        "The config file is TOML (`--config FILE`, env `ACP_CONFIG`; without one the built-in",
        "`config/default.toml`). The environment and the command line override the file:",
        "`ACP_STATE_DIR` / `--state-dir`, `ACP_DB` / `--db`. Every key is optional unless it",
        "says `required`; an unknown key is an error with a suggestion. Durations are a number",
        'of seconds or a string like `"500ms"`, `"90s"`, `"15m"`, `"1h"`, `"2d"`.',
        "",
        "`acp-supervisor config check` validates a file the way `run` would (without",
        "connecting to the database) and prints every problem; `acp-supervisor config show`",
        "prints the effective configuration, secrets masked.",
    ]
    for section in SECTIONS:
        out += ["", f"## `{section.path}`", "", section.meaning, ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for k in section.keys:
            default = k.default if k.default in ("-", "required") else f"`{k.default}`"
            if k.default.startswith(("per ", "see ", "the ")) or "(" in k.default:
                default = k.default
            out.append(f"| `{k.name}` | {k.type} | {default} | {k.meaning} |")
    return "\n".join(out) + "\n"

"""`acp-supervisor`: the command line. Global options work before or after the subcommand and
fall back to the environment: --config (ACP_CONFIG), --db (ACP_DB), --state-dir (ACP_STATE_DIR).

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error. An expected error is
one line on stderr, never a traceback. Logs go to stderr; stdout carries only a command's result.
A reader that closes the pipe early (`| head`) ends the command quietly with 141 (128 + SIGPIPE),
the status a shell reports for a process that SIGPIPE killed.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, NoReturn

import anyio

from ..config import Config, load_config
from ..errors import SupervisorError, UsageError

PROG = "acp-supervisor"
Handler = Callable[[argparse.Namespace, Config], Awaitable[int]]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _globals(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    group = parser.add_argument_group("global options")
    group.add_argument(
        "--config",
        metavar="FILE",
        default=default,
        help="config file (TOML); env ACP_CONFIG; default: the built-in config",
    )
    group.add_argument(
        "--db",
        metavar="URL",
        default=default,
        help="sqlite:///path or postgresql://...; env ACP_DB",
    )
    group.add_argument(
        "--state-dir",
        metavar="DIR",
        default=default,
        help="state directory; env ACP_STATE_DIR; default ./state",
    )
    group.add_argument(
        "--run",
        metavar="ID|latest",
        default=default,
        help="read a simulated run (its id, a unique prefix of it, or latest) instead of --db",
    )
    group.add_argument(
        "--log-level",
        default=argparse.SUPPRESS if suppress else "info",
        choices=["debug", "info", "warning", "error"],
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _keys(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(","))
    if not all(keys):
        raise argparse.ArgumentTypeError(f"expected comma-separated param names, got {text!r}")
    return keys


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON on stdout")


def _iso(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 instant: {value!r}") from None
    return parsed  # without an offset: read in the configured time zone (commands.run)


_BY_HELP = "who decides (default: the invoking user: $SUDO_USER, then the login name)"


def invoking_user() -> str:
    """Who runs the command: the user behind sudo first, then the login name."""
    import getpass

    sudo_user = os.environ.get("SUDO_USER", "").strip()
    if sudo_user:
        return sudo_user
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no LOGNAME/USER and no passwd entry
        raise UsageError("cannot tell who you are: give --by NAME") from None


def _select_run(args: argparse.Namespace, config: Config) -> Config:
    """`--run ID|latest`: the database of that simulated run, for the commands that read."""
    ref = getattr(args, "run", None)
    if ref is None:
        return config
    if args.handler.__name__ in ("run", "db_migrate"):
        raise UsageError("--run selects a simulated run to read; it does not go with this command")
    if args.db is not None:
        raise UsageError("--run and --db both name a database: give one")
    import dataclasses

    from ..simruns import find

    chosen = find(config.state_dir, ref)
    return dataclasses.replace(config, db_url=chosen.db_url, db_explicit=True)


def _budget(value: str) -> float:
    """A budget bound: a finite number >= 0 (`nan` or `inf` would mean no bound at all)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value!r}")
    return number


def version() -> str:
    """The installed distribution's version (package metadata, so it matches the wheel)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("acp-supervisor")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "unknown (not installed)"


class _Version(argparse.Action):
    """Like argparse's, but with print(): argparse drops write errors, hiding a closed pipe."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any, **_kw: Any) -> NoReturn:
        print(f"{PROG} {version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, description="Keeps AI agent workers running and governs every action."
    )
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    _globals(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def command(
        name: str, help_: str, handler: Handler, parent: Any = sub
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=help_)
        _globals(p, suppress=True)
        p.set_defaults(handler=handler)
        return p

    from . import commands as c

    run = command("run", "run the daemon (until stopped, or for one horizon)", c.run)
    run.add_argument("--horizon", choices=["hour", "day", "week", "month"])
    run.add_argument("--simulate", action="store_true", help="run the horizon on a virtual clock")
    run.add_argument("--start", type=_iso, help="simulated start instant (ISO 8601); without an "
                     "offset it is read in the configured time zone (daemon.timezone)")  # fmt: skip
    run.add_argument("--seed", type=int)
    _json_flag(run)

    db = sub.add_parser("db", help="database commands").add_subparsers(
        dest="db_command", metavar="ACTION", parser_class=_Parser
    )
    db.required = True
    migrate = command("migrate", "create or upgrade the schema", c.db_migrate, db)
    migrate.add_argument("--new", action="store_true",
                         help="begin a new store where a deleted or replaced one was")  # fmt: skip

    _json_flag(command("status", "workers, windows, kill switch and approvals", c.status))
    card = command("scorecard", "the run's scorecard from the store", c.scorecard)
    card.add_argument("--shadow", action="store_true",
                      help="where the shadow policy disagreed with the live one, per window")  # fmt: skip
    _json_flag(card)

    sessions = sub.add_parser("sessions", help="governance windows").add_subparsers(
        dest="sessions_command", metavar="ACTION", parser_class=_Parser
    )
    sessions.required = True
    _json_flag(command("list", "list windows", c.sessions_list, sessions))

    events = sub.add_parser("events", help="the event log").add_subparsers(
        dest="events_command", metavar="ACTION", parser_class=_Parser
    )
    events.required = True
    replay = command("replay", "events of one session in order", c.events_replay, events)
    replay.add_argument("--session", required=True)
    replay.add_argument("--after", type=int, default=0, metavar="SEQ")
    _json_flag(replay)

    cps = sub.add_parser("checkpoints", help="worker checkpoints").add_subparsers(
        dest="cp_command", metavar="ACTION", parser_class=_Parser
    )
    cps.required = True
    _json_flag(command("list", "list checkpoints", c.checkpoints_list, cps))
    restore = command(
        "restore", "make a checkpoint the worker's resume point", c.checkpoints_restore, cps
    )
    restore.add_argument("id", type=int)
    restore.add_argument("--by", help=_BY_HELP)

    ap = sub.add_parser("approvals", help="pending and decided approvals").add_subparsers(
        dest="ap_command", metavar="ACTION", parser_class=_Parser
    )
    ap.required = True
    lst = command("list", "list approvals", c.approvals_list, ap)
    lst.add_argument("--pending", action="store_true")
    _json_flag(lst)
    approve = command("approve", "approve a pending approval", c.approvals_approve, ap)
    approve.add_argument("id")
    approve.add_argument("--by", help=_BY_HELP)
    approve.add_argument("--reason")
    approve.add_argument("--scope", choices=["once", "window"], default="once")
    approve.add_argument("--uses", "--max-uses", dest="max_uses", type=_positive_int,
                         help="--scope window: at most N later actions (default 10)")  # fmt: skip
    approve.add_argument("--max-cost", type=_budget)
    approve.add_argument("--match", type=_keys, metavar="KEY[,KEY...]",
                         help="--scope window: later actions must have the same values for "
                              "these params (default: all params)")  # fmt: skip
    deny = command("deny", "deny a pending approval", c.approvals_deny, ap)
    deny.add_argument("id")
    deny.add_argument("--by", help=_BY_HELP)
    deny.add_argument("--reason", required=True)

    ks = sub.add_parser("killswitch", help="halt and resume actions").add_subparsers(
        dest="ks_command", metavar="ACTION", parser_class=_Parser
    )
    ks.required = True
    engage = command("engage", "halt actions at a scope", c.killswitch_engage, ks)
    engage.add_argument(
        "--mode", required=True, choices=["halt_noncritical", "halt_all", "emergency"]
    )
    engage.add_argument(
        "--scope",
        nargs="+",
        default=["host"],
        metavar="SCOPE",
        help="host | fleet | session ID | worker NAME (all its replicas) or NAME-N (one)",
    )
    engage.add_argument("--reason", required=True)
    engage.add_argument("--by", help=_BY_HELP)
    dis = command("disengage", "resume actions at a scope", c.killswitch_disengage, ks)
    dis.add_argument("--scope", nargs="+", default=["host"], metavar="SCOPE")
    dis.add_argument("--reason", required=True)
    dis.add_argument("--by", help=_BY_HELP)
    for p in (engage, dis):
        p.add_argument("--force", action="store_true",
                       help="a worker or session this config does not know (not started yet)")  # fmt: skip
    _json_flag(command("status", "the kill switch at every scope", c.killswitch_status, ks))

    drills = sub.add_parser("drill", help="operational drills on a throwaway fleet").add_subparsers(
        dest="drill_command", metavar="DRILL", parser_class=_Parser
    )
    drills.required = True
    ksd = command(
        "killswitch",
        "halt a drill fleet, verify nothing ran after, resume",
        c.drill_killswitch,
        drills,
    )
    ksd.add_argument("--workers", type=int, default=10)
    ksd.add_argument("--seconds", type=float, default=2.0, help="how long to watch the halt")
    _json_flag(ksd)
    abd = command(
        "approval-backlog",
        "verify escalation and deny-by-default on time",
        c.drill_approval_backlog,
        drills,
    )
    abd.add_argument("--count", type=int, default=100)
    _json_flag(abd)

    rec = command("recover", "run the recovery scan now", c.recover)
    rec.add_argument("--dry-run", action="store_true")
    _json_flag(rec)

    actions = sub.add_parser("actions", help="actions").add_subparsers(
        dest="actions_command", metavar="ACTION", parser_class=_Parser
    )
    actions.required = True
    _json_flag(
        command("in-doubt", "actions started without an outcome", c.actions_in_doubt, actions)
    )
    resolve = command(
        "resolve", "record an operator's verdict on an in-doubt action", c.actions_resolve, actions
    )
    resolve.add_argument("id")
    resolve.add_argument("--as", dest="as_", required=True, choices=["done", "failed"])
    resolve.add_argument("--by", help=_BY_HELP)

    tokens = sub.add_parser("tokens", help="token governance").add_subparsers(
        dest="tokens_command", metavar="ACTION", parser_class=_Parser
    )
    tokens.required = True
    usage = command("usage", "token usage per identity and period", c.tokens_usage, tokens)
    usage.add_argument("--scope", choices=["user", "team", "org"])
    usage.add_argument("--period", choices=["day", "week", "month"])
    _json_flag(usage)

    from . import configcmd

    configcmd.register(sub, _Parser, lambda p: _globals(p, suppress=True))
    from ..console import commands as console_c

    con = command("console", "serve the operator web console", console_c.console_serve)
    con.add_argument("--listen", metavar="HOST:PORT",
                     help="address to serve on; default [console] listen (127.0.0.1:8787)")  # fmt: skip
    con_sub = con.add_subparsers(dest="console_command", metavar="ACTION", parser_class=_Parser)
    add_op = command("add-operator", "add a console operator and print their secret once",
                     console_c.console_add_operator, con_sub)  # fmt: skip
    add_op.add_argument("name")
    add_op.add_argument("--role", required=True, choices=["viewer", "approver", "admin"])

    _policy_commands(sub, command, c)
    return parser


def _policy_commands(sub: Any, command: Callable[..., argparse.ArgumentParser], c: Any) -> None:
    """`policy explain` and `policy replay`: tuning the policy from its decisions."""
    from ..governance.replay import FAIL_ON

    pol = sub.add_parser("policy", help="explain and replay policy decisions").add_subparsers(
        dest="policy_command", metavar="ACTION", parser_class=_Parser
    )
    pol.required = True
    ex = command(
        "explain", "the decision the policy gives an action, and why", c.policy_explain, pol
    )
    ex.add_argument("--action", required=True, metavar="NAME")
    ex.add_argument("--worker", default="", metavar="W")
    ex.add_argument("--risk", choices=["low", "medium", "high", "critical"], default="low")
    ex.add_argument("--params", default="{}", metavar="JSON", help="the action's params object")
    ex.add_argument("--model", help="also check model access for this model")
    ex.add_argument("--identity", action="append", default=[], metavar="SCOPE:NAME",
                    help="who asks, for the model check (repeatable: user:alice team:support)")  # fmt: skip
    _json_flag(ex)
    rp = command(
        "replay", "decide recorded proposals again with a candidate policy", c.policy_replay, pol
    )
    rp.add_argument("--candidate", required=True, metavar="FILE",
                    help="TOML with [policy], [tokens], [models]; absent sections are the config's")  # fmt: skip
    which = rp.add_mutually_exclusive_group()
    which.add_argument("--since", metavar="DURATION",
                       help="windows ending within this of the newest window's end (default 7d)")  # fmt: skip
    which.add_argument("--window", action="append", default=[], metavar="ID",
                       help="a window (session) id or unique prefix; repeatable")  # fmt: skip
    rp.add_argument("--fail-on", action="append", default=[], choices=FAIL_ON,
                    help="exit 3 when the candidate does this (repeatable)")  # fmt: skip
    _json_flag(rp)


def _nonempty(args: argparse.Namespace) -> None:
    if "by" in args and args.by is None:
        args.by = invoking_user()
    for name in ("by", "reason"):
        value = getattr(args, name, None)
        if value is not None and not str(value).strip():
            raise UsageError(f"--{name} must not be empty")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
    except (BrokenPipeError, BaseExceptionGroup) as exc:
        if not _closed_pipe(exc):
            raise
        # Python's advice for SIGPIPE: point stdout at devnull so nothing is flushed into the
        # closed pipe at exit, and end the way a process that SIGPIPE killed is reported.
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                os.dup2(devnull, stream.fileno())
        return 128 + signal.SIGPIPE


def _closed_pipe(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_closed_pipe(e) for e in exc.exceptions)
    return isinstance(exc, BrokenPipeError)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..logging import configure

    configure(level=args.log_level, stream=sys.stderr)
    try:
        _nonempty(args)
        if getattr(args, "config_handler", None) is not None:
            return int(args.config_handler(args))  # `config check|show` load the config themselves
        config = load_config(
            args.config or os.environ.get("ACP_CONFIG") or None,
            db=args.db,
            state_dir=args.state_dir,
        )
        config = _select_run(args, config)
        code: int = anyio.run(args.handler, args, config)
        return code
    except SupervisorError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130

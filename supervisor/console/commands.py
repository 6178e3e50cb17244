"""`acp-supervisor console` and `acp-supervisor console add-operator`."""

from __future__ import annotations

import argparse
import os

import structlog

from ..config import Config
from ..killswitch import SECRET_ENV
from ..timing.clock import SystemClock
from .auth import OperatorsFile, Role
from .settings import parse_listen

log = structlog.get_logger("supervisor.console")


async def console_serve(args: argparse.Namespace, config: Config) -> int:
    from .serve import require_extra, serve

    require_extra()
    if args.listen is not None:
        parse_listen(args.listen, "--listen")  # a bad address is the one line, before any warning

    class Listening:
        """serve() reports here once it listens: only then the warnings, so a console that
        cannot start says one line."""

        def started(self, value: object = None) -> None:
            path = config.console.operators_path(config.state_dir)
            if not OperatorsFile(path).load():
                log.warning("console.no_operators", operators_file=str(path),
                            hint="add one: acp-supervisor console add-operator NAME --role admin")  # fmt: skip
            if SECRET_ENV not in os.environ and config.killswitch_secret_file is None:
                log.warning("console.no_killswitch_secret",
                            hint="the host switch cannot be changed from this console")  # fmt: skip

    await serve(config, args.listen, task_status=Listening())
    return 0


async def console_add_operator(args: argparse.Namespace, config: Config) -> int:
    path = config.console.operators_path(config.state_dir)
    secret = OperatorsFile(path).add(args.name, Role(args.role),
                                     created_at=SystemClock().now().isoformat())  # fmt: skip
    print(f"operator {args.name} ({args.role}) added to {path}")
    print(f"secret: {secret}")
    print("This secret is shown once; only its scrypt hash is stored.")
    return 0

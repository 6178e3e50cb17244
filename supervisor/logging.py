"""structlog, configured once at the entry point: on stderr (stdout carries only a command's
result), JSON lines when stderr is not a terminal (journald, CI, pipes), readable lines on one.
Context (worker, window, command_id, correlation id) comes from contextvars, so every line a
worker's cycle logs carries it."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog


def configure(
    *, json: bool | None = None, level: str = "info", stream: TextIO | None = None
) -> None:
    stream = stream or sys.stderr
    as_json = (not stream.isatty()) if json is None else json
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if as_json:
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=False)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )

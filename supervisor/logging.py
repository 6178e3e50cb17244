"""structlog, configured once at the entry point: on stderr (stdout carries only a command's
result), JSON lines when stderr is not a terminal (journald, CI, pipes), readable lines on one.
Context (worker, window, command_id, correlation id) comes from contextvars, so every line a
worker's cycle logs carries it."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog


class _NamedPrintLogger(structlog.PrintLogger):
    """A PrintLogger that keeps the name given to `structlog.get_logger(name)`, which the stock
    factory drops (and `structlog.stdlib.add_logger_name` needs a stdlib logger)."""

    def __init__(self, file: TextIO, name: str | None) -> None:
        super().__init__(file)
        self.name = name


class _NamedPrintLoggerFactory:
    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> _NamedPrintLogger:
        return _NamedPrintLogger(self._file, str(args[0]) if args else None)


def _add_logger_name(logger: Any, method_name: str, event_dict: Any) -> Any:
    name = getattr(logger, "name", None)
    if name is not None:
        event_dict.setdefault("logger", name)
    return event_dict


def configure(
    *, json: bool | None = None, level: str = "info", stream: TextIO | None = None
) -> None:
    stream = stream or sys.stderr
    as_json = (not stream.isatty()) if json is None else json
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if as_json:
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=False)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=_NamedPrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )

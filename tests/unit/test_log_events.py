"""Every log event name is a literal, so one search finds every place that logs it: the varying
part of a line goes in a field, never into the event name."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "supervisor"
LEVELS = {"debug", "info", "warning", "warn", "error", "exception", "critical", "fatal", "msg"}


def _is_logger(node: ast.expr) -> bool:
    """`log`, `logger`, `self.log`, `structlog.get_logger(...)`, `log.bind(...)`."""
    if isinstance(node, ast.Name):
        return node.id in ("log", "logger") or node.id.endswith(("_log", "_logger"))
    if isinstance(node, ast.Attribute):
        return node.attr in ("log", "logger")
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        if node.func.attr == "get_logger":
            return True
        return node.func.attr in ("bind", "new", "unbind") and _is_logger(node.func.value)
    return False


def _event_index(func: ast.expr) -> int | None:
    """Where the event name sits if `func` is a logging method (`log.log(level, event)`), else None."""
    if isinstance(func, ast.Attribute) and _is_logger(func.value):
        if func.attr in LEVELS:
            return 0
        return 1 if func.attr == "log" else None
    if isinstance(func, ast.IfExp):  # (log.warning if bad else log.info)("...")
        return (
            _event_index(func.body)
            if _event_index(func.body) is not None
            else _event_index(func.orelse)
        )
    if isinstance(func, ast.Call) and isinstance(func.func, ast.Name) and func.func.id == "getattr":
        return 0 if func.args and _is_logger(func.args[0]) else None  # getattr(log, level)("...")
    return None


def computed_event_names(source: str, filename: str = "<string>") -> list[str]:
    """`file:line: call` for each logging call whose event name is not a string literal."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        index = _event_index(node.func)
        if index is None:
            continue
        event = node.args[index] if len(node.args) > index else None
        if not (isinstance(event, ast.Constant) and isinstance(event.value, str)):
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)[:100]}")
    return found


def test_every_event_name_in_the_package_is_a_literal() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30
    found = [
        hit
        for f in files
        for hit in computed_event_names(f.read_text(), str(f.relative_to(PACKAGE.parent)))
    ]
    assert found == []


def test_the_check_finds_computed_names_and_passes_literals() -> None:
    bad = """
log.info(f"cycle.{kind}", worker=w)
log.warning("alert." + state)
logger.error(name)
self.log.debug(EVENT)
(log.warning if raised else log.info)(f"alert.{state}", **fields)
getattr(log, level)(event)
structlog.get_logger("supervisor.x").warning("a.%s" % b)
log.bind(worker=w).info(f"x.{y}")
log.log(20, f"x.{y}")
log.info(event="keyword.only")
"""
    assert len(computed_event_names(bad)) == 10
    good = """
log.info("cycle.done", kind=kind)
(log.warning if raised else log.info)("alert.changed", state=state)
getattr(log, level)("worker.log", text=text)
log.log(20, "x.y")
print(f"not.{a}.log")
results.info(f"not a logger")
"""
    assert computed_event_names(good) == []

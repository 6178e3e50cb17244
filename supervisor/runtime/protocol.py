"""The external worker protocol on the wire: JSON lines, one object per line, each way.

What a child may send is parsed here, and nothing else: `parse_message` turns one line into a
typed message or raises `WorkerProtocolError` naming what is wrong (bad JSON, a duplicate key,
NaN, nesting past `MAX_DEPTH`, an unknown type, a field of the wrong type); `LineReader` never
buffers more than one line's limit plus a chunk; `encode` writes the daemon's messages. The
process that speaks it is `external.py`'s; the full protocol is docs/worker-protocol.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

import anyio
import anyio.abc

from ..actions import RISKS, Action
from ..errors import SupervisorError

PROTOCOL_VERSION: Final = 1

#: Hard limits on what one message may contain (beyond the line length).
MAX_ID_LENGTH: Final = 128
MAX_DEPTH: Final = 32  # JSON nesting; deeper values are refused before they reach the store

LOG_LEVELS: Final = frozenset({"debug", "info", "warning", "error"})
_ACTION_KEYS: Final = frozenset(
    {"name", "params", "risk", "cost", "critical", "safe_to_retry", "key"}
)

CHUNK: Final = 64 * 1024


class WorkerProtocolError(Exception):
    """The child broke the protocol, hung, or went away. The fleet counts it as a crash.

    `reason` is a short machine-readable code: malformed, oversized, unknown_type, invalid,
    unexpected, flood, exited, hung, start_failed.
    """

    def __init__(self, message: str, *, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


class WorkerHung(WorkerProtocolError):
    """No message from the child for `heartbeat_timeout` seconds."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="hung")


class ExternalActionFailed(Exception):
    """The child reported `ok: false` for an approved action: recorded as a failed outcome."""


# -- messages (child -> daemon) -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Propose:
    id: str
    action: Action
    key: str | None = None


@dataclass(frozen=True, slots=True)
class Result:
    id: str
    ok: bool
    result: dict[str, Any] | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class CycleDone:
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    pass


@dataclass(frozen=True, slots=True)
class Log:
    level: str
    message: str


Message: TypeAlias = Propose | Result | CycleDone | Heartbeat | Log


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf, which no store or encoder accepts
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _too_deep(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _bad(kind: str, what: str, expected: str, value: object) -> WorkerProtocolError:
    return WorkerProtocolError(
        f"{kind}: {what} must be {expected}, got {_type_name(value)}", reason="invalid"
    )


def _ident(kind: str, obj: Mapping[str, Any], key: str = "id") -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise _bad(kind, key, "a non-empty string", value)
    if len(value) > MAX_ID_LENGTH:
        raise WorkerProtocolError(f"{kind}: {key} is longer than {MAX_ID_LENGTH} characters")
    return value


def _object(kind: str, obj: Mapping[str, Any], key: str, *, required: bool) -> dict[str, Any]:
    if key not in obj and not required:
        return {}
    value = obj.get(key)
    if not isinstance(value, dict):
        raise _bad(kind, key, "an object", value)
    return value


def _flag(kind: str, obj: Mapping[str, Any], key: str) -> bool:
    value = obj.get(key, False)
    if not isinstance(value, bool):
        raise _bad(kind, key, "true or false", value)
    return value


def _parse_action(raw: Mapping[str, Any]) -> tuple[Action, str | None]:
    kind = "propose.action"
    unknown = sorted(set(raw) - _ACTION_KEYS)
    if unknown:
        # Fail closed: a field the gate would not see (a model, an identity...) is not ignored.
        raise WorkerProtocolError(f"{kind}: unknown field {unknown[0]!r}", reason="invalid")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _bad(kind, "name", "a non-empty string", name)
    if len(name) > 200:
        raise WorkerProtocolError(f"{kind}: name is longer than 200 characters")
    if not name.isprintable():
        # A name is shown to the operator who approves it: no terminal escapes, carriage
        # returns or bidi overrides that could make `approvals list` show another action.
        raise WorkerProtocolError(f"{kind}: name holds a control or format character")
    params = _object(kind, raw, "params", required=False)
    risk = raw.get("risk")
    if not isinstance(risk, str) or risk not in RISKS:
        shown = repr(risk) if isinstance(risk, str) else _type_name(risk)
        raise WorkerProtocolError(
            f"{kind}: risk must be one of {', '.join(RISKS)}, got {shown[:40]}", reason="invalid"
        )
    cost = raw.get("cost", 0)
    if isinstance(cost, bool) or not isinstance(cost, int | float):
        raise _bad(kind, "cost", "a number", cost)
    try:
        cost_f = float(cost)
    except OverflowError:
        raise WorkerProtocolError(f"{kind}: cost is out of range") from None
    if not math.isfinite(cost_f) or cost_f < 0:
        raise WorkerProtocolError(f"{kind}: cost must be a finite number >= 0")
    key = raw.get("key")
    if key is not None:
        key = _ident(kind, raw, "key")
    try:
        action = Action(name=name, params=params, risk=risk, cost=cost_f,
                        critical=_flag(kind, raw, "critical"),
                        safe_to_retry=_flag(kind, raw, "safe_to_retry"))  # fmt: skip
    except SupervisorError as exc:  # UsageError from Action's own checks
        raise WorkerProtocolError(f"{kind}: {exc}", reason="invalid") from None
    return action, key


def parse_message(line: bytes, max_line: int) -> Message:
    """Parse one line the child wrote. Returns a Message or raises WorkerProtocolError; never
    anything else, whatever the bytes."""
    if len(line) > max_line:
        raise WorkerProtocolError(
            f"line of {len(line)} bytes is over the {max_line}-byte limit", reason="oversized"
        )
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WorkerProtocolError(
            f"not UTF-8: {exc.reason} at byte {exc.start}", reason="malformed"
        ) from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant,
                          parse_float=_finite)  # fmt: skip
        if "\\u" in text:
            # A lone surrogate escape (\ud800) is valid JSON but no UTF-8 text: the store and
            # the log would fail on it later, outside the protocol's error handling.
            json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise WorkerProtocolError("a string holds a lone surrogate (\\ud800-\\udfff)",
                                  reason="malformed") from None  # fmt: skip
    except RecursionError:
        raise WorkerProtocolError("JSON nested too deeply", reason="malformed") from None
    except ValueError as exc:  # JSONDecodeError, duplicate keys, NaN, huge integers
        raise WorkerProtocolError(f"not valid JSON: {str(exc)[:200]}", reason="malformed") from None
    if not isinstance(data, dict):
        raise WorkerProtocolError(
            f"a message must be a JSON object, got {_type_name(data)}", reason="malformed"
        )
    if _too_deep(data, MAX_DEPTH):
        raise WorkerProtocolError(f"JSON nested deeper than {MAX_DEPTH}", reason="malformed")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise WorkerProtocolError(
            f"message without a string 'type' (got {_type_name(kind)})", reason="malformed"
        )
    if kind == "heartbeat":
        return Heartbeat()
    if kind == "propose":
        ident = _ident(kind, data)
        action, key = _parse_action(_object(kind, data, "action", required=True))
        return Propose(id=ident, action=action, key=key)
    if kind == "result":
        ident = _ident(kind, data)
        ok = data.get("ok")
        if not isinstance(ok, bool):
            raise _bad(kind, "ok", "true or false", ok)
        result = data.get("result")
        if result is not None and not isinstance(result, dict):
            raise _bad(kind, "result", "an object or null", result)
        error = data.get("error")
        if error is not None and not isinstance(error, str):
            raise _bad(kind, "error", "a string or null", error)
        return Result(id=ident, ok=ok, result=result, error=error)
    if kind == "cycle_done":
        return CycleDone(state=_object(kind, data, "state", required=True))
    if kind == "log":
        level = data.get("level", "info")
        if not isinstance(level, str) or level not in LOG_LEVELS:
            shown = repr(level)[:40] if isinstance(level, str) else _type_name(level)
            raise WorkerProtocolError(
                f"log: level must be one of {', '.join(sorted(LOG_LEVELS))}, got {shown}",
                reason="invalid",
            )
        message = data.get("message")
        if not isinstance(message, str):
            raise _bad(kind, "message", "a string", message)
        return Log(level=level, message=message)
    raise WorkerProtocolError(f"unknown message type {kind[:60]!r}", reason="unknown_type")


def printable(text: str) -> str:
    """Child-controlled text goes into our log lines: no control characters (terminal escapes,
    carriage returns) get through."""
    return "".join(ch if ch == "\t" or (ch >= " " and ch != "\x7f") else "\ufffd" for ch in text)


def encode(message: Mapping[str, Any]) -> bytes:
    return (
        json.dumps(message, separators=(",", ":"), allow_nan=False, default=str) + "\n"
    ).encode()


class LineReader:
    """Reads lines of at most `max_line` bytes in bounded chunks; never buffers more than
    max_line plus one chunk."""

    def __init__(self, stream: anyio.abc.ByteReceiveStream, max_line: int) -> None:
        self.stream = stream
        self.max_line = max_line
        self.buffer = bytearray()

    async def readline(self) -> bytes | None:
        """The next line without its newline, or None at end of stream (a partial last line is
        dropped: the writer went away before finishing it)."""
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 1]
                if len(line) > self.max_line:
                    raise WorkerProtocolError(
                        f"line of {len(line)} bytes is over the {self.max_line}-byte limit",
                        reason="oversized",
                    )
                return line
            if len(self.buffer) > self.max_line:
                raise WorkerProtocolError(
                    f"line over the {self.max_line}-byte limit (no newline in "
                    f"{len(self.buffer)} bytes)",
                    reason="oversized",
                )
            try:
                chunk = await self.stream.receive(CHUNK)
            except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                return None
            self.buffer += chunk

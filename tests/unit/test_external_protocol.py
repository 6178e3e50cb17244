"""The external worker protocol parser: valid messages, every kind of invalid line, and a fuzz.

Whatever bytes a child writes, `parse_message` returns a Message or raises WorkerProtocolError:
never another exception, never a crash of the daemon.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.runtime.external import child_environment
from supervisor.runtime.protocol import (
    MAX_DEPTH,
    CycleDone,
    Heartbeat,
    LineReader,
    Log,
    Propose,
    Result,
    WorkerProtocolError,
    parse_message,
)

MAX = 64 * 1024
MESSAGE_TYPES = (Propose, Result, CycleDone, Heartbeat, Log)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def line(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def propose(**action: Any) -> bytes:
    body = {"name": "notes.write", "params": {"n": 1}, "risk": "low"}
    body.update(action)
    return line({"type": "propose", "id": "a1", "action": body})


def rejected(raw: bytes, max_line: int = MAX) -> WorkerProtocolError:
    with pytest.raises(WorkerProtocolError) as info:
        parse_message(raw, max_line)
    return info.value


# --- valid messages ------------------------------------------------------------------------------


def test_propose_with_every_field() -> None:
    msg = parse_message(
        propose(cost=0.25, critical=True, safe_to_retry=True, key="note-7", risk="medium"), MAX
    )
    assert isinstance(msg, Propose)
    assert msg.id == "a1"
    assert msg.key == "note-7"
    action = msg.action
    assert (action.name, action.params, action.risk) == ("notes.write", {"n": 1}, "medium")
    assert (action.cost, action.critical, action.safe_to_retry) == (0.25, True, True)


def test_propose_defaults() -> None:
    msg = parse_message(
        line({"type": "propose", "id": "x", "action": {"name": "a.b", "risk": "high"}}), MAX
    )
    assert isinstance(msg, Propose)
    assert msg.key is None
    assert msg.action.params == {}
    assert (msg.action.cost, msg.action.critical, msg.action.safe_to_retry) == (0.0, False, False)


def test_result_cycle_done_heartbeat_log() -> None:
    assert parse_message(
        line({"type": "result", "id": "a1", "ok": True, "result": {"x": 1}}), MAX
    ) == Result("a1", True, {"x": 1}, None)
    assert parse_message(
        line({"type": "result", "id": "a1", "ok": False, "error": "disk full"}), MAX
    ) == Result("a1", False, None, "disk full")
    assert parse_message(line({"type": "cycle_done", "state": {"n": [1, 2]}}), MAX) == CycleDone(
        {"n": [1, 2]}
    )
    assert parse_message(b'{"type":"heartbeat"}', MAX) == Heartbeat()
    assert parse_message(line({"type": "log", "level": "warning", "message": "hm"}), MAX) == Log(
        "warning", "hm"
    )
    assert parse_message(line({"type": "log", "message": "default level"}), MAX) == Log(
        "info", "default level"
    )


def test_whitespace_crlf_and_unknown_envelope_fields_are_fine() -> None:
    assert parse_message(b'  {"type": "heartbeat", "seq": 4}\r', MAX) == Heartbeat()


def test_a_line_exactly_at_the_limit_is_accepted() -> None:
    raw = b'{"type":"heartbeat","pad":"' + b"x" * 10 + b'"}'
    assert parse_message(raw, len(raw)) == Heartbeat()
    assert rejected(raw, len(raw) - 1).reason == "oversized"


# --- invalid lines -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason", "words"),
    [
        (b"", "malformed", "not valid JSON"),
        (b"not json", "malformed", "not valid JSON"),
        (b'{"type":"heartbeat"', "malformed", "not valid JSON"),
        (b"\xff\xfe{}", "malformed", "not UTF-8"),
        (b"[1, 2]", "malformed", "must be a JSON object, got array"),
        (b'"heartbeat"', "malformed", "got string"),
        (b"null", "malformed", "got null"),
        (b"{}", "malformed", "without a string 'type'"),
        (b'{"type": 5}', "malformed", "got number"),
        (b'{"type":"heartbeat","type":"propose"}', "malformed", "duplicate key"),
        (b'{"type":"log","message":"x","n":NaN}', "malformed", "not valid JSON"),
        (b'{"type":"log","message":"x","n":Infinity}', "malformed", "not valid JSON"),
        (b'{"type":"log","message":"x","n":' + b"9" * 5000 + b"}", "malformed", "JSON"),
        # valid JSON that no store or encoder takes: refused here, not later in the gate
        (b'{"type":"cycle_done","state":{"x":1e400}}', "malformed", "out of range"),
        (b'{"type":"cycle_done","state":{"x":-1e400}}', "malformed", "out of range"),
        (b'{"type":"log","message":"a\\ud800"}', "malformed", "lone surrogate"),
        (b'{"type":"result","id":"a","ok":false,"error":"\\udfff"}', "malformed", "surrogate"),
        (
            b'{"type":"propose","id":"a","action":{"name":"x.\\ud800","risk":"low"}}',
            "malformed",
            "surrogate",
        ),
        (b'{"type":"reboot"}', "unknown_type", "unknown message type 'reboot'"),
        (b'{"type":"hello","state":{}}', "unknown_type", "unknown message type"),
        (b'{"type":"decision","id":"a"}', "unknown_type", "unknown message type"),
        # propose
        (b'{"type":"propose","action":{"name":"a","risk":"low"}}', "invalid", "id must be"),
        (b'{"type":"propose","id":"","action":{"name":"a","risk":"low"}}', "invalid", "id"),
        (b'{"type":"propose","id":7,"action":{"name":"a","risk":"low"}}', "invalid", "got number"),
        (b'{"type":"propose","id":"a"}', "invalid", "action must be an object, got null"),
        (b'{"type":"propose","id":"a","action":[]}', "invalid", "got array"),
        (propose(name=""), "invalid", "name must be a non-empty string"),
        (propose(name=None), "invalid", "name must be"),
        (propose(name="deploy.prod\r\x1b[Kdocs.read"), "invalid", "control or format character"),
        (propose(name="docs.\u202edaer"), "invalid", "control or format character"),
        (propose(name="docs.read\n"), "invalid", "control or format character"),
        (propose(risk="extreme"), "invalid", "risk must be one of"),
        (propose(risk=None), "invalid", "risk must be one of"),
        (propose(params=[1]), "invalid", "params must be an object"),
        (propose(params="x"), "invalid", "params must be an object"),
        (propose(cost=-1), "invalid", "cost must be a finite number >= 0"),
        (propose(cost="1"), "invalid", "cost must be a number"),
        (propose(cost=True), "invalid", "cost must be a number, got boolean"),
        (propose(cost=1e400), "malformed", "not valid JSON"),  # json.dumps writes Infinity
        (propose(critical="yes"), "invalid", "critical must be true or false"),
        (propose(safe_to_retry=1), "invalid", "safe_to_retry must be true or false"),
        (propose(key=""), "invalid", "key must be a non-empty string"),
        (propose(key=5), "invalid", "key must be"),
        (propose(key="k" * 500), "invalid", "longer than"),
        (propose(model="gpt-x"), "invalid", "unknown field 'model'"),
        (propose(identity={"user": "root"}), "invalid", "unknown field 'identity'"),
        # result
        (b'{"type":"result","id":"a"}', "invalid", "ok must be true or false, got null"),
        (b'{"type":"result","id":"a","ok":"true"}', "invalid", "ok must be true or false"),
        (b'{"type":"result","id":"a","ok":1}', "invalid", "got number"),
        (b'{"type":"result","ok":true}', "invalid", "id must be"),
        (b'{"type":"result","id":"a","ok":true,"result":[1]}', "invalid", "result must be"),
        (b'{"type":"result","id":"a","ok":false,"error":{"x":1}}', "invalid", "error must be"),
        # cycle_done, log
        (b'{"type":"cycle_done"}', "invalid", "state must be an object, got null"),
        (b'{"type":"cycle_done","state":[]}', "invalid", "state must be an object"),
        (b'{"type":"log","level":"fatal","message":"x"}', "invalid", "level must be one of"),
        (b'{"type":"log","level":3,"message":"x"}', "invalid", "level must be one of"),
        (b'{"type":"log","level":"info"}', "invalid", "message must be a string"),
    ],
)
def test_invalid_lines_are_refused_with_a_reason(raw: bytes, reason: str, words: str) -> None:
    error = rejected(raw)
    assert error.reason == reason
    assert words in str(error)
    assert "\n" not in str(error)


def test_escaped_surrogate_pairs_and_big_finite_numbers_are_fine() -> None:
    raw = b'{"type":"log","message":"\\ud83d\\ude00 1e308","n":1e308}'
    assert parse_message(raw, MAX) == Log(level="info", message="\U0001f600 1e308")


def test_oversized_line() -> None:
    error = rejected(b'{"type":"heartbeat"}' + b" " * 100, max_line=50)
    assert error.reason == "oversized"
    assert "over the 50-byte limit" in str(error)


def test_deep_nesting_is_refused() -> None:
    shallow = {"type": "cycle_done", "state": {}}
    node: dict[str, Any] = shallow["state"]  # type: ignore[assignment]
    for _ in range(MAX_DEPTH - 2):
        node["n"] = {}
        node = node["n"]
    assert isinstance(parse_message(line(shallow), MAX), CycleDone)
    node["n"] = {}
    assert "nested deeper" in str(rejected(line(shallow)))
    # deeper than the interpreter's recursion limit: still a protocol error, not a crash
    assert rejected(b"[" * 60_000 + b"]" * 60_000, max_line=200_000).reason == "malformed"


def test_error_messages_do_not_echo_unbounded_child_text() -> None:
    assert len(str(rejected(line({"type": "x" * 10_000})))) < 200
    assert len(str(rejected(propose(risk="r" * 10_000)))) < 200


# --- the fuzz ------------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=15,
)
types = st.sampled_from(["propose", "result", "cycle_done", "heartbeat", "log", "hello", "x"])
field_names = st.sampled_from(
    ["id", "ok", "result", "error", "state", "level", "message", "action", "type"]
)
action_fields = st.sampled_from(
    ["name", "params", "risk", "cost", "critical", "safe_to_retry", "key", "model"]
)


def check(raw: bytes, max_line: int = MAX) -> None:
    try:
        msg = parse_message(raw, max_line)
    except WorkerProtocolError as exc:
        assert str(exc)
        return
    assert isinstance(msg, MESSAGE_TYPES)


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()  # may write NaN/Infinity: the parser must refuse them


@FUZZ
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=400))
def test_fuzz_arbitrary_bytes(raw: bytes, max_line: int) -> None:
    check(raw, max_line)


@FUZZ
@given(json_values)
def test_fuzz_arbitrary_json_values(value: Any) -> None:
    check(dumps(value))


@FUZZ
@given(types, st.dictionaries(field_names, json_values, max_size=5))
def test_fuzz_messages_with_wrong_field_types(kind: str, fields: dict[str, Any]) -> None:
    check(dumps({"type": kind, **fields}))


@FUZZ
@given(
    st.dictionaries(action_fields, json_values, max_size=8),
    st.one_of(st.none(), json_values),
)
def test_fuzz_proposals(action: dict[str, Any], ident: Any) -> None:
    base = {"name": "a.b", "risk": "low"}
    check(dumps({"type": "propose", "id": ident, "action": action}))
    check(dumps({"type": "propose", "id": "p", "action": {**base, **action}}))


@FUZZ
@given(
    st.sampled_from(
        [
            b'{"type":"propose","id":"a","action":{"name":"n","risk":"low","params":{"k":1}}}',
            b'{"type":"result","id":"a","ok":true,"result":{"x":[1,2]}}',
            b'{"type":"cycle_done","state":{"n":1}}',
            b'{"type":"log","level":"info","message":"hi"}',
        ]
    ),
    st.data(),
)
def test_fuzz_mutated_valid_lines(raw: bytes, data: st.DataObject) -> None:
    position = data.draw(st.integers(min_value=0, max_value=len(raw)))
    mutation = data.draw(st.sampled_from(["insert", "delete", "replace", "truncate"]))
    junk = data.draw(st.binary(min_size=1, max_size=4))
    if mutation == "insert":
        mutated = raw[:position] + junk + raw[position:]
    elif mutation == "delete":
        mutated = raw[:position] + raw[position + len(junk) :]
    elif mutation == "replace":
        mutated = raw[:position] + junk + raw[position + len(junk) :]
    else:
        mutated = raw[:position]
    check(mutated)


@FUZZ
@given(
    st.text(min_size=1, max_size=40),
    st.sampled_from(["low", "medium", "high", "critical"]),
    st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=4),
    st.floats(min_value=0, max_value=1e9, allow_nan=False),
    st.booleans(),
)
def test_fuzz_valid_proposals_round_trip(
    name: str, risk: str, params: dict[str, Any], cost: float, critical: bool
) -> None:
    raw = dumps({"type": "propose", "id": "p1", "action": {
        "name": name, "risk": risk, "params": params, "cost": cost, "critical": critical,
    }})  # fmt: skip
    try:
        msg = parse_message(raw, MAX)
    except WorkerProtocolError:
        # the only ways a well-typed proposal is refused: a blank name, or one that would
        # not show as itself to an operator (control or format characters)
        assert not name.strip() or not name.isprintable()
        return
    assert isinstance(msg, Propose)
    assert (msg.action.name, msg.action.risk, msg.action.params) == (name, risk, params)
    assert (msg.action.cost, msg.action.critical) == (cost, critical)


# --- the line reader -----------------------------------------------------------------------------


class ChunkStream(anyio.abc.ByteReceiveStream):
    """Hands out the given chunks, then end of stream; counts how much was read."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.read = 0

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self.chunks:
            raise anyio.EndOfStream
        chunk = self.chunks.pop(0)
        if len(chunk) > max_bytes:
            chunk, rest = chunk[:max_bytes], chunk[max_bytes:]
            self.chunks.insert(0, rest)
        self.read += len(chunk)
        return chunk

    async def aclose(self) -> None:
        self.chunks.clear()


@pytest.mark.anyio
async def test_line_reader_splits_and_joins_chunks() -> None:
    reader = LineReader(ChunkStream([b'{"a"', b':1}\n{"b":2}\n{"c"', b":3}\npartial"]), 100)
    assert [await reader.readline() for _ in range(3)] == [b'{"a":1}', b'{"b":2}', b'{"c":3}']
    assert await reader.readline() is None  # a partial last line is dropped at end of stream


@pytest.mark.anyio
async def test_line_reader_refuses_a_long_line_without_reading_it_all() -> None:
    stream = ChunkStream([b"x" * 1000] * 10_000)  # 10 MB, no newline
    reader = LineReader(stream, 4096)
    with pytest.raises(WorkerProtocolError) as info:
        await reader.readline()
    assert info.value.reason == "oversized"
    assert stream.read <= 4096 + 64 * 1024  # bounded: the limit plus one chunk at most


@pytest.mark.anyio
async def test_line_reader_refuses_a_long_line_that_does_end() -> None:
    reader = LineReader(ChunkStream([b"y" * 300 + b"\n"]), 100)
    with pytest.raises(WorkerProtocolError):
        await reader.readline()


# --- the child's environment ---------------------------------------------------------------------


def test_child_environment_drops_the_daemons_secrets() -> None:
    base = {
        "PATH": "/bin", "ACP_KILLSWITCH_SECRET": "s3cret", "ACP_DB": "postgresql://x",
        "NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1", "HOME": "/root",
        "PGPASSWORD": "db", "PGPASSFILE": "/etc/acp-supervisor/pgpass",
        "CREDENTIALS_DIRECTORY": "/run/credentials/acp-supervisor.service",
    }  # fmt: skip
    env = child_environment({"EXAMPLE": "1"}, base)
    assert env == {"PATH": "/bin", "HOME": "/root", "EXAMPLE": "1"}
    # an operator may still pass one explicitly
    assert child_environment({"ACP_DB": "sqlite:///x"}, base)["ACP_DB"] == "sqlite:///x"

"""The switch-file reader never hangs and never raises: a FIFO, socket or device in place of the
file, and any bytes at all, give a verdict (halt_all when it does not verify). Once a signed file
was accepted, a missing file is halt_all; the store's high-water mark outlives the mark file."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.killswitch import HostSwitchFile, Mode, SwitchState, render, signed_document

SECRET = b"s3cret-for-tests"
AT = "2026-03-01T12:00:00+00:00"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "killswitch.json"


def read_within(switch: HostSwitchFile, seconds: float = 5.0) -> SwitchState:
    """read() in a thread: a reader that blocks (open() on a FIFO) fails the test, not hangs it."""
    out: list[SwitchState | BaseException] = []

    def target() -> None:
        try:
            out.append(switch.read())
        except BaseException as exc:  # reported below
            out.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"read() blocked for {seconds}s"
    [result] = out
    assert isinstance(result, SwitchState), f"read() raised {result!r}"
    return result


def assert_invalid(state: SwitchState, fragment: str = "") -> None:
    assert state.mode is Mode.HALT_ALL and not state.valid, state
    assert state.problem is not None and fragment in state.problem, state.problem


# -- not a regular file -------------------------------------------------------------------------


def test_fifo_in_place_of_the_switch_file_is_invalid_not_a_hang(path: Path) -> None:
    os.mkfifo(path)
    switch = HostSwitchFile(path, SECRET)
    assert_invalid(read_within(switch), "named pipe")
    assert_invalid(read_within(switch), "named pipe")  # cached by stat, still a verdict


def test_fifo_in_place_of_the_mark_file_is_invalid_not_a_hang(path: Path) -> None:
    HostSwitchFile(path, SECRET).write(Mode.DISENGAGED, reason="r", by="b", at=AT)
    mark = path.with_suffix(".seq")
    mark.unlink()
    os.mkfifo(mark)
    assert_invalid(read_within(HostSwitchFile(path, SECRET)), "named pipe")


def test_socket_in_place_of_the_switch_file_is_invalid(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        assert_invalid(read_within(HostSwitchFile(path, SECRET)), "socket")


def test_device_in_place_of_the_switch_file_is_invalid(path: Path) -> None:
    path.symlink_to("/dev/zero")  # an endless device: a reader that read it would never stop
    assert stat.S_ISCHR(path.stat().st_mode)
    assert_invalid(read_within(HostSwitchFile(path, SECRET)), "character device")


def test_directory_in_place_of_the_switch_file_is_invalid(path: Path) -> None:
    path.mkdir()
    assert_invalid(read_within(HostSwitchFile(path, SECRET)), "directory")


def test_write_replaces_a_fifo_without_hanging(path: Path) -> None:
    os.mkfifo(path)
    switch = HostSwitchFile(path, SECRET)
    out: list[SwitchState] = []
    thread = threading.Thread(
        target=lambda: out.append(switch.write(Mode.HALT_ALL, reason="r", by="b", at=AT)),
        daemon=True,
    )
    thread.start()
    thread.join(5)
    assert not thread.is_alive(), "write() blocked on a FIFO"
    assert out[0].mode is Mode.HALT_ALL and out[0].valid


# -- malformed content --------------------------------------------------------------------------


def signed_with(**fields: object) -> dict[str, object]:
    return dict(signed_document(Mode.DISENGAGED, seq=1, reason="r", by="b", at=AT, secret=SECRET),
                **fields)  # fmt: skip


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"[" * 60_000, "nested too deeply"),
        (b'{"a":' * 10_000, "nested too deeply"),
        (json.dumps(signed_with(sig="\ud800")).encode(), "bad signature"),
        (json.dumps(signed_with(sig="é" * 64)).encode(), "bad signature"),
        (b'{"mode": "disengaged", "seq": 1e400, "sig": "00"}', "canonical"),
        (b'{"mode": "disengaged", "seq": -1e400, "sig": "00"}', "canonical"),
        (b'{"seq": ' + b"9" * 5000 + b', "sig": "00"}', "not valid JSON"),
        (b'"\\ud800"', "not a JSON object"),
        (b"\xff\xfe\x00", "not valid JSON"),
    ],
    ids=[
        "deep-array",
        "deep-object",
        "lone-surrogate-sig",
        "non-ascii-sig",
        "1e400",
        "-1e400",
        "huge-int",
        "surrogate-string",
        "bad-utf8",
    ],
)
def test_malformed_file_is_invalid_never_an_exception(
    path: Path, data: bytes, fragment: str
) -> None:
    path.write_bytes(data)
    state = read_within(HostSwitchFile(path, SECRET))
    assert_invalid(state, fragment)
    assert state.problem is not None
    state.problem.encode("utf-8")  # safe to log, store and hash


def test_lone_surrogate_in_a_field_gives_an_encodable_problem(path: Path) -> None:
    doc = signed_document(Mode.DISENGAGED, seq=1, reason="r", by="b", at=AT, secret=SECRET)
    doc["mode"] = "\udc80"
    path.write_text(json.dumps(doc))
    state = read_within(HostSwitchFile(path, SECRET))
    assert_invalid(state)
    assert state.problem is not None
    state.problem.encode("utf-8")


@settings(
    max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=2048))
def test_any_bytes_give_a_verdict(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    state = HostSwitchFile(path, SECRET).read()
    assert isinstance(state, SwitchState)
    assert not state.valid and state.mode is Mode.HALT_ALL
    assert state.problem is not None
    state.problem.encode("utf-8")


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=256))
def test_any_bytes_in_the_mark_file_give_a_verdict(path: Path, data: bytes) -> None:
    render_valid = render(signed_document(Mode.DISENGAGED, seq=3, reason="r", by="b", at=AT,
                                          secret=SECRET))  # fmt: skip
    path.write_bytes(render_valid)
    path.with_suffix(".seq").write_bytes(data)
    state = HostSwitchFile(path, SECRET).read()
    assert isinstance(state, SwitchState)
    assert state.valid or state.mode is Mode.HALT_ALL


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(extra=st.dictionaries(st.sampled_from(["mode", "seq", "sig", "at", "by", "reason", "scope",
                                              "x"]), json_values))  # fmt: skip
def test_any_json_object_gives_a_verdict(path: Path, extra: dict[str, object]) -> None:
    """Near-valid documents (fields of every JSON type, NaN and infinities included)."""
    doc = {**signed_document(Mode.HALT_ALL, seq=1, reason="r", by="b", at=AT, secret=SECRET),
           **extra}  # fmt: skip
    path.write_text(json.dumps(doc))
    state = HostSwitchFile(path, SECRET).read()
    assert isinstance(state, SwitchState)
    if not state.valid:
        assert state.mode is Mode.HALT_ALL and state.problem is not None
        state.problem.encode("utf-8")


# -- a switch that was engaged stays engaged until disengaged ------------------------------------


def test_fresh_install_without_file_or_history_is_disengaged(path: Path) -> None:
    state = HostSwitchFile(path, SECRET).read()
    assert state.mode is Mode.DISENGAGED and state.valid


def test_file_deleted_while_running_is_halt_all(path: Path) -> None:
    switch = HostSwitchFile(path, SECRET)
    switch.write(Mode.HALT_ALL, reason="incident", by="alice", at=AT)
    assert switch.read().mode is Mode.HALT_ALL
    path.unlink()
    path.with_suffix(".seq").unlink()
    assert_invalid(switch.read(), "unverifiable")


def test_file_deleted_after_restart_is_halt_all(path: Path) -> None:
    HostSwitchFile(path, SECRET).write(Mode.DISENGAGED, reason="r", by="b", at=AT)
    path.unlink()
    assert_invalid(HostSwitchFile(path, SECRET).read(), "unverifiable")


def test_store_mark_keeps_a_missing_file_halted_when_the_mark_file_is_gone_too(path: Path) -> None:
    HostSwitchFile(path, SECRET).write(Mode.HALT_ALL, reason="r", by="b", at=AT)
    path.unlink()
    path.with_suffix(".seq").unlink()
    switch = HostSwitchFile(path, SECRET)
    switch.adopt_mark(1)  # what the daemon reads from the store at startup
    assert_invalid(switch.read(), "unverifiable")


def test_store_mark_rejects_an_old_disengage_when_the_mark_file_is_deleted(path: Path) -> None:
    writer = HostSwitchFile(path, SECRET)
    writer.write(Mode.DISENGAGED, reason="r", by="b", at=AT)
    old = path.read_bytes()
    writer.write(Mode.HALT_ALL, reason="incident", by="alice", at=AT)
    path.with_suffix(".seq").unlink()
    path.write_bytes(old)
    switch = HostSwitchFile(path, SECRET)  # a restart: only the store remembers seq 2
    switch.adopt_mark(2)
    assert_invalid(switch.read(), "replayed")
    # The operator's way out is a new signed change above the store's mark.
    assert switch.write(Mode.DISENGAGED, reason="over", by="alice", at=AT).seq == 3
    assert switch.read().mode is Mode.DISENGAGED


def test_disengage_after_a_missing_file_resumes(path: Path) -> None:
    switch = HostSwitchFile(path, SECRET)
    switch.write(Mode.HALT_ALL, reason="r", by="b", at=AT)
    path.unlink()
    assert not switch.read().valid
    state = switch.write(Mode.DISENGAGED, reason="restored", by="alice", at=AT)
    assert state.valid and state.mode is Mode.DISENGAGED and state.seq == 2


# -- permissions --------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_switch_files_are_0640_whatever_the_umask(path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        HostSwitchFile(path, SECRET).write(Mode.HALT_ALL, reason="r", by="b", at=AT)
    finally:
        os.umask(old)
    for p in (path, path.with_suffix(".seq")):
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p


def test_render_round_trips(path: Path) -> None:
    doc = signed_document(Mode.HALT_ALL, seq=1, reason="r", by="b", at=AT, secret=SECRET)
    path.write_bytes(render(doc))
    assert HostSwitchFile(path, SECRET).read().mode is Mode.HALT_ALL

"""The host kill-switch file: signing, fail-closed verification, replay protection, the watcher."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from supervisor.errors import ConfigError, KillSwitchError
from supervisor.killswitch import (
    HostSwitchFile,
    Mode,
    SwitchState,
    load_secret,
    permits,
    render,
    sign,
    signed_document,
    strictest,
)

SECRET = b"s3cret-for-tests"
AT = "2026-03-01T12:00:00+00:00"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "ks" / "killswitch.json"


def replace_bytes(path: Path, data: bytes) -> None:
    """Install content the way an operator's tool (or `mv`) would: a new file renamed in place."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_bytes())
    return doc


def assert_failed_closed(state: SwitchState, fragment: str) -> None:
    assert state.mode is Mode.HALT_ALL
    assert state.valid is False
    assert state.problem is not None
    assert fragment in state.problem, state.problem


# -- modes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "critical", "allowed"),
    [
        (Mode.DISENGAGED, False, True),
        (Mode.DISENGAGED, True, True),
        (Mode.HALT_NONCRITICAL, False, False),
        (Mode.HALT_NONCRITICAL, True, True),
        (Mode.HALT_ALL, False, False),
        (Mode.HALT_ALL, True, False),
        (Mode.EMERGENCY, False, False),
        (Mode.EMERGENCY, True, False),
    ],
)
def test_permits_table(mode: Mode, critical: bool, allowed: bool) -> None:
    assert permits(mode, critical=critical) is allowed


def test_strictest_orders_modes() -> None:
    assert strictest() is Mode.DISENGAGED
    assert strictest(Mode.DISENGAGED, Mode.HALT_NONCRITICAL) is Mode.HALT_NONCRITICAL
    assert strictest(Mode.EMERGENCY, Mode.HALT_ALL, Mode.DISENGAGED) is Mode.EMERGENCY
    assert strictest(Mode.HALT_NONCRITICAL, Mode.HALT_ALL) is Mode.HALT_ALL


# -- reading and writing ----------------------------------------------------------------------


def test_missing_file_is_disengaged(path: Path) -> None:
    state = HostSwitchFile(path, SECRET).read()
    assert state.mode is Mode.DISENGAGED
    assert state.seq == 0
    assert state.valid is True
    assert state.problem is None


def test_missing_file_is_disengaged_even_without_secret(path: Path) -> None:
    assert HostSwitchFile(path, None).read().mode is Mode.DISENGAGED


@pytest.mark.parametrize("mode", list(Mode))
def test_write_read_round_trip(path: Path, mode: Mode) -> None:
    switch = HostSwitchFile(path, SECRET)
    written = switch.write(mode, reason="maintenance", by="alice", at=AT)
    assert written == SwitchState(mode=mode, seq=1, reason="maintenance", by="alice", at=AT)
    # A fresh instance (a restarted daemon) reads the same state from disk.
    assert HostSwitchFile(path, SECRET).read() == written
    doc = load(path)
    assert doc["mode"] == mode.value
    assert doc["scope"] == "host"
    assert len(doc["sig"]) == 64
    assert path.with_suffix(".seq").read_text().strip() == "1"


def test_seq_increases_and_mark_follows(path: Path) -> None:
    switch = HostSwitchFile(path, SECRET)
    switch.write(Mode.HALT_ALL, reason="incident", by="alice", at=AT)
    state = switch.write(Mode.DISENGAGED, reason="resolved", by="bob", at=AT)
    assert state.seq == 2
    assert state.mode is Mode.DISENGAGED
    assert path.with_suffix(".seq").read_text().strip() == "2"


def test_write_creates_parent_and_leaves_no_temp_files(path: Path) -> None:
    assert not path.parent.exists()
    HostSwitchFile(path, SECRET).write(Mode.HALT_ALL, reason="r", by="b", at=AT)
    assert sorted(p.name for p in path.parent.iterdir()) == ["killswitch.json", "killswitch.seq"]


def test_write_without_secret_refuses_and_writes_nothing(path: Path) -> None:
    switch = HostSwitchFile(path, None)
    with pytest.raises(KillSwitchError, match="no kill-switch secret configured"):
        switch.write(Mode.HALT_ALL, reason="incident", by="alice", at=AT)
    assert not path.exists()
    assert not path.with_suffix(".seq").exists()


@pytest.mark.parametrize(
    ("reason", "by", "at"),
    [("", "alice", AT), ("  ", "alice", AT), ("why", "", AT), ("why", "alice", "yesterday")],
)
def test_write_requires_reason_who_and_utc_time(path: Path, reason: str, by: str, at: str) -> None:
    with pytest.raises(KillSwitchError):
        HostSwitchFile(path, SECRET).write(Mode.HALT_ALL, reason=reason, by=by, at=at)
    assert not path.exists()


def test_file_present_but_no_secret_fails_closed(path: Path) -> None:
    HostSwitchFile(path, SECRET).write(Mode.DISENGAGED, reason="r", by="b", at=AT)
    assert_failed_closed(HostSwitchFile(path, None).read(), "no kill-switch secret")


# -- verification fails closed ----------------------------------------------------------------


def test_tampered_mode_fails_closed(path: Path) -> None:
    switch = HostSwitchFile(path, SECRET)
    switch.write(Mode.HALT_ALL, reason="incident", by="alice", at=AT)
    doc = load(path)
    doc["mode"] = "disengaged"  # edited by hand, not re-signed
    replace_bytes(path, json.dumps(doc).encode())
    assert_failed_closed(switch.read(), "bad signature")
    assert_failed_closed(HostSwitchFile(path, SECRET).read(), "bad signature")


def test_unsigned_file_fails_closed(path: Path) -> None:
    HostSwitchFile(path, SECRET).write(Mode.DISENGAGED, reason="r", by="b", at=AT)
    doc = load(path)
    del doc["sig"]
    replace_bytes(path, json.dumps(doc).encode())
    assert_failed_closed(HostSwitchFile(path, SECRET).read(), "unsigned")


def test_wrong_secret_fails_closed(path: Path) -> None:
    HostSwitchFile(path, b"another secret").write(Mode.DISENGAGED, reason="r", by="b", at=AT)
    assert_failed_closed(HostSwitchFile(path, SECRET).read(), "bad signature")


@pytest.mark.parametrize(
    "data",
    [b"\x00\xff\xfe garbage", b"", b"{not json", b"[1, 2]", b'{"sig": 5}', b'{"sig": "\xc3\xa9"}'],
)
def test_garbage_fails_closed(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    state = HostSwitchFile(path, SECRET).read()
    assert state.mode is Mode.HALT_ALL
    assert state.valid is False
    assert state.problem


def test_duplicate_keys_fail_closed(path: Path) -> None:
    doc = signed_document(Mode.HALT_ALL, seq=1, reason="r", by="b", at=AT, secret=SECRET)
    text = json.dumps(doc)
    path.parent.mkdir(parents=True)
    path.write_text(text[:-1] + ', "mode": "disengaged"}')
    assert_failed_closed(HostSwitchFile(path, SECRET).read(), "duplicate")


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"mode": "off"}, "unknown mode"),
        ({"seq": 0}, "seq"),
        ({"seq": "3"}, "seq"),
        ({"scope": "fleet"}, "scope"),
        ({"by": ""}, "by"),
        ({"at": "2026-03-01T12:00:00+02:00"}, "UTC"),
        ({"extra": 1}, "unexpected"),
    ],
)
def test_signed_but_malformed_fails_closed(
    path: Path, change: dict[str, object], fragment: str
) -> None:
    payload: dict[str, object] = {
        "mode": "disengaged", "seq": 1, "reason": "r", "by": "b", "at": AT, "scope": "host",
    }  # fmt: skip
    payload.update(change)
    path.parent.mkdir(parents=True)
    path.write_bytes(render({**payload, "sig": sign(payload, SECRET)}))
    assert_failed_closed(HostSwitchFile(path, SECRET).read(), fragment)


def test_signed_but_missing_field_fails_closed(path: Path) -> None:
    payload: dict[str, object] = {"mode": "disengaged", "seq": 1, "reason": "r", "by": "b"}
    path.parent.mkdir(parents=True)
    path.write_bytes(render({**payload, "sig": sign(payload, SECRET)}))
    assert_failed_closed(HostSwitchFile(path, SECRET).read(), "missing field(s): at, scope")


# -- replay protection ------------------------------------------------------------------------


def test_old_signed_file_copied_back_is_a_replay(path: Path) -> None:
    switch = HostSwitchFile(path, SECRET)
    switch.write(Mode.DISENGAGED, reason="all clear", by="alice", at=AT)
    old = path.read_bytes()
    assert switch.write(Mode.HALT_ALL, reason="incident", by="bob", at=AT).seq == 2
    replace_bytes(path, old)
    assert_failed_closed(switch.read(), "replayed: seq 1 below 2")
    # The mark is on disk, so a restarted daemon rejects it too.
    assert_failed_closed(HostSwitchFile(path, SECRET).read(), "replayed: seq 1 below 2")


def test_replay_rejected_even_if_mark_file_deleted_while_running(path: Path) -> None:
    cli = HostSwitchFile(path, SECRET)  # writes, as the CLI would
    daemon = HostSwitchFile(path, SECRET)  # only reads
    cli.write(Mode.DISENGAGED, reason="all clear", by="alice", at=AT)
    old = path.read_bytes()
    cli.write(Mode.HALT_ALL, reason="incident", by="bob", at=AT)
    assert daemon.read().seq == 2
    path.with_suffix(".seq").unlink()
    replace_bytes(path, old)
    # The daemon remembers the highest seq it accepted.
    assert_failed_closed(daemon.read(), "replayed: seq 1 below 2")


def test_same_seq_different_content_is_a_replay(path: Path) -> None:
    switch = HostSwitchFile(path, SECRET)
    switch.write(Mode.HALT_ALL, reason="incident", by="alice", at=AT)
    assert switch.read().valid
    twin = signed_document(Mode.DISENGAGED, seq=1, reason="sneaky", by="eve", at=AT, secret=SECRET)
    replace_bytes(path, render(twin))
    assert_failed_closed(switch.read(), "replay")


def test_same_file_reread_is_fine(path: Path) -> None:
    switch = HostSwitchFile(path, SECRET)
    written = switch.write(Mode.HALT_NONCRITICAL, reason="r", by="b", at=AT)
    # Rewritten with identical bytes (new inode and mtime): same seq, same content, accepted.
    replace_bytes(path, path.read_bytes())
    assert switch.changed()
    assert switch.read() == written
    assert HostSwitchFile(path, SECRET).read() == written


def test_hand_signed_file_with_higher_seq_is_honoured(path: Path) -> None:
    switch = HostSwitchFile(path, SECRET)
    switch.write(Mode.HALT_ALL, reason="incident", by="alice", at=AT)
    # What an operator's tool does: build the payload, sign it with the module's sign().
    payload: dict[str, object] = {
        "mode": "halt_noncritical",
        "seq": 7,
        "reason": "partial resume",
        "by": "ops-tool",
        "at": "2026-03-01T13:00:00Z",
        "scope": "host",
    }
    replace_bytes(path, json.dumps({**payload, "sig": sign(payload, SECRET)}).encode())
    state = switch.read()
    assert state.valid, state.problem
    assert (state.mode, state.seq, state.by) == (Mode.HALT_NONCRITICAL, 7, "ops-tool")
    assert path.with_suffix(".seq").read_text().strip() == "7"
    assert switch.write(Mode.DISENGAGED, reason="done", by="alice", at=AT).seq == 8


def test_next_seq_exceeds_an_invalid_file_seq(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"mode": "disengaged", "seq": 41, "sig": "00"}))
    switch = HostSwitchFile(path, SECRET)
    assert not switch.read().valid
    assert switch.write(Mode.HALT_ALL, reason="r", by="b", at=AT).seq == 42


def test_corrupt_mark_fails_closed_and_write_repairs_it(path: Path) -> None:
    HostSwitchFile(path, SECRET).write(Mode.DISENGAGED, reason="r", by="b", at=AT)
    path.with_suffix(".seq").write_text("not a number")
    switch = HostSwitchFile(path, SECRET)
    assert_failed_closed(switch.read(), "high-water mark")
    state = switch.write(Mode.DISENGAGED, reason="repair", by="alice", at=AT)
    assert state.valid and state.seq == 2
    assert path.with_suffix(".seq").read_text().strip() == "2"


# -- stat caching -----------------------------------------------------------------------------


def test_unchanged_file_is_not_reopened(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    HostSwitchFile(path, SECRET).write(Mode.HALT_ALL, reason="r", by="b", at=AT)
    opens: list[Path] = []
    real_open = os.open

    def counting_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(file) == path:
            opens.append(path)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting_open)
    switch = HostSwitchFile(path, SECRET)
    assert switch.changed()
    first = switch.read()
    assert not switch.changed()
    second = switch.read()
    third = switch.read()
    assert len(opens) == 1
    assert first is second is third

    replace_bytes(path, render(signed_document(
        Mode.DISENGAGED, seq=2, reason="r", by="b", at=AT, secret=SECRET
    )))  # fmt: skip
    assert switch.changed()
    assert switch.read().mode is Mode.DISENGAGED
    assert len(opens) == 2


# -- the secret -------------------------------------------------------------------------------


def test_secret_from_env_wins_over_file(tmp_path: Path) -> None:
    f = tmp_path / "secret"
    f.write_bytes(b"from-file\n")
    assert load_secret({"ACP_KILLSWITCH_SECRET": "from-env"}, str(f)) == b"from-env"


def test_secret_from_file_strips_trailing_newline(tmp_path: Path) -> None:
    f = tmp_path / "secret"
    f.write_bytes(b"from-file\n")
    assert load_secret({}, str(f)) == b"from-file"


def test_no_secret_configured_is_none() -> None:
    assert load_secret({"OTHER": "x"}, None) is None


def test_unreadable_secret_file_is_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "secret"
    with pytest.raises(ConfigError, match="nope/secret"):
        load_secret({}, str(missing))
    with pytest.raises(ConfigError, match=str(tmp_path)):
        load_secret({}, str(tmp_path))  # a directory cannot be read as a file


def test_empty_secret_is_config_error(tmp_path: Path) -> None:
    f = tmp_path / "secret"
    f.write_bytes(b"\n")
    with pytest.raises(ConfigError, match="empty"):
        load_secret({}, str(f))
    with pytest.raises(ConfigError, match="empty"):
        load_secret({"ACP_KILLSWITCH_SECRET": ""}, None)

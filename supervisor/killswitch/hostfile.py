"""The host kill switch: a signed JSON file that halts workers.

Pure, synchronous file logic; `keeper.py` watches it and records its changes.
Everything that does not verify fails closed: the host is treated as `halt_all`.

File format (one JSON object)::

    {"at": "...", "by": "...", "mode": "...", "reason": "...", "scope": "host", "seq": 7,
     "sig": "<hex HMAC-SHA256>"}

`sig` is HMAC-SHA256, keyed with the secret, over the canonical JSON (sorted keys, separators
`,` and `:`, ASCII escapes, no NaN) of the object without `sig`. Formatting of the file itself is
free, so an operator may pretty-print it. Next to it, `<name>.seq` holds the highest `seq` ever
accepted, so a validly signed but older file copied back is rejected as a replay; the daemon
also keeps that mark in the store (`adopt_mark`). No file is disengaged only where no signed file
was ever accepted; after one was, a missing file is unverifiable, so halt_all. Only a regular
file is read, without blocking; any content gives a verdict, never an exception.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from ..errors import ConfigError, KillSwitchError
from ..statedir import atomic_write, make_state_dir
from .modes import MODE_VALUES, Mode

SECRET_ENV = "ACP_KILLSWITCH_SECRET"
NO_SECRET_MESSAGE = (
    "no kill-switch secret configured: set ACP_KILLSWITCH_SECRET or killswitch.secret_file"
)
_FIELDS = frozenset({"mode", "seq", "reason", "by", "at", "scope"})
# A kill-switch file is a few hundred bytes; refusing huge ones keeps a per-change read cheap.
_MAX_BYTES = 64 * 1024


#: The systemd credential the unit loads (`LoadCredential=killswitch.secret:/etc/...`).
CREDENTIAL_NAME = "killswitch.secret"


def load_secret(env: Mapping[str, str], secret_file: str | None) -> bytes | None:
    """The HMAC key; None when none is configured. In order: the environment variable (for
    development: under systemd it logs a warning, since a service's environment is readable by
    whatever runs as its user), the systemd credential `$CREDENTIALS_DIRECTORY/killswitch.secret`,
    then `[killswitch] secret_file`.

    The secret is deliberately never read from the config file itself.
    """
    if SECRET_ENV in env:
        secret = env[SECRET_ENV].encode()
        if not secret:
            raise ConfigError(f"{SECRET_ENV} is set but empty")
        if env.get("INVOCATION_ID") or env.get("NOTIFY_SOCKET"):
            import structlog

            structlog.get_logger("supervisor.killswitch").warning(
                "killswitch.secret_in_environment", variable=SECRET_ENV,
                hint="use LoadCredential=killswitch.secret or [killswitch] secret_file",
            )  # fmt: skip
        return secret
    credentials = env.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / CREDENTIAL_NAME).exists():
        return _read_secret(str(Path(credentials) / CREDENTIAL_NAME))
    if secret_file is None:
        return None
    return _read_secret(secret_file)


def _read_secret(secret_file: str) -> bytes:
    try:
        data = Path(secret_file).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read kill-switch secret file {secret_file}: {exc.strerror or exc}"
        ) from exc
    # Editors and `echo` add a newline; it is not part of the key.
    secret = data.rstrip(b"\r\n")
    if not secret:
        raise ConfigError(f"kill-switch secret file {secret_file} is empty")
    return secret


def _canonical(payload: Mapping[str, object]) -> bytes:
    # Pinned here rather than shared: this is a file format that operators' tools reproduce.
    return json.dumps(
        payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def sign(payload: Mapping[str, object], secret: bytes) -> str:
    """Hex HMAC-SHA256 over the canonical JSON of `payload` (which must not contain `sig`)."""
    return hmac.new(secret, _canonical(payload), hashlib.sha256).hexdigest()


def signed_document(
    mode: Mode, *, seq: int, reason: str, by: str, at: str, secret: bytes
) -> dict[str, object]:
    """The full file object, signature included, as `HostSwitchFile.write` (or a tool) stores it."""
    payload: dict[str, object] = {
        "mode": str(Mode(mode)),
        "seq": seq,
        "reason": reason,
        "by": by,
        "at": at,
        "scope": "host",
    }
    return {**payload, "sig": sign(payload, secret)}


def render(document: Mapping[str, object]) -> bytes:
    """File bytes for a document: pretty, so a human can read it; the signature ignores layout."""
    return (json.dumps(document, sort_keys=True, indent=2, allow_nan=False) + "\n").encode()


@dataclass(frozen=True)
class SwitchState:
    """The switch as read. `valid` False means it did not verify and the mode is forced to halt_all.

    With no file or an invalid one, `seq` is 0 and `by`/`at` are empty (nothing was accepted).
    """

    mode: Mode
    seq: int
    reason: str
    by: str
    at: str
    scope: str = "host"
    valid: bool = True
    problem: str | None = None


_MISSING = SwitchState(mode=Mode.DISENGAGED, seq=0, reason="no kill-switch file", by="", at="")


def _failed(problem: str) -> SwitchState:
    # The problem text goes into events, logs and derived ids: never let a lone surrogate or
    # a megabyte of quoted garbage from a hostile file travel with it.
    problem = problem.encode("utf-8", "backslashreplace").decode("utf-8")[:500]
    return SwitchState(
        mode=Mode.HALT_ALL,
        seq=0,
        reason=f"kill-switch file rejected: {problem}",
        by="",
        at="",
        valid=False,
        problem=problem,
    )


_StatKey = tuple[int, int, int]


def _key(st: os.stat_result) -> _StatKey:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class _Invalid(Exception):
    """Internal: why a file was rejected; becomes `SwitchState.problem`."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a directory")):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


def _read_regular(path: Path, limit: int) -> tuple[_StatKey, bytes] | None:
    """Up to `limit` bytes of the regular file at `path`, and its stat key; None when absent.

    Never blocks: opening a named pipe for reading waits for a writer (and a device may do
    anything), so the path is checked before opening, opened non-blocking, and checked again on
    the descriptor (it may have been swapped in between). Anything but a regular file raises
    _Invalid; other OS errors propagate as OSError.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise _Invalid(f"{path} is {_kind(st.st_mode)}, not a regular file")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Invalid(f"{path} is {_kind(st.st_mode)}, not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit)
    finally:
        os.close(fd)
    return _key(st), data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # With duplicate keys, what a reader sees could differ from what the signer meant.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Invalid(f"duplicate field {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> NoReturn:
    raise _Invalid(f"non-finite number {name}")


def _parse_at(value: str) -> datetime | None:
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.utcoffset() != timedelta(0):
        return None
    return when


def _atomic_write(path: Path, data: bytes) -> None:
    # Not secret (the signature protects it): the owner's group (operators' tools) may read it;
    # nobody else, whatever the umask.
    atomic_write(path, data, mode=0o640)


class HostSwitchFile:
    """The host-scope switch file. `read()` is meant to be called before every action."""

    def __init__(self, path: Path, secret: bytes | None) -> None:
        self.path = Path(path)
        self.mark_path = self.path.with_suffix(".seq")
        self._secret = secret
        self._cached: SwitchState | None = None
        self._cached_key: _StatKey | None = None
        # Highest seq accepted in this process, so deleting the mark file mid-run changes nothing.
        self._mark = 0
        # (seq, sig) of the last accepted file: a different file with the same seq is a forgery.
        self._accepted: tuple[int, str] | None = None
        # Why the high-water mark could not be persisted, if so (for the daemon to log).
        self.mark_error: str | None = None

    # -- reading ----------------------------------------------------------------------------

    def _stat(self) -> _StatKey | None:
        try:
            return _key(self.path.stat())
        except FileNotFoundError:
            return None

    def changed(self) -> bool:
        """Whether the file differs (by stat) from the last `read()`. Errors count as changed."""
        if self._cached is None:
            return True
        try:
            return self._stat() != self._cached_key
        except OSError:
            return True

    def read(self) -> SwitchState:
        """The current state; a stat only, unless the file changed since the last read."""
        try:
            key = self._stat()
        except OSError as exc:
            return self._io_failure(f"cannot stat {self.path}: {exc.strerror}")
        if self._cached is not None and key == self._cached_key:
            return self._cached
        if key is None:
            return self._remember(None, self._missing())
        try:
            # The key comes from the open descriptor: if the file was replaced after our stat,
            # the cache still describes exactly the bytes we verified.
            found = _read_regular(self.path, _MAX_BYTES + 1)
        except _Invalid as exc:
            return self._remember(key, _failed(str(exc)))
        except OSError as exc:
            return self._io_failure(f"cannot read {self.path}: {exc.strerror}")
        if found is None:
            return self._remember(None, self._missing())
        key, data = found
        return self._remember(key, self._verify(data))

    def adopt_mark(self, seq: int) -> None:
        """Raise the high-water mark to `seq`, the one the store kept: deleting the mark file
        beside the switch then re-opens no older file, and a missing switch file stays halted."""
        if seq > self._mark:
            self._mark = seq
            self._cached = None

    @property
    def mark(self) -> int:
        """The highest seq this process knows was accepted (file, store or its own reads)."""
        return self._mark

    def _missing(self) -> SwitchState:
        """No switch file. Disengaged only where no signed file was ever accepted: once one was,
        a missing file is unverifiable (deleted by someone who could not sign a disengage)."""
        try:
            mark = self._read_mark()
        except _Invalid as exc:
            return _failed(f"{self.path} missing, and {exc}")
        if mark > 0:
            return _failed(f"{self.path} missing after seq {mark} was accepted: unverifiable")
        return _MISSING

    def _remember(self, key: _StatKey | None, state: SwitchState) -> SwitchState:
        self._cached, self._cached_key = state, key
        return state

    def _io_failure(self, problem: str) -> SwitchState:
        # I/O trouble is not a property of the file's content: fail closed now but cache
        # nothing, so the next read tries again.
        self._cached = None
        return _failed(problem)

    def _read_mark(self) -> int:
        try:
            found = _read_regular(self.mark_path, 64)
            if found is None:
                return self._mark
            text = found[1].decode("ascii")
        except _Invalid as exc:
            raise _Invalid(f"high-water mark {exc}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise _Invalid(f"high-water mark {self.mark_path} unreadable: {exc}") from exc
        try:
            value = int(text.strip())
        except ValueError as exc:
            raise _Invalid(f"high-water mark {self.mark_path} is not an integer") from exc
        return max(value, self._mark)

    def _raise_mark(self, seq: int) -> None:
        try:
            _atomic_write(self.mark_path, f"{seq}\n".encode())
        except OSError as exc:
            # The file itself verified; the in-memory mark still guards this run.
            self.mark_error = f"cannot write {self.mark_path}: {exc}"
        else:
            self.mark_error = None

    def _verify(self, data: bytes) -> SwitchState:
        try:
            return self._check(data)
        except _Invalid as exc:
            return _failed(str(exc))
        except Exception as exc:  # any content is a verdict, never a crash
            return _failed(f"malformed ({type(exc).__name__})")

    def _check(self, data: bytes) -> SwitchState:
        if self._secret is None:
            raise _Invalid(f"no kill-switch secret configured, cannot verify {self.path}")
        if len(data) > _MAX_BYTES:
            raise _Invalid(f"file larger than {_MAX_BYTES} bytes")
        try:
            doc = json.loads(
                data.decode("utf-8"),
                object_pairs_hook=_no_duplicates,
                parse_constant=_reject_constant,
            )
        except (UnicodeDecodeError, ValueError) as exc:
            raise _Invalid(f"not valid JSON: {exc}") from exc
        except RecursionError as exc:
            raise _Invalid("not valid JSON: nested too deeply") from exc
        if not isinstance(doc, dict):
            raise _Invalid("not a JSON object")
        sig = doc.pop("sig", None)
        if sig is None:
            raise _Invalid('unsigned: no "sig" field')
        if not isinstance(sig, str):
            raise _Invalid('"sig" is not a string')
        # Signature first: nothing in an unauthenticated file is worth interpreting.
        # Compared as bytes: compare_digest raises on non-ASCII str, and sig is untrusted input.
        try:
            expected = sign(doc, self._secret)
        except ValueError as exc:  # 1e400 parses as inf, which canonical JSON cannot hold
            raise _Invalid(f"not canonical JSON: {exc}") from exc
        # surrogatepass: a lone surrogate in sig must compare unequal, not raise.
        if not hmac.compare_digest(expected.encode(), sig.encode("utf-8", "surrogatepass")):
            raise _Invalid("bad signature (tampered, or signed with another secret)")

        missing = sorted(_FIELDS - doc.keys())
        if missing:
            raise _Invalid(f"missing field(s): {', '.join(missing)}")
        extra = sorted(doc.keys() - _FIELDS)
        if extra:
            raise _Invalid(f"unexpected field(s): {', '.join(extra)}")
        mode, seq, scope = doc["mode"], doc["seq"], doc["scope"]
        if not isinstance(mode, str) or mode not in MODE_VALUES:
            raise _Invalid(f"unknown mode {mode!r}")
        if type(seq) is not int or seq < 1:
            raise _Invalid(f"seq must be a positive integer, not {seq!r}")
        if scope != "host":
            raise _Invalid(f"scope must be 'host', not {scope!r}")
        for name in ("reason", "by", "at"):
            if not isinstance(doc[name], str) or not doc[name].strip():
                raise _Invalid(f"{name} must be a non-empty string")
        if _parse_at(doc["at"]) is None:
            raise _Invalid(f"at is not an ISO 8601 UTC instant: {doc['at']!r}")

        mark = self._read_mark()
        if seq < mark:
            raise _Invalid(f"replayed: seq {seq} below {mark}")
        # Same seq as the last accepted file but other content: two files cannot share a seq.
        # (Across a restart only the number survives; write() never reuses a seq, so an equal-seq
        # twin can only come from a racing writer, not from copying an old file back.)
        accepted = self._accepted
        if seq == mark and accepted is not None and accepted[0] == seq and accepted[1] != sig:
            raise _Invalid(f"replayed: seq {seq} already accepted with different content")
        if seq > mark:
            self._raise_mark(seq)
        # Also when the mark file already had it (written by another process, the CLI): the
        # in-memory mark is what still guards us if the file is deleted.
        self._mark = max(self._mark, seq)
        self._accepted = (seq, sig)
        return SwitchState(
            mode=Mode(mode), seq=seq, reason=doc["reason"], by=doc["by"], at=doc["at"]
        )

    # -- writing ----------------------------------------------------------------------------

    def _file_seq(self) -> int:
        """The seq in the current file, verified or not: the next seq must exceed it either way."""
        try:
            found = _read_regular(self.path, _MAX_BYTES + 1)
            doc = json.loads(found[1]) if found is not None else None
        except (OSError, ValueError, RecursionError, _Invalid):
            return 0
        seq = doc.get("seq") if isinstance(doc, dict) else None
        return seq if type(seq) is int else 0

    def write(self, mode: Mode, *, reason: str, by: str, at: str) -> SwitchState:
        """Sign and atomically install a new state with the next seq; returns it as read back."""
        if self._secret is None:
            raise KillSwitchError(NO_SECRET_MESSAGE)
        if not reason.strip():
            raise KillSwitchError("a kill-switch change needs a reason")
        if not by.strip():
            raise KillSwitchError("a kill-switch change needs to say who (by)")
        if _parse_at(at) is None:
            raise KillSwitchError(f"at must be an ISO 8601 UTC instant, not {at!r}")
        try:
            mark = self._read_mark()
        except _Invalid:
            # A corrupt mark must not block the operator; the rewrite below repairs it.
            mark = self._mark
        seq = max(self._file_seq(), mark) + 1
        doc = signed_document(Mode(mode), seq=seq, reason=reason, by=by, at=at, secret=self._secret)
        try:
            make_state_dir(self.path.parent)
            # File before mark: a crash in between leaves a file above the mark (accepted, the
            # mark is raised on read), never a mark above the file (a spurious replay halt).
            _atomic_write(self.path, render(doc))
            _atomic_write(self.mark_path, f"{seq}\n".encode())
        except OSError as exc:
            raise KillSwitchError(f"cannot write kill switch {self.path}: {exc}") from exc
        self._mark = max(self._mark, seq)
        self._cached = None
        return self.read()

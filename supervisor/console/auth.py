"""Operators, their secrets, login sessions, CSRF tokens and the failed-login limiter.

Standard library only, so `acp-supervisor console add-operator` works without the console's
optional dependencies.

The operators file is JSON, written atomically with mode 0600::

    {"operators": [{"name": "alice", "role": "approver", "kdf": "scrypt", "n": 16384, "r": 8,
                    "p": 1, "salt": "<hex>", "hash": "<hex>", "created_at": "..."}]}

Secrets are hashed with scrypt (`hashlib.scrypt`, OpenSSL's): a memory-hard KDF in the standard
library, so a stolen file is expensive to brute-force on GPUs and the console needs no compiled
dependency (argon2 would be one). n=2**14, r=8 takes 16 MiB and some tens of milliseconds per
check, which also slows down online guessing before the rate limiter steps in.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from ..errors import ConfigError, UsageError
from ..statedir import atomic_write

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_MAXMEM = 64 * 1024 * 1024


class Role(StrEnum):
    VIEWER = "viewer"
    APPROVER = "approver"
    ADMIN = "admin"


_RANK = {Role.VIEWER: 0, Role.APPROVER: 1, Role.ADMIN: 2}


def allows(role: Role, needed: Role) -> bool:
    """Roles are ordered: an admin can do what an approver can, an approver what a viewer can."""
    return _RANK[role] >= _RANK[needed]


@dataclass(frozen=True, slots=True)
class Operator:
    name: str
    role: Role
    salt: bytes
    hash: bytes
    n: int = SCRYPT_N
    r: int = SCRYPT_R
    p: int = SCRYPT_P
    created_at: str = ""

    def verify(self, secret: str) -> bool:
        digest = _scrypt(secret, self.salt, self.n, self.r, self.p)
        return hmac.compare_digest(digest, self.hash)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role.value, "kdf": "scrypt", "n": self.n,
                "r": self.r, "p": self.p, "salt": self.salt.hex(), "hash": self.hash.hex(),
                "created_at": self.created_at}  # fmt: skip


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=32)


def hash_secret(name: str, role: Role, secret: str, *, created_at: str) -> Operator:
    salt = secrets.token_bytes(16)
    return Operator(name=name, role=role, salt=salt,
                    hash=_scrypt(secret, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P),
                    created_at=created_at)  # fmt: skip


def _operator(raw: Any, where: str) -> Operator:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: an operator must be an object")
    try:
        if raw.get("kdf") != "scrypt":
            raise ConfigError(f"{where}: unknown kdf {raw.get('kdf')!r} (scrypt)")
        name, role = raw["name"], Role(raw["role"])
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"{where}: invalid operator name {name!r}")
        n, r, p = (int(raw[k]) for k in ("n", "r", "p"))
        return Operator(name=name, role=role, salt=bytes.fromhex(raw["salt"]),
                        hash=bytes.fromhex(raw["hash"]), n=n, r=r, p=p,
                        created_at=str(raw.get("created_at", "")))  # fmt: skip
    except KeyError as exc:
        raise ConfigError(f"{where}: missing field {exc.args[0]!r}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


class OperatorsFile:
    """The operators file; re-read when it changes, so a new operator can log in at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: tuple[int, int] | None = None
        self._operators: dict[str, Operator] = {}

    def load(self) -> dict[str, Operator]:
        """Operators by name; no file means no operators (there is no default account)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._key, self._operators = None, {}
            return {}
        except OSError as exc:
            raise ConfigError(f"cannot read operators file {self.path}: {exc.strerror}") from None
        key = (st.st_mtime_ns, st.st_size)
        if key == self._key:
            return self._operators
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read operators file {self.path}: {exc.strerror}") from None
        except ValueError as exc:
            raise ConfigError(f"operators file {self.path}: not valid JSON: {exc}") from None
        entries = doc.get("operators") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            raise ConfigError(f'operators file {self.path}: expected {{"operators": [...]}}')
        found: dict[str, Operator] = {}
        for index, raw in enumerate(entries):
            op = _operator(raw, f"operators file {self.path}, entry {index}")
            if op.name in found:
                raise ConfigError(f"operators file {self.path}: duplicate operator {op.name!r}")
            found[op.name] = op
        self._key, self._operators = key, found
        return found

    def add(self, name: str, role: Role, *, created_at: str) -> str:
        """Add an operator with a fresh random secret; returns the secret (shown once)."""
        if not _NAME.match(name):
            raise UsageError(
                f"invalid operator name {name!r}: letters, digits and _.@- (up to 64), "
                "starting with a letter or digit"
            )
        operators = dict(self.load())
        if name in operators:
            raise UsageError(f"operator {name!r} already exists in {self.path}")
        secret = secrets.token_urlsafe(24)
        operators[name] = hash_secret(name, role, secret, created_at=created_at)
        self._write(operators)
        return secret

    def _write(self, operators: dict[str, Operator]) -> None:
        body = json.dumps({"operators": [op.as_json() for op in operators.values()]}, indent=2)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # 0600: the hashes are not for other users to try offline.
            atomic_write(self.path, (body + "\n").encode(), mode=0o600)
        except OSError as exc:
            raise ConfigError(f"cannot write operators file {self.path}: {exc.strerror}") from None
        self._key = None


@dataclass
class LoginSession:
    token: str
    operator: str
    role: Role
    csrf: str
    expires: float  # monotonic seconds


class Sessions:
    """Login sessions held in this process's memory: a restart of the console logs everyone
    out, which is the safe direction. Tokens are 256-bit random; nothing secret is in the cookie
    but the token itself."""

    def __init__(self, ttl: float, now: Any = time.monotonic) -> None:
        self.ttl = ttl
        self._now = now
        self._by_token: dict[str, LoginSession] = {}

    def create(self, operator: Operator) -> LoginSession:
        self._sweep()
        session = LoginSession(token=secrets.token_urlsafe(32), operator=operator.name,
                               role=operator.role, csrf=secrets.token_urlsafe(32),
                               expires=self._now() + self.ttl)  # fmt: skip
        self._by_token[session.token] = session
        return session

    def get(self, token: str | None) -> LoginSession | None:
        """The live session for a cookie value; None when unknown or expired."""
        if not token:
            return None
        session = self._by_token.get(token)
        if session is None:
            return None
        if self._now() >= session.expires:
            del self._by_token[token]
            return None
        return session

    def end(self, token: str | None) -> None:
        if token:
            self._by_token.pop(token, None)

    def _sweep(self) -> None:
        now = self._now()
        for token in [t for t, s in self._by_token.items() if now >= s.expires]:
            del self._by_token[token]


class LoginLimiter:
    """At most `attempts` failed logins per client address and per operator name within
    `window` seconds; past that every login from there, right or wrong, is refused until the
    oldest failure ages out (no oracle for a guesser who hits the limit)."""

    def __init__(self, attempts: int, window: float, now: Any = time.monotonic) -> None:
        self.attempts = attempts
        self.window = window
        self._now = now
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str) -> deque[float]:
        q = self._failures.setdefault(key, deque())
        cutoff = self._now() - self.window
        while q and q[0] <= cutoff:
            q.popleft()
        return q

    def retry_after(self, *keys: str) -> float:
        """Seconds until a login may be tried again; 0 when allowed now."""
        wait = 0.0
        for key in keys:
            q = self._recent(key)
            if len(q) >= self.attempts:
                wait = max(wait, q[0] + self.window - self._now())
        return wait

    def failed(self, *keys: str) -> None:
        for key in keys:
            self._recent(key).append(self._now())
        if len(self._failures) > 10_000:  # a spray of names must not grow memory without end
            for key in [k for k, q in self._failures.items() if not q]:
                del self._failures[key]


def csrf_ok(session: LoginSession, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(session.csrf.encode(), str(presented).encode())

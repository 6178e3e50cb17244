"""Console pieces without HTTP: the failed-login limiter, session expiry, role order, the
operators file's checks, the `[console]` section, and the trend charts' rate-change marks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from supervisor.console.auth import LoginLimiter, OperatorsFile, Role, Sessions, allows, hash_secret
from supervisor.console.charts import line_chart, rate_changes
from supervisor.console.serve import bind
from supervisor.console.settings import ConsoleConfig
from supervisor.errors import ConfigError


class Tick:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_limiter_refuses_after_the_attempts_until_the_oldest_failure_ages_out() -> None:
    now = Tick()
    limiter = LoginLimiter(3, 60.0, now)
    for _ in range(3):
        assert limiter.retry_after("client:a", "name:x") == 0
        limiter.failed("client:a", "name:x")
        now.t += 1
    assert limiter.retry_after("client:a") == pytest.approx(57.0)
    assert limiter.retry_after("client:b", "name:x") > 0  # the name is limited from anywhere
    assert limiter.retry_after("client:b", "name:y") == 0
    now.t += 57.0
    assert limiter.retry_after("client:a") == 0


def test_sessions_expire_and_end() -> None:
    now = Tick()
    sessions = Sessions(ttl=10.0, now=now)
    op = hash_secret("a", Role.ADMIN, "s3cret", created_at="")
    s = sessions.create(op)
    assert sessions.get(s.token) is s and s.csrf != s.token
    now.t += 9.9
    assert sessions.get(s.token) is s
    now.t += 0.2
    assert sessions.get(s.token) is None
    s2 = sessions.create(op)
    sessions.end(s2.token)
    assert sessions.get(s2.token) is None and sessions.get(None) is None


def test_roles_are_ordered() -> None:
    assert allows(Role.ADMIN, Role.APPROVER) and allows(Role.APPROVER, Role.VIEWER)
    assert not allows(Role.VIEWER, Role.APPROVER) and not allows(Role.APPROVER, Role.ADMIN)


def test_operators_file_problems_are_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "ops.json"
    assert OperatorsFile(path).load() == {}  # no file, no account
    path.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        OperatorsFile(path).load()
    path.write_text(json.dumps({"operators": [{"name": "a", "role": "god", "kdf": "scrypt"}]}))
    with pytest.raises(ConfigError, match="entry 0"):
        OperatorsFile(path).load()
    path.write_text(json.dumps({"operators": [{"name": "a", "role": "admin", "kdf": "md5"}]}))
    with pytest.raises(ConfigError, match="unknown kdf"):
        OperatorsFile(path).load()


def test_console_section() -> None:
    assert ConsoleConfig.from_config(None) == ConsoleConfig()
    cfg = ConsoleConfig.from_config({"enabled": True, "listen": "[::1]:9000", "session_ttl": "1h"})
    assert (cfg.enabled, cfg.listen, cfg.session_ttl) == (True, "[::1]:9000", 3600.0)
    for bad, message in (({"enabled": "yes"}, "boolean"), ({"listen": "8787"}, "HOST:PORT"),
                         ({"tls_key": "k"}, "go together"), ({"login_attempts": 0}, ">= 1"),
                         ({"session_ttl": "soon"}, "invalid duration"), ({"x": 1}, "unknown key")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            ConsoleConfig.from_config(bad)


def test_rate_changes_mark_jumps_and_drops_against_the_trailing_windows() -> None:
    values = [2, 2, 2, 9, 2, 2, 2, 2]
    assert [(m.index, m.up, m.label) for m in rate_changes(values)] == [(3, True, "+350%")]
    assert [(m.index, m.up) for m in rate_changes([8, 8, 8, 1, 7])] == [(3, False)]
    assert rate_changes([5, 6, 7, 6, 5]) == []  # steady: nothing marked
    assert [m.label for m in rate_changes([0, 0, 4])] == ["+4 (from 0)"]
    svg = line_chart(
        "Denials <x>", [f"2026-10-{d:02d}T00:00:00+00:00" for d in range(1, 9)], values
    )
    assert svg.count('class="point"') == 8 and svg.count("<polygon") == 1
    assert "Denials &lt;x&gt;" in svg and "<x>" not in svg


def test_the_wheel_carries_every_template_and_asset() -> None:
    import tomllib
    from fnmatch import fnmatch

    root = Path(__file__).resolve().parents[2]
    data = tomllib.loads((root / "pyproject.toml").read_text())
    globs = data["tool"]["setuptools"]["package-data"]["supervisor.console"]
    package = root / "supervisor" / "console"
    shipped = [p.relative_to(package).as_posix() for d in ("templates", "static")
               for p in (package / d).iterdir()]  # fmt: skip
    assert shipped and all(any(fnmatch(f, g) for g in globs) for f in shipped), (shipped, globs)
    store_globs = data["tool"]["setuptools"]["package-data"]["supervisor.store"]
    assert "sql/*.sql" in store_globs  # the shared named queries, the console's among them


def test_the_console_socket_is_not_inheritable() -> None:
    # A child the daemon starts (a governed worker, an alert command) never holds it, whatever
    # the spawning code's close_fds.
    sock = bind("127.0.0.1:0")
    try:
        assert not sock.get_inheritable()
    finally:
        sock.close()

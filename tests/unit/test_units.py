"""The systemd unit files: required directives, `systemd-analyze verify`, security exposure.

Without systemd-analyze the systemd checks are skipped, except under CI=true where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT_DIR = Path(__file__).resolve().parents[2] / "systemd"
INSTALLED_BINARY = "/opt/acp-supervisor/bin/acp-supervisor"
# (file in systemd/, name to analyse it under: a template is checked as an instance)
UNITS = [
    ("acp-supervisor.service", "acp-supervisor.service"),
    ("acp-supervisor@.service", "acp-supervisor@day.service"),
]
# Keys newer than the local systemd: it ignores them with a warning, which is expected.
KEYS_SINCE = {"RestartSteps": 254, "RestartMaxDelaySec": 254}
MAX_EXPOSURE = 2.0


def parse_unit(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, duplicates kept, continuations joined."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def values(unit: str, section: str, key: str) -> list[str]:
    text = (UNIT_DIR / unit).read_text()
    return [v for s, k, v in parse_unit(text) if s == section and k == key]


@pytest.mark.parametrize("unit", [u for u, _ in UNITS])
@pytest.mark.parametrize(
    ("section", "key", "expected"),
    [
        ("Unit", "StartLimitIntervalSec", "0"),
        ("Service", "Type", "notify"),
        ("Service", "NotifyAccess", "main"),
        ("Service", "WatchdogSec", "30"),
        ("Service", "Restart", "on-failure"),
        ("Service", "RestartSec", "1s"),
        ("Service", "RestartSteps", "10"),
        ("Service", "RestartMaxDelaySec", "5min"),
        ("Service", "RestartPreventExitStatus", "2"),
        ("Service", "TimeoutStopSec", "90"),
        ("Service", "KillMode", "mixed"),
        ("Service", "KillSignal", "SIGTERM"),
        ("Service", "ExecReload", "/bin/kill -HUP $MAINPID"),
        ("Service", "StandardOutput", "journal"),
        ("Service", "NoNewPrivileges", "yes"),
        ("Service", "ProtectSystem", "strict"),
        ("Service", "CapabilityBoundingSet", "CAP_SETUID CAP_SETGID CAP_KILL"),
        ("Service", "AmbientCapabilities", "CAP_SETUID CAP_SETGID CAP_KILL"),
        ("Service", "LoadCredential", "killswitch.secret:/etc/acp-supervisor/killswitch.secret"),
        ("Service", "UMask", "0077"),
        ("Install", "WantedBy", "multi-user.target"),
    ],
)
def test_required_directive(unit: str, section: str, key: str, expected: str) -> None:
    assert values(unit, section, key) == [expected]


@pytest.mark.parametrize("unit", [u for u, _ in UNITS])
def test_address_families_and_syscalls(unit: str) -> None:
    assert values(unit, "Service", "RestrictAddressFamilies") == ["AF_UNIX AF_INET AF_INET6"]
    assert values(unit, "Service", "SystemCallFilter") == [
        "@system-service",
        "~@privileged @resources",
        "@setuid capset",  # the switch to the workers' user, and dropping every capability
    ]


def test_service_environment() -> None:
    unit = "acp-supervisor.service"
    assert values(unit, "Service", "ExecStart") == [f"{INSTALLED_BINARY} run"]
    env = values(unit, "Service", "Environment")
    assert "ACP_CONFIG=/etc/acp-supervisor/config.toml" in env
    assert "ACP_STATE_DIR=%S/acp-supervisor" in env
    assert values(unit, "Service", "StateDirectory") == ["acp-supervisor"]
    assert values(unit, "Service", "EnvironmentFile") == ["-/etc/acp-supervisor/acp.env"]
    assert not any("SECRET" in e for e in env)  # the secret never rides in the environment


def test_template_is_per_instance() -> None:
    unit = "acp-supervisor@.service"
    (exec_start,) = values(unit, "Service", "ExecStart")
    assert exec_start.startswith(f"{INSTALLED_BINARY} run --config /etc/acp-supervisor/%i.toml")
    assert "ACP_STATE_DIR=%S/acp-supervisor/%i" in values(unit, "Service", "Environment")
    assert values(unit, "Service", "StateDirectory") == ["acp-supervisor/%i"]
    assert values(unit, "Service", "EnvironmentFile") == ["-/etc/acp-supervisor/%i.env"]


def test_template_has_the_same_hardening() -> None:
    """Everything but the per-instance lines is identical between the two units."""
    per_instance = {
        "Description",
        "ExecStart",
        "Environment",
        "EnvironmentFile",
        "StateDirectory",
        "SyslogIdentifier",
    }

    def shared(unit: str) -> list[tuple[str, str, str]]:
        text = (UNIT_DIR / unit).read_text()
        return [e for e in parse_unit(text) if e[1] not in per_instance]

    assert shared("acp-supervisor.service") == shared("acp-supervisor@.service")


# --- systemd-analyze -------------------------------------------------------------------


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze") or (
        "/usr/bin/systemd-analyze" if os.access("/usr/bin/systemd-analyze", os.X_OK) else None
    )
    if path is None:
        reason = "systemd-analyze is not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (required under CI=true)")
        pytest.skip(reason)
    return path


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_COLORS": "0", "LC_ALL": "C.UTF-8"}
    return subprocess.run(
        [systemd_analyze(), *args], capture_output=True, text=True, env=env, timeout=60
    )


def systemd_version() -> int:
    first = analyze("--version").stdout.split("\n", 1)[0]  # "systemd 252 (252.38-1~deb12u1)"
    match = re.match(r"systemd (\d+)", first)
    assert match, first
    return int(match.group(1))


def installable_copy(unit: str, name: str, directory: Path) -> Path:
    """The unit under `name` with ExecStart pointing at an executable that exists here."""
    text = (UNIT_DIR / unit).read_text().replace(INSTALLED_BINARY, sys.executable)
    path = directory / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(("unit", "name"), UNITS)
def test_systemd_analyze_verify(unit: str, name: str, tmp_path: Path) -> None:
    path = installable_copy(unit, name, tmp_path)
    result = analyze("verify", "--man=no", str(path))
    version = systemd_version()
    expected = {
        f"Unknown key '{key}' in section [Service], ignoring."
        for key, since in KEYS_SINCE.items()
        if version < since
    }
    ours = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if str(path) in line or name in line
    ]
    unexpected = [line for line in ours if not any(line.endswith(e) for e in expected)]
    assert result.returncode == 0, result.stdout + result.stderr
    assert unexpected == []


def offline_supported() -> bool:
    return "--offline" in analyze("--help").stdout


@pytest.mark.parametrize(("unit", "name"), UNITS)
def test_security_exposure(unit: str, name: str, tmp_path: Path) -> None:
    if not offline_supported():
        pytest.skip("systemd-analyze security --offline needs systemd >= 250")
    path = installable_copy(unit, name, tmp_path)
    result = analyze("security", "--offline=true", "--no-pager", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\w+)", result.stdout)
    assert match, result.stdout
    exposure, verdict = float(match.group(1)), match.group(2)
    assert exposure <= MAX_EXPOSURE, (exposure, verdict, result.stdout)
    assert verdict in {"OK", "SAFE", "PERFECT"}, verdict

"""The config schema (supervisor/schema.py) is the one list of keys: the parsers take their
known keys from it, docs/config.md is generated from it, and its documented defaults are the
ones the code applies."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from supervisor.config import Backoff, WorkerSpec, load_config
from supervisor.configparse import parse_duration
from supervisor.docgen import main as docgen
from supervisor.errors import ConfigError
from supervisor.ops.alerts import AlertConfig
from supervisor.ops.metrics import MetricsConfig
from supervisor.schema import SECTIONS, keys, markdown, unknown_keys

ROOT = Path(__file__).resolve().parents[2]


def test_docs_config_md_is_generated_from_the_schema() -> None:
    text = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert text == markdown(), "docs/config.md is stale: python -m supervisor.docgen"
    for section in SECTIONS:  # every key is in the reference, with its type and default
        for key in section.keys:
            assert f"| `{key.name}` | {key.type} |" in text


def test_docgen_check_fails_on_a_stale_file(tmp_path: Path) -> None:
    assert docgen([str(tmp_path)]) == 0  # writes both files
    assert docgen(["--check", str(tmp_path)]) == 0
    (tmp_path / "config.md").write_text("# old\n")
    assert docgen(["--check", str(tmp_path)]) == 1


def documented(path: str, name: str) -> Any:
    """A documented default, as the value the code uses (durations in seconds)."""
    key = next(k for k in next(s for s in SECTIONS if s.path == path).keys if k.name == name)
    value = tomllib.loads(f"v = {key.default}")["v"]
    return parse_duration(value, name) if key.type == "duration" else value


def test_documented_defaults_are_the_ones_the_code_applies(tmp_path: Path) -> None:
    (tmp_path / "empty.toml").write_text("")
    config = load_config(tmp_path / "empty.toml", env={})
    for name in ("fleet", "profile", "shutdown_timeout", "recovery_every", "escalation_every",
                 "flush_every", "seed", "lease_ttl", "heartbeat", "fleet_switch_grace"):  # fmt: skip
        assert getattr(config, name) == documented("daemon", name), name
    assert str(config.timezone) == documented("daemon", "timezone")
    assert config.killswitch_watch_interval == documented("killswitch", "watch_interval")
    assert config.approvals.timeout == documented("approvals", "timeout")
    metrics, alerts = MetricsConfig(), AlertConfig()
    for name in keys("metrics"):
        assert getattr(metrics, name) == documented("metrics", name), name
    for name in keys("alerts"):
        if name != "sinks":
            assert getattr(alerts, name) == documented("alerts", name), name
    spec = WorkerSpec(name="w", target="m:C")
    for name in ("replicas", "restart", "stable_after", "max_restarts", "restart_window",
                 "quarantine_for", "heartbeat_timeout", "cycle_deadline"):  # fmt: skip
        assert getattr(spec, name) == documented("workers[]", name), name
    for name in keys("workers[].backoff"):
        assert getattr(Backoff(), name) == documented("workers[].backoff", name), name


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            '[daemon]\nshutdown_timout = "5s"\n',
            "unknown key 'shutdown_timout' (did you mean 'shutdown_timeout'?)",
        ),
        ("[metrics]\nenabeld = true\n", "unknown key 'enabeld' (did you mean 'enabled'?)"),
        ("[horizons.day]\nmax_cots = 1\n", "unknown key 'max_cots' (did you mean 'max_cost'?)"),
        ('[[workers]]\nname = "w"\nclass = "m:C"\nreplica = 2\n', "(did you mean 'replicas'?)"),
        ("[tokens]\nbudget = []\n", "unknown key 'budget' (did you mean 'budgets'?)"),
        ('[daemon]\ncolour = "blue"\n', "unknown key 'colour'"),
    ],
)
def test_unknown_keys_get_a_suggestion(tmp_path: Path, toml: str, message: str) -> None:
    (tmp_path / "c.toml").write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.toml", env={})
    assert message in str(info.value)
    if "colour" in toml:
        assert "did you mean" not in str(info.value)  # nothing close: no guess


def test_unknown_keys_walks_every_section() -> None:
    data = tomllib.loads(
        '[daemon]\nshutdown_timout = 1\n[horizons.week]\nwindw = "daily"\n'
        '[[policy.rules]]\nname = "r"\noutcome = "deny"\nwhen = [{ parm = "x", op = "exists" }]\n'
        '[[alerts.sinks]]\ntype = "webhook"\nurl = "http://h"\nretry = 1\n'
        '[[workers]]\nname = "w"\nclass = "m:C"\nbackoff = { inital = 1 }\n'
    )
    assert unknown_keys(data) == [
        ("daemon", "shutdown_timout", "shutdown_timeout"),
        ("horizons.week", "windw", "window"),
        ("policy.rules[0].when[0]", "parm", "param"),
        ("alerts.sinks[0]", "retry", "retries"),
        ("worker 'w' backoff", "inital", "initial"),
    ]


def test_enumerated_keys_agree_with_the_code() -> None:
    from supervisor.actions import RISKS
    from supervisor.timing.horizons import HORIZONS

    assert keys("policy.risk") == RISKS
    doc = next(s for s in SECTIONS if s.path == "horizons.NAME").meaning
    assert all(name in doc for name in HORIZONS)

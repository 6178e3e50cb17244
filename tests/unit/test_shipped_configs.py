"""Every config file the project ships loads, and the built-in default is config/default.toml."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.config import default_config_text, load_config

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted([*ROOT.glob("config/*.toml"), *ROOT.glob("workers/*.toml")])


def test_there_are_shipped_configs() -> None:
    assert {p.name for p in SHIPPED} >= {"default.toml", "production.toml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads(path: Path, tmp_path: Path) -> None:
    config = load_config(path, env={}, state_dir=tmp_path)
    assert config.workers, f"{path.name} declares no workers"


def test_built_in_default_is_the_shipped_default() -> None:
    assert default_config_text() == (ROOT / "config" / "default.toml").read_text()


def test_production_example_is_a_multi_host_postgres_fleet(tmp_path: Path) -> None:
    config = load_config(ROOT / "config" / "production.toml", env={}, state_dir=tmp_path)
    assert config.db_url.startswith("postgresql://") and config.db_explicit
    assert config.lease_ttl > config.heartbeat and config.metrics.enabled
    assert len(config.alerts.sinks) == 1 and config.horizon("week").max_actions == 20000


def test_production_example_runs_external_workers_as_their_own_user(tmp_path: Path) -> None:
    config = load_config(ROOT / "config" / "production.toml", env={}, state_dir=tmp_path)
    external = [w for w in config.workers if w.command is not None]
    assert external and all(w.user == "acp-agent" for w in external)
    assert config.halt_in_flight == "terminate" and config.policy.critical

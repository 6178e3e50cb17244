"""Where the kill-switch secret comes from: never the environment of a service."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from supervisor.errors import ConfigError
from supervisor.killswitch import load_secret


def test_a_systemd_credential_is_read_before_the_secret_file(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "killswitch.secret").write_text("from-credential\n")
    (tmp_path / "file").write_text("from-file\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds), "INVOCATION_ID": "x"}
    assert load_secret(env, str(tmp_path / "file")) == b"from-credential"
    # A credentials directory without ours: the configured file.
    (creds / "killswitch.secret").unlink()
    assert load_secret(env, str(tmp_path / "file")) == b"from-file"


def test_an_empty_credential_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "killswitch.secret").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_secret({"CREDENTIALS_DIRECTORY": str(tmp_path)}, None)


@pytest.mark.parametrize("marker", ["INVOCATION_ID", "NOTIFY_SOCKET"])
def test_the_environment_variable_under_systemd_logs_a_warning(marker: str) -> None:
    with capture_logs() as logs:
        assert load_secret({"ACP_KILLSWITCH_SECRET": "dev", marker: "1"}, None) == b"dev"
    assert [e["event"] for e in logs] == ["killswitch.secret_in_environment"]


def test_the_environment_variable_in_development_is_quiet() -> None:
    with capture_logs() as logs:
        assert load_secret({"ACP_KILLSWITCH_SECRET": "dev"}, None) == b"dev"
    assert logs == []

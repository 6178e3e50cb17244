"""[alerts] and [metrics] config: defaults, parsing, and one error line per bad item."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from supervisor.errors import ConfigError
from supervisor.ops.alerts import AlertConfig, CommandSink, WebhookSink
from supervisor.ops.metrics import MetricsConfig

FULL = """
[alerts]
approval_age = "45m"
approval_backlog = 10
rate_change = 0.25
rate_min_samples = 5
trailing_windows = 3
evaluate_every = "30s"

[[alerts.sinks]]
type = "webhook"
url = "https://hooks.example.com/acp?token=secret"
timeout = "2s"
retries = 1

[[alerts.sinks]]
type = "command"
argv = ["/usr/bin/logger", "-t", "acp"]
timeout = "10s"
"""


def test_defaults() -> None:
    for cfg in (AlertConfig.from_config(None), AlertConfig.from_config({})):
        assert cfg == AlertConfig()
        assert cfg.approval_age == 1800.0
        assert cfg.approval_backlog == 50
        assert cfg.rate_change == 0.3
        assert cfg.rate_min_samples == 20
        assert cfg.trailing_windows == 6
        assert cfg.evaluate_every == 60.0
        assert cfg.sinks == ()


def test_full_toml() -> None:
    cfg = AlertConfig.from_config(tomllib.loads(FULL)["alerts"])
    assert cfg.approval_age == 45 * 60
    assert cfg.approval_backlog == 10
    assert cfg.rate_change == 0.25
    assert cfg.rate_min_samples == 5
    assert cfg.trailing_windows == 3
    assert cfg.evaluate_every == 30.0
    webhook, command = cfg.sinks
    assert webhook == WebhookSink(url="https://hooks.example.com/acp?token=secret", timeout=2.0,
                                  retries=1)  # fmt: skip
    assert command == CommandSink(argv=("/usr/bin/logger", "-t", "acp"), timeout=10.0, retries=0)
    # the description never shows the query string (a token may live there)
    assert webhook.describe() == "webhook https://hooks.example.com/acp"
    assert command.describe() == "command /usr/bin/logger"


def test_sink_defaults() -> None:
    cfg = AlertConfig.from_config(
        {"sinks": [{"type": "webhook", "url": "http://127.0.0.1:8080/x"},
                   {"type": "command", "argv": ["true"]}]}
    )  # fmt: skip
    assert cfg.sinks == (
        WebhookSink(url="http://127.0.0.1:8080/x", timeout=5.0, retries=3),
        CommandSink(argv=("true",), timeout=10.0, retries=0),
    )


def test_numbers_as_seconds_and_integral_rate() -> None:
    cfg = AlertConfig.from_config({"approval_age": 90, "evaluate_every": 0.5, "rate_change": 1})
    assert cfg.approval_age == 90.0
    assert cfg.evaluate_every == 0.5
    assert cfg.rate_change == 1.0


def sink(**entry: Any) -> dict[str, Any]:
    return {"sinks": [entry]}


ERRORS: list[tuple[Any, str]] = [
    ([1, 2], "alerts: expected a table, got array"),
    ({"approval_agee": "30m"}, "alerts: unknown key 'approval_agee' ("),
    ({"approval_age": "-3m"}, "alerts.approval_age: invalid duration '-3m'"),
    ({"approval_age": 0}, "alerts.approval_age: duration must be positive, got 0"),
    ({"approval_age": -5}, "alerts.approval_age: duration must be positive, got -5"),
    ({"approval_age": True}, "alerts.approval_age: expected a duration"),
    ({"approval_backlog": -3}, "alerts.approval_backlog: must be >= 1, got -3"),
    ({"approval_backlog": 0}, "alerts.approval_backlog: must be >= 1, got 0"),
    ({"approval_backlog": 2.5}, "alerts.approval_backlog: expected an integer, got 2.5"),
    ({"approval_backlog": "50"}, "alerts.approval_backlog: expected an integer, got string"),
    ({"approval_backlog": True}, "alerts.approval_backlog: expected an integer, got boolean"),
    ({"rate_change": 0}, "alerts.rate_change: must be > 0 and <= 1, got 0"),
    ({"rate_change": -0.1}, "alerts.rate_change: must be > 0 and <= 1, got -0.1"),
    ({"rate_change": 1.5}, "alerts.rate_change: must be > 0 and <= 1, got 1.5"),
    ({"rate_change": float("nan")}, "alerts.rate_change: must be > 0 and <= 1, got nan"),
    ({"rate_change": "0.3"}, "alerts.rate_change: expected a number, got string"),
    ({"rate_min_samples": 0}, "alerts.rate_min_samples: must be >= 1, got 0"),
    ({"trailing_windows": -1}, "alerts.trailing_windows: must be >= 1, got -1"),
    ({"trailing_windows": 0}, "alerts.trailing_windows: must be >= 1, got 0"),
    ({"evaluate_every": "0s"}, "alerts.evaluate_every: duration must be positive, got '0s'"),
    ({"evaluate_every": "soon"}, "alerts.evaluate_every: invalid duration 'soon'"),
    ({"sinks": {"type": "webhook"}}, "alerts.sinks: expected an array, got table"),
    ({"sinks": ["http://x"]}, "alerts.sinks[0]: expected a table, got string"),
    (sink(url="http://x"), "alerts.sinks[0]: missing 'type' (webhook or command)"),
    (sink(type="email"), "alerts.sinks[0].type: unknown sink type 'email' (webhook, command)"),
    (sink(type=3), "alerts.sinks[0].type: unknown sink type number (webhook, command)"),
    (sink(type="webhook"), "alerts.sinks[0]: missing 'url'"),
    (sink(type="webhook", url="http://h", method="PUT"), "alerts.sinks[0]: unknown key 'method'"),
    (sink(type="webhook", url="ftp://h/x"),
     "alerts.sinks[0].url: must be an http:// or https:// URL with a host, got 'ftp://h/x'"),
    (sink(type="webhook", url="/just/a/path"),
     "alerts.sinks[0].url: must be an http:// or https:// URL with a host, got '/just/a/path'"),
    (sink(type="webhook", url="http://"),
     "alerts.sinks[0].url: must be an http:// or https:// URL with a host, got 'http://'"),
    (sink(type="webhook", url="http://h:99999/"),
     "alerts.sinks[0].url: must be an http:// or https:// URL with a host, got 'http://h:99999/'"),
    (sink(type="webhook", url=""), "alerts.sinks[0].url: must not be empty"),
    (sink(type="webhook", url=5), "alerts.sinks[0].url: expected a string, got number"),
    (sink(type="webhook", url="http://h", timeout="0s"),
     "alerts.sinks[0].timeout: duration must be positive, got '0s'"),
    (sink(type="webhook", url="http://h", retries=-1),
     "alerts.sinks[0].retries: must be >= 0, got -1"),
    (sink(type="webhook", url="http://h", retries=1.0),
     "alerts.sinks[0].retries: expected an integer, got 1.0"),
    (sink(type="command"), "alerts.sinks[0]: missing 'argv'"),
    (sink(type="command", argv=[]), "alerts.sinks[0].argv: must not be empty"),
    (sink(type="command", argv="logger -t acp"),
     "alerts.sinks[0].argv: expected an array, got string"),
    (sink(type="command", argv=["logger", ""]), "alerts.sinks[0].argv[1]: must not be empty"),
    (sink(type="command", argv=["logger", 3]),
     "alerts.sinks[0].argv[1]: expected a string, got number"),
    (sink(type="command", argv=["true"], url="http://h"), "alerts.sinks[0]: unknown key 'url'"),
    (sink(type="command", argv=["true"], timeout=-2),
     "alerts.sinks[0].timeout: duration must be positive, got -2"),
]  # fmt: skip


@pytest.mark.parametrize(("section", "message"), ERRORS)
def test_errors(section: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        AlertConfig.from_config(section)
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_second_sink_is_named() -> None:
    with pytest.raises(ConfigError, match=r"^alerts\.sinks\[1\]\.argv: must not be empty$"):
        AlertConfig.from_config(
            {"sinks": [{"type": "command", "argv": ["true"]}, {"type": "command", "argv": []}]}
        )


# --- [metrics] ----------------------------------------------------------------------------------


def test_metrics_defaults() -> None:
    for cfg in (MetricsConfig.from_config(None), MetricsConfig.from_config({})):
        assert cfg == MetricsConfig(enabled=False, host="127.0.0.1", port=9464, stall_after=30.0)


def test_metrics_values() -> None:
    text = '[metrics]\nenabled = true\nhost = "0.0.0.0"\nport = 0\nstall_after = "200ms"\n'
    cfg = MetricsConfig.from_config(tomllib.loads(text)["metrics"])
    assert cfg == MetricsConfig(enabled=True, host="0.0.0.0", port=0, stall_after=0.2)


METRICS_ERRORS: list[tuple[Any, str]] = [
    ("on", "metrics: expected a table, got string"),
    ({"enable": True}, "metrics: unknown key 'enable' ("),
    ({"enabled": "yes"}, "metrics.enabled: expected a boolean, got string"),
    ({"enabled": 1}, "metrics.enabled: expected a boolean, got number"),
    ({"host": ""}, "metrics.host: must not be empty"),
    ({"host": 127}, "metrics.host: expected a string, got number"),
    ({"port": -1}, "metrics.port: must be between 0 and 65535, got -1"),
    ({"port": 70000}, "metrics.port: must be between 0 and 65535, got 70000"),
    ({"port": "9464"}, "metrics.port: expected an integer, got string"),
    ({"port": True}, "metrics.port: expected an integer, got boolean"),
    ({"stall_after": 0}, "metrics.stall_after: duration must be positive, got 0"),
    ({"stall_after": "later"}, "metrics.stall_after: invalid duration 'later'"),
]


@pytest.mark.parametrize(("section", "message"), METRICS_ERRORS)
def test_metrics_errors(section: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        MetricsConfig.from_config(section)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_metrics_module_does_not_import_prometheus() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import supervisor.ops.metrics as m; m.MetricsConfig.from_config({}); "
        "print('prometheus_client' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

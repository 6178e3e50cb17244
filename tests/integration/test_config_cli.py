"""`acp-supervisor config check` and `config show` through the real command line."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def acp(folder: Path, *argv: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_") and k != "NOTIFY_SOCKET"}
    env.update(PYTHONPATH=str(ROOT), **extra)
    return subprocess.run([sys.executable, "-m", "supervisor", *argv], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_check_says_ok_for_the_shipped_configs(tmp_path: Path) -> None:
    for argv in ((), ("--config", str(ROOT / "config" / "default.toml"))):
        done = acp(tmp_path, *argv, "config", "check")
        assert (done.returncode, done.stdout, done.stderr) == (0, "ok\n", ""), done
    assert not (tmp_path / "state").exists()  # a check writes nothing


BROKEN = """\
[daemon]
fleet = "a"
shutdown_timout = "5s"
colour = "blue"

[metrics]
enabeld = true

[[workers]]
name = "ghost"
class = "workers.support:NoSuchAgent"

[[workers]]
name = "tool"
command = ["/nonexistent/agent", "--serve"]

[[workers]]
name = "ok"
class = "workers.support:SupportAgent"
"""


def test_check_prints_one_line_per_problem_and_exits_2(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(BROKEN)
    done = acp(tmp_path, "--config", "c.toml", "config", "check")
    assert done.returncode == 2, done
    assert "Traceback" not in done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines == [
        "c.toml, line 3: daemon: unknown key 'shutdown_timout' (did you mean 'shutdown_timeout'?)",
        "c.toml, line 4: daemon: unknown key 'colour'",
        "c.toml, line 7: metrics: unknown key 'enabeld' (did you mean 'enabled'?)",
        "worker 'ghost': 'workers.support' has no class 'NoSuchAgent'",
        "worker 'tool': command '/nonexistent/agent' is not an executable",
    ], done.stdout
    assert not (tmp_path / "state").exists()


def test_check_reports_a_bad_value_after_the_unknown_keys(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(
        '[daemon]\nfleet = "a"\nsed = 1\n\n[horizons.day]\nmax_cost = nan\n'
    )
    done = acp(tmp_path, "--config", "c.toml", "config", "check")
    assert done.returncode == 2
    first, second = done.stdout.splitlines()
    assert "unknown key 'sed' (did you mean 'seed'?)" in first
    assert "horizons.day.max_cost" in second and "finite" in second


def test_check_of_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_bytes(b"[daemon]\nfleet = '\xff'\n")
    done = acp(tmp_path, "--config", "c.toml", "config", "check")
    assert done.returncode == 2
    assert done.stdout.splitlines() == ["c.toml: not valid UTF-8 at byte offset 18 (0xff)"]


def test_check_names_an_unreadable_secret_file_and_state_dir(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('[killswitch]\nsecret_file = "/nonexistent/secret"\n')
    (tmp_path / "a-file").write_text("")
    done = acp(tmp_path, "--config", "c.toml", "--state-dir", "a-file/state", "config", "check")
    assert done.returncode == 2
    lines = done.stdout.splitlines()
    assert len(lines) == 2, lines
    assert "secret file /nonexistent/secret" in lines[0]
    assert "state directory" in lines[1] and "a-file is not a directory" in lines[1]


SHOWN = """\
[daemon]
fleet = "shop"
recovery_every = "15m"

[[alerts.sinks]]
type = "webhook"
url = "https://bot:s3cret-hook@hooks.example.com/acp?token=t0ken&team=ops"

[[policy.rules]]
name = "refunds"
action = "billing.refund"
when = [{ param = "amount", op = ">", value = 500 }]
outcome = "escalate"

[[workers]]
name = "support"
class = "workers.support:SupportAgent"
replicas = 2
params = { api_token = "sk-live-123", team = "support" }

[[workers]]
name = "tool"
command = ["/bin/echo", "--api-token=sk-cli-9", "https://u:argv-pw@x.example/y", "--verbose"]
"""


def test_show_merges_file_environment_and_flags_and_masks_secrets(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(SHOWN)
    env = {"ACP_DB": "postgresql://acp:pg-pass@db.internal/acp", "ACP_KILLSWITCH_SECRET": "k3y"}
    done = acp(tmp_path, "--config", "c.toml", "--state-dir", "elsewhere", "config", "show", **env)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for secret in ("pg-pass", "s3cret-hook", "t0ken", "sk-live-123", "k3y", "sk-cli-9", "argv-pw"):
        assert secret not in out, secret
    shown = tomllib.loads(out)
    daemon = shown["daemon"]
    assert daemon["fleet"] == "shop" and daemon["recovery_every"] == "15m"  # the file
    assert daemon["db"] == "postgresql://acp:***@db.internal/acp"  # the environment
    assert daemon["state_dir"] == str(tmp_path / "elsewhere")  # the flag
    assert daemon["shutdown_timeout"] == "30s"  # the default
    assert shown["horizons"]["day"]["cycle_every"] == "15m"
    assert shown["alerts"]["sinks"][0]["url"] == (
        "https://bot:***@hooks.example.com/acp?token=***&team=ops"
    )
    assert shown["workers"][0]["params"] == {"api_token": "***", "team": "support"}
    assert shown["workers"][1]["command"] == [
        "/bin/echo", "--api-token=***", "https://u:***@x.example/y", "--verbose"
    ]  # fmt: skip
    assert shown["policy"]["rules"][0]["when"] == [{"param": "amount", "op": ">", "value": 500}]
    assert "ACP_KILLSWITCH_SECRET" in out.splitlines()[1]

    # what it prints is a config that gives the same effective config again
    (tmp_path / "shown.toml").write_text(out)
    again = acp(tmp_path, "--config", "shown.toml", "--state-dir", "elsewhere", "config", "show",
                **env)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[1:] == out.splitlines()[1:]


def test_show_of_a_bad_config_is_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('[daemon]\nprofile = "year"\n')
    done = acp(tmp_path, "--config", "c.toml", "config", "show")
    assert done.returncode == 2 and done.stdout == ""
    assert (
        done.stderr.count("\n") == 1 and "profile" in done.stderr and "Traceback" not in done.stderr
    )


def test_check_reads_the_database_url_as_run_would(tmp_path: Path) -> None:
    for url, words in (
        ("sqlite:///nonexistent/dir/x.db", "sqlite database directory /nonexistent/dir"),
        ("mysql://db/x", "unknown database scheme 'mysql'"),
    ):
        done = acp(tmp_path, "--db", url, "config", "check")
        assert done.returncode == 2 and words in done.stdout, done
    done = acp(tmp_path, "config", "check", ACP_DB=f"sqlite:///{tmp_path}/ok.db")
    assert (done.returncode, done.stdout) == (0, "ok\n"), done
    assert not (tmp_path / "ok.db").exists()


def test_a_worker_file_that_fails_to_import_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    # A new user's first worker: a missing colon, or code that raises when the module loads.
    (tmp_path / "typo_w.py").write_text("from supervisor import Worker\nclass A(Worker)\n")
    (tmp_path / "boom_w.py").write_text("x = 1\nraise RuntimeError('no API key')\n")
    (tmp_path / "w.toml").write_text('[[workers]]\nname = "typo"\nclass = "typo_w:A"\n\n'
                                     '[[workers]]\nname = "boom"\nclass = "boom_w:B"\n')  # fmt: skip
    done = acp(tmp_path, "--config", "w.toml", "config", "check")
    assert done.returncode == 2, done
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        f"worker 'typo': cannot import 'typo_w': expected ':' ({tmp_path / 'typo_w.py'}, line 2)",
        f"worker 'boom': importing 'boom_w' raised RuntimeError: no API key "
        f"({tmp_path / 'boom_w.py'}, line 2)",
    ]
    run = acp(tmp_path, "--config", "w.toml", "run", "--horizon", "hour", "--simulate")
    assert run.returncode == 2, run
    assert run.stderr.splitlines() == [f"acp-supervisor: error: {done.stdout.splitlines()[0]}"]
    assert not (tmp_path / "state").exists()  # refused before a run's folder is made

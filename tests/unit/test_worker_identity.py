"""Who an external worker runs as: config checks, the launcher's argv, the warning."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from supervisor.config import load_config
from supervisor.errors import ConfigError
from supervisor.runtime import sandbox
from supervisor.runtime.daemon import build_factories
from supervisor.runtime.sandbox import Identity, launch_argv, resolve

WORKER = """
[[workers]]
name = "agent"
command = ["{python}", "-c", "pass"]
{extra}
"""


def config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "c.toml"
    path.write_text(WORKER.format(python=sys.executable, extra=extra))
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('user = "no-such-user-here"', "unknown user 'no-such-user-here'"),
        ('user = "root"', "is root"),
        ('group = "nogroup"', "'group' needs 'user'"),
    ],
)
def test_a_bad_identity_is_one_config_error(tmp_path: Path, extra: str, message: str) -> None:
    cfg = load_config(config(tmp_path, extra), env={}, state_dir=tmp_path)
    with pytest.raises(ConfigError, match=message):
        build_factories(cfg, {})


def test_sandbox_and_user_are_for_command_workers_only(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[workers]]\nname = "w"\nclass = "workers.support:SupportAgent"\nuser = "x"\n')
    with pytest.raises(ConfigError, match="command workers only"):
        load_config(path, env={}, state_dir=tmp_path)
    path.write_text(WORKER.format(python=sys.executable, extra='sandbox = "docker"'))
    with pytest.raises(ConfigError, match="unknown sandbox 'docker'"):
        load_config(path, env={}, state_dir=tmp_path)


def test_the_launcher_switches_user_before_the_worker_runs() -> None:
    assert launch_argv(["w"], Identity()) == ["w"]
    argv = launch_argv(["w", "--x"], Identity(uid=1234, gid=5678, user="agent"))
    assert argv[1:4] == ["-I", "-S", str(Path(sandbox.__file__).resolve())]
    assert argv[4:] == ["--uid", "1234", "--gid", "5678", "--", "w", "--x"]
    assert resolve(None, None, "w") == (None, None)


def test_a_worker_as_the_daemons_own_user_under_systemd_warns_once(tmp_path: Path) -> None:
    cfg = load_config(config(tmp_path), env={}, state_dir=tmp_path)
    with capture_logs() as logs:
        build_factories(cfg, {"INVOCATION_ID": "abc"})
        build_factories(cfg, {"INVOCATION_ID": "abc"})  # a reload: no second warning
    warned = [e for e in logs if e["event"] == "worker.runs_as_daemon_user"]
    assert [e["worker"] for e in warned] == ["agent"]
    with capture_logs() as logs:
        build_factories(cfg, {})  # not a service: a development run, no warning
    assert logs == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
def test_the_launcher_drops_every_privilege(tmp_path: Path) -> None:
    import subprocess

    probe = "import os; print(os.getresuid(), os.getresgid(), os.getgroups(), open('/proc/self/status').read())"
    argv = launch_argv(["/usr/bin/python3", "-c", probe], Identity(uid=65534, gid=65534))
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    assert out.startswith("(65534, 65534, 65534) (65534, 65534, 65534) []")
    status = dict(line.split(":\t", 1) for line in out.splitlines()[1:] if ":\t" in line)
    for caps in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(status[caps], 16) == 0, (caps, status[caps])
    assert status["NoNewPrivs"].strip() == "1"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to set the scene")
def test_ambient_capabilities_of_a_service_do_not_reach_the_worker() -> None:
    """Under systemd the daemon is an unprivileged user holding CAP_SETUID/CAP_SETGID as
    ambient capabilities. A bare setuid would hand them on (the worker could switch to the
    daemon's user); the launcher clears every set."""
    import shutil
    import subprocess

    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    probe = "print(''.join(l for l in open('/proc/self/status') if l.startswith(('Cap', 'NoNew'))))"
    as_service = ["setpriv", "--reuid=65533", "--regid=65533", "--clear-groups",
                  "--inh-caps=+setuid,+setgid", "--ambient-caps=+setuid,+setgid", "--"]  # fmt: skip
    launcher = ["/usr/bin/python3", "-I", "-S", str(Path(sandbox.__file__).resolve()),
                "--uid", "65534", "--gid", "65534", "--", "/usr/bin/python3", "-c", probe]  # fmt: skip
    done = subprocess.run(
        as_service + launcher, capture_output=True, text=True, check=False, cwd="/"
    )
    assert done.returncode == 0, done.stderr
    status = dict(line.split(":\t", 1) for line in done.stdout.splitlines() if ":\t" in line)
    for caps in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(status[caps], 16) == 0, (caps, status[caps])


def test_a_database_outside_the_state_dir_is_closed_and_masked(tmp_path: Path) -> None:
    from supervisor.runtime.daemon import hidden_paths, private_files, sqlite_files

    db = tmp_path / "elsewhere" / "acp.db"
    db.parent.mkdir()
    db.write_bytes(b"")
    db.chmod(0o644)
    path = config(tmp_path, 'user = "nobody"')
    cfg = load_config(path, env={}, db=f"sqlite:///{db}", state_dir=tmp_path / "state")
    files = sqlite_files(cfg)
    assert files[0] == db and str(db) in hidden_paths(cfg, {})
    private_files(files)  # the -wal and -shm files do not exist yet: skipped
    assert db.stat().st_mode & 0o777 == 0o600


def test_switching_user_needs_root_or_the_two_capabilities() -> None:
    from supervisor.runtime.sandbox import can_switch_user

    assert can_switch_user("CapEff:\t00000000000000c0\n")  # CAP_SETUID and CAP_SETGID
    assert not can_switch_user("CapEff:\t0000000000000080\n")  # CAP_SETUID alone
    assert not can_switch_user("CapEff:\t0000000000000000\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to set the scene")
def test_a_daemon_that_cannot_switch_user_refuses_to_start(tmp_path: Path) -> None:
    import shutil
    import subprocess

    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    path = config(tmp_path, 'user = "nobody"')
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_")}
    done = subprocess.run(
        ["setpriv", "--bounding-set=-setuid,-setgid", "--inh-caps=-setuid,-setgid", "--",
         sys.executable, "-m", "supervisor", "--config", str(path), "--state-dir",
         str(tmp_path / "state"), "run"],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "needs the daemon to be root or hold CAP_SETUID" in lines[0], lines


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_a_worker_in_the_daemons_own_group_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's group may read its secret file (root:acp-supervisor 0640) and its config
    (with the database's password): a worker running in that group could read them too."""
    import grp

    gid = grp.getgrnam("nogroup").gr_gid
    cfg = load_config(config(tmp_path, 'user = "nobody"\ngroup = "nogroup"'), env={},
                      state_dir=tmp_path)  # fmt: skip
    assert build_factories(cfg, {})  # another group than the daemon's: fine
    monkeypatch.setattr(os, "getegid", lambda: gid)  # as if the daemon ran in group nogroup
    with pytest.raises(ConfigError, match="daemon's own group"):
        build_factories(cfg, {})


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_two_workers_sharing_one_user_outside_a_sandbox_are_refused(tmp_path: Path) -> None:
    """As one uid, a child can take the other worker's protocol pipe (pidfd_getfd, ptrace) and
    propose, or report results, in its name. Replicas of one worker may share their user."""
    import shutil

    second = f'user = "nobody"\n\n[[workers]]\nname = "other"\ncommand = ["{sys.executable}"]\n'
    path = config(tmp_path, second + 'user = "nobody"')
    with pytest.raises(ConfigError, match="'agent' and 'other' both run as user 'nobody'"):
        build_factories(load_config(path, env={}, state_dir=tmp_path), {})
    path = config(tmp_path, 'user = "nobody"\nreplicas = 2')
    assert build_factories(load_config(path, env={}, state_dir=tmp_path), {})
    if shutil.which("bwrap") is not None:  # one sandboxed, the other not: still refused
        path = config(tmp_path, second + 'user = "nobody"\nsandbox = "bwrap"')
        with pytest.raises(ConfigError, match="both run as user 'nobody'"):
            build_factories(load_config(path, env={}, state_dir=tmp_path), {})


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_a_secret_every_user_may_read_is_refused_when_a_worker_runs_as_another_user(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "killswitch.secret"
    secret.write_text("s3cret")
    path = config(tmp_path, 'user = "nobody"')
    path.write_text(f'[killswitch]\nsecret_file = "{secret}"\n\n' + path.read_text())
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by every user"):
        build_factories(load_config(path, env={}, state_dir=tmp_path), {})
    secret.chmod(0o640)
    assert build_factories(load_config(path, env={}, state_dir=tmp_path), {})
    # A password in the database URL makes the config file a secret too.
    path.write_text('[daemon]\ndb = "postgresql://acp:pw@127.0.0.1/acp"\n\n' + path.read_text())
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=f"{path} is readable by every user"):
        build_factories(load_config(path, env={}, state_dir=tmp_path), {})
    path.chmod(0o640)
    assert build_factories(load_config(path, env={}, state_dir=tmp_path), {})


def test_a_worker_program_under_tmp_is_bound_back_read_only_and_hidden_paths_stay_masked(
    tmp_path: Path,
) -> None:
    """The sandbox's /tmp is its own tmpfs: a worker script in a checkout under /tmp must be bound
    back (read-only) or the command cannot start; a hidden path named in argv stays masked."""
    from supervisor.runtime.sandbox import bwrap_args

    script = tmp_path / "worker.py"
    script.write_text("print('hi')\n")
    secret = tmp_path / "secret"
    secret.write_text("s\n")
    assert str(script).startswith("/tmp/")
    args = bwrap_args("/usr/bin/bwrap", [("dir", str(tmp_path / "state"))],
                      ["/usr/bin/python3", str(script), str(tmp_path / "missing.py")])  # fmt: skip
    sep = args.index("--")
    mounts = args[:sep]
    at = mounts.index(str(script))
    assert mounts[at - 1] == "--ro-bind" and mounts[at + 1] == str(script)
    assert mounts.index("--ro-bind", 3) > mounts.index("/tmp")  # after the tmpfs that hides it
    assert mounts.index(str(tmp_path / "state")) > at  # hidden paths are masked after it
    assert str(tmp_path / "missing.py") not in mounts  # only files that exist are bound
    assert "/usr/bin/python3" not in mounts[3:]  # not under a masked directory: already visible
    assert args[sep + 1 :] == ["/usr/bin/python3", str(script), str(tmp_path / "missing.py")]

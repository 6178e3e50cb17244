"""Running an external worker outside the daemon's reach.

An external worker is the agent under governance: it must not read or write the state directory,
the database, the kill-switch file or secret, nor the daemon's /proc. So it runs as its own
unprivileged user (`user = "acp-agent"` in its `[[workers]]` entry) and, where the host has
bubblewrap, in a sandbox (`sandbox = "bwrap"`): a read-only system, its own /tmp, its own pid
namespace, and the state directory and secret not mounted at all.

The switch of user happens in a small launcher (this file, run as a script), not in the
daemon: the launcher drops the supplementary groups, sets the group and user ids, clears every
capability set (a daemon started by systemd holds CAP_SETUID/CAP_SETGID as *ambient*
capabilities, which would otherwise survive the exec), sets no_new_privs, checks that all of it
took, and only then executes the worker (or bwrap). A launcher that cannot drop privileges
exits 126 with one line on stderr: the worker never starts with the daemon's rights.
"""

from __future__ import annotations

import ctypes
import grp
import os
import pwd
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING or __package__:
    # Not when run as the launcher script: it imports nothing of the package (and so none of
    # its dependencies) while it still holds the daemon's privileges.
    from ..errors import ConfigError

Sandbox = Literal["none", "bwrap"]
SANDBOXES: tuple[Sandbox, ...] = ("none", "bwrap")

_PR_SET_NO_NEW_PRIVS = 38
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


@dataclass(frozen=True, slots=True)
class Identity:
    """Who an external worker runs as (None: the daemon's own user), and in which sandbox."""

    uid: int | None = None
    gid: int | None = None
    user: str | None = None
    sandbox: Sandbox = "none"
    hidden: tuple[str, ...] = ()  # paths the sandbox masks (state dir, secret, database)
    writable: tuple[str, ...] = ()  # the worker's own directories, writable in the sandbox


def resolve(user: str | None, group: str | None, where: str) -> tuple[int | None, int | None]:
    """Numeric ids for a worker's `user` and `group`; the group defaults to the user's own."""
    if user is None:
        if group is not None:
            raise ConfigError(f"{where}: 'group' needs 'user'")
        return None, None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(
            f"{where}: unknown user {user!r} (create it: see docs/deploy.md)"
        ) from None
    if entry.pw_uid == 0:
        raise ConfigError(f"{where}: user {user!r} is root; a worker needs an unprivileged user")
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"{where}: unknown group {group!r}") from None
    if gid == 0:
        raise ConfigError(f"{where}: group 0 (root) is not an unprivileged group")
    return entry.pw_uid, gid


_CAP_SETGID, _CAP_SETUID = 6, 7


def can_switch_user(status: str | None = None) -> bool:
    """Whether this process may switch a child to another user: CAP_SETUID and CAP_SETGID in
    its effective set (root's, or a service's ambient capabilities)."""
    if status is None:
        try:
            status = Path("/proc/self/status").read_text()
        except OSError:
            return os.geteuid() == 0
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            caps = int(line.split()[1], 16)
            return bool(caps >> _CAP_SETUID & 1 and caps >> _CAP_SETGID & 1)
    return False


def launch_argv(argv: Sequence[str], identity: Identity) -> list[str]:
    """The argv that runs `argv` as `identity` (unchanged when there is nothing to switch)."""
    if identity.uid is None and identity.sandbox == "none":
        return list(argv)
    out = [sys.executable, "-I", "-S", str(Path(__file__).resolve())]
    if identity.uid is not None and identity.gid is not None:
        out += ["--uid", str(identity.uid), "--gid", str(identity.gid)]
    if identity.sandbox == "bwrap":
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            raise ConfigError("sandbox 'bwrap' needs bubblewrap installed (apt install bubblewrap)")
        out += ["--bwrap", bwrap]
        for path in identity.writable:
            out += ["--bind", path]
        # Decided here, with the daemon's rights: the dropped launcher may not even stat them.
        dirs = [Path(p) for p in identity.hidden if Path(p).is_dir()]
        for path in identity.hidden:
            p = Path(path)
            if p.is_dir():
                out += ["--hide-dir", str(p)]
            elif p.exists() and not any(p.is_relative_to(d) for d in dirs):
                out += ["--hide-file", str(p)]  # (inside a hidden directory it is gone anyway)
    return [*out, "--", *argv]


def without_capabilities(argv: Sequence[str]) -> list[str]:
    """`argv` run through the launcher with no user switch: every capability the daemon holds
    (a service's CAP_SETUID/CAP_SETGID/CAP_KILL) cleared and no_new_privs set. For the
    daemon's other children, such as alert commands."""
    return [sys.executable, "-I", "-S", str(Path(__file__).resolve()), "--", *argv]


_MASKED = ("/tmp/", "/var/tmp/", "/run/")  # tmpfs in the sandbox


def bwrap_args(bwrap: str, hidden: Sequence[tuple[str, str]], argv: Sequence[str]) -> list[str]:
    """A read-only system, its own /tmp, /proc and pid namespace; `hidden` paths masked."""
    args = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--tmpfs", "/tmp", "--tmpfs", "/var/tmp", "--tmpfs", "/run",
            "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent",
            "--new-session", "--chdir", "/"]  # fmt: skip
    # The worker's own program files under a directory the sandbox replaces with a tmpfs (a
    # checkout in /tmp) are bound back read-only, or the command could not start; the hidden
    # paths come after, so they stay masked whatever the command names.
    for word in argv:
        if word.startswith(_MASKED) and os.path.isfile(word):
            args += ["--ro-bind", word, word]
    for kind, path in hidden:
        if kind == "bind":
            args += ["--bind", path, path]
            continue
        if kind == "dir":
            args += ["--tmpfs", path]
            continue
        # A file is covered by an empty one (not /dev/null: device nodes do not open on the
        # nodev mounts of an unprivileged namespace). bwrap reads its content from a pipe.
        read, write = os.pipe()
        os.close(write)
        os.set_inheritable(read, True)
        args += ["--ro-bind-data", str(read), path]
    return [*args, "--", *argv]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]  # fmt: skip


def drop_privileges(uid: int | None, gid: int | None) -> None:
    """Become uid/gid with no supplementary groups, no capabilities and no_new_privs.

    Raises OSError when any step fails or did not take."""
    libc = ctypes.CDLL(None, use_errno=True)
    if uid is not None and gid is not None:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
            raise OSError("the user and group ids did not change")
        if os.getgroups():
            raise OSError("supplementary groups remain")
    # Every capability set empty (ambient ones go with the inheritable set): nothing of the
    # daemon's CAP_SETUID/CAP_SETGID survives into the worker.
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"no_new_privs: {os.strerror(err)}")


def main(args: Sequence[str]) -> int:
    uid = gid = None
    bwrap: str | None = None
    hidden: list[tuple[str, str]] = []
    rest = list(args)
    while rest and rest[0] != "--":
        flag = rest.pop(0)
        value = rest.pop(0) if rest else ""
        if flag == "--uid":
            uid = int(value)
        elif flag == "--gid":
            gid = int(value)
        elif flag == "--bwrap":
            bwrap = value
        elif flag in ("--hide-dir", "--hide-file"):
            hidden.append((flag[len("--hide-") :], value))
        elif flag == "--bind":
            hidden.insert(0, ("bind", value))  # binds first: a mask must win over them
        else:
            print(f"acp-supervisor sandbox: unknown flag {flag!r}", file=sys.stderr)
            return 126
    argv = rest[1:]
    if not argv:
        print("acp-supervisor sandbox: no command", file=sys.stderr)
        return 126
    try:
        drop_privileges(uid, gid)
    except (OSError, ValueError) as exc:
        print(
            f"acp-supervisor sandbox: cannot drop privileges to uid {uid}: {exc}", file=sys.stderr
        )
        return 126
    target = bwrap_args(bwrap, hidden, argv) if bwrap is not None else argv
    try:
        os.execvp(target[0], target)
    except OSError as exc:
        print(f"acp-supervisor sandbox: cannot run {target[0]!r}: {exc.strerror}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

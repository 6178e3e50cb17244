"""The state directory and the files in it: the directory created owner-only (0700) whatever
the umask, files replaced atomically with the mode their content calls for.

It holds the database, the kill-switch files and the emergency snapshots; nobody but the
daemon's user has any business in it. An existing directory keeps the mode its owner gave it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: bytes, *, mode: int) -> None:
    """Temp file in the same directory, fsync, rename into place, fsync the directory.

    A crash leaves either the old file or the new one, never a torn one. The file has `mode`
    from before its content is written, whatever the umask. Raises OSError."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def make_state_dir(path: Path) -> None:
    """Create `path` (and its parents) if missing; a directory made here is 0700. Raises OSError."""
    if path.is_dir():
        return
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    # mkdir's mode is filtered by the umask; chmod is not.
    os.chmod(path, 0o700)

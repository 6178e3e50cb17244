"""The state directory: created owner-only (0700) whatever the umask.

It holds the database, the kill-switch files and the emergency snapshots; nobody but the
daemon's user has any business in it. An existing directory keeps the mode its owner gave it.
"""

from __future__ import annotations

import os
from pathlib import Path


def make_state_dir(path: Path) -> None:
    """Create `path` (and its parents) if missing; a directory made here is 0700. Raises OSError."""
    if path.is_dir():
        return
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    # mkdir's mode is filtered by the umask; chmod is not.
    os.chmod(path, 0o700)

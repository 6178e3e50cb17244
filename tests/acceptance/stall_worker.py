"""Test workers for acceptance tests, imported by the daemon subprocess."""

from __future__ import annotations

import time
from pathlib import Path

from supervisor.worker import CycleContext, Worker


class StallWorker(Worker):
    """Blocks the whole event loop (time.sleep) while the file named in params exists: a stuck
    main loop, as the systemd watchdog should see it."""

    async def cycle(self, ctx: CycleContext) -> None:
        marker = Path(self.params["stall_file"])
        while marker.exists():
            time.sleep(0.2)

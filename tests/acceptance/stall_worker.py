"""Test workers for acceptance tests, imported by the daemon subprocess."""

from __future__ import annotations

import time
from pathlib import Path

from supervisor.runtime.worker import CycleContext, Worker


class StallWorker(Worker):
    """Blocks the whole event loop (time.sleep) while the file named in params exists: a stuck
    main loop, as the systemd watchdog should see it."""

    async def cycle(self, ctx: CycleContext) -> None:
        marker = Path(self.params["stall_file"])
        while marker.exists():  # noqa: ASYNC240 - blocking on purpose: this is the stall
            time.sleep(0.2)  # noqa: ASYNC251


class LongSleeper(Worker):
    """Waits a minute inside each cycle; a halt must cut the wait short."""

    async def cycle(self, ctx: CycleContext) -> None:
        import structlog

        from supervisor.errors import ActionDenied

        log = structlog.get_logger("test")
        log.info("sleeper.waiting")
        try:
            await ctx.sleep(60)
        except ActionDenied as exc:
            log.info("sleeper.halted", reason=exc.reason)
            raise


class StuckInThread(Worker):
    """While the file named in params exists, each cycle waits for it in a thread that ignores
    cancellation (a blocking library call): the loop runs on, the cycle deadline cannot end the
    cycle, and no cycle completes. A stall the fleet must report."""

    async def cycle(self, ctx: CycleContext) -> None:
        import anyio

        marker = Path(self.params["stall_file"])

        def wait() -> None:
            while marker.exists():
                time.sleep(0.05)

        await anyio.to_thread.run_sync(wait)

"""The interpreter settings of a long-lived daemon, made once it has started.

Heavy reads (the scorecard, `events replay`, the recovery scan) build their rows in worker
threads, but a garbage collection started there holds the GIL: the event loop (the kill switch's
watch, the gate) stops for as long as it runs. Measured with bench/loop_lag.py at 1M events:

- a full (generation 2) collection walks every tracked object, and the start-up objects
  (modules, classes, functions, the config) were most of them: up to 50-75 ms. Frozen
  (`gc.freeze`), a full collection walks only what was made since: 2-12 ms;
- a thread running Python keeps the GIL for the switch interval (5 ms) before the loop gets it,
  at each of the loop's wake-ups: 1 ms halves the ticker's p99 lag while a read runs, with no
  measurable cost to the read.

The collection thresholds stay the interpreter's: with the start-up objects frozen, a full
collection is cheap, and collecting less often would only let cyclic garbage pile up.
"""

from __future__ import annotations

import gc
import sys

SWITCH_INTERVAL = 0.001  # seconds (the interpreter's default: 0.005)


def settle() -> None:
    """Move every object alive now out of the collector's way, and shorten the GIL's switch
    interval. Call once start-up is done (long-lived objects made), before the daemon's tasks
    run. Calling it again (a test, a second daemon in one process) re-freezes from scratch."""
    gc.unfreeze()  # what an earlier call froze and has died since is collected below
    gc.collect()  # garbage frozen now would never be collected
    gc.freeze()
    sys.setswitchinterval(SWITCH_INTERVAL)

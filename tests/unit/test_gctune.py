"""gctune.settle sets what it says (the figures it is for are bench/loop_lag.py's)."""

from __future__ import annotations

import gc
import sys
import weakref
from collections.abc import Iterator

import pytest

from supervisor.ops import gctune


class Node:
    """A container the collector tracks; `link` makes a cycle only it can free."""

    link: object = None


@pytest.fixture(autouse=True)
def restore() -> Iterator[None]:
    interval, threshold = sys.getswitchinterval(), gc.get_threshold()
    yield
    gc.unfreeze()
    sys.setswitchinterval(interval)
    gc.set_threshold(*threshold)


def test_settle_freezes_what_is_alive_after_collecting_the_garbage() -> None:
    kept = Node()
    cycle = Node()
    cycle.link = cycle
    garbage = weakref.ref(cycle)
    del cycle
    gctune.settle()
    assert garbage() is None  # collected first: frozen garbage would never be freed
    assert gc.get_freeze_count() > 0
    assert all(o is not kept for o in gc.get_objects())  # out of every generation's walk


def test_settle_shortens_the_switch_interval_and_keeps_the_thresholds() -> None:
    threshold = gc.get_threshold()
    gctune.settle()
    assert sys.getswitchinterval() == pytest.approx(gctune.SWITCH_INTERVAL)
    assert gc.get_threshold() == threshold
    assert gc.isenabled()


def test_settle_again_frees_what_died_since_the_last_freeze() -> None:
    cycle = Node()
    cycle.link = cycle
    ref = weakref.ref(cycle)
    gctune.settle()
    del cycle
    gc.collect()
    assert ref() is not None  # frozen: a full collection does not look at it
    gctune.settle()
    assert ref() is None

"""The kill switch's modes and how they combine: pure, imported by the store as well."""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .hostfile import SwitchState


class Mode(StrEnum):
    DISENGAGED = "disengaged"
    HALT_NONCRITICAL = "halt_noncritical"
    HALT_ALL = "halt_all"
    EMERGENCY = "emergency"


MODE_VALUES = frozenset(m.value for m in Mode)
_RANK = {
    Mode.DISENGAGED: 0,
    Mode.HALT_NONCRITICAL: 1,
    Mode.HALT_ALL: 2,
    Mode.EMERGENCY: 3,
}


def permits(mode: Mode, *, critical: bool) -> bool:
    """Whether an action may run under `mode`."""
    if mode is Mode.DISENGAGED:
        return True
    if mode is Mode.HALT_NONCRITICAL:
        return critical
    return False


def host_verdict(state: SwitchState, *, critical: bool) -> str | None:
    """The host switch's verdict on an action: None when it permits it."""
    if permits(state.mode, critical=critical):
        return None
    return f"host {state.mode.value}" + (f": {state.problem}" if state.problem else "")


def strictest(*modes: Mode) -> Mode:
    """The strictest of several scopes' modes; no modes at all means nothing is engaged."""
    return max(modes, key=_RANK.__getitem__, default=Mode.DISENGAGED)

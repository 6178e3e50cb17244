"""Alerts, in three parts: `config` (the conditions, the sinks and `[alerts]`; it imports no
store, so loading a config stays light), `delivery` (how a sink is reached) and `engine`
(`Alerts`: raise and resolve once, evaluate, deliver without blocking the gate).

The config names are re-exported here; `Alerts` is loaded on first use, for the same reason."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import (
    APPROVAL_AGE,
    APPROVAL_BACKLOG,
    APPROVAL_RATE_CHANGE,
    BUDGET_EXHAUSTED,
    CONDITIONS,
    DENIAL_RATE_CHANGE,
    KILLSWITCH_ENGAGED,
    RECOVERY_IN_DOUBT,
    RESTART_INTENSITY,
    STATE_WRITE_FAILED,
    TOKEN_BUDGET_EXHAUSTED,
    WORKER_CAP,
    WORKER_QUARANTINED,
    WORKER_STALLED,
    AlertConfig,
    CommandSink,
    Sink,
    WebhookSink,
)

if TYPE_CHECKING:
    from .engine import Alerts

__all__ = [
    "APPROVAL_AGE",
    "APPROVAL_BACKLOG",
    "APPROVAL_RATE_CHANGE",
    "BUDGET_EXHAUSTED",
    "CONDITIONS",
    "DENIAL_RATE_CHANGE",
    "KILLSWITCH_ENGAGED",
    "RECOVERY_IN_DOUBT",
    "RESTART_INTENSITY",
    "STATE_WRITE_FAILED",
    "TOKEN_BUDGET_EXHAUSTED",
    "WORKER_CAP",
    "WORKER_QUARANTINED",
    "WORKER_STALLED",
    "AlertConfig",
    "Alerts",
    "CommandSink",
    "Sink",
    "WebhookSink",
]


def __getattr__(name: str) -> Any:
    if name == "Alerts":
        from .engine import Alerts

        return Alerts
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

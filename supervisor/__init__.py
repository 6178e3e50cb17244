"""acp-supervisor: keeps AI agent workers running for weeks and governs every action they take.

The public names are imported on first access (PEP 562), so `from supervisor import Worker`
does not pull in the daemon, the store backends or the scheduler.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .actions import Action
    from .approvals import Permit
    from .clock import Clock, SystemClock, VirtualClock
    from .config import Config, WorkerSpec, load_config
    from .daemon import Daemon
    from .errors import (
        ActionDenied,
        ActionExpired,
        ApprovalError,
        ApprovalPending,
        ConfigError,
        GovernedRefusal,
        IdempotencyConflict,
        SchemaTooNew,
        StateWriteError,
        StoreError,
        SupervisorError,
        UsageError,
    )
    from .gate import Gate, Outcome
    from .killswitch import Mode
    from .scorecard import Scorecard
    from .store import Event, NewEvent, Session, Store, open_store
    from .worker import ActionAlreadyDone, CycleContext, Worker

__all__ = [
    "Action",
    "ActionAlreadyDone",
    "ActionDenied",
    "ActionExpired",
    "ApprovalError",
    "ApprovalPending",
    "Clock",
    "Config",
    "ConfigError",
    "CycleContext",
    "Daemon",
    "Event",
    "Gate",
    "GovernedRefusal",
    "IdempotencyConflict",
    "Mode",
    "NewEvent",
    "Outcome",
    "Permit",
    "SchemaTooNew",
    "Scorecard",
    "Session",
    "StateWriteError",
    "Store",
    "StoreError",
    "SupervisorError",
    "SystemClock",
    "UsageError",
    "VirtualClock",
    "Worker",
    "WorkerSpec",
    "load_config",
    "open_store",
]

# Each public name and the module that defines it; keep in step with the imports above.
_HOMES = {
    "Action": "actions",
    "Permit": "approvals",
    "Clock": "clock",
    "SystemClock": "clock",
    "VirtualClock": "clock",
    "Config": "config",
    "WorkerSpec": "config",
    "load_config": "config",
    "Daemon": "daemon",
    "ActionDenied": "errors",
    "ActionExpired": "errors",
    "ApprovalError": "errors",
    "ApprovalPending": "errors",
    "GovernedRefusal": "errors",
    "ConfigError": "errors",
    "IdempotencyConflict": "errors",
    "SchemaTooNew": "errors",
    "StateWriteError": "errors",
    "StoreError": "errors",
    "SupervisorError": "errors",
    "UsageError": "errors",
    "Gate": "gate",
    "Outcome": "gate",
    "Mode": "killswitch",
    "Scorecard": "scorecard",
    "Event": "store",
    "NewEvent": "store",
    "Session": "store",
    "Store": "store",
    "open_store": "store",
    "ActionAlreadyDone": "worker",
    "CycleContext": "worker",
    "Worker": "worker",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""acp-supervisor: keeps AI agent workers running for weeks and governs every action they take.

The public names are imported on first access (PEP 562), so `from supervisor import Worker`
does not pull in the daemon, the store backends or the scheduler.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .actions import Action
    from .config import Config, WorkerSpec, load_config
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
    from .governance.approvals import Permit
    from .governance.gate import Gate, Outcome
    from .killswitch import Mode
    from .ops.scorecard import Scorecard
    from .runtime.daemon import Daemon
    from .runtime.worker import ActionAlreadyDone, CycleContext, Worker
    from .store import Event, NewEvent, Session, Store, open_store
    from .timing.clock import Clock, SystemClock, VirtualClock

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
    "Permit": "governance.approvals",
    "Clock": "timing.clock",
    "SystemClock": "timing.clock",
    "VirtualClock": "timing.clock",
    "Config": "config",
    "WorkerSpec": "config",
    "load_config": "config",
    "Daemon": "runtime.daemon",
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
    "Gate": "governance.gate",
    "Outcome": "governance.gate",
    "Mode": "killswitch",
    "Scorecard": "ops.scorecard",
    "Event": "store",
    "NewEvent": "store",
    "Session": "store",
    "Store": "store",
    "open_store": "store",
    "ActionAlreadyDone": "runtime.worker",
    "CycleContext": "runtime.worker",
    "Worker": "runtime.worker",
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

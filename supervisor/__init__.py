"""acp-supervisor: keeps AI agent workers running for weeks and governs every action they take."""

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

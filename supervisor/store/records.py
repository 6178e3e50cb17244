"""The statuses the store writes, as enums: a typo is a mypy error, not a record that never
matches. They are StrEnums, so a status read back from a row compares equal to its member."""

from __future__ import annotations

from enum import StrEnum


class ActionStatus(StrEnum):
    STARTED = "started"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    HALTED = "halted"
    IN_DOUBT = "in_doubt"
    RESOLVED_DONE = "resolved_done"
    RESOLVED_FAILED = "resolved_failed"


class ApprovalStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"


class SessionStatus(StrEnum):
    OPEN = "open"
    CLOSED = "closed"
    RECOVERED = "recovered"
    MISSED = "missed"


class HostStatus(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"


class RunStatus(StrEnum):
    RUNNING = "running"
    FINISHED = "finished"

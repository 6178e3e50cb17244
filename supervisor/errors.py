"""The project's own errors. Every expected failure is one of these, with a reason code.

The CLI turns a `SupervisorError` into one line on stderr and its `exit_code`; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class SupervisorError(Exception):
    """Base of every expected error. `exit_code` is what the CLI exits with."""

    exit_code = 1
    reason = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class UsageError(SupervisorError):
    """Bad command line or configuration: exit code 2, nothing written."""

    exit_code = 2
    reason = "usage"


class ConfigError(UsageError):
    reason = "config"


class StoreError(SupervisorError):
    """The store failed at runtime (driver errors are translated into this family)."""

    reason = "store"
    # True when the connection was lost, a query timed out or the server aborted the
    # transaction to break a deadlock: nothing is wrong with the request itself, and the same
    # work on a fresh connection may succeed (a crash it is not).
    transient = False


class StoreUnavailable(StoreError):
    reason = "store_unavailable"


class StoreConfigError(UsageError):
    """The database URL is malformed, names an unknown scheme, or points at a path we cannot use."""

    reason = "store_config"


class DatabaseMissing(StoreConfigError):
    """The SQLite file a read names does not exist; nothing is created to find that out."""

    reason = "database_missing"

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


class SchemaTooNew(StoreError):
    exit_code = 2
    reason = "schema_too_new"


class SchemaMissing(StoreError):
    exit_code = 2
    reason = "schema_missing"


class StateWriteError(StoreError):
    """A state-bearing write did not commit. The caller must not go on (fail-closed)."""

    reason = "state_write_failed"


class StoreLost(StateWriteError):
    """The database file was deleted or replaced under the running daemon: nothing it writes
    would last, so every action halts and the daemon exits."""

    reason = "store_lost"


class IdempotencyConflict(SupervisorError):
    """The same command_id was used for another operation or other params."""

    reason = "idempotency_conflict"

    def __init__(
        self,
        command_id: str,
        *,
        stored_operation: str,
        stored_hash: str,
        operation: str,
        params_hash: str,
    ) -> None:
        super().__init__(
            f"command_id {command_id!r} conflicts: stored {stored_operation} "
            f"(params {stored_hash[:12]}), requested {operation} (params {params_hash[:12]})"
        )
        self.command_id = command_id
        self.stored_operation = stored_operation
        self.operation = operation


class NotFound(SupervisorError):
    reason = "not_found"


class GovernedRefusal(SupervisorError):
    """The gate's answer to an action that did not run now: denied, expired, pending approval,
    or already done. A governed outcome, never a crash: `except GovernedRefusal` is the one
    test of which it is."""


class ActionDenied(GovernedRefusal):
    """The gate refused an action. `reason` is the machine-readable code."""

    def __init__(self, message: str, *, reason: str, command_id: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.command_id = command_id


class ApprovalPending(GovernedRefusal):
    reason = "approval_pending"

    def __init__(self, approval_id: str, *, command_id: str | None = None) -> None:
        super().__init__(f"approval {approval_id} is pending")
        self.approval_id = approval_id
        self.command_id = command_id


class ActionExpired(ActionDenied):
    def __init__(self, message: str, *, command_id: str | None = None) -> None:
        super().__init__(message, reason="approval_expired", command_id=command_id)


class ApprovalError(UsageError):
    """Deciding an unknown, expired or already decided approval."""

    exit_code = 1
    reason = "approval"


class KillSwitchError(UsageError):
    reason = "killswitch"

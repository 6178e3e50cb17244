"""The store: one object whose operations are grouped by aggregate, one module each."""

from __future__ import annotations

from .actions import ActionsRepo
from .approvals import ApprovalsRepo
from .checkpoints import CheckpointsRepo
from .counts import CountsRepo
from .fleet import FleetRepo
from .runs import RunsRepo
from .switches import SwitchesRepo
from .tokens import TokensRepo
from .windows import WindowsRepo


class Store(
    ActionsRepo,
    ApprovalsRepo,
    CheckpointsRepo,
    CountsRepo,
    FleetRepo,
    RunsRepo,
    SwitchesRepo,
    TokensRepo,
    WindowsRepo,
):
    """Domain operations. Each public method is one transaction unless it says otherwise."""

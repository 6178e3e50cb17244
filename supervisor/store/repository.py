"""The store: one object whose operations are grouped by aggregate, one module each."""

from __future__ import annotations

from .actions import ActionsRepo
from .activity import ActivityRepo
from .alerts import AlertsRepo
from .approvals import ApprovalsRepo
from .checkpoints import CheckpointsRepo
from .fleet import FleetRepo
from .runs import RunsRepo
from .switches import SwitchesRepo
from .tallies import TalliesRepo
from .tokens import TokensRepo
from .windows import WindowsRepo


class Store(
    ActionsRepo,
    ActivityRepo,
    AlertsRepo,
    ApprovalsRepo,
    CheckpointsRepo,
    FleetRepo,
    RunsRepo,
    SwitchesRepo,
    TalliesRepo,
    TokensRepo,
    WindowsRepo,
):
    """Domain operations. Each public method is one transaction unless it says otherwise."""

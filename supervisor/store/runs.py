"""The runs aggregate: one row per `run`, continuous or a horizon, its start and end."""

from __future__ import annotations

from .base import StoreCore


class RunsRepo(StoreCore):
    pass

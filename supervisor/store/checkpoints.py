"""The checkpoints aggregate: each worker's saved state and its resume point."""

from __future__ import annotations

from .base import StoreCore


class CheckpointsRepo(StoreCore):
    pass

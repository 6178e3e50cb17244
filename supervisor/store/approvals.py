"""The approvals aggregate: requests, decisions, expiry, escalation and window grants."""

from __future__ import annotations

from .base import StoreCore


class ApprovalsRepo(StoreCore):
    pass

"""The fleet aggregate: hosts, leases (leader and worker slots) and worker rows."""

from __future__ import annotations

from .base import StoreCore


class FleetRepo(StoreCore):
    pass

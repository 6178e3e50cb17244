"""The kill switch, in one package: its modes (`modes`), the host's signed file (`hostfile`),
what the daemon runs to watch both the file and the store's switches and to record every change
(`keeper`), and the engage protocol of the CLI and the console (`engage`).

This module re-exports the pure parts only; `keeper` and `engage` use the store (which itself
imports `modes`), so they are imported by their full names."""

from __future__ import annotations

from .hostfile import (
    CREDENTIAL_NAME,
    NO_SECRET_MESSAGE,
    SECRET_ENV,
    HostSwitchFile,
    SwitchState,
    load_secret,
    render,
    sign,
    signed_document,
)
from .modes import Mode, host_verdict, permits, strictest

__all__ = [
    "CREDENTIAL_NAME",
    "NO_SECRET_MESSAGE",
    "SECRET_ENV",
    "HostSwitchFile",
    "Mode",
    "SwitchState",
    "host_verdict",
    "load_secret",
    "permits",
    "render",
    "sign",
    "signed_document",
    "strictest",
]

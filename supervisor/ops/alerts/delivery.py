"""How an alert reaches a sink: the record queued for it, the webhook's signed POST (no
redirects followed), the command's scrubbed environment."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Delivery:
    condition: str
    state: str  # "raised" | "resolved"
    session_id: str | None
    stream: str
    body: bytes


def plain(detail: Mapping[str, Any]) -> dict[str, Any]:
    """`detail` as plain JSON data (what the store and the sinks can carry); never raises."""
    try:
        text = json.dumps(dict(detail), default=str, allow_nan=False)
    except (TypeError, ValueError):
        return {"detail": repr(detail)[:1000]}
    plain: dict[str, Any] = json.loads(text)
    return plain


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as the failure it is (its 3xx status): the body and its signature
    go to the configured receiver or nowhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)

#: What an alert command inherits of the daemon's environment; nothing else (no ACP_*, no
#: database or cloud credentials, no systemd sockets).
_COMMAND_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")


def command_environment(source: Mapping[str, str] | None = None) -> dict[str, str]:
    source = os.environ if source is None else source
    return {k: source[k] for k in _COMMAND_ENV if k in source}


def signature(secret: bytes, body: bytes) -> str:
    """The X-ACP-Signature header: `sha256=` and the hex HMAC-SHA256 of the exact body."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def post(url: str, body: bytes, timeout: float, secret: bytes | None = None) -> int:
    """One HTTP POST (in a worker thread); the response status, 3xx/4xx/5xx included."""
    headers = {"Content-Type": "application/json", "User-Agent": "acp-supervisor"}
    if secret is not None:
        headers["X-ACP-Signature"] = signature(secret, body)
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            response.read(65536)
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code

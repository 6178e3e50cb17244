"""What a worker asks to do, and the canonical form used for hashing and command ids."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import UsageError

Risk = Literal["low", "medium", "high", "critical"]
RISKS: tuple[Risk, ...] = ("low", "medium", "high", "critical")


# One encoder for every call: json.dumps with these options builds a new one each time, and an
# action encodes five values on its way through the gate.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False)


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no spaces, no NaN. Raises UsageError if not serializable."""
    try:
        return _CANONICAL.encode(value)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"params do not serialize to JSON: {exc}", reason="params") from exc


def params_hash(operation: str, params: Any) -> str:
    return params_digest(operation, canonical_json(params))


def params_digest(operation: str, params_json: str) -> str:
    """`params_hash` of params already written as canonical JSON."""
    return hashlib.sha256(f"{operation}\n{params_json}".encode()).hexdigest()


def derive_id(*parts: str) -> str:
    """A deterministic id from its parts: the same inputs give the same id on every host."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Action:
    """One side effect a worker wants to perform."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    risk: Risk = "low"
    cost: float = 0.0
    critical: bool = False
    safe_to_retry: bool = False
    # Token and model governance: the estimate is checked before, actual usage recorded after.
    model: str | None = None
    tokens: int = 0
    identity: dict[str, str] = field(default_factory=dict)  # {"user": .., "team": .., "org": ..}
    agent_id: str | None = None

    def __post_init__(self) -> None:
        if self.risk not in RISKS:
            raise UsageError(f"action {self.name!r}: unknown risk {self.risk!r}", reason="params")
        if self.cost < 0 or self.tokens < 0:
            raise UsageError(f"action {self.name!r}: cost and tokens must be >= 0", reason="params")
        canonical_json(self.params)

    @classmethod
    def recorded(
        cls,
        name: str,
        params: dict[str, Any],
        risk: str,
        cost: float,
        model: str | None,
        tokens: int,
        identity: dict[str, str],
    ) -> Action:
        """An action read back from the store (policy replay, a million at a time). Its params
        were parsed from JSON, so they serialize: only that check of __init__ is skipped."""
        if risk not in RISKS or cost < 0 or tokens < 0 or not isinstance(params, dict):
            raise UsageError(f"recorded action {name!r}: bad risk, cost, tokens or params")
        action = object.__new__(cls)
        for key, value in (("name", name), ("params", params), ("risk", risk), ("cost", cost),
                           ("critical", False), ("safe_to_retry", False), ("model", model),
                           ("tokens", tokens), ("identity", identity), ("agent_id", None)):  # fmt: skip
            object.__setattr__(action, key, value)
        return action


def proposal_fields(action: Action) -> dict[str, Any]:
    """What a policy decides on, as recorded with denials and approval requests so that
    `policy replay` can decide the same proposal again (the action row keeps the same fields)."""
    return {
        "risk": action.risk,
        "params": action.params,
        "cost": action.cost,
        "tokens": action.tokens,
        "model": action.model,
        "identity": action.identity,
    }

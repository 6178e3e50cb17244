"""The token budgets' ledger: tokens and cost used per budget scope, identity and period."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .base import StoreCore, Tx


@dataclass(frozen=True, slots=True)
class TokenKey:
    """One budget's row: its scope (agent, team, ...), the identity it counts, the period."""

    scope: str
    identity: str
    period_key: str


@dataclass(frozen=True, slots=True)
class TokenCharge:
    """One action's estimate against one budget: reserved with its started record (refused
    there if it no longer fits, so concurrent actions cannot overrun the budget), settled to
    the reported usage with a success, released with a failure or a halt."""

    key: TokenKey
    label: str
    tokens: int
    cost: float
    max_tokens: int
    max_cost: float | None


@dataclass(frozen=True, slots=True)
class TokenUsage:
    scope: str
    identity: str
    period_key: str
    tokens: int
    cost: float


class TokensRepo(StoreCore):
    async def token_usage(self, key: TokenKey) -> TokenUsage:
        """What the budget has used in its period (nothing yet: zero)."""
        row = await self._fetchrow("get_token_usage", key.scope, key.identity, key.period_key)
        tokens, cost = (int(row["tokens"]), float(row["cost"])) if row else (0, 0.0)
        return TokenUsage(key.scope, key.identity, key.period_key, tokens, cost)

    async def list_token_usage(self) -> list[TokenUsage]:
        rows = await self._fetchall("list_token_usage")
        return [TokenUsage(r["scope"], r["identity"], r["period_key"], int(r["tokens"]),
                           float(r["cost"])) for r in rows]  # fmt: skip


async def reserve_tokens_in(tx: Tx, charges: Sequence[TokenCharge]) -> TokenCharge | None:
    """Reserve every charge inside `tx`; the first that does not fit is returned (the caller
    rolls the transaction back), None when all fit."""
    for c in charges:
        max_cost = c.max_cost if c.max_cost is not None else math.inf
        if c.tokens > c.max_tokens or c.cost > max_cost:
            return c  # does not fit even an unused budget (the statement checks only a row's sum)
        row = await tx.fetchrow("reserve_tokens", c.key.scope, c.key.identity, c.key.period_key,
                                c.tokens, c.cost, c.max_tokens, max_cost)  # fmt: skip
        if row is None:
            return c
    return None


async def settle_tokens_in(
    tx: Tx, charges: Sequence[TokenCharge], *, ok: bool, tokens_used: int | None
) -> None:
    """With the outcome: a success counts what the effect reported (the estimate if nothing),
    a failure or a halt gives the reservation back."""
    for c in charges:
        if ok:
            tokens, cost = (tokens_used - c.tokens if tokens_used is not None else 0), 0.0
        else:
            tokens, cost = -c.tokens, -c.cost
        if tokens or cost:
            await tx.execute("adjust_tokens", tokens, cost, c.key.scope, c.key.identity,
                             c.key.period_key)  # fmt: skip

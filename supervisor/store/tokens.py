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
    there if it no longer fits, so concurrent actions cannot overrun the budget) and held under
    its command_id (table token_holds) until its outcome settles it to the reported usage (a
    success) or gives it back (a failure, a halt). An in-doubt action keeps its hold, since it
    may have spent the tokens, until an operator resolves it."""

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


async def reserve_tokens_in(
    tx: Tx, command_id: str, charges: Sequence[TokenCharge]
) -> TokenCharge | None:
    """Reserve every charge inside `tx`, each held under `command_id`; the first that does not
    fit is returned (the caller rolls the transaction back), None when all fit. A re-run keeps
    what its first start holds (it went in-doubt holding it) instead of reserving it again."""
    if not charges:
        return None
    held = {(h["scope"], h["identity"], h["period_key"])
            for h in await tx.fetchall("token_holds_of", command_id)}  # fmt: skip
    for c in charges:
        key = c.key
        if (key.scope, key.identity, key.period_key) in held:
            continue
        max_cost = c.max_cost if c.max_cost is not None else math.inf
        if c.tokens > c.max_tokens or c.cost > max_cost:
            return c  # does not fit even an unused budget (the statement checks only a row's sum)
        row = await tx.fetchrow("reserve_tokens", key.scope, key.identity, key.period_key,
                                c.tokens, c.cost, c.max_tokens, max_cost)  # fmt: skip
        if row is None:
            return c
        await tx.execute("insert_token_hold", command_id, key.scope, key.identity,
                         key.period_key, c.tokens, c.cost)  # fmt: skip
    return None


async def settle_tokens_in(
    tx: Tx, command_id: str, *, spent: bool, tokens_used: int | None
) -> None:
    """What `command_id` holds, settled: `spent` keeps it counted (to what the effect reported,
    when it said; else its estimate), otherwise it is given back. The holds go either way."""
    holds = await tx.fetchall("token_holds_of", command_id)
    for h in holds:
        if spent:
            tokens = tokens_used - int(h["tokens"]) if tokens_used is not None else 0
            cost = 0.0
        else:
            tokens, cost = -int(h["tokens"]), -float(h["cost"])
        if tokens or cost:
            await tx.execute("adjust_tokens", tokens, cost, h["scope"], h["identity"],
                             h["period_key"])  # fmt: skip
    if holds:
        await tx.execute("delete_token_holds", command_id)

"""A support-case agent: each cycle it picks up one case from a deterministic mix of risks.

Low and medium cases are resolved (auto-approved by the default policy); high and critical cases
are denied by policy. Effects go to the effect log so tests can count them.
"""

from __future__ import annotations

from typing import Any

from supervisor.actions import Action, Risk
from supervisor.errors import ActionDenied, ApprovalPending
from supervisor.runtime.worker import CycleContext, Worker

_MIX: list[tuple[Risk, int]] = [("low", 50), ("medium", 30), ("high", 15), ("critical", 5)]
_RISKS = [r for r, _ in _MIX]
_WEIGHTS = [w for _, w in _MIX]


class SupportAgent(Worker):
    awaits_only_the_gate = True  # its effects are in-process records

    def __init__(self, name: str, params: dict[str, Any]) -> None:
        super().__init__(name, params)
        self.cases_per_cycle = int(params.get("cases_per_cycle", 1))
        self.cost = float(params.get("cost", 0.05))
        self.resolved = 0
        self.refused = 0

    async def cycle(self, ctx: CycleContext) -> None:
        for n in range(self.cases_per_cycle):
            risk = ctx.rng.choices(_RISKS, weights=_WEIGHTS)[0]
            case_id = f"{self.name}-{ctx.cycle}-{n}"
            action = Action(
                name="support.resolve_case",
                params={"case": case_id, "risk": risk},
                risk=risk,
                cost=self.cost,
                critical=risk == "critical",
            )
            try:
                outcome = await ctx.dispatch(action)
            except (ActionDenied, ApprovalPending):
                self.refused += 1
                continue
            if outcome.status == "succeeded" and not outcome.replayed:
                self.resolved += 1

    def snapshot(self) -> dict[str, Any]:
        return {"resolved": self.resolved, "refused": self.refused}

    def restore(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        self.resolved = int(state.get("resolved", 0))
        self.refused = int(state.get("refused", 0))

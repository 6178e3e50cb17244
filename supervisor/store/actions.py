"""The actions aggregate: an action's started record, re-run, outcome, in-doubt and resolution,
with their budget reservations, each one transaction. The gate asks; this module decides nothing
about policy."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from ..actions import canonical_json, params_digest, params_hash
from ..errors import StateWriteError, StoreError, UsageError
from .base import (
    CALL_MARK,
    COMMAND_TRIES,
    ActionRecord,
    NewEvent,
    Row,
    StoreCore,
    Tx,
    call_mark,
    current_fence,
    json_object,
    unreadable,
)
from .records import ActionStatus
from .switches import (
    SwitchRecord,
    SwitchTarget,
    host_lets_finish,
    host_permits,
    stopping_switch,
    switch_verdict,
    switches_in,
    switches_with_print,
)
from .tokens import TokenCharge, reserve_tokens_in, settle_tokens_in


def _started_claim(mark: str) -> str:
    """What a started action's ledger row holds (an outcome lives in its action row): the
    status, and the mark of the call that wrote it (see base.CALL_MARK)."""
    return canonical_json({"status": "started", CALL_MARK: mark})


@dataclass(frozen=True, slots=True)
class ActionRow:
    """One row of the actions table: a governed action's started record and what became of it."""

    command_id: str
    fleet: str
    session_id: str
    worker: str
    name: str
    params: dict[str, Any]
    risk: str
    cost: float
    critical: bool
    safe_to_retry: bool
    status: ActionStatus
    rule: str | None
    started_at: datetime
    finished_at: datetime | None
    result: Any
    error: str | None
    resolved_by: str | None
    host: str | None
    owner: str | None
    identity: dict[str, str] | None
    model: str | None
    tokens: int
    decision: str | None

    @classmethod
    def from_row(cls, row: Row) -> ActionRow:
        what = f"action {row['command_id']}"
        try:
            return cls(
                command_id=row["command_id"], fleet=row["fleet"], session_id=row["session_id"],
                worker=row["worker"], name=row["name"], params=json_object(row["params"]),
                risk=row["risk"], cost=float(row["cost"]), critical=bool(row["critical"]),
                safe_to_retry=bool(row["safe_to_retry"]), status=ActionStatus(row["status"]),
                rule=row["rule"], started_at=row["started_at"], finished_at=row["finished_at"],
                result=json.loads(row["result"]) if row["result"] is not None else None,
                error=row["error"], resolved_by=row["resolved_by"], host=row["host"],
                owner=row["owner"],
                identity=json_object(row["identity"]) if row["identity"] else None,
                model=row["model"], tokens=int(row["tokens"] or 0), decision=row["decision"],
            )  # fmt: skip
        except (TypeError, ValueError) as exc:
            raise unreadable(what, exc) from exc

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: times as ISO 8601 text, the status as its value."""
        out: dict[str, Any] = {}
        for k in self.__slots__:
            v = getattr(self, k)
            out[k] = v.isoformat() if isinstance(v, datetime) else v
        out["status"] = self.status.value
        return out


class ActionsRepo(StoreCore):
    async def lookup_action(
        self, command_id: str, operation: str, params: Any
    ) -> ActionRecord | None:
        """Where an action's command_id stands, in one read of its ledger row and action row;
        None if unknown; IdempotencyConflict if the id was used for something else. An action's
        outcome lives in its action row only: the ledger row holds the claim."""
        async with self.backend.reader() as tx:
            row = await tx.fetchrow("lookup_action", command_id)
        if row is None:
            return None
        self._same_command(command_id, row, operation, params_hash(operation, params))
        status, error = row["status"], row["error"]
        if status == "resolved_done":
            status = "succeeded"
        elif status == "resolved_failed":
            status, error = "failed", f"resolved as failed by {row['resolved_by']}"
        try:
            result = json.loads(row["result"]) if row["result"] is not None else None
        except ValueError as exc:
            raise unreadable(f"action {command_id}", exc) from exc
        return ActionRecord(status, result, error, bool(row["safe_to_retry"]))

    async def begin_action(
        self,
        *,
        command_id: str,
        operation: str,
        params: Mapping[str, Any],
        fleet: str,
        session_id: str,
        worker: str,
        name: str,
        risk: str,
        cost: float,
        critical: bool,
        safe_to_retry: bool,
        rule: str,
        correlation_id: str | None,
        agent_id: str | None,
        switches: SwitchTarget,
        host: str | None = None,
        owner: str | None = None,
        identity: Mapping[str, str] | None = None,
        model: str | None = None,
        tokens: int = 0,
        decision: str | None = None,
        grant_ids: Sequence[str] = (),
        token_charges: Sequence[TokenCharge] = (),
    ) -> tuple[str, dict[str, Any]]:
        """The durable "started" record, the budget reservation and the fleet/session/worker
        kill-switch check, in one transaction. Returns (status, stored or new result) where status
        is "started", "budget" (no room), "killswitch" (a store switch forbids), or "replay"."""
        from ..events import ACTION_STARTED

        params_json = canonical_json(dict(params))
        digest = params_digest(operation, params_json)
        # A retry after a lost acknowledgement finds this call's own claim by its mark: the
        # start is this call's (its effect may run), not a concurrent twin's.
        mark = call_mark()
        claim = _started_claim(mark)
        landed: dict[str, Any] = {}  # the grant and the start time the claim's attempt wrote
        if self.backend.one_statement_writes and not grant_ids and not token_charges:
            landed["at"] = self.clock.now()
            at_once = await self._begin_at_once(
                command_id=command_id, operation=operation, params_json=params_json,
                digest=digest, claim=claim, now=landed["at"], fleet=fleet,
                session_id=session_id, worker=worker, name=name, risk=risk, cost=cost,
                critical=critical, safe_to_retry=safe_to_retry, rule=rule,
                correlation_id=correlation_id, agent_id=agent_id, switches=switches, host=host,
                owner=owner, identity=identity, model=model, tokens=tokens, decision=decision,
            )  # fmt: skip
            if at_once is not None:
                return at_once

        refused: dict[str, str] = {}

        async def attempt(_n: int) -> tuple[str, dict[str, Any]]:
            async with self._transaction() as tx:
                # The ledger row first: a racing twin waits on it and comes back as a replay.
                found = await self.claim_in(tx, command_id, operation, digest, claim)
                if (
                    found is not None
                    and found[1] == mark
                    and await self._still_ours_in(
                        tx, command_id, host=host, owner=owner, started_at=landed.get("at")
                    )
                ):  # an attempt of ours landed, and nothing moved its record since
                    return "started", {"status": "started", "grant": landed.get("grant")}
                if found is not None:
                    return "replay", found[0]
                grant = landed["grant"] = await self._may_start_in(
                    tx, command_id=command_id, fleet=fleet, session_id=session_id, cost=cost,
                    switches=switches, refused=refused, grant_ids=grant_ids,
                    token_charges=token_charges,
                )  # fmt: skip
                now = landed["at"] = self.clock.now()  # after any wait for the window's row
                await tx.execute(
                    "insert_action", command_id, fleet, session_id, worker, name, params_json,
                    risk, cost, critical, safe_to_retry, rule, now, host, owner,
                    canonical_json(dict(identity)) if identity else None, model, tokens, decision,
                )  # fmt: skip
                await self.append_in(tx, NewEvent(
                    kind=ACTION_STARTED, session_id=session_id, command_id=command_id,
                    payload={"action": name, "risk": risk, "cost": cost, "rule": rule},
                    correlation_id=correlation_id, worker=worker, agent_id=agent_id,
                ), now)  # fmt: skip
            return "started", {"status": "started", "grant": grant}

        try:
            # A retry after a lost connection is safe: a start that did commit left its ledger
            # row, and the retry comes back as a replay instead of starting it again.
            return await self.retrying(
                attempt, what=operation, tries=COMMAND_TRIES, command_id=command_id
            )
        except _Refused:
            return refused["reason"], dict(refused)

    @staticmethod
    async def _still_ours_in(
        tx: Tx, command_id: str, *, host: str | None, owner: str | None,
        started_at: datetime | None,
    ) -> bool:  # fmt: skip
        """Whether the started record this call's landed attempt wrote is still open and the
        same one: a peer's recovery may have marked it in-doubt meanwhile (this host's
        heartbeat was stale past the lease), and a re-run (elsewhere, or here by another task)
        may have started it again; then its effect may not run for this call (a replay:
        refused in doubt)."""
        row = await tx.fetchrow("get_action", command_id)
        return (
            row is not None
            and row["status"] == "started"
            and row["host"] == host
            and row["owner"] == owner
            and started_at is not None
            and row["started_at"] == started_at
        )

    async def _begin_at_once(
        self, *, command_id: str, operation: str, params_json: str, digest: str, claim: str,
        now: datetime, fleet: str,
        session_id: str, worker: str, name: str, risk: str, cost: float, critical: bool,
        safe_to_retry: bool, rule: str, correlation_id: str | None, agent_id: str | None,
        switches: SwitchTarget, host: str | None, owner: str | None,
        identity: Mapping[str, str] | None, model: str | None, tokens: int,
        decision: str | None,
    ) -> tuple[str, dict[str, Any]] | None:  # fmt: skip
        """The started record in one statement (Postgres: acp_begin_action), decided on the
        switch rows as last read, which the statement finds unchanged under the fleet's switch
        lock or writes nothing. None: take the general path, which decides everything again in
        one transaction of its own: the switches moved or forbid, the host file forbids as the
        batch is sent, a fence, a twin in the same batch that was refused ("again"), or the
        batch's statement failed (a lost connection: the ledger finds a start that landed, by
        `claim`'s mark this call's; any other error rolled the whole statement back, and this
        start may not be the one that caused it)."""
        from ..events import ACTION_STARTED

        if current_fence.get() is not None:
            return None
        print_, records = await self._switch_print(fleet)
        if switch_verdict(records, switches) is not None:  # the host file too
            self.switch_cache.prints.pop(fleet, None)  # decided again on fresh rows next time
            return None  # the general path refuses, after what the ledger knows
        try:
            row = await self.backend.batched("begin_action", order=session_id,
                                             still=partial(host_permits, switches), args=(
                command_id, operation, digest, claim,
                now, print_, fleet, session_id, worker, name, params_json, risk,
                cost, critical, safe_to_retry, rule, host, owner,
                canonical_json(dict(identity)) if identity else None, model, tokens, decision,
                ACTION_STARTED,
                canonical_json({"action": name, "risk": risk, "cost": cost, "rule": rule}),
                correlation_id, agent_id,
            ))  # fmt: skip
        except StoreError:
            return None
        if row is None:  # the host file forbade it as the batch was sent: nothing written
            return None
        status = row["status"]
        if status == "started":
            return "started", {"status": "started", "grant": None}
        if status == "replay":
            return "replay", self._stored(command_id, row, operation, digest)
        if status in ("budget", "no_window"):
            return status, {"reason": status}
        if status == "switches":  # they moved since last read
            self.switch_cache.prints.pop(fleet, None)
        return None  # (or "again": a twin in its batch claimed it and was refused)

    async def _switch_print(self, fleet: str) -> tuple[str, list[SwitchRecord]]:
        """The fleet's switch rows and their fingerprint: as last read, else read now."""
        known = self.switch_cache.prints.get(fleet)
        if known is not None:
            return known
        async with self.backend.reader() as tx:
            return await switches_with_print(tx, fleet, self.switch_cache)

    async def _may_start_in(
        self, tx: Tx, *, command_id: str, fleet: str, session_id: str, cost: float,
        switches: SwitchTarget, refused: dict[str, str],
        grant_ids: Sequence[str] = (), token_charges: Sequence[TokenCharge] = (),
    ) -> str | None:  # fmt: skip
        """What a started record needs, checked where it is written: the store's switches, a
        reservation in an open window and, when the action counts on window-scoped approvals,
        one use of the first of `grant_ids` with room left (returned). Raises _Refused with the
        reason in `refused`; "grant_spent" when every grant was spent meanwhile."""
        problem = switch_verdict(await switches_in(tx, fleet, self.switch_cache), switches)
        if problem is not None:
            refused.update(reason="killswitch", detail=problem)
            raise _Refused()
        if await tx.fetchval("reserve_budget", session_id, cost, self.clock.now()) is None:
            session = await tx.fetchrow("get_session", session_id)
            window_open = (
                session is not None
                and session["status"] == "open"
                and session["ends_at"] > self.clock.now()
            )
            refused["reason"] = "budget" if window_open else "no_window"
            raise _Refused()
        over = await reserve_tokens_in(tx, command_id, token_charges)
        if over is not None:
            refused.update(reason="token_budget", detail=over.label, period=over.key.period_key)
            raise _Refused()
        for grant in grant_ids:
            if await tx.fetchrow("use_approval", cost, grant, cost) is not None:
                return grant
        if grant_ids:
            refused["reason"] = "grant_spent"
            raise _Refused()
        return None

    async def restart_action(
        self,
        *,
        command_id: str,
        fleet: str,
        session_id: str,
        worker: str,
        name: str,
        risk: str,
        cost: float,
        rule: str,
        correlation_id: str | None,
        agent_id: str | None,
        switches: SwitchTarget,
        host: str | None = None,
        owner: str | None = None,
        grant_ids: Sequence[str] = (),
        token_charges: Sequence[TokenCharge] = (),
    ) -> tuple[str, dict[str, Any]]:
        """A new started record for an action that was halted, or in-doubt and safe to retry,
        under its command_id: the same checks as `begin_action` (marking it in-doubt released
        its reservation, so it reserves again in the current window), the same statuses, one
        transaction. "replay" when a concurrent re-run started it first."""
        from ..events import ACTION_STARTED

        refused: dict[str, str] = {}
        try:
            async with self._transaction() as tx:
                grant = await self._may_start_in(
                    tx, command_id=command_id, fleet=fleet, session_id=session_id, cost=cost,
                    switches=switches, refused=refused, grant_ids=grant_ids,
                token_charges=token_charges,
                )  # fmt: skip
                if await tx.fetchrow("restart_action", self.clock.now(), session_id, host, owner,
                                     command_id) is None:  # fmt: skip
                    refused["reason"] = "replay"
                    raise _Refused()
                await self.append_in(tx, NewEvent(
                    kind=ACTION_STARTED, session_id=session_id, command_id=command_id,
                    payload={"action": name, "risk": risk, "cost": cost, "rule": rule,
                             "rerun": True},
                    correlation_id=correlation_id, worker=worker, agent_id=agent_id,
                ))  # fmt: skip
        except _Refused:
            return refused["reason"], dict(refused)
        return "started", {"status": "started", "grant": grant}

    async def finish_action(
        self,
        *,
        command_id: str,
        session_id: str,
        ok: bool,
        cost: float,
        result: Any = None,
        error: str | None = None,
        worker: str | None = None,
        correlation_id: str | None = None,
        status: str | None = None,
        reason: str | None = None,
        stop_target: SwitchTarget | None = None,
        halt_all_stops: bool = False,
        fleet: str = "",
        tokens_held: bool = False,
        tokens_used: int | None = None,
    ) -> str | None:
        """The outcome record: action row, budget charge (success) or release, event, ledger.

        With `stop_target`, the switches that reach the action (the host file it names, the
        store's, read on Postgres under the fleet's shared switch lock, so an engage and this
        outcome serialize) are read inside the transaction, again on every attempt: if one now
        stops effects in flight (emergency; halt_all with `halt_all_stops`), the action is
        recorded in-doubt instead and that verdict is returned: no success lands after such an
        engage returned. `tokens_held`: the action may hold token charges (it names an identity
        and an estimate); they are settled to `tokens_used` (a success) or given back. An
        in-doubt action keeps them."""
        from ..events import ACTION_FAILED, ACTION_SUCCEEDED

        final = status or ("succeeded" if ok else "failed")
        error = storable_text(error)  # a worker's words: an effect's error text is theirs
        encoded = result_json(result)

        stopped: list[str] = []
        at_once = self.backend.one_statement_writes and not tokens_held

        async def attempt(n: int) -> None:
            if at_once and n == 0 and await self._finish_at_once(
                command_id=command_id, session_id=session_id, final=final, ok=ok, cost=cost,
                encoded=encoded, error=error, worker=worker, correlation_id=correlation_id,
                reason=reason, stop_target=stop_target, halt_all_stops=halt_all_stops,
                fleet=fleet,
            ):  # fmt: skip
                return
            async with self._transaction() as tx:
                now = self.clock.now()
                if n > 0:
                    landed = await tx.fetchrow("get_action", command_id)
                    if landed is not None and landed["status"] in (final, "in_doubt"):
                        # The earlier attempt committed before its connection went.
                        if landed["status"] == "in_doubt" and final != "in_doubt":
                            stopped.append("killswitch")
                        return
                problem = None
                if stop_target is not None:
                    problem = stopping_switch(await switches_in(tx, fleet, self.switch_cache), stop_target,
                                              halt_all_stops=halt_all_stops)  # fmt: skip
                if problem is not None:
                    reported = json.loads(encoded) if encoded is not None else None
                    await self._in_doubt_in(tx, command_id=command_id, session_id=session_id,
                                            cost=cost, worker=worker, reason="killswitch",
                                            payload={"stopped_by": problem, "reported": reported,
                                                     "reported_error": error})  # fmt: skip
                    stopped.append(problem)
                    return
                if await tx.fetchval("finish_action", final, now, encoded, error,
                                     command_id) is None:  # fmt: skip
                    raise StateWriteError(f"action {command_id} has no open started record")
                if ok:
                    await tx.execute("settle_budget", session_id, cost)
                else:
                    await tx.execute("release_budget", session_id, cost)
                if tokens_held:
                    await settle_tokens_in(tx, command_id, spent=ok, tokens_used=tokens_used)
                await self.append_in(
                    tx,
                    NewEvent(
                        kind=ACTION_SUCCEEDED if ok else ACTION_FAILED,
                        session_id=session_id,
                        reason=reason,
                        payload={"status": final, "error": error},
                        command_id=command_id,
                        correlation_id=correlation_id,
                        worker=worker,
                    ),
                )

        # The effect has run: its outcome is known, so it is written until it lands. Only a
        # daemon that stops first leaves the started record open (in-doubt after recovery).
        await self.retrying(attempt, what="action.outcome", tries=None, command_id=command_id)
        return stopped[0] if stopped else None

    async def _finish_at_once(
        self, *, command_id: str, session_id: str, final: str, ok: bool, cost: float,
        encoded: str | None, error: str | None, worker: str | None, correlation_id: str | None,
        reason: str | None, stop_target: SwitchTarget | None, halt_all_stops: bool, fleet: str,
    ) -> bool:  # fmt: skip
        """The outcome in one statement (Postgres: acp_finish_action); with `stop_target`,
        decided on the switch rows as last read, which the statement finds unchanged under the
        fleet's switch lock or writes nothing. False: nothing was written, take the general
        path (the switches moved or one stops this effect, the host file does as the batch is
        sent, no open record, a fence, a batch statement that failed other than by a lost
        connection, which is raised for `retrying`: the general path then finds whether it
        landed)."""
        from ..events import ACTION_FAILED, ACTION_SUCCEEDED

        if current_fence.get() is not None:
            return False
        print_ = None
        still = None
        if stop_target is not None:
            print_, records = await self._switch_print(fleet)
            if stopping_switch(records, stop_target, halt_all_stops=halt_all_stops):
                self.switch_cache.prints.pop(fleet, None)  # fresh rows next time
                return False  # the general path records it in-doubt
            still = partial(host_lets_finish, stop_target, halt_all_stops=halt_all_stops)
        args = (
            command_id, session_id, final, self.clock.now(),
            encoded, error, cost, ok, print_,
            fleet, ACTION_SUCCEEDED if ok else ACTION_FAILED, reason,
            canonical_json({"status": final, "error": error}), correlation_id, worker,
        )  # fmt: skip
        try:
            row = await self.backend.batched("finish_action", order=session_id, still=still,
                                             args=args)  # fmt: skip
        except StoreError as exc:
            if exc.transient:
                raise
            return False  # rolled back with its whole batch: written again on its own
        if row is None:
            return False
        if row["status"] == "switches":
            self.switch_cache.prints.pop(fleet, None)
        return bool(row["status"] == "done")

    async def mark_in_doubt(
        self, *, command_id: str, session_id: str, cost: float, worker: str | None,
        reason: str, payload: Mapping[str, Any],
    ) -> bool:  # fmt: skip
        """A started action whose outcome is unknown (its effect was stopped mid-way): in-doubt,
        its reservation released, shown to operators. False when it was not open."""
        async with self._transaction() as tx:
            return await self._in_doubt_in(tx, command_id=command_id, session_id=session_id,
                                           cost=cost, worker=worker, reason=reason,
                                           payload=payload)  # fmt: skip

    async def _in_doubt_in(
        self, tx: Tx, *, command_id: str, session_id: str, cost: float, worker: str | None,
        reason: str, payload: Mapping[str, Any],
    ) -> bool:  # fmt: skip
        from ..events import ACTION_IN_DOUBT

        if await tx.fetchrow("mark_in_doubt", command_id) is None:
            return False
        await tx.execute("release_budget", session_id, cost)
        await self.append_in(tx, NewEvent(
            kind=ACTION_IN_DOUBT, session_id=session_id, reason=reason, command_id=command_id,
            worker=worker, payload=_json_safe(dict(payload)),
        ))  # fmt: skip
        return True

    async def get_action(self, command_id: str) -> ActionRow | None:
        row = await self._fetchrow("get_action", command_id)
        return ActionRow.from_row(row) if row is not None else None

    async def actions_with_status(
        self, *, fleet: str, status: ActionStatus, limit: int = 10_000
    ) -> list[ActionRow]:
        """The fleet's actions in `status`, oldest first."""
        query = "unfinished_actions" if status in _UNFINISHED else "actions_with_status"
        rows = await self._fetchall(query, fleet, status.value, limit)
        return [ActionRow.from_row(r) for r in rows]

    async def orphan_candidates(
        self, *, fleet: str, host: str | None, live_after: datetime | None, limit: int = 100_000
    ) -> list[ActionRow]:
        """Started actions a recovery scan may find abandoned. With several hosts (`host` and
        `live_after` given): only this host's, those recording no host, and those of hosts whose
        heartbeat stopped before `live_after`; a live host's in-flight actions are its own."""
        if host is not None and live_after is not None:
            rows = await self._fetchall("stale_started_actions", fleet, host, live_after, limit)
        else:
            rows = await self._fetchall("unfinished_actions", fleet, "started", limit)
        return [ActionRow.from_row(r) for r in rows]

    async def count_actions_by_status(self, fleet: str) -> dict[ActionStatus, int]:
        rows = await self._fetchall("count_actions_by_status", fleet)
        return {ActionStatus(r["status"]): int(r["n"]) for r in rows}

    async def resolve_in_doubt(self, *, command_id: str, done: bool, by: str) -> ActionRow | None:
        """An operator's verdict on an in-doubt action, with its event, in one transaction:
        done charges the window's budget (the reservation was released when it went in-doubt)
        and keeps its token holds counted; failed gives the tokens back. None when the action is not in-doubt (unknown, or resolved meanwhile)."""
        from ..events import ACTION_RESOLVED

        async with self._transaction() as tx:
            row = await tx.fetchrow("get_action", command_id)
            if row is None or row["status"] != ActionStatus.IN_DOUBT:
                return None
            status = ActionStatus.RESOLVED_DONE if done else ActionStatus.RESOLVED_FAILED
            now = self.clock.now()
            if await tx.fetchrow("resolve_action", status.value, by, now, command_id) is None:
                return None
            if done:
                await tx.execute("charge_budget", float(row["cost"]), row["session_id"])
            # Its token holds: counted as spent (done) or given back (failed).
            await settle_tokens_in(tx, command_id, spent=done, tokens_used=None)
            await self.append_in(tx, NewEvent(
                kind=ACTION_RESOLVED, session_id=row["session_id"],
                payload={"as": "done" if done else "failed", "by": by},
                command_id=command_id, worker=row["worker"],
            ))  # fmt: skip
        return ActionRow.from_row({**row, "status": status.value, "resolved_by": by,
                                   "finished_at": now})  # fmt: skip

    async def proposal_rows(self, session_id: str) -> tuple[list[Row], list[Row]]:
        """What `policy replay` reads of one window, in one read-only snapshot: its action rows
        and its ACTION_DENIED and APPROVAL_REQUESTED events (payloads still JSON text)."""
        rows = await self.read_off_loop(
            [("replay_actions", (session_id,)), ("replay_refusals", (session_id,))], list
        )
        return rows[0], rows[1]


# The statuses the partial index `actions_unfinished` covers.
_UNFINISHED = frozenset({ActionStatus.STARTED, ActionStatus.IN_DOUBT})


def storable_text(text: str | None) -> str | None:
    """Text a worker chose (an effect's error) as every backend can store it: Postgres text
    holds no NUL character, and one NUL made the whole outcome fail to write."""
    if text is None or "\x00" not in text:
        return text
    return text.replace("\x00", "\\x00")


def result_json(value: Any) -> str | None:
    """An effect's result as stored: its JSON, or when it has none the JSON of its repr (a
    result is never dropped); None stays NULL."""
    if value is None:
        return None
    try:
        return canonical_json(value)
    except (UsageError, RecursionError):  # not JSON, or nested too deep to encode
        pass
    try:
        return canonical_json(repr(value))
    except Exception:  # a repr that raises (an int past Python's digit limit, say)
        return canonical_json(f"<{type(value).__name__} without a representation>")


def _json_safe(value: dict[str, Any]) -> dict[str, Any]:
    try:
        canonical_json(value)
        return value
    except Exception:
        return {k: repr(v) for k, v in value.items()}


class _Refused(Exception):
    """Internal: roll back a begin_action transaction that must not start."""

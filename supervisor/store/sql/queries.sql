-- Named queries shared by both dialects. Placeholders are written `?`; the Postgres backend
-- rewrites them to $1, $2, ... when it loads this file. A dialect whose SQL must differ puts a
-- query of the same name in sql/<dialect>/queries.sql, which wins.

-- name: get_command
SELECT operation, params_hash, result FROM commands WHERE command_id = ?;

-- name: insert_command
INSERT INTO commands (command_id, operation, params_hash, result, created_at) VALUES (?, ?, ?, ?, ?);

-- name: claim_command
-- The ledger row first: a racing twin's claim waits for this transaction and then finds it.
INSERT INTO commands (command_id, operation, params_hash, result, created_at) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (command_id) DO NOTHING
RETURNING command_id;

-- insert_event (the event and its sequence number in one statement) differs by dialect: see
-- sql/<dialect>/queries.sql. It also keeps each stream's row (Postgres; SQLite derives the
-- number from the events' own index).

-- name: replay_events
SELECT * FROM events WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT ?;

-- name: events_by_command
SELECT * FROM events WHERE command_id = ? ORDER BY session_id, seq;

-- name: insert_session
INSERT INTO sessions (id, fleet, window_key, starts_at, ends_at, status, max_cost, max_actions,
                      opened_by, opened_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO NOTHING;

-- name: get_session
SELECT * FROM sessions WHERE id = ?;

-- name: close_session
UPDATE sessions SET status = ?, closed_by = ?, closed_at = ?
WHERE id = ? AND status = 'open' RETURNING id;

-- name: open_sessions
SELECT * FROM sessions WHERE fleet = ? AND status = 'open' ORDER BY starts_at;

-- name: overdue_sessions
SELECT * FROM sessions WHERE fleet = ? AND status = 'open' AND ends_at <= ? ORDER BY starts_at;

-- name: list_sessions
SELECT * FROM sessions WHERE fleet = ? ORDER BY starts_at DESC LIMIT ?;

-- name: latest_session
SELECT * FROM sessions WHERE fleet = ? ORDER BY starts_at DESC LIMIT 1;

-- name: reserve_budget
-- (session, cost, now): room for one action in an open window, or no row. On Postgres the
-- rule is acp_reserve_budget (migration 0010), which the one-statement start calls too.
UPDATE sessions
SET reserved_cost = reserved_cost + ?2, reserved_actions = reserved_actions + 1
WHERE id = ?1 AND status = 'open'
  AND (max_cost IS NULL OR used_cost + reserved_cost + ?2 <= max_cost)
  AND (max_actions IS NULL OR used_actions + reserved_actions + 1 <= max_actions)
  AND ends_at > ?3
RETURNING 1 AS ok;

-- name: settle_budget
-- (session, cost): the reservation charged (a success).
UPDATE sessions
SET reserved_cost = reserved_cost - ?2, reserved_actions = reserved_actions - 1,
    used_cost = used_cost + ?2, used_actions = used_actions + 1
WHERE id = ?1;

-- name: release_budget
-- (session, cost): the reservation given back.
UPDATE sessions SET reserved_cost = reserved_cost - ?2, reserved_actions = reserved_actions - 1
WHERE id = ?1;

-- name: insert_action
INSERT INTO actions (command_id, fleet, session_id, worker, name, params, risk, cost, critical,
                     safe_to_retry, status, rule, started_at, host, owner, identity, model,
                     tokens, decision)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'started', ?, ?, ?, ?, ?, ?, ?, ?);

-- name: lookup_action
SELECT c.operation, c.params_hash, a.status, a.result, a.error, a.safe_to_retry, a.resolved_by
FROM commands c LEFT JOIN actions a ON a.command_id = c.command_id
WHERE c.command_id = ?;

-- name: get_action
SELECT * FROM actions WHERE command_id = ?;

-- name: finish_action
UPDATE actions SET status = ?, finished_at = ?, result = ?, error = ?
WHERE command_id = ? AND status = 'started' RETURNING command_id;

-- name: actions_with_status
SELECT * FROM actions WHERE fleet = ? AND status = ? ORDER BY started_at LIMIT ?;

-- name: unfinished_actions
-- started or in_doubt only: the IN term repeats the partial index's predicate verbatim, which
-- SQLite needs to use actions_unfinished (and Postgres needs for a generic plan).
SELECT * FROM actions WHERE fleet = ? AND status = ? AND status IN ('started', 'in_doubt')
ORDER BY started_at LIMIT ?;

-- name: mark_in_doubt
UPDATE actions SET status = 'in_doubt' WHERE command_id = ? AND status = 'started'
RETURNING command_id;

-- name: restart_action
UPDATE actions SET status = 'started', started_at = ?, session_id = ?, host = ?, owner = ?
WHERE command_id = ? AND status IN ('in_doubt', 'halted')
RETURNING command_id;

-- name: resolve_action
UPDATE actions SET status = ?, resolved_by = ?, finished_at = ?
WHERE command_id = ? AND status = 'in_doubt' RETURNING command_id;

-- name: insert_approval
INSERT INTO approvals (id, idempotency_key, fleet, session_id, worker, agent_id, action, params,
                       params_hash, risk, cost, status, tier, created_at, deadline, next_check_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?);

-- name: get_approval
SELECT * FROM approvals WHERE id = ?;

-- name: get_approval_by_key
SELECT * FROM approvals WHERE fleet = ? AND idempotency_key = ?;

-- name: decide_approval
UPDATE approvals
SET status = ?, decided_by = ?, decided_at = ?, reason = ?, next_check_at = NULL,
    scope = ?, max_uses = ?, max_cost = ?
WHERE id = ? AND status = 'pending' RETURNING id;

-- name: decide_pending_approval
-- An operator's decision, fenced in the statement: refused once the deadline has passed by the
-- instant given (SQLite: the deciding process's clock; Postgres overrides it with now()), and
-- only for an approval of the deciding fleet.
UPDATE approvals
SET status = ?, decided_by = ?, decided_at = ?, reason = ?, next_check_at = NULL,
    scope = ?, max_uses = ?, max_cost = ?
WHERE id = ? AND fleet = ? AND status = 'pending' AND deadline > ? RETURNING id;

-- name: escalate_approval
UPDATE approvals SET tier = ?, next_check_at = ? WHERE id = ? AND status = 'pending'
RETURNING id;

-- name: due_approvals
SELECT * FROM approvals WHERE fleet = ? AND status = 'pending' AND next_check_at <= ?
ORDER BY next_check_at LIMIT ?;

-- name: list_approvals
SELECT * FROM approvals WHERE fleet = ? ORDER BY created_at DESC LIMIT ?;

-- name: use_approval
UPDATE approvals SET used_count = used_count + 1, used_cost = used_cost + ?
WHERE id = ? AND status = 'approved'
  AND (max_uses IS NULL OR used_count + 1 <= max_uses)
  AND (max_cost IS NULL OR used_cost + ? <= max_cost)
RETURNING id;

-- name: insert_checkpoint
INSERT INTO checkpoints (fleet, worker, cycle, session_id, state, counters, last_seq, created_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id;

-- name: latest_checkpoint
SELECT * FROM checkpoints WHERE fleet = ? AND worker = ? ORDER BY id DESC LIMIT 1;

-- name: get_checkpoint
SELECT * FROM checkpoints WHERE id = ?;

-- name: list_checkpoints
SELECT * FROM checkpoints WHERE fleet = ? ORDER BY id DESC LIMIT ?;

-- name: get_resume_point
SELECT checkpoint_id FROM resume_points WHERE fleet = ? AND worker = ?;

-- name: set_resume_point
INSERT INTO resume_points (fleet, worker, checkpoint_id) VALUES (?, ?, ?)
ON CONFLICT (fleet, worker) DO UPDATE SET checkpoint_id = excluded.checkpoint_id;

-- name: clear_resume_point
-- Only the pin that was used: an operator's newer restore, landed meanwhile, stays.
DELETE FROM resume_points WHERE fleet = ? AND worker = ? AND checkpoint_id = ?;

-- name: upsert_kill_switch
INSERT INTO kill_switches (fleet, scope, target, mode, reason, changed_by, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (fleet, scope, target) DO UPDATE
SET mode = excluded.mode, reason = excluded.reason, changed_by = excluded.changed_by,
    updated_at = excluded.updated_at;

-- name: kill_switches
SELECT * FROM kill_switches WHERE fleet = ? ORDER BY scope, target;

-- name: reserve_tokens
-- An action's estimate, only if the budget's period still has room for it (tokens and cost).
INSERT INTO token_usage (scope, identity, period_key, tokens, cost) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (scope, identity, period_key) DO UPDATE
SET tokens = token_usage.tokens + excluded.tokens, cost = token_usage.cost + excluded.cost
WHERE token_usage.tokens + excluded.tokens <= ? AND token_usage.cost + excluded.cost <= ?
RETURNING tokens;

-- name: adjust_tokens
UPDATE token_usage SET tokens = tokens + ?, cost = cost + ?
WHERE scope = ? AND identity = ? AND period_key = ?;

-- name: get_token_usage
SELECT tokens, cost FROM token_usage WHERE scope = ? AND identity = ? AND period_key = ?;

-- name: list_token_usage
SELECT * FROM token_usage ORDER BY scope, identity, period_key;

-- name: upsert_worker
INSERT INTO workers (fleet, name, host, state, restarts, last_error, cycle, session_id, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (fleet, name) DO UPDATE
SET host = excluded.host, state = excluded.state, restarts = excluded.restarts,
    last_error = excluded.last_error, cycle = excluded.cycle, session_id = excluded.session_id,
    updated_at = excluded.updated_at;

-- name: list_workers
SELECT * FROM workers WHERE fleet = ? ORDER BY name;

-- name: event_counts
SELECT e.session_id, e.kind, e.reason, count(*) AS n
FROM events e JOIN sessions s ON s.id = e.session_id
WHERE s.fleet = ?
GROUP BY e.session_id, e.kind, e.reason;

-- name: stream_counts
SELECT session_id, kind, reason, count(*) AS n FROM events WHERE session_id = ?
GROUP BY session_id, kind, reason;

-- name: schema_versions
SELECT version FROM schema_version ORDER BY version;

-- name: record_version
INSERT INTO schema_version (version, applied_at) VALUES (?, ?);

-- name: insert_run
INSERT INTO runs (id, fleet, horizon, simulated, seed, starts_at, ends_at, status, created_at)
VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?)
ON CONFLICT (id) DO NOTHING;

-- name: get_run
SELECT * FROM runs WHERE id = ?;

-- name: unfinished_run
SELECT * FROM runs WHERE fleet = ? AND horizon = ? AND simulated = ? AND status = 'running'
ORDER BY created_at DESC LIMIT 1;


-- name: finish_run
UPDATE runs SET status = 'finished', finished_at = ? WHERE id = ? AND status = 'running'
RETURNING id;

-- name: stream_seq
SELECT last_seq FROM streams WHERE id = ?;

-- name: count_actions_by_status
SELECT status, count(*) AS n FROM actions WHERE fleet = ? GROUP BY status;

-- name: count_pending_approvals
SELECT count(*) AS n, min(created_at) AS oldest_at FROM approvals WHERE fleet = ? AND status = 'pending';

-- name: charge_budget
UPDATE sessions SET used_cost = used_cost + ?, used_actions = used_actions + 1 WHERE id = ?;

-- name: next_approval_check
SELECT min(next_check_at) AS next_at FROM approvals WHERE fleet = ? AND status = 'pending';

-- name: get_host
SELECT * FROM hosts WHERE fleet = ? AND host_id = ?;

-- name: upsert_host
INSERT INTO hosts (fleet, host_id, instance, pid, started_at, heartbeat_at, status)
VALUES (?, ?, ?, ?, ?, ?, 'running')
ON CONFLICT (fleet, host_id) DO UPDATE
SET instance = excluded.instance, pid = excluded.pid, started_at = excluded.started_at,
    heartbeat_at = excluded.heartbeat_at, status = 'running';

-- name: host_heartbeat
UPDATE hosts SET heartbeat_at = ? WHERE fleet = ? AND host_id = ? AND instance = ?
RETURNING host_id;

-- name: host_stopped
UPDATE hosts SET status = 'stopped', heartbeat_at = ? WHERE fleet = ? AND host_id = ? AND instance = ?;

-- name: list_hosts
SELECT * FROM hosts WHERE fleet = ? ORDER BY host_id;

-- name: live_hosts
SELECT count(*) AS n FROM hosts WHERE fleet = ? AND status = 'running' AND heartbeat_at > ?;

-- name: acquire_lease
INSERT INTO leases (name, holder, token, expires_at) VALUES (?, ?, 1, ?)
ON CONFLICT (name) DO UPDATE
SET holder = excluded.holder,
    token = CASE WHEN leases.holder = excluded.holder THEN leases.token ELSE leases.token + 1 END,
    expires_at = excluded.expires_at
WHERE leases.holder = excluded.holder OR leases.expires_at <= ?
RETURNING token;

-- name: release_lease
UPDATE leases SET expires_at = ? WHERE name = ? AND holder = ?;

-- name: check_fence
SELECT token FROM leases WHERE name = ? AND holder = ? AND token = ? AND expires_at > ?;

-- name: list_leases
SELECT * FROM leases WHERE name LIKE ? ORDER BY name;

-- name: stale_started_actions
SELECT a.* FROM actions a
WHERE a.fleet = ? AND a.status = 'started' AND a.status IN ('started', 'in_doubt')
  AND (a.host IS NULL OR a.host = ? OR a.host NOT IN (
        SELECT h.host_id FROM hosts h
        WHERE h.fleet = a.fleet AND h.status = 'running' AND h.heartbeat_at > ?))
ORDER BY a.started_at LIMIT ?;

-- Alerts (supervisor/ops/alerts/engine.py). All three run on the events (session_id, kind, reason) index
-- and the sessions (fleet, starts_at) index.

-- name: alert_state
SELECT kind, count(*) AS n FROM events
WHERE session_id = ? AND reason = ? AND kind IN (?, ?)
GROUP BY kind;

-- name: alert_window_counts
SELECT kind, count(*) AS n FROM events
WHERE session_id = ? AND kind IN (?, ?, ?, ?)
GROUP BY kind;

-- name: alert_trailing_counts
SELECT session_id, kind, count(*) AS n FROM events
WHERE session_id IN (SELECT id FROM sessions
                     WHERE fleet = ? AND starts_at < ? AND status IN ('closed', 'recovered')
                     ORDER BY starts_at DESC LIMIT ?)
  AND kind IN (?, ?, ?, ?)
GROUP BY session_id, kind;

-- name: kill_switches_for_start
SELECT * FROM kill_switches WHERE fleet = ?;

-- name: ensure_fleet_switch
INSERT INTO kill_switches (fleet, scope, target, mode, reason, changed_by, updated_at)
VALUES (?, 'fleet', '', 'disengaged', 'initial state', 'acp-supervisor', ?)
ON CONFLICT (fleet, scope, target) DO NOTHING;

-- name: lock_fleet_switch
UPDATE kill_switches SET updated_at = updated_at
WHERE fleet = ? AND scope = 'fleet' AND target = '' RETURNING mode;

-- name: session_ids_by_prefix
-- The CLI accepts a unique id prefix (like git): ids of this fleet that start with it.
SELECT id FROM sessions WHERE fleet = ? AND substr(id, 1, ?) = ? ORDER BY id LIMIT 21;

-- name: approval_ids_by_prefix
SELECT id FROM approvals WHERE fleet = ? AND substr(id, 1, ?) = ? ORDER BY id LIMIT 21;

-- name: action_ids_by_prefix
SELECT command_id AS id FROM actions WHERE fleet = ? AND substr(command_id, 1, ?) = ?
ORDER BY command_id LIMIT 21;

-- The operator console (supervisor/store/console.py). Each read stays on an index, so the
-- overview and approvals pages cost the same with a million events as with a thousand.

-- name: console_in_doubt_count
SELECT count(*) AS n FROM actions
WHERE fleet = ? AND status = 'in_doubt' AND status IN ('started', 'in_doubt');

-- name: console_stream_kinds
SELECT * FROM events WHERE session_id = ? AND kind IN (?, ?, ?) ORDER BY seq DESC LIMIT ?;

-- name: console_window_counts
SELECT e.session_id, e.kind, e.reason, count(*) AS n FROM events e
WHERE e.session_id IN (SELECT id FROM sessions WHERE fleet = ? ORDER BY starts_at DESC LIMIT ?)
  AND e.kind IN (?, ?, ?, ?, ?, ?, ?)
GROUP BY e.session_id, e.kind, e.reason;

-- name: console_decided_approvals
SELECT * FROM approvals WHERE fleet = ? AND status <> 'pending' ORDER BY decided_at DESC LIMIT ?;

-- name: console_tail
-- Newest first; an empty filter value means "any". The fleet's windows and its system stream.
SELECT * FROM events
WHERE (session_id IN (SELECT id FROM sessions WHERE fleet = ?) OR session_id = ?)
  AND (? = '' OR worker = ?) AND (? = '' OR kind = ?) AND (? = '' OR session_id = ?)
  AND (? = '' OR command_id = ?) AND id < ?
ORDER BY id DESC LIMIT ?;

-- name: store_identity
SELECT id FROM store_identity;

-- name: host_switch_mark
SELECT seq FROM host_switch_marks WHERE fleet = ? AND host = ?;

-- name: raise_host_switch_mark
-- Only ever upward: a racing writer with a lower seq changes nothing.
INSERT INTO host_switch_marks (fleet, host, seq, updated_at) VALUES (?, ?, ?, ?)
ON CONFLICT (fleet, host) DO UPDATE SET seq = excluded.seq, updated_at = excluded.updated_at
WHERE host_switch_marks.seq < excluded.seq;

-- name: scoped_approvals
SELECT * FROM approvals
WHERE session_id = ? AND worker = ? AND action = ? AND scope = 'window' AND status = 'approved'
ORDER BY decided_at LIMIT 100;

-- name: set_approval_match
UPDATE approvals SET match_keys = ? WHERE id = ?;

-- name: count_pending_of_worker
SELECT count(*) AS n FROM approvals
WHERE fleet = ? AND worker = ? AND status = 'pending' AND idempotency_key <> ?;

-- name: replay_actions
-- The proposals a window admitted, as `policy replay` decides them again (read-only).
SELECT command_id, worker, name, params, risk, cost, identity, model, tokens, decision,
       started_at AS seen_at
FROM actions WHERE session_id = ?;

-- name: replay_refusals
-- Denials and approval requests of a window: the proposals that did not start at once.
SELECT command_id, payload, worker, created_at AS seen_at
FROM events WHERE session_id = ? AND kind IN ('ACTION_DENIED', 'APPROVAL_REQUESTED');

-- name: release_holder_leases
-- Every lease of one holder (a dead incarnation of a host that restarted), expired at once.
UPDATE leases SET expires_at = ? WHERE holder = ?;

-- Approvals (supervisor/store/approvals.py).

-- name: set_approval_next_check
-- When a pending approval is next looked at, its tier unchanged (escalate_approval moves both).
UPDATE approvals SET next_check_at = ? WHERE id = ? AND status = 'pending';

-- A fleet's activity, read beside a running daemon (supervisor/store/counts.py): the fleet's
-- windows and its system stream, on the events (session_id, kind, reason) index.

-- name: fleet_event_count_since
-- An empty reason means "any".
SELECT count(*) AS n FROM events
WHERE (session_id IN (SELECT id FROM sessions WHERE fleet = ?) OR session_id = ?)
  AND kind = ? AND (? = '' OR reason = ?) AND created_at > ?;

-- name: fleet_last_event_at
SELECT max(created_at) AS last_at FROM events
WHERE (session_id IN (SELECT id FROM sessions WHERE fleet = ?) OR session_id = ?) AND kind = ?;

-- name: stream_events_of_kind
SELECT * FROM events WHERE session_id = ? AND kind = ? ORDER BY seq DESC LIMIT ?;

-- name: count_actions_started_since
SELECT count(*) AS n FROM actions WHERE fleet = ? AND started_at > ?;

-- name: latest_run
-- The newest run of a fleet (simulated or not). Not named `last_run`: a checkpoint counter is,
-- and the store-boundary test flags any string outside the store equal to a query name.
SELECT * FROM runs WHERE fleet = ? AND simulated = ? ORDER BY ends_at DESC LIMIT 1;

-- name: fleet_pending_approvals
-- A fleet's pending approvals, oldest first. Not named `pending_approvals`: a JSON key of the
-- status, the overview and the emergency snapshot is, and the store-boundary test flags any
-- string outside the store equal to a query name.
SELECT * FROM approvals WHERE fleet = ? AND status = 'pending' ORDER BY created_at LIMIT ?;

-- name: insert_token_hold
INSERT INTO token_holds (command_id, scope, identity, period_key, tokens, cost)
VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (command_id, scope, identity, period_key) DO NOTHING;

-- name: token_holds_of
SELECT scope, identity, period_key, tokens, cost FROM token_holds WHERE command_id = ?;

-- name: delete_token_holds
DELETE FROM token_holds WHERE command_id = ?;

-- Postgres-only queries: the database's clock times leases across hosts.

-- name: db_now
SELECT now() AS now_at;

-- name: schema_table_exists
SELECT to_regclass('schema_version') IS NOT NULL AS ok;

-- name: notify_killswitch
SELECT pg_notify('acp_killswitch', ?);

-- name: kill_switches_for_start
-- Under the fleet's shared switch lock (migration 0008): an engage, which takes it exclusive,
-- waits for starts and outcomes in flight, and a start waits for an engage in flight, so no
-- action starts after an engage has returned. The lock is fair: a busy fleet cannot starve it.
SELECT * FROM acp_switches_for_start(?);

-- name: lock_fleet_switch
-- The fleet's switch lock, exclusive, until this transaction ends.
SELECT pg_advisory_xact_lock(4242, hashtext(?));

-- name: decide_pending_approval
-- The database's clock decides the deadline, not the caller's: a CLI whose clock is slow must
-- not approve an expired request. The caller passes NULL as the last instant for that; a
-- simulation (virtual clock) passes its simulated now instead.
UPDATE approvals
SET status = ?, decided_by = ?, decided_at = ?, reason = ?, next_check_at = NULL,
    scope = ?, max_uses = ?, max_cost = ?
WHERE id = ? AND fleet = ? AND status = 'pending' AND deadline > COALESCE(?::timestamptz, now())
RETURNING id;

-- name: insert_event
-- The stream's next sequence number and the event (acp_append_event, migration 0010).
SELECT acp_append_event(?, ?, ?, ?, ?, ?, ?, ?, ?, ?) AS seq;

-- name: insert_event_arrays
-- insert_event's rows as one array per column, in one statement (acp_append_events, migration
-- 0011): what Tx.executemany sends for insert_event.
SELECT acp_append_events(NULL, ?::text[], ?::text[], ?::text[], ?::text[], ?::bool[],
                         ?::text[], ?::text[], ?::text[], ?::text[], ?::timestamptz[]);

-- name: reserve_budget
SELECT 1 AS ok WHERE acp_reserve_budget(?, ?, ?);

-- name: settle_budget
SELECT acp_settle_budget(?, ?, true);

-- name: release_budget
SELECT acp_settle_budget(?, ?, false);

-- name: begin_action_batch
-- Started records, one array per argument of acp_begin_actions (migration 0011), in one
-- statement and so one transaction and one COMMIT (see PostgresBackend.batched).
SELECT status, operation, params_hash, result, print FROM acp_begin_actions(
    ?::text[], ?::text[], ?::text[], ?::text[], ?::timestamptz[], ?::text[], ?::text[],
    ?::text[], ?::text[], ?::text[], ?::text[], ?::text[], ?::float8[], ?::bool[], ?::bool[],
    ?::text[], ?::text[], ?::text[], ?::text[], ?::text[], ?::int8[], ?::text[], ?::text[],
    ?::text[], ?::text[], ?::text[]
) ORDER BY n;

-- name: begin_action_one
-- A batch of one: 0010's one-call function, fewer statements than the batch's for one call.
SELECT status, operation, params_hash, result, print FROM acp_begin_action(
    ?, ?, ?, ?, ?::timestamptz, ?, ?, ?, ?, ?, ?, ?, ?::float8, ?::bool, ?::bool, ?, ?, ?, ?, ?,
    ?::int8, ?, ?, ?, ?, ?
);

-- name: finish_action_batch
-- Outcomes, one array per argument of acp_finish_actions (migration 0011), in one statement.
SELECT status, print FROM acp_finish_actions(
    ?::text[], ?::text[], ?::text[], ?::timestamptz[], ?::text[], ?::text[], ?::float8[],
    ?::bool[], ?::text[], ?::text[], ?::text[], ?::text[], ?::text[], ?::text[], ?::text[]
) ORDER BY n;

-- name: finish_action_one
-- A batch of one (see begin_action_one).
SELECT status, print FROM acp_finish_action(
    ?, ?, ?, ?::timestamptz, ?, ?, ?::float8, ?::bool, ?, ?, ?, ?, ?, ?, ?
);

-- name: switches_with_print
SELECT * FROM acp_switches_with_print(?);


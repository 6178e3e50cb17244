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

-- name: reserve_budget
SELECT 1 AS ok WHERE acp_reserve_budget(?, ?, ?);

-- name: settle_budget
SELECT acp_settle_budget(?, ?, true);

-- name: release_budget
SELECT acp_settle_budget(?, ?, false);

-- name: begin_action_batch
-- Started records, one call of acp_begin_action (migration 0010) per element of the arrays, in
-- one statement and so one transaction and one COMMIT (see PostgresBackend.batched).
SELECT r.* FROM unnest(
    ?::text[], ?::text[], ?::text[], ?::text[], ?::timestamptz[], ?::text[], ?::text[],
    ?::text[], ?::text[], ?::text[], ?::text[], ?::text[], ?::float8[], ?::bool[], ?::bool[],
    ?::text[], ?::text[], ?::text[], ?::text[], ?::text[], ?::int8[], ?::text[], ?::text[],
    ?::text[], ?::text[], ?::text[]
) WITH ORDINALITY
AS t(a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19, a20,
     a21, a22, a23, a24, a25, a26, n)
CROSS JOIN LATERAL acp_begin_action(
    t.a1, t.a2, t.a3, t.a4, t.a5, t.a6, t.a7, t.a8, t.a9, t.a10, t.a11, t.a12, t.a13, t.a14,
    t.a15, t.a16, t.a17, t.a18, t.a19, t.a20, t.a21, t.a22, t.a23, t.a24, t.a25, t.a26
) AS r
ORDER BY t.n;

-- name: finish_action_batch
-- Outcomes, one call of acp_finish_action (migration 0010) per element, in one statement.
SELECT r.* FROM unnest(
    ?::text[], ?::text[], ?::text[], ?::timestamptz[], ?::text[], ?::text[], ?::float8[],
    ?::bool[], ?::text[], ?::text[], ?::text[], ?::text[], ?::text[], ?::text[], ?::text[]
) WITH ORDINALITY
AS t(a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, n)
CROSS JOIN LATERAL acp_finish_action(
    t.a1, t.a2, t.a3, t.a4, t.a5, t.a6, t.a7, t.a8, t.a9, t.a10, t.a11, t.a12, t.a13, t.a14,
    t.a15
) AS r
ORDER BY t.n;

-- name: switches_with_print
SELECT * FROM acp_switches_with_print(?);


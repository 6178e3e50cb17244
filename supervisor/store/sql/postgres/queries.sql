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
-- The stream's next sequence number and the event in one statement: the upsert locks the
-- stream's row, so concurrent appends to one stream take consecutive numbers.
WITH s AS (
    INSERT INTO streams (id, last_seq) VALUES (?, 1)
    ON CONFLICT (id) DO UPDATE SET last_seq = streams.last_seq + 1
    RETURNING id, last_seq
)
INSERT INTO events (session_id, seq, kind, reason, payload, state_bearing, command_id,
                    correlation_id, worker, agent_id, created_at)
SELECT s.id, s.last_seq, ?, ?, ?, ?, ?, ?, ?, ?, ? FROM s
RETURNING seq;

-- SQLite-only queries (they win over sql/queries.sql).

-- name: insert_event
-- The event with the next sequence number of its stream, in one statement: every write
-- transaction holds the database's write lock, so max(seq) cannot move under it, and the
-- (session_id, seq) index answers it in one probe. SQLite keeps no count in `streams`.
INSERT INTO events (session_id, seq, kind, reason, payload, state_bearing, command_id,
                    correlation_id, worker, agent_id, created_at)
VALUES (?1, (SELECT coalesce(max(seq), 0) + 1 FROM events WHERE session_id = ?1),
        ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
RETURNING seq;

-- name: stream_seq
SELECT coalesce(max(seq), 0) AS last_seq FROM events WHERE session_id = ?;

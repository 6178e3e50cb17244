-- Postgres-only queries: the database's clock times leases across hosts.

-- name: db_now
SELECT now() AS now_at;

-- name: schema_table_exists
SELECT to_regclass('schema_version') IS NOT NULL AS ok;

-- name: notify_killswitch
SELECT pg_notify('acp_killswitch', ?);

-- name: kill_switches_for_start
-- FOR SHARE: an engage (which locks the fleet row for update) waits for starts in flight, and
-- a start waits for an engage in flight, so no action starts after an engage has returned.
SELECT * FROM kill_switches WHERE fleet = ? FOR SHARE;

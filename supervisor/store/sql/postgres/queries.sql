-- Postgres-only queries: the database's clock times leases across hosts.

-- name: db_now
SELECT now() AS now_at;

-- name: notify_killswitch
SELECT pg_notify('acp_killswitch', ?);

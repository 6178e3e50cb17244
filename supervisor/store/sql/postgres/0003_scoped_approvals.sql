-- Window-scoped approvals are looked up per (session, worker, action) before a new request.
CREATE INDEX approvals_scoped ON approvals (session_id, worker, action) WHERE scope = 'window';

-- A window-scoped grant is bound to the params of the request it answered: NULL compares every
-- param, else a JSON array of the param keys the operator named (`approve --match k1,k2`).
ALTER TABLE approvals ADD COLUMN match_keys TEXT;
-- Pending approvals are counted per worker for the per-worker cap.
CREATE INDEX approvals_pending_worker ON approvals (fleet, worker) WHERE status = 'pending';

-- The process incarnation that started each action: recovery never touches an action whose
-- owner is the scanning process and still holds it in flight (decided by owner, not wall time).
ALTER TABLE actions ADD COLUMN owner TEXT;

-- Approval keys are scoped by fleet: the stored key is "<fleet>/<key>" (fleet names hold no
-- "/"), so a request in one fleet never finds another fleet's approval under the same key.
UPDATE approvals SET idempotency_key = fleet || '/' || idempotency_key;

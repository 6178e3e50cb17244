-- Everything a policy decided on is kept with the action, so `policy replay` can decide it again:
-- who asked (identity JSON), the model and token estimate, and the decision the policy gave.
ALTER TABLE actions ADD COLUMN identity TEXT;
ALTER TABLE actions ADD COLUMN model TEXT;
ALTER TABLE actions ADD COLUMN tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE actions ADD COLUMN decision TEXT;

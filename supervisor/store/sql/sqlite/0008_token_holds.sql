-- What each started action holds of each token budget it falls under: reserved with its started
-- record, settled (a success) or given back (a failure, a halt) with its outcome, and kept while
-- the action is in-doubt (it may have spent them) until an operator resolves it.
CREATE TABLE token_holds (
    command_id TEXT NOT NULL,
    scope TEXT NOT NULL,
    identity TEXT NOT NULL,
    period_key TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    cost REAL NOT NULL,
    PRIMARY KEY (command_id, scope, identity, period_key)
);

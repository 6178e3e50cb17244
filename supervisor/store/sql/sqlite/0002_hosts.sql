-- Several hosts in one fleet: who is alive, and which host started each action.
CREATE TABLE hosts (
    fleet TEXT NOT NULL,
    host_id TEXT NOT NULL,
    instance TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at TEXT NOT NULL,
    heartbeat_at TEXT NOT NULL,
    status TEXT NOT NULL,
    PRIMARY KEY (fleet, host_id)
);
ALTER TABLE actions ADD COLUMN host TEXT;

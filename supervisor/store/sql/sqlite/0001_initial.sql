-- Timestamps are ISO 8601 UTC text with microseconds ("...T..:..:..ffffff+00:00"), so text order is time order.
CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL);

CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    fleet TEXT NOT NULL,
    window_key TEXT NOT NULL,
    starts_at TEXT NOT NULL,
    ends_at TEXT NOT NULL,
    status TEXT NOT NULL,
    max_cost REAL,
    max_actions INTEGER,
    used_cost REAL NOT NULL DEFAULT 0,
    used_actions INTEGER NOT NULL DEFAULT 0,
    reserved_cost REAL NOT NULL DEFAULT 0,
    reserved_actions INTEGER NOT NULL DEFAULT 0,
    opened_by TEXT,
    opened_at TEXT,
    closed_by TEXT,
    closed_at TEXT,
    UNIQUE (fleet, window_key)
);
CREATE INDEX sessions_fleet_status ON sessions (fleet, status, ends_at);
CREATE INDEX sessions_fleet_start ON sessions (fleet, starts_at);

CREATE TABLE streams (id TEXT PRIMARY KEY, last_seq INTEGER NOT NULL DEFAULT 0);

CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    reason TEXT,
    payload TEXT NOT NULL,
    state_bearing INTEGER NOT NULL,
    command_id TEXT,
    correlation_id TEXT,
    worker TEXT,
    agent_id TEXT,
    created_at TEXT NOT NULL,
    UNIQUE (session_id, seq)
);
CREATE INDEX events_command ON events (command_id) WHERE command_id IS NOT NULL;
CREATE INDEX events_session_kind ON events (session_id, kind, reason);

CREATE TABLE commands (
    command_id TEXT PRIMARY KEY,
    operation TEXT NOT NULL,
    params_hash TEXT NOT NULL,
    result TEXT NOT NULL,
    created_at TEXT NOT NULL
);

CREATE TABLE actions (
    command_id TEXT PRIMARY KEY,
    fleet TEXT NOT NULL,
    session_id TEXT NOT NULL,
    worker TEXT NOT NULL,
    name TEXT NOT NULL,
    params TEXT NOT NULL,
    risk TEXT NOT NULL,
    cost REAL NOT NULL,
    critical INTEGER NOT NULL,
    safe_to_retry INTEGER NOT NULL,
    status TEXT NOT NULL,
    rule TEXT,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    result TEXT,
    error TEXT,
    resolved_by TEXT
);
CREATE INDEX actions_unfinished ON actions (fleet, status) WHERE status IN ('started', 'in_doubt');
CREATE INDEX actions_session ON actions (session_id, status);

CREATE TABLE approvals (
    id TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL UNIQUE,
    fleet TEXT NOT NULL,
    session_id TEXT NOT NULL,
    worker TEXT NOT NULL,
    agent_id TEXT,
    action TEXT NOT NULL,
    params TEXT NOT NULL,
    params_hash TEXT NOT NULL,
    risk TEXT NOT NULL,
    cost REAL NOT NULL,
    status TEXT NOT NULL,
    tier TEXT NOT NULL,
    created_at TEXT NOT NULL,
    deadline TEXT NOT NULL,
    next_check_at TEXT,
    decided_by TEXT,
    decided_at TEXT,
    reason TEXT,
    scope TEXT NOT NULL DEFAULT 'once',
    max_uses INTEGER,
    max_cost REAL,
    used_count INTEGER NOT NULL DEFAULT 0,
    used_cost REAL NOT NULL DEFAULT 0
);
CREATE INDEX approvals_pending ON approvals (fleet, next_check_at) WHERE status = 'pending';

CREATE TABLE checkpoints (
    id INTEGER PRIMARY KEY,
    fleet TEXT NOT NULL,
    worker TEXT NOT NULL,
    cycle INTEGER NOT NULL,
    session_id TEXT,
    state TEXT NOT NULL,
    counters TEXT NOT NULL,
    last_seq INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX checkpoints_worker ON checkpoints (fleet, worker, id);

CREATE TABLE resume_points (
    fleet TEXT NOT NULL,
    worker TEXT NOT NULL,
    checkpoint_id INTEGER NOT NULL,
    PRIMARY KEY (fleet, worker)
);

CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    token INTEGER NOT NULL,
    expires_at TEXT NOT NULL
);

CREATE TABLE kill_switches (
    fleet TEXT NOT NULL,
    scope TEXT NOT NULL,
    target TEXT NOT NULL,
    mode TEXT NOT NULL,
    reason TEXT NOT NULL,
    changed_by TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (fleet, scope, target)
);

CREATE TABLE token_usage (
    scope TEXT NOT NULL,
    identity TEXT NOT NULL,
    period_key TEXT NOT NULL,
    tokens INTEGER NOT NULL DEFAULT 0,
    cost REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, identity, period_key)
);

CREATE TABLE workers (
    fleet TEXT NOT NULL,
    name TEXT NOT NULL,
    host TEXT NOT NULL,
    state TEXT NOT NULL,
    restarts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    cycle INTEGER NOT NULL DEFAULT 0,
    session_id TEXT,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (fleet, name)
);

CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    fleet TEXT NOT NULL,
    horizon TEXT NOT NULL,
    simulated INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    starts_at TEXT NOT NULL,
    ends_at TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    finished_at TEXT
);
CREATE INDEX runs_fleet ON runs (fleet, simulated, status);

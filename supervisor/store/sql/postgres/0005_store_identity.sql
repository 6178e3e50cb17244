-- Which store this is: written once, when the schema is made (see the SQLite migration).
CREATE TABLE store_identity (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    id TEXT NOT NULL
);
INSERT INTO store_identity (one, id) VALUES (1, md5(random()::text || clock_timestamp()::text));
-- The highest host kill-switch seq each host accepted: the replay mark outlives the mark file.
CREATE TABLE host_switch_marks (
    fleet TEXT NOT NULL,
    host TEXT NOT NULL,
    seq BIGINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (fleet, host)
);

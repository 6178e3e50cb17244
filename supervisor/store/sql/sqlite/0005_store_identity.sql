-- Which store this is: written once, when the schema is made, and copied beside the database
-- file, so a deleted or replaced database is noticed instead of silently starting afresh.
CREATE TABLE store_identity (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    id TEXT NOT NULL
);
INSERT INTO store_identity (one, id) VALUES (1, lower(hex(randomblob(16))));
-- The highest host kill-switch seq each host accepted: the replay mark outlives the mark file.
CREATE TABLE host_switch_marks (
    fleet TEXT NOT NULL,
    host TEXT NOT NULL,
    seq INTEGER NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (fleet, host)
);

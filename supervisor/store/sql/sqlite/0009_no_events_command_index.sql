-- events_command indexed every event by its command_id, a hash: each insert landed on a random
-- leaf of an index as large as the event log, and on a store of a million events those leaves
-- (one per event, three per governed action) were the database writes that cost the most. No
-- hot path reads events by command_id (the ledger, the actions and the approvals are keyed by
-- it); the one read that does, events_for_command, scans off the event loop.
DROP INDEX IF EXISTS events_command;

-- The kill switch's lock is fair. Starts and outcomes held the fleet switch row FOR SHARE and an
-- engage waited for it FOR UPDATE; a row lock queues nobody, so a busy fleet, whose starts
-- always overlap, kept an engage waiting until it timed out. Starts and outcomes now take a
-- shared advisory lock on the fleet's switches and the engage an exclusive one: the lock
-- manager queues new shared requests behind a waiting exclusive one.
-- VOLATILE: the read after the lock has a snapshot of its own, taken once the lock is held, so
-- it sees an engage that committed while this one waited.
CREATE FUNCTION acp_switches_for_start(for_fleet TEXT) RETURNS SETOF kill_switches
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(4242, hashtext(for_fleet));
    RETURN QUERY SELECT * FROM kill_switches WHERE fleet = for_fleet;
END
$$;

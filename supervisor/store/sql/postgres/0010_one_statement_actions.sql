-- An action's started record and its outcome, each one statement (one round trip, its own
-- transaction). They were five and four statements inside BEGIN ... COMMIT: seven and six round
-- trips, each holding the window's row and its stream's row locked the while.
--
-- The budget, the event sequence and the switches' fingerprint are functions here, called by
-- these two and by the named queries of the general path (sql/postgres/queries.sql), so each
-- rule has one text.

-- The window's budget: reserve room for one action, or nothing (false) when it is spent, closed,
-- or past its end.
CREATE FUNCTION acp_reserve_budget(p_session TEXT, p_cost DOUBLE PRECISION, p_now TIMESTAMPTZ)
RETURNS BOOLEAN LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    UPDATE sessions
    SET reserved_cost = reserved_cost + p_cost, reserved_actions = reserved_actions + 1
    WHERE id = p_session AND status = 'open'
      AND (max_cost IS NULL OR used_cost + reserved_cost + p_cost <= max_cost)
      AND (max_actions IS NULL OR used_actions + reserved_actions + 1 <= max_actions)
      AND ends_at > p_now;
    RETURN FOUND;
END
$$;

-- The reservation settled: charged (a success) or given back.
CREATE FUNCTION acp_settle_budget(p_session TEXT, p_cost DOUBLE PRECISION, p_charge BOOLEAN)
RETURNS VOID LANGUAGE sql VOLATILE AS $$
    UPDATE sessions
    SET reserved_cost = reserved_cost - p_cost, reserved_actions = reserved_actions - 1,
        used_cost = used_cost + CASE WHEN p_charge THEN p_cost ELSE 0 END,
        used_actions = used_actions + CASE WHEN p_charge THEN 1 ELSE 0 END
    WHERE id = p_session;
$$;

-- The event with its stream's next sequence number: the upsert locks the stream's row, so
-- concurrent appends to one stream take consecutive numbers.
CREATE FUNCTION acp_append_event(
    p_session TEXT, p_kind TEXT, p_reason TEXT, p_payload TEXT, p_state_bearing BOOLEAN,
    p_command_id TEXT, p_correlation_id TEXT, p_worker TEXT, p_agent_id TEXT, p_at TIMESTAMPTZ
) RETURNS BIGINT LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_seq BIGINT;
BEGIN
    INSERT INTO streams (id, last_seq) VALUES (p_session, 1)
    ON CONFLICT (id) DO UPDATE SET last_seq = streams.last_seq + 1
    RETURNING last_seq INTO v_seq;
    INSERT INTO events (session_id, seq, kind, reason, payload, state_bearing, command_id,
                        correlation_id, worker, agent_id, created_at)
    VALUES (p_session, v_seq, p_kind, p_reason, p_payload, p_state_bearing, p_command_id,
            p_correlation_id, p_worker, p_agent_id, p_at);
    RETURN v_seq;
END
$$;

-- What the fleet's switch rows say, as one value: the caller decided on rows whose fingerprint
-- it passes, and a statement that finds another one writes nothing (the caller reads the rows
-- again and decides again). The rule itself stays in the caller's code.
CREATE FUNCTION acp_switch_print(p_fleet TEXT) RETURNS TEXT LANGUAGE sql STABLE AS $$
    SELECT coalesce(md5(string_agg(scope || chr(31) || target || chr(31) || mode, chr(30)
                                   ORDER BY scope, target)), '')
    FROM kill_switches WHERE fleet = p_fleet;
$$;

-- The fleet's switch rows with their fingerprint, in one snapshot (a row of NULLs but the
-- fingerprint when there is none).
CREATE FUNCTION acp_switches_with_print(p_fleet TEXT)
RETURNS TABLE (print TEXT, scope TEXT, target TEXT, mode TEXT, reason TEXT, changed_by TEXT,
               updated_at TIMESTAMPTZ)
LANGUAGE sql STABLE AS $$
    SELECT acp_switch_print(p_fleet), k.scope, k.target, k.mode, k.reason, k.changed_by,
           k.updated_at
    FROM (SELECT 1) one LEFT JOIN kill_switches k ON k.fleet = p_fleet;
$$;

-- The started record: the ledger's claim (a racing twin waits on it, then finds it), the
-- switches unchanged under the fleet's shared switch lock (migration 0008), the budget
-- reservation, the action row and ACTION_STARTED. Status: started; replay (the command_id is
-- known: what the ledger holds comes back); switches (they changed: their new fingerprint comes
-- back); budget or no_window. Nothing is written unless the status is started.
CREATE FUNCTION acp_begin_action(
    p_command_id TEXT, p_operation TEXT, p_params_hash TEXT, p_claim TEXT, p_now TIMESTAMPTZ,
    p_print TEXT, p_fleet TEXT, p_session TEXT, p_worker TEXT, p_name TEXT, p_params TEXT,
    p_risk TEXT, p_cost DOUBLE PRECISION, p_critical BOOLEAN, p_safe_to_retry BOOLEAN,
    p_rule TEXT, p_host TEXT, p_owner TEXT, p_identity TEXT, p_model TEXT, p_tokens BIGINT,
    p_decision TEXT, p_kind TEXT, p_payload TEXT, p_correlation_id TEXT, p_agent_id TEXT
) RETURNS TABLE (status TEXT, operation TEXT, params_hash TEXT, result TEXT, print TEXT)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_print TEXT;
BEGIN
    INSERT INTO commands (command_id, operation, params_hash, result, created_at)
    VALUES (p_command_id, p_operation, p_params_hash, p_claim, p_now)
    ON CONFLICT (command_id) DO NOTHING;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'replay'::TEXT, c.operation, c.params_hash, c.result, NULL::TEXT
                     FROM commands c WHERE c.command_id = p_command_id;
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(4242, hashtext(p_fleet));
    v_print := acp_switch_print(p_fleet);
    IF v_print IS DISTINCT FROM p_print THEN
        DELETE FROM commands WHERE command_id = p_command_id;
        RETURN QUERY SELECT 'switches'::TEXT, NULL::TEXT, NULL::TEXT, NULL::TEXT, v_print;
        RETURN;
    END IF;
    IF NOT acp_reserve_budget(p_session, p_cost, p_now) THEN
        DELETE FROM commands WHERE command_id = p_command_id;
        RETURN QUERY SELECT CASE WHEN EXISTS (SELECT 1 FROM sessions s WHERE s.id = p_session
                                              AND s.status = 'open' AND s.ends_at > p_now)
                                 THEN 'budget' ELSE 'no_window' END,
                            NULL::TEXT, NULL::TEXT, NULL::TEXT, v_print;
        RETURN;
    END IF;
    INSERT INTO actions (command_id, fleet, session_id, worker, name, params, risk, cost,
                         critical, safe_to_retry, status, rule, started_at, host, owner,
                         identity, model, tokens, decision)
    VALUES (p_command_id, p_fleet, p_session, p_worker, p_name, p_params, p_risk, p_cost,
            p_critical, p_safe_to_retry, 'started', p_rule, p_now, p_host, p_owner,
            p_identity, p_model, p_tokens, p_decision);
    PERFORM acp_append_event(p_session, p_kind, NULL, p_payload, TRUE, p_command_id,
                             p_correlation_id, p_worker, p_agent_id, p_now);
    RETURN QUERY SELECT 'started'::TEXT, NULL::TEXT, NULL::TEXT, NULL::TEXT, v_print;
END
$$;

-- The outcome: the action row, the budget charged or given back, ACTION_SUCCEEDED or
-- ACTION_FAILED, under the fleet's shared switch lock (taken first, as every start takes it:
-- an engage queued for it then waits for this outcome, never the other way round). With a
-- fingerprint, the switches first: changed, nothing is written (status switches, with the new
-- fingerprint), so the caller can look whether one stops this effect. Status: done; switches;
-- not_open (no open started record: nothing written).
CREATE FUNCTION acp_finish_action(
    p_command_id TEXT, p_session TEXT, p_status TEXT, p_now TIMESTAMPTZ, p_result TEXT,
    p_error TEXT, p_cost DOUBLE PRECISION, p_ok BOOLEAN, p_print TEXT, p_fleet TEXT,
    p_kind TEXT, p_reason TEXT, p_payload TEXT, p_correlation_id TEXT, p_worker TEXT
) RETURNS TABLE (status TEXT, print TEXT) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_print TEXT;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(4242, hashtext(p_fleet));
    IF p_print IS NOT NULL THEN
        v_print := acp_switch_print(p_fleet);
        IF v_print IS DISTINCT FROM p_print THEN
            RETURN QUERY SELECT 'switches'::TEXT, v_print;
            RETURN;
        END IF;
    END IF;
    UPDATE actions SET status = p_status, finished_at = p_now, result = p_result, error = p_error
    WHERE command_id = p_command_id AND actions.status = 'started';
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'not_open'::TEXT, v_print;
        RETURN;
    END IF;
    PERFORM acp_settle_budget(p_session, p_cost, p_ok);
    PERFORM acp_append_event(p_session, p_kind, p_reason, p_payload, TRUE, p_command_id,
                             p_correlation_id, p_worker, NULL, p_now);
    RETURN QUERY SELECT 'done'::TEXT, v_print;
END
$$;

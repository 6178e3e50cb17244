-- A batch of starts or outcomes (one statement, one COMMIT) locks its window's row and its
-- stream's row once, last, for a few set-based statements. 0010's batches called one function
-- per action, so the first action's reservation locked the window's row (and its event the
-- stream's) while every later action of the batch ran its own statements: a batch of 25 held
-- both rows for about 25 actions' work, and the other batch (starts against outcomes) and every
-- checkpoint waited that long. Now the per-action work that locks nothing hot (ledger claims,
-- action rows) runs first; then the window rows, one UPDATE each, then the streams, one each,
-- then the events. A batch takes its hot rows in the order of their ids, windows before
-- streams (a telemetry backlog or a checkpoint over several streams may not: a
-- deadlock there is broken by the server, and the loser is written again or counted). 0010's
-- functions stay: a host still running the previous version calls them until it restarts (a
-- restarted one refuses this schema).
--
-- The rules keep one text each: the budget's room (acp_budget_room), the settlement
-- (acp_settle_budget_many), the sequence numbers (acp_take_seqs); 0010's one-action functions
-- are redefined on them. Reservations and settlements of a batch are applied one after
-- another, in call order, so their sums are those of as many one-action statements.

-- Whether a window has room for one more action of `p_cost`, given its row's values.
CREATE FUNCTION acp_budget_room(
    p_status TEXT, p_ends_at TIMESTAMPTZ, p_max_cost DOUBLE PRECISION, p_max_actions BIGINT,
    p_used_cost DOUBLE PRECISION, p_reserved_cost DOUBLE PRECISION, p_used_actions BIGINT,
    p_reserved_actions BIGINT, p_cost DOUBLE PRECISION, p_now TIMESTAMPTZ
) RETURNS BOOLEAN LANGUAGE sql IMMUTABLE AS $$
    SELECT p_status = 'open'
       AND (p_max_cost IS NULL OR p_used_cost + p_reserved_cost + p_cost <= p_max_cost)
       AND (p_max_actions IS NULL OR p_used_actions + p_reserved_actions + 1 <= p_max_actions)
       AND p_ends_at > p_now;
$$;

CREATE OR REPLACE FUNCTION acp_reserve_budget(
    p_session TEXT, p_cost DOUBLE PRECISION, p_now TIMESTAMPTZ
) RETURNS BOOLEAN LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    UPDATE sessions
    SET reserved_cost = reserved_cost + p_cost, reserved_actions = reserved_actions + 1
    WHERE id = p_session
      AND acp_budget_room(status, ends_at, max_cost, max_actions, used_cost, reserved_cost,
                          used_actions, reserved_actions, p_cost, p_now);
    RETURN FOUND;
END
$$;

-- Reservations settled, one after another in the arrays' order (so the sums are those of as
-- many one-action settlements): each action's cost given back, and charged where `p_charge`
-- (its success). The window's row is locked first.
CREATE FUNCTION acp_settle_budget_many(
    p_session TEXT, p_cost DOUBLE PRECISION[], p_charge BOOLEAN[]
) RETURNS VOID LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_window sessions%ROWTYPE;
    i INT;
BEGIN
    SELECT * INTO v_window FROM sessions WHERE id = p_session FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    FOR i IN 1 .. coalesce(array_length(p_cost, 1), 0) LOOP
        v_window.reserved_cost := v_window.reserved_cost - p_cost[i];
        v_window.reserved_actions := v_window.reserved_actions - 1;
        IF p_charge[i] THEN
            v_window.used_cost := v_window.used_cost + p_cost[i];
            v_window.used_actions := v_window.used_actions + 1;
        END IF;
    END LOOP;
    UPDATE sessions
    SET reserved_cost = v_window.reserved_cost, reserved_actions = v_window.reserved_actions,
        used_cost = v_window.used_cost, used_actions = v_window.used_actions
    WHERE id = p_session;
END
$$;

CREATE OR REPLACE FUNCTION acp_settle_budget(
    p_session TEXT, p_cost DOUBLE PRECISION, p_charge BOOLEAN
) RETURNS VOID LANGUAGE sql VOLATILE AS $$
    SELECT acp_settle_budget_many(p_session, ARRAY[p_cost], ARRAY[p_charge]);
$$;

-- The next `p_count` sequence numbers of a stream: the upsert locks its row, so concurrent
-- appends take consecutive numbers. Returns the last of them.
CREATE FUNCTION acp_take_seqs(p_session TEXT, p_count BIGINT)
RETURNS BIGINT LANGUAGE sql VOLATILE AS $$
    INSERT INTO streams (id, last_seq) VALUES (p_session, p_count)
    ON CONFLICT (id) DO UPDATE SET last_seq = streams.last_seq + p_count
    RETURNING last_seq;
$$;

CREATE OR REPLACE FUNCTION acp_append_event(
    p_session TEXT, p_kind TEXT, p_reason TEXT, p_payload TEXT, p_state_bearing BOOLEAN,
    p_command_id TEXT, p_correlation_id TEXT, p_worker TEXT, p_agent_id TEXT, p_at TIMESTAMPTZ
) RETURNS BIGINT LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_seq BIGINT;
BEGIN
    v_seq := acp_take_seqs(p_session, 1);
    INSERT INTO events (session_id, seq, kind, reason, payload, state_bearing, command_id,
                        correlation_id, worker, agent_id, created_at)
    VALUES (p_session, v_seq, p_kind, p_reason, p_payload, p_state_bearing, p_command_id,
            p_correlation_id, p_worker, p_agent_id, p_at);
    RETURN v_seq;
END
$$;

-- The events whose `p_write` is true (all of them when it is NULL), each stream's in the arrays'
-- order: per stream (in id order) its numbers taken at once, then one INSERT of them all. A
-- checkpoint's cycles and a telemetry flush come here too (Store.append_many_in), so a hundred
-- events hold their stream's row for two statements, not a hundred. (Loops over the arrays,
-- not queries: a batch is often of one or two, and each statement costs more than the loop.)
CREATE FUNCTION acp_append_events(
    p_write BOOLEAN[], p_session TEXT[], p_kind TEXT[], p_reason TEXT[], p_payload TEXT[],
    p_state_bearing BOOLEAN[], p_command_id TEXT[], p_correlation_id TEXT[], p_worker TEXT[],
    p_agent_id TEXT[], p_at TIMESTAMPTZ[]
) RETURNS VOID LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_count INT := coalesce(array_length(p_session, 1), 0);
    v_streams TEXT[] := '{}';
    v_counts BIGINT[] := '{}';
    v_next BIGINT[];
    v_seq BIGINT[] := array_fill(NULL::BIGINT, ARRAY[v_count]);
    i INT;
    j INT;
BEGIN
    FOR i IN 1 .. v_count LOOP
        CONTINUE WHEN p_write IS NOT NULL AND NOT p_write[i];
        j := array_position(v_streams, p_session[i]);
        IF j IS NULL THEN
            v_streams := v_streams || p_session[i];
            v_counts := v_counts || 1::BIGINT;
        ELSE
            v_counts[j] := v_counts[j] + 1;
        END IF;
    END LOOP;
    IF cardinality(v_streams) = 0 THEN
        RETURN;
    END IF;
    IF cardinality(v_streams) > 1 THEN
        SELECT array_agg(u.s ORDER BY u.s), array_agg(u.k ORDER BY u.s)
        INTO v_streams, v_counts FROM unnest(v_streams, v_counts) AS u(s, k);
    END IF;
    v_next := v_counts;
    FOR j IN 1 .. cardinality(v_streams) LOOP
        v_next[j] := acp_take_seqs(v_streams[j], v_counts[j]) - v_counts[j] + 1;
    END LOOP;
    FOR i IN 1 .. v_count LOOP
        CONTINUE WHEN p_write IS NOT NULL AND NOT p_write[i];
        j := array_position(v_streams, p_session[i]);
        v_seq[i] := v_next[j];
        v_next[j] := v_next[j] + 1;
    END LOOP;
    INSERT INTO events (session_id, seq, kind, reason, payload, state_bearing, command_id,
                        correlation_id, worker, agent_id, created_at)
    SELECT e.s, e.q, e.kind, e.reason, e.payload, e.state_bearing, e.command_id,
           e.correlation_id, e.worker, e.agent_id, e.at
    FROM unnest(p_session, v_seq, p_kind, p_reason, p_payload, p_state_bearing, p_command_id,
                p_correlation_id, p_worker, p_agent_id, p_at)
         AS e(s, q, kind, reason, payload, state_bearing, command_id, correlation_id, worker,
              agent_id, at)
    WHERE e.q IS NOT NULL;
END
$$;

-- Each value once, in order: the order a batch takes its hot rows in.
CREATE FUNCTION acp_in_order(p_values TEXT[]) RETURNS TEXT[] LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_out TEXT[] := '{}';
    v_value TEXT;
BEGIN
    FOREACH v_value IN ARRAY p_values LOOP
        IF NOT v_value = ANY(v_out) THEN
            v_out := v_out || v_value;
        END IF;
    END LOOP;
    IF cardinality(v_out) > 1 THEN
        v_out := ARRAY(SELECT v FROM unnest(v_out) AS u(v) ORDER BY v);
    END IF;
    RETURN v_out;
END
$$;

-- The fleets of a batch, each once, in order, with their switches' fingerprint read under the
-- fleet's shared switch lock (taken here, held to the COMMIT).
CREATE FUNCTION acp_lock_fleets(p_fleet TEXT[], OUT fleets TEXT[], OUT prints TEXT[])
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_fleet TEXT;
BEGIN
    fleets := acp_in_order(p_fleet);
    prints := '{}';
    FOREACH v_fleet IN ARRAY fleets LOOP
        PERFORM pg_advisory_xact_lock_shared(4242, hashtext(v_fleet));
        prints := prints || acp_switch_print(v_fleet);
    END LOOP;
END
$$;

-- Started records, in call order (the arguments are 0010's acp_begin_action's, one array
-- each). Per call: its ledger claim (a command_id known already, or twice in the batch, is a
-- replay: what the ledger holds comes back), the switches unchanged under the fleet's shared
-- switch lock (else "switches", with their new fingerprint), its action row. Then per window,
-- its row locked, each call in order against the room left ("budget", or "no_window" when the
-- window is closed or past: the claim and the row are taken back), and one reservation for
-- the rest. Then their ACTION_STARTED events. Nothing of a call is written unless its status
-- is started; "again": a replay of a twin of this batch that was refused (decide it again).
CREATE FUNCTION acp_begin_actions(
    p_command_id TEXT[], p_operation TEXT[], p_params_hash TEXT[], p_claim TEXT[],
    p_now TIMESTAMPTZ[], p_print TEXT[], p_fleet TEXT[], p_session TEXT[], p_worker TEXT[],
    p_name TEXT[], p_params TEXT[], p_risk TEXT[], p_cost DOUBLE PRECISION[],
    p_critical BOOLEAN[], p_safe_to_retry BOOLEAN[], p_rule TEXT[], p_host TEXT[],
    p_owner TEXT[], p_identity TEXT[], p_model TEXT[], p_tokens BIGINT[], p_decision TEXT[],
    p_kind TEXT[], p_payload TEXT[], p_correlation_id TEXT[], p_agent_id TEXT[]
) RETURNS TABLE (n INT, status TEXT, operation TEXT, params_hash TEXT, result TEXT,
                 print TEXT)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_count INT := coalesce(array_length(p_command_id, 1), 0);
    v_status TEXT[] := array_fill(NULL::TEXT, ARRAY[v_count]);
    v_fleets TEXT[];
    v_prints TEXT[];
    v_sessions TEXT[] := '{}';
    v_session TEXT;
    v_window sessions%ROWTYPE;
    v_actions BIGINT;
    v_refused BOOLEAN := FALSE;
    i INT;
BEGIN
    FOR i IN 1 .. v_count LOOP
        INSERT INTO commands (command_id, operation, params_hash, result, created_at)
        VALUES (p_command_id[i], p_operation[i], p_params_hash[i], p_claim[i], p_now[i])
        ON CONFLICT (command_id) DO NOTHING;
        IF NOT FOUND THEN
            v_status[i] := 'replay';
        END IF;
    END LOOP;
    SELECT l.fleets, l.prints INTO v_fleets, v_prints FROM acp_lock_fleets(p_fleet) AS l;
    FOR i IN 1 .. v_count LOOP
        CONTINUE WHEN v_status[i] IS NOT NULL;
        IF v_prints[array_position(v_fleets, p_fleet[i])] IS DISTINCT FROM p_print[i] THEN
            v_status[i] := 'switches';
            DELETE FROM commands WHERE command_id = p_command_id[i];
            CONTINUE;
        END IF;
        INSERT INTO actions (command_id, fleet, session_id, worker, name, params, risk, cost,
                             critical, safe_to_retry, status, rule, started_at, host, owner,
                             identity, model, tokens, decision)
        VALUES (p_command_id[i], p_fleet[i], p_session[i], p_worker[i], p_name[i],
                p_params[i], p_risk[i], p_cost[i], p_critical[i], p_safe_to_retry[i],
                'started', p_rule[i], p_now[i], p_host[i], p_owner[i], p_identity[i],
                p_model[i], p_tokens[i], p_decision[i]);
        v_sessions := v_sessions || p_session[i];
    END LOOP;
    FOREACH v_session IN ARRAY acp_in_order(v_sessions) LOOP
        -- No such window: every field NULL, so no room and not open ("no_window").
        SELECT * INTO v_window FROM sessions WHERE id = v_session FOR UPDATE;
        v_actions := 0;
        FOR i IN 1 .. v_count LOOP
            CONTINUE WHEN v_status[i] IS NOT NULL OR p_session[i] <> v_session;
            -- One reservation after another, as acp_reserve_budget would make them (the
            -- same sums, to the last bit of a float).
            IF acp_budget_room(v_window.status, v_window.ends_at, v_window.max_cost,
                               v_window.max_actions, v_window.used_cost,
                               v_window.reserved_cost, v_window.used_actions,
                               v_window.reserved_actions, p_cost[i], p_now[i]) THEN
                v_status[i] := 'started';
                v_window.reserved_cost := v_window.reserved_cost + p_cost[i];
                v_window.reserved_actions := v_window.reserved_actions + 1;
                v_actions := v_actions + 1;
            ELSE
                v_status[i] := CASE WHEN v_window.status = 'open' AND v_window.ends_at > p_now[i]
                                    THEN 'budget' ELSE 'no_window' END;
                v_refused := TRUE;
            END IF;
        END LOOP;
        IF v_actions > 0 THEN
            UPDATE sessions
            SET reserved_cost = v_window.reserved_cost,
                reserved_actions = v_window.reserved_actions
            WHERE id = v_session;
        END IF;
    END LOOP;
    IF v_refused THEN
        FOR i IN 1 .. v_count LOOP
            IF v_status[i] IN ('budget', 'no_window') THEN
                DELETE FROM actions WHERE command_id = p_command_id[i];
                DELETE FROM commands WHERE command_id = p_command_id[i];
            END IF;
        END LOOP;
    END IF;
    PERFORM acp_append_events(
        ARRAY(SELECT s = 'started' FROM unnest(v_status) AS u(s)), p_session, p_kind,
        array_fill(NULL::TEXT, ARRAY[v_count]), p_payload, array_fill(TRUE, ARRAY[v_count]),
        p_command_id, p_correlation_id, p_worker, p_agent_id, p_now);
    FOR i IN 1 .. v_count LOOP
        n := i;
        status := v_status[i];
        operation := NULL;
        params_hash := NULL;
        result := NULL;
        print := v_prints[array_position(v_fleets, p_fleet[i])];
        IF status = 'replay' THEN
            SELECT c.operation, c.params_hash, c.result INTO operation, params_hash, result
            FROM commands c WHERE c.command_id = p_command_id[i];
            IF NOT FOUND THEN
                status := 'again';  -- its twin in this batch claimed it, then was refused
            END IF;
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;

-- Outcomes, in call order (0010's acp_finish_action's arguments, one array each). Per call,
-- under the fleet's shared switch lock: with a fingerprint, the switches first (changed:
-- "switches" with the new one, nothing written); the action row ("not_open" when it has no
-- open started record). Then per window one settlement, then the events. Status "done" else.
CREATE FUNCTION acp_finish_actions(
    p_command_id TEXT[], p_session TEXT[], p_status TEXT[], p_now TIMESTAMPTZ[],
    p_result TEXT[], p_error TEXT[], p_cost DOUBLE PRECISION[], p_ok BOOLEAN[],
    p_print TEXT[], p_fleet TEXT[], p_kind TEXT[], p_reason TEXT[], p_payload TEXT[],
    p_correlation_id TEXT[], p_worker TEXT[]
) RETURNS TABLE (n INT, status TEXT, print TEXT) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_count INT := coalesce(array_length(p_command_id, 1), 0);
    v_status TEXT[] := array_fill(NULL::TEXT, ARRAY[v_count]);
    v_fleets TEXT[];
    v_prints TEXT[];
    v_sessions TEXT[] := '{}';
    v_session TEXT;
    v_costs DOUBLE PRECISION[];
    v_charges BOOLEAN[];
    i INT;
BEGIN
    SELECT l.fleets, l.prints INTO v_fleets, v_prints FROM acp_lock_fleets(p_fleet) AS l;
    FOR i IN 1 .. v_count LOOP
        IF p_print[i] IS NOT NULL
           AND v_prints[array_position(v_fleets, p_fleet[i])] IS DISTINCT FROM p_print[i] THEN
            v_status[i] := 'switches';
            CONTINUE;
        END IF;
        UPDATE actions
        SET status = p_status[i], finished_at = p_now[i], result = p_result[i],
            error = p_error[i]
        WHERE command_id = p_command_id[i] AND actions.status = 'started';
        IF FOUND THEN
            v_status[i] := 'done';
            v_sessions := v_sessions || p_session[i];
        ELSE
            v_status[i] := 'not_open';
        END IF;
    END LOOP;
    FOREACH v_session IN ARRAY acp_in_order(v_sessions) LOOP
        v_costs := '{}';
        v_charges := '{}';
        FOR i IN 1 .. v_count LOOP
            CONTINUE WHEN v_status[i] <> 'done' OR p_session[i] <> v_session;
            v_costs := v_costs || p_cost[i];
            v_charges := v_charges || p_ok[i];
        END LOOP;
        PERFORM acp_settle_budget_many(v_session, v_costs, v_charges);
    END LOOP;
    PERFORM acp_append_events(
        ARRAY(SELECT s = 'done' FROM unnest(v_status) AS u(s)), p_session, p_kind, p_reason,
        p_payload, array_fill(TRUE, ARRAY[v_count]), p_command_id, p_correlation_id, p_worker,
        array_fill(NULL::TEXT, ARRAY[v_count]), p_now);
    FOR i IN 1 .. v_count LOOP
        n := i;
        status := v_status[i];
        print := CASE WHEN p_print[i] IS NOT NULL
                      THEN v_prints[array_position(v_fleets, p_fleet[i])] END;
        RETURN NEXT;
    END LOOP;
END
$$;

-- Declared timeouts (issue 23): StepDefinition.timeout, an attempt's execution limit.
--
-- workflow_steps.timeout_ms (NULL: none). A lease never runs past the attempt's start plus
-- its timeout: tasker.lease_queued caps the first lease and tasker.extend_lease caps every
-- extension, so the attempt's end is the lease expiry the deadline scheduler already sleeps
-- towards (no new timer, no polling). tasker.expire_leases ends such an attempt as TIMED_OUT
-- (last_error {"outcome": "TIMED_OUT", "attempt", "timeout_ms", ...}; history reason
-- "timed_out"), a failed attempt like any other: the retry policy and max_attempts decide
-- what follows. A worker reporting on it afterwards is refused with 'timed_out' (the service
-- answers FAILED_PRECONDITION naming the timeout).
ALTER TABLE tasker.workflow_steps ADD COLUMN timeout_ms integer
    CONSTRAINT workflow_steps_timeout_valid CHECK (timeout_ms BETWEEN 1 AND 604800000);

-- Steps carry their timeout ("timeout_ms" in p_steps); otherwise 20261204000012's.
DROP FUNCTION tasker.create_task(uuid, text, text, integer, jsonb, text, jsonb, jsonb, integer, integer, boolean, text, timestamptz);
CREATE FUNCTION tasker.create_task(
    p_task_uuid uuid, p_namespace text, p_name text, p_priority integer, p_context jsonb,
    p_idempotency_key text, p_steps jsonb, p_metadata jsonb DEFAULT '{}'::jsonb,
    p_max_namespaces integer DEFAULT NULL, p_context_bytes integer DEFAULT NULL,
    p_create_namespace boolean DEFAULT true, p_concurrency_key text DEFAULT NULL,
    p_start_at timestamptz DEFAULT NULL
)
RETURNS TABLE (task_uuid uuid, created boolean, step_name text, step_uuid uuid)
LANGUAGE plpgsql AS $$
DECLARE
    v_existing uuid;
    v_namespaces bigint;
    v_later boolean := p_start_at IS NOT NULL AND p_start_at > clock_timestamp();
BEGIN
    PERFORM set_config('tasker.transition_metadata', p_metadata::text, true);
    -- a new namespace only: the name checks run when it is created, not for every task
    IF NOT EXISTS (SELECT 1 FROM tasker.namespaces n WHERE n.name = p_namespace) THEN
        IF NOT p_create_namespace THEN
            -- the message is the name: the service words the error
            RAISE EXCEPTION '%', p_namespace USING ERRCODE = 'TK006';
        END IF;
        IF p_max_namespaces IS NOT NULL THEN
            -- creations of namespaces queue here, so that concurrent ones cannot overshoot
            -- the cap; they are rare (the first task of each namespace)
            PERFORM pg_advisory_xact_lock(hashtext('tasker.namespaces'));
            SELECT count(*) INTO v_namespaces FROM tasker.namespaces;
            IF v_namespaces >= p_max_namespaces
               AND NOT EXISTS (SELECT 1 FROM tasker.namespaces n WHERE n.name = p_namespace) THEN
                RAISE EXCEPTION 'namespace % would be one more than the % allowed (database.max_namespaces)',
                    quote_literal(p_namespace), p_max_namespaces
                    USING ERRCODE = 'TK005';
            END IF;
        END IF;
        INSERT INTO tasker.namespaces (name) VALUES (p_namespace) ON CONFLICT DO NOTHING;
    END IF;

    INSERT INTO tasker.tasks AS t (task_uuid, namespace, name, priority, context, idempotency_key,
                                   remaining_steps, context_bytes, concurrency_key, start_at)
    VALUES (p_task_uuid, p_namespace, p_name, p_priority, coalesce(p_context, '{}'::jsonb),
            p_idempotency_key, jsonb_array_length(p_steps), p_context_bytes, p_concurrency_key,
            CASE WHEN v_later THEN p_start_at END)
    ON CONFLICT ON CONSTRAINT tasks_idempotency_key_unique DO NOTHING;
    IF NOT FOUND THEN
        SELECT t.task_uuid INTO v_existing FROM tasker.tasks t
        WHERE t.namespace = p_namespace AND t.idempotency_key = p_idempotency_key;
        RETURN QUERY SELECT v_existing, false, s.name, s.step_uuid
            FROM tasker.workflow_steps s WHERE s.task_uuid = v_existing ORDER BY s.position;
        RETURN;
    END IF;

    INSERT INTO tasker.workflow_steps (step_uuid, task_uuid, name, position, unfinished_parents,
                                       ready_at, max_attempts, retryable, inputs, data_bytes, queue,
                                       retry_policy, timeout_ms)
    SELECT (e->>'step_uuid')::uuid, p_task_uuid, e->>'name', (e->>'position')::int, p.n,
           CASE WHEN p.n = 0 AND NOT v_later THEN clock_timestamp() END,
           coalesce((e->>'max_attempts')::int, 3), coalesce((e->>'retryable')::boolean, true),
           coalesce(e->'inputs', '{}'::jsonb), (e->>'inputs_bytes')::int,
           coalesce(e->>'queue', 'default'),
           CASE WHEN jsonb_typeof(e->'retry') = 'object' THEN e->'retry' END,
           (e->>'timeout_ms')::int
    FROM jsonb_array_elements(p_steps) AS x(e)
    CROSS JOIN LATERAL (SELECT count(DISTINCT d)::int AS n
                        FROM jsonb_array_elements_text(coalesce(e->'parents', '[]'::jsonb)) d) p
    ORDER BY (e->>'position')::int;

    INSERT INTO tasker.step_edges (task_uuid, parent_step_uuid, child_step_uuid)
    SELECT DISTINCT p_task_uuid, d::uuid, (e->>'step_uuid')::uuid
    FROM jsonb_array_elements(p_steps) AS x(e),
         jsonb_array_elements_text(coalesce(e->'parents', '[]'::jsonb)) d;

    IF v_later THEN
        -- a deadline: every replica's scheduler wakes for it
        INSERT INTO tasker.task_starts (task_uuid, namespace, start_at)
        VALUES (p_task_uuid, p_namespace, p_start_at);
        PERFORM pg_notify('tasker_deadlines',
                          json_build_object('namespace', p_namespace, 'at', p_start_at)::text);
    ELSE
        INSERT INTO tasker.ready_steps (step_uuid, task_uuid, ready_at)
        SELECT s.step_uuid, p_task_uuid, s.ready_at FROM tasker.workflow_steps s
        WHERE s.task_uuid = p_task_uuid AND s.unfinished_parents = 0;
        -- a DAG has at least one root: it is ready now
        PERFORM tasker.send_task_ready(p_task_uuid, p_namespace, 'task_start');
    END IF;
    RETURN QUERY SELECT p_task_uuid, true, s.name, s.step_uuid
        FROM tasker.workflow_steps s WHERE s.task_uuid = p_task_uuid ORDER BY s.position;
END
$$;

-- A lease of a step with a timeout ends no later than the attempt's start plus the timeout;
-- otherwise 20261204000006's.
CREATE OR REPLACE FUNCTION tasker.lease_queued(p_msg_id bigint, p_worker_id text, p_lease_ms bigint,
                                               p_holds_slot boolean)
RETURNS TABLE (
    step_uuid uuid, task_uuid uuid, name text, attempt integer, inputs jsonb,
    parent_results jsonb, lease_expires_at timestamptz, enqueued_at timestamptz, traceparent text,
    lease_token uuid, queue text
)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_q record;
    v_s record;
    v_end timestamptz;
BEGIN
    UPDATE tasker.step_queue q
    SET leased_by = p_worker_id,
        visible_at = clock_timestamp() + make_interval(secs => p_lease_ms / 1000.0),
        read_count = q.read_count + 1,
        lease_token = gen_random_uuid(),
        holds_slot = p_holds_slot
    WHERE q.msg_id = p_msg_id
    RETURNING q.step_uuid, q.attempt, q.visible_at, q.enqueued_at, q.traceparent, q.lease_token,
              q.queue
    INTO v_q;
    UPDATE tasker.workflow_steps s
    SET state = 'in_progress', started_at = clock_timestamp()
    WHERE s.step_uuid = v_q.step_uuid AND s.state = 'enqueued' AND s.attempts = v_q.attempt
    RETURNING s.task_uuid, s.name, s.inputs, s.timeout_ms, s.started_at INTO v_s;
    IF NOT FOUND THEN
        IF p_holds_slot THEN
            -- the caller gives the unused grant back
            UPDATE tasker.step_queue q SET holds_slot = false WHERE q.msg_id = p_msg_id;
        END IF;
        RETURN;
    END IF;
    lease_expires_at := v_q.visible_at;
    IF v_s.timeout_ms IS NOT NULL THEN
        v_end := v_s.started_at + make_interval(secs => v_s.timeout_ms / 1000.0);
        IF v_end < v_q.visible_at THEN
            UPDATE tasker.step_queue q SET visible_at = v_end WHERE q.msg_id = p_msg_id;
            lease_expires_at := v_end;
        END IF;
    END IF;
    step_uuid := v_q.step_uuid;
    task_uuid := v_s.task_uuid;
    name := v_s.name;
    attempt := v_q.attempt;
    inputs := v_s.inputs;
    SELECT coalesce(jsonb_object_agg(ps.name, coalesce(ps.results, 'null'::jsonb)), '{}'::jsonb)
    INTO parent_results
    FROM tasker.step_edges e
    CROSS JOIN LATERAL (SELECT p.name, p.results FROM tasker.workflow_steps p
                        WHERE p.step_uuid = e.parent_step_uuid OFFSET 0) ps
    WHERE e.child_step_uuid = v_q.step_uuid;
    enqueued_at := v_q.enqueued_at;
    traceparent := v_q.traceparent;
    lease_token := v_q.lease_token;
    queue := v_q.queue;
    RETURN NEXT;
END
$$;

-- Whether attempt p_attempt of a step ended by its timeout, or runs past it now (its lease not
-- yet ended by the scheduler). Read only when a report is refused, so last_error (which may be
-- large) is not read on the way of every completion.
CREATE FUNCTION tasker.attempt_timed_out(p_step_uuid uuid, p_attempt integer) RETURNS boolean
LANGUAGE sql STABLE
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
    SELECT coalesce((SELECT (s.last_error->>'outcome' = 'TIMED_OUT'
                             AND (s.last_error->>'attempt')::int = p_attempt)
                            OR (s.state = 'in_progress' AND s.attempts = p_attempt
                                AND s.timeout_ms IS NOT NULL
                                AND s.started_at + make_interval(secs => s.timeout_ms / 1000.0)
                                    <= clock_timestamp())
                     FROM tasker.workflow_steps s WHERE s.step_uuid = p_step_uuid), false)
$$;

-- A report on an attempt that timed out is refused as 'timed_out' rather than as stale, over
-- or expired; otherwise 20261204000001's.
CREATE OR REPLACE FUNCTION tasker.check_lease(p_step_uuid uuid, p_attempt integer, p_lease_token uuid)
RETURNS text
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_step record;
    v_msg record;
BEGIN
    SELECT s.state, s.attempts INTO v_step FROM tasker.workflow_steps s
    WHERE s.step_uuid = p_step_uuid FOR UPDATE;
    IF NOT FOUND THEN RETURN 'step_not_found'; END IF;
    IF v_step.attempts <> p_attempt THEN
        IF tasker.attempt_timed_out(p_step_uuid, p_attempt) THEN RETURN 'timed_out'; END IF;
        RETURN 'stale_attempt';
    END IF;
    IF v_step.state = 'cancelled' THEN RETURN 'task_cancelled'; END IF;
    IF v_step.state <> 'in_progress' THEN
        IF tasker.attempt_timed_out(p_step_uuid, p_attempt) THEN RETURN 'timed_out'; END IF;
        RETURN 'not_in_progress';
    END IF;
    SELECT q.visible_at, q.leased_by, q.lease_token INTO v_msg FROM tasker.step_queue q
    WHERE q.step_uuid = p_step_uuid AND q.attempt = p_attempt
    FOR UPDATE;
    IF NOT FOUND OR v_msg.leased_by IS NULL OR v_msg.visible_at <= clock_timestamp() THEN
        IF tasker.attempt_timed_out(p_step_uuid, p_attempt) THEN RETURN 'timed_out'; END IF;
        RETURN 'lease_expired';
    END IF;
    IF p_lease_token IS NOT NULL AND v_msg.lease_token IS DISTINCT FROM p_lease_token THEN
        RETURN 'lease_not_held';
    END IF;
    RETURN NULL;
END
$$;

-- An extension never carries an attempt past its timeout: the lease ends at the earlier of
-- now + p_lease_ms and the attempt's start + timeout; otherwise 20261204000001's.
CREATE OR REPLACE FUNCTION tasker.extend_lease(p_step_uuid uuid, p_attempt integer, p_lease_token uuid,
                                               p_lease_ms bigint)
RETURNS TABLE (outcome text, lease_expires_at timestamptz)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_problem text := tasker.check_lease(p_step_uuid, p_attempt, p_lease_token);
    v_until timestamptz;
BEGIN
    IF v_problem IS NOT NULL THEN
        RETURN QUERY SELECT v_problem, NULL::timestamptz;
        RETURN;
    END IF;
    UPDATE tasker.step_queue q
    SET visible_at = least(clock_timestamp() + make_interval(secs => p_lease_ms / 1000.0),
                           s.started_at + make_interval(secs => s.timeout_ms / 1000.0))
    FROM (SELECT w.started_at, w.timeout_ms FROM tasker.workflow_steps w
          WHERE w.step_uuid = p_step_uuid) s
    WHERE q.step_uuid = p_step_uuid AND q.attempt = p_attempt
    RETURNING q.visible_at INTO v_until;
    RETURN QUERY SELECT 'extended'::text, v_until;
END
$$;

-- An attempt whose lease ran out at its timeout is TIMED_OUT; otherwise 20261204000010's.
CREATE OR REPLACE FUNCTION tasker.expire_leases(p_limit integer DEFAULT 500, p_namespaces text[] DEFAULT NULL)
RETURNS TABLE (task_uuid uuid, step_uuid uuid, outcome text, namespace text, priority integer)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_msg record;
    v_outcome text;
    v_timeout integer;
BEGIN
    FOR v_msg IN
        SELECT q.task_uuid, q.step_uuid, q.attempt, q.leased_by, q.namespace, q.priority FROM tasker.step_queue q
        WHERE q.leased_by IS NOT NULL AND q.visible_at <= clock_timestamp()
          AND tasker.namespace_matches(q.namespace, p_namespaces)
        ORDER BY q.visible_at
        LIMIT p_limit
    LOOP
        PERFORM 1 FROM tasker.tasks t WHERE t.task_uuid = v_msg.task_uuid FOR NO KEY UPDATE;
        -- re-check under the locks: the worker may have answered in the meantime
        IF tasker.check_live_lease(v_msg.step_uuid, v_msg.attempt) = 'lease_expired'
           AND EXISTS (SELECT 1 FROM tasker.step_queue q WHERE q.step_uuid = v_msg.step_uuid AND q.attempt = v_msg.attempt)
        THEN
            -- a lease never outlives the timeout, so one ending at or after it is the timeout
            v_timeout := NULL;
            SELECT s.timeout_ms INTO v_timeout FROM tasker.workflow_steps s
            WHERE s.step_uuid = v_msg.step_uuid
              AND s.started_at + make_interval(secs => s.timeout_ms / 1000.0) <= clock_timestamp();
            IF v_timeout IS NOT NULL THEN
                PERFORM set_config('tasker.transition_metadata', '{"reason":"timed_out"}', true);
                SELECT f.outcome INTO v_outcome FROM tasker.record_attempt_failure(
                    v_msg.step_uuid,
                    jsonb_build_object('message', format('attempt %s ran past its timeout of %s ms',
                                                         v_msg.attempt, v_timeout),
                                       'outcome', 'TIMED_OUT', 'attempt', v_msg.attempt,
                                       'timeout_ms', v_timeout, 'worker_id', v_msg.leased_by),
                    true, NULL) f;
            ELSE
                PERFORM set_config('tasker.transition_metadata', '{"reason":"lease_expired"}', true);
                SELECT f.outcome INTO v_outcome FROM tasker.record_attempt_failure(
                    v_msg.step_uuid,
                    jsonb_build_object('message', 'lease expired', 'worker_id', v_msg.leased_by),
                    true, NULL) f;
            END IF;
            RETURN QUERY SELECT v_msg.task_uuid, v_msg.step_uuid, v_outcome, v_msg.namespace, v_msg.priority;
        END IF;
    END LOOP;
END
$$;

-- Declared retry policies (issue 23): a step's backoff when a worker's FailStep gives none
-- (and when its lease runs out), from StepDefinition.retry or the task's default.
--
-- workflow_steps.retry_policy: {"initial_ms", "multiplier", "max_ms", "jitter"} as the service
-- checked it (initial_ms >= 1, multiplier 1..=100, max_ms >= initial_ms, jitter 0..=1);
-- NULL: none, and a failure without a backoff is retried at once, as before.
ALTER TABLE tasker.workflow_steps ADD COLUMN retry_policy jsonb;

-- The backoff of an attempt under a policy: initial * multiplier^(attempt - 1), at most max,
-- less a random part of up to jitter of it (so that failures of one burst do not all retry
-- together). NULL without a policy.
CREATE FUNCTION tasker.policy_backoff_ms(p_policy jsonb, p_attempt integer) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT round(b * (1 - coalesce((p_policy->>'jitter')::float8, 0) * random()))::bigint
    FROM (SELECT least((p_policy->>'max_ms')::float8,
                       (p_policy->>'initial_ms')::float8
                           * power(coalesce((p_policy->>'multiplier')::float8, 1),
                                   least(greatest(p_attempt - 1, 0), 100))) AS b) x
    WHERE p_policy IS NOT NULL
$$;

-- p_backoff_ms NULL: the worker gave none (the step's policy decides).
CREATE OR REPLACE FUNCTION tasker.record_attempt_failure(
    p_step_uuid uuid, p_error jsonb, p_retryable boolean, p_backoff_ms bigint
) RETURNS TABLE (outcome text, next_retry_at timestamptz)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_step record;
    v_next timestamptz;
    v_backoff_ms bigint;
BEGIN
    SELECT s.task_uuid, s.attempts, s.max_attempts, s.retryable, s.retry_policy INTO v_step
    FROM tasker.workflow_steps s WHERE s.step_uuid = p_step_uuid;
    DELETE FROM tasker.step_queue q WHERE q.step_uuid = p_step_uuid AND q.attempt = v_step.attempts;
    IF p_retryable AND v_step.retryable AND v_step.attempts < v_step.max_attempts THEN
        -- the worker's backoff wins; without one, the step's declared policy; without a
        -- policy, at once
        v_backoff_ms := greatest(coalesce(p_backoff_ms,
                                          tasker.policy_backoff_ms(v_step.retry_policy, v_step.attempts),
                                          0), 0);
        v_next := clock_timestamp() + make_interval(secs => v_backoff_ms / 1000.0);
        UPDATE tasker.workflow_steps s
        SET state = 'waiting_for_retry', last_error = p_error, next_retry_at = v_next,
            data_bytes = s.data_bytes - coalesce(octet_length(s.last_error::text), 0)
                         + octet_length(p_error::text)
        WHERE s.step_uuid = p_step_uuid AND s.state = 'in_progress';
        IF v_backoff_ms = 0 THEN
            UPDATE tasker.workflow_steps s SET state = 'pending', ready_at = clock_timestamp()
            WHERE s.step_uuid = p_step_uuid AND s.state = 'waiting_for_retry';
            INSERT INTO tasker.ready_steps (step_uuid, task_uuid) VALUES (p_step_uuid, v_step.task_uuid);
            PERFORM tasker.send_task_ready(v_step.task_uuid, t.namespace, 'step_transition')
            FROM tasker.tasks t WHERE t.task_uuid = v_step.task_uuid AND t.state IN ('pending', 'in_progress');
        END IF;
        RETURN QUERY SELECT 'retry_scheduled'::text, v_next;
    ELSE
        UPDATE tasker.workflow_steps s
        SET state = 'error', last_error = p_error, completed_at = clock_timestamp(),
            data_bytes = s.data_bytes - coalesce(octet_length(s.last_error::text), 0)
                         + octet_length(p_error::text)
        WHERE s.step_uuid = p_step_uuid AND s.state = 'in_progress';
        UPDATE tasker.tasks t SET state = 'error', completed_at = clock_timestamp()
        WHERE t.task_uuid = v_step.task_uuid AND t.state = 'in_progress';
        RETURN QUERY SELECT 'failed'::text, NULL::timestamptz;
    END IF;
END
$$;

-- An expired lease is a failed attempt without a worker's backoff: the policy decides.
CREATE OR REPLACE FUNCTION tasker.expire_leases(p_limit integer DEFAULT 500, p_namespaces text[] DEFAULT NULL)
RETURNS TABLE (task_uuid uuid, step_uuid uuid, outcome text, namespace text, priority integer)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_msg record;
    v_outcome text;
BEGIN
    PERFORM set_config('tasker.transition_metadata', '{"reason":"lease_expired"}', true);
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
            SELECT f.outcome INTO v_outcome FROM tasker.record_attempt_failure(
                v_msg.step_uuid,
                jsonb_build_object('message', 'lease expired', 'worker_id', v_msg.leased_by),
                true, NULL) f;
            RETURN QUERY SELECT v_msg.task_uuid, v_msg.step_uuid, v_outcome, v_msg.namespace, v_msg.priority;
        END IF;
    END LOOP;
END
$$;

-- Steps carry their retry policy ("retry" in p_steps, resolved by the service from the step's
-- own or the task's default).
CREATE OR REPLACE FUNCTION tasker.create_task(
    p_task_uuid uuid, p_namespace text, p_name text, p_priority integer, p_context jsonb,
    p_idempotency_key text, p_steps jsonb, p_metadata jsonb DEFAULT '{}'::jsonb,
    p_max_namespaces integer DEFAULT NULL, p_context_bytes integer DEFAULT NULL,
    p_create_namespace boolean DEFAULT true, p_concurrency_key text DEFAULT NULL
)
RETURNS TABLE (task_uuid uuid, created boolean, step_name text, step_uuid uuid)
LANGUAGE plpgsql AS $$
DECLARE
    v_existing uuid;
    v_namespaces bigint;
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
                                   remaining_steps, context_bytes, concurrency_key)
    VALUES (p_task_uuid, p_namespace, p_name, p_priority, coalesce(p_context, '{}'::jsonb),
            p_idempotency_key, jsonb_array_length(p_steps), p_context_bytes, p_concurrency_key)
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
                                       retry_policy)
    SELECT (e->>'step_uuid')::uuid, p_task_uuid, e->>'name', (e->>'position')::int, p.n,
           CASE WHEN p.n = 0 THEN clock_timestamp() END,
           coalesce((e->>'max_attempts')::int, 3), coalesce((e->>'retryable')::boolean, true),
           coalesce(e->'inputs', '{}'::jsonb), (e->>'inputs_bytes')::int,
           coalesce(e->>'queue', 'default'),
           CASE WHEN jsonb_typeof(e->'retry') = 'object' THEN e->'retry' END
    FROM jsonb_array_elements(p_steps) AS x(e)
    CROSS JOIN LATERAL (SELECT count(DISTINCT d)::int AS n
                        FROM jsonb_array_elements_text(coalesce(e->'parents', '[]'::jsonb)) d) p
    ORDER BY (e->>'position')::int;

    INSERT INTO tasker.step_edges (task_uuid, parent_step_uuid, child_step_uuid)
    SELECT DISTINCT p_task_uuid, d::uuid, (e->>'step_uuid')::uuid
    FROM jsonb_array_elements(p_steps) AS x(e),
         jsonb_array_elements_text(coalesce(e->'parents', '[]'::jsonb)) d;

    INSERT INTO tasker.ready_steps (step_uuid, task_uuid, ready_at)
    SELECT s.step_uuid, p_task_uuid, s.ready_at FROM tasker.workflow_steps s
    WHERE s.task_uuid = p_task_uuid AND s.unfinished_parents = 0;

    -- a DAG has at least one root: it is ready now
    PERFORM tasker.send_task_ready(p_task_uuid, p_namespace, 'task_start');
    RETURN QUERY SELECT p_task_uuid, true, s.name, s.step_uuid
        FROM tasker.workflow_steps s WHERE s.task_uuid = p_task_uuid ORDER BY s.position;
END
$$;

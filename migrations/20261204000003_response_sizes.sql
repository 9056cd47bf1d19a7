-- What a page of tasks or steps will weigh, known before the documents are read.
--
-- ListTasks and GetTask (with step data) read a whole page (up to 1,001 rows) with every
-- document in it before the response budget cut it: 1,000 tasks with 262 KB contexts cost a
-- read token's ListTasks 3.2 GB of memory for 8 tasks returned. Each task now records its
-- context's size as sent (context_bytes, measured by the service when it creates the task),
-- and each step the size of its data (data_bytes: inputs and results as sent, plus the last
-- error as JSON), so a page is cut to the response budget in the query, and only the
-- documents of the rows returned are read. Rows written before this migration have NULL
-- sizes; their size is then computed from the document (a cost only those old rows pay).
--
-- Kept up to date by: create_task (below), tasker.complete_step (20261204000001),
-- tasker.resolve_step_manually (20261204000002) and record_attempt_failure (below).

ALTER TABLE tasker.tasks ADD COLUMN context_bytes integer;
ALTER TABLE tasker.workflow_steps ADD COLUMN data_bytes integer;

-- The baseline's create_task, with the context's size as sent (p_context_bytes; NULL: not
-- measured, as a replica of the previous release calls it), each step's inputs' size
-- ("inputs_bytes" in p_steps), and whether a namespace not seen before is created
-- (p_create_namespace; false: refused with TK006, see 20261204000004).
DROP FUNCTION tasker.create_task(uuid, text, text, integer, jsonb, text, jsonb, jsonb, integer);
CREATE FUNCTION tasker.create_task(
    p_task_uuid uuid, p_namespace text, p_name text, p_priority integer, p_context jsonb,
    p_idempotency_key text, p_steps jsonb, p_metadata jsonb DEFAULT '{}'::jsonb,
    p_max_namespaces integer DEFAULT NULL, p_context_bytes integer DEFAULT NULL,
    p_create_namespace boolean DEFAULT true
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
                                   remaining_steps, context_bytes)
    VALUES (p_task_uuid, p_namespace, p_name, p_priority, coalesce(p_context, '{}'::jsonb),
            p_idempotency_key, jsonb_array_length(p_steps), p_context_bytes)
    ON CONFLICT ON CONSTRAINT tasks_idempotency_key_unique DO NOTHING;
    IF NOT FOUND THEN
        SELECT t.task_uuid INTO v_existing FROM tasker.tasks t
        WHERE t.namespace = p_namespace AND t.idempotency_key = p_idempotency_key;
        RETURN QUERY SELECT v_existing, false, s.name, s.step_uuid
            FROM tasker.workflow_steps s WHERE s.task_uuid = v_existing ORDER BY s.position;
        RETURN;
    END IF;

    INSERT INTO tasker.workflow_steps (step_uuid, task_uuid, name, position, unfinished_parents,
                                       ready_at, max_attempts, retryable, inputs, data_bytes)
    SELECT (e->>'step_uuid')::uuid, p_task_uuid, e->>'name', (e->>'position')::int, p.n,
           CASE WHEN p.n = 0 THEN clock_timestamp() END,
           coalesce((e->>'max_attempts')::int, 3), coalesce((e->>'retryable')::boolean, true),
           coalesce(e->'inputs', '{}'::jsonb), (e->>'inputs_bytes')::int
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

-- The baseline's end of a failed attempt, keeping data_bytes: the last error replaces the
-- one before it (each counted as JSON).
CREATE OR REPLACE FUNCTION tasker.record_attempt_failure(
    p_step_uuid uuid, p_error jsonb, p_retryable boolean, p_backoff_ms bigint
) RETURNS TABLE (outcome text, next_retry_at timestamptz)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_step record;
    v_next timestamptz;
BEGIN
    SELECT s.task_uuid, s.attempts, s.max_attempts, s.retryable INTO v_step
    FROM tasker.workflow_steps s WHERE s.step_uuid = p_step_uuid;
    DELETE FROM tasker.step_queue q WHERE q.step_uuid = p_step_uuid AND q.attempt = v_step.attempts;
    IF p_retryable AND v_step.retryable AND v_step.attempts < v_step.max_attempts THEN
        v_next := clock_timestamp() + make_interval(secs => greatest(p_backoff_ms, 0) / 1000.0);
        UPDATE tasker.workflow_steps s
        SET state = 'waiting_for_retry', last_error = p_error, next_retry_at = v_next,
            data_bytes = s.data_bytes - coalesce(octet_length(s.last_error::text), 0)
                         + octet_length(p_error::text)
        WHERE s.step_uuid = p_step_uuid AND s.state = 'in_progress';
        IF p_backoff_ms <= 0 THEN
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

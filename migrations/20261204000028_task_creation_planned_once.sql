-- A task's creation is planned once per connection (issue 25: what a task costs beside its
-- steps). Two statements of tasker.create_task read back the steps it had just written (the
-- roots into the ready set; the steps returned in order), and PostgreSQL planned both again
-- at every call (pg_stat_statements with track_planning: 533 plans for 513 calls, 0.17 ms
-- a task): their generic plans were priced above the custom ones. The roots now go into the
-- ready set from the steps' own INSERT (RETURNING), and the answer is read from p_steps, the
-- steps as written.

-- Create a task with its DAG. p_steps is a JSON array of {"step_uuid", "name", "position",
-- "parents": [uuid], "max_attempts", "retryable", "inputs", "inputs_bytes", "queue"} in which
-- the service resolved dependencies by name, ordered the steps topologically and checked the
-- queue names (absent: 'default'); the database still refuses a parent of another task
-- (foreign key), duplicate names (unique) and an edge against the order (TK003: a cycle). An
-- idempotency key that names a task of the namespace returns that task (created = false) and
-- writes nothing. A namespace not seen before is created when p_create_namespace (else
-- TK006), unless p_max_namespaces exist (TK005). p_context_bytes and "inputs_bytes": the
-- documents' sizes as sent (a page of tasks or steps is cut to the response budget by them
-- before any document is read). p_concurrency_key: the task's concurrency key (NULL: none).
-- "retry" in p_steps: the step's retry policy as the service resolved it (its own or the
-- task's default), stored as workflow_steps.retry_policy; "timeout_ms": an attempt's execution
-- limit; "schedule_to_start_ms": how long it may wait for a worker once queued. p_start_at in
-- the future: the task waits for it (tasker.task_starts, announced on tasker_deadlines) with
-- its roots out of the ready set; otherwise it is ready now.
-- (from migrations/20261204000028_task_creation_planned_once.sql)
CREATE OR REPLACE FUNCTION tasker.create_task(
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

    -- the steps, and the roots of a task that starts now in the ready set, in one statement
    -- (a query of the steps just written was planned again at every call)
    WITH created AS (
        INSERT INTO tasker.workflow_steps AS w (step_uuid, task_uuid, name, position, unfinished_parents,
                                           ready_at, max_attempts, retryable, inputs, data_bytes,
                                           queue, retry_policy, timeout_ms, schedule_to_start_ms)
        SELECT (e->>'step_uuid')::uuid, p_task_uuid, e->>'name', (e->>'position')::int, p.n,
               CASE WHEN p.n = 0 AND NOT v_later THEN clock_timestamp() END,
               coalesce((e->>'max_attempts')::int, 3), coalesce((e->>'retryable')::boolean, true),
               coalesce(e->'inputs', '{}'::jsonb), (e->>'inputs_bytes')::int,
               coalesce(e->>'queue', 'default'),
               CASE WHEN jsonb_typeof(e->'retry') = 'object' THEN e->'retry' END,
               (e->>'timeout_ms')::int, (e->>'schedule_to_start_ms')::int
        FROM jsonb_array_elements(p_steps) AS x(e)
        CROSS JOIN LATERAL (SELECT count(DISTINCT d)::int AS n
                            FROM jsonb_array_elements_text(coalesce(e->'parents', '[]'::jsonb)) d) p
        ORDER BY (e->>'position')::int
        RETURNING w.step_uuid, w.unfinished_parents, w.ready_at
    )
    INSERT INTO tasker.ready_steps (step_uuid, task_uuid, ready_at)
    SELECT c.step_uuid, p_task_uuid, c.ready_at FROM created c
    WHERE c.unfinished_parents = 0 AND NOT v_later;

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
        -- a DAG has at least one root: it is ready now
        PERFORM tasker.send_task_ready(p_task_uuid, p_namespace, 'task_start');
    END IF;
    -- the steps as written (the same query of the table was planned again at every call)
    RETURN QUERY SELECT p_task_uuid, true, e->>'name', (e->>'step_uuid')::uuid
        FROM jsonb_array_elements(p_steps) AS x(e) ORDER BY (e->>'position')::int;
END
$$;

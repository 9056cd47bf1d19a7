-- Eager start (issue 25): a worker that creates a task may ask for the steps it makes ready
-- in the same call (CreateTaskRequest.next), as a completing worker asks for its successors
-- (CompleteStepRequest.next): the creation's own transaction claims the task and leases its
-- roots to that worker. One commit and one call instead of the creation's commit, the
-- listener's claim pass (its own transaction), the hand-off's commit and a FetchSteps: at 8
-- chains of 10 steps with the Node.js worker, a chain's first step came 13-14 ms after its
-- CreateTask was sent, against 9-10 ms for every later hop.
--
-- create_task's body becomes tasker.insert_task, with whether the task's readiness is
-- announced (a caller claiming the task itself announces nothing, as complete_attempt's
-- p_announce); create_task is insert_task announcing, unchanged for its callers.

CREATE FUNCTION tasker.insert_task(
    p_task_uuid uuid, p_namespace text, p_name text, p_priority integer, p_context jsonb,
    p_idempotency_key text, p_steps jsonb, p_metadata jsonb DEFAULT '{}'::jsonb,
    p_max_namespaces integer DEFAULT NULL, p_context_bytes integer DEFAULT NULL,
    p_create_namespace boolean DEFAULT true, p_concurrency_key text DEFAULT NULL,
    p_start_at timestamptz DEFAULT NULL, p_announce boolean DEFAULT true
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
    ELSIF p_announce THEN
        -- a DAG has at least one root: it is ready now
        PERFORM tasker.send_task_ready(p_task_uuid, p_namespace, 'task_start');
    END IF;
    -- the steps as written (the same query of the table was planned again at every call)
    RETURN QUERY SELECT p_task_uuid, true, e->>'name', (e->>'step_uuid')::uuid
        FROM jsonb_array_elements(p_steps) AS x(e) ORDER BY (e->>'position')::int;
END
$$;

CREATE OR REPLACE FUNCTION tasker.create_task(
    p_task_uuid uuid, p_namespace text, p_name text, p_priority integer, p_context jsonb,
    p_idempotency_key text, p_steps jsonb, p_metadata jsonb DEFAULT '{}'::jsonb,
    p_max_namespaces integer DEFAULT NULL, p_context_bytes integer DEFAULT NULL,
    p_create_namespace boolean DEFAULT true, p_concurrency_key text DEFAULT NULL,
    p_start_at timestamptz DEFAULT NULL
)
RETURNS TABLE (task_uuid uuid, created boolean, step_name text, step_uuid uuid)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY SELECT * FROM tasker.insert_task(
        p_task_uuid, p_namespace, p_name, p_priority, p_context, p_idempotency_key, p_steps,
        p_metadata, p_max_namespaces, p_context_bytes, p_create_namespace, p_concurrency_key,
        p_start_at, true);
END
$$;

CREATE FUNCTION tasker.create_task_and_claim(
    p_task_uuid uuid, p_namespace text, p_name text, p_priority integer, p_context jsonb,
    p_idempotency_key text, p_steps jsonb, p_metadata jsonb, p_max_namespaces integer,
    p_context_bytes integer, p_create_namespace boolean, p_concurrency_key text,
    p_start_at timestamptz, p_enqueue_metadata jsonb, p_takers jsonb
)
RETURNS TABLE (task_uuid uuid, created boolean, step_names text[], step_uuids uuid[],
               outcome text, namespace text, enqueued_steps uuid[],
               max_ready_wait_ms double precision, leased jsonb, queued jsonb, held jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    v_task uuid;
    v_created boolean;
    v_names text[];
    v_uuids uuid[];
    v_e record;
BEGIN
    SELECT (array_agg(c.task_uuid))[1], bool_and(c.created),
           array_agg(c.step_name ORDER BY c.ord), array_agg(c.step_uuid ORDER BY c.ord)
    INTO v_task, v_created, v_names, v_uuids
    FROM tasker.insert_task(
        p_task_uuid, p_namespace, p_name, p_priority, p_context, p_idempotency_key, p_steps,
        p_metadata, p_max_namespaces, p_context_bytes, p_create_namespace, p_concurrency_key,
        p_start_at, false) WITH ORDINALITY AS c(task_uuid, created, step_name, step_uuid, ord);
    IF v_task IS NULL THEN
        RETURN;
    END IF;
    -- a task the idempotency key named already was started when it was created; a task that
    -- starts later has nothing ready now (its start is announced on tasker_deadlines)
    IF NOT v_created OR (p_start_at IS NOT NULL AND p_start_at > clock_timestamp()) THEN
        RETURN QUERY SELECT v_task, v_created, v_names, v_uuids, NULL::text, NULL::text,
                            '{}'::uuid[], NULL::float8, '[]'::jsonb, '[]'::jsonb, '[]'::jsonb;
        RETURN;
    END IF;
    SELECT * INTO v_e FROM tasker.claim_and_enqueue(v_task, p_enqueue_metadata, p_takers, NULL) e;
    -- claim_and_enqueue commits asynchronously when it hands nothing over: not a creation
    PERFORM set_config('synchronous_commit', 'on', true);
    IF v_e.outcome = 'claimed_elsewhere' THEN
        PERFORM tasker.send_task_ready(v_task, p_namespace, 'task_start');
    END IF;
    RETURN QUERY SELECT v_task, true, v_names, v_uuids, v_e.outcome, v_e.namespace,
                        v_e.enqueued_steps, v_e.max_ready_wait_ms, v_e.leased, v_e.queued, v_e.held;
END
$$;

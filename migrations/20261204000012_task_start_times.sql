-- Tasks that start later (issue 23): CreateTaskRequest.start_at.
--
-- A task created to start later is stored whole (pending, its steps pending) but its root
-- steps stay out of the ready set, so no claim, no poll and no fetch sees it. Its start time is
-- a deadline like a retry's: a row of tasker.task_starts, which tasker.next_deadline reads
-- (the deadline scheduler sleeps until the earliest) and every replica hears of at creation
-- (tasker_deadlines, {namespace, at}), so the start is met on time by any replica, even when
-- the one that created the task is gone. At the start, tasker.promote_due_starts moves the
-- roots into the ready set and the scheduler sends a readiness command for the task.
--
-- tasks.start_at keeps the time asked for (GetTask shows it); NULL: started at creation.
-- A row of task_starts exists exactly while the task waits for it: the readiness views and
-- ListTasks (scheduled) read that, not a comparison with the clock, so a start that is due but
-- not yet promoted still shows as scheduled, never as ready-but-unclaimed.
ALTER TABLE tasker.tasks ADD COLUMN start_at timestamptz;

CREATE TABLE tasker.task_starts (
    task_uuid  uuid PRIMARY KEY REFERENCES tasker.tasks (task_uuid) ON DELETE CASCADE,
    namespace  text NOT NULL,
    start_at   timestamptz NOT NULL
);
CREATE INDEX task_starts_due_idx ON tasker.task_starts (start_at);

-- p_start_at: when the task's first steps become ready; NULL or not after now: at once.
DROP FUNCTION tasker.create_task(uuid, text, text, integer, jsonb, text, jsonb, jsonb, integer, integer, boolean, text);
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
                                       retry_policy)
    SELECT (e->>'step_uuid')::uuid, p_task_uuid, e->>'name', (e->>'position')::int, p.n,
           CASE WHEN p.n = 0 AND NOT v_later THEN clock_timestamp() END,
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

-- Tasks whose start time came: their root steps go into the ready set (ready from now). The
-- caller sends a readiness command for each task returned (one row per root step). Claimed
-- with SKIP LOCKED: replicas waking for the same start promote it once.
CREATE FUNCTION tasker.promote_due_starts(p_limit integer DEFAULT 500, p_namespaces text[] DEFAULT NULL)
RETURNS TABLE (task_uuid uuid, step_uuid uuid, namespace text, priority integer)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
BEGIN
    RETURN QUERY
    WITH due AS (
        DELETE FROM tasker.task_starts d
        WHERE d.task_uuid IN (SELECT s.task_uuid FROM tasker.task_starts s
                              WHERE s.start_at <= clock_timestamp()
                                AND tasker.namespace_matches(s.namespace, p_namespaces)
                              ORDER BY s.start_at
                              LIMIT p_limit
                              FOR UPDATE SKIP LOCKED)
        RETURNING d.task_uuid
    ),
    roots AS (
        UPDATE tasker.workflow_steps s SET ready_at = clock_timestamp()
        FROM due
        WHERE s.task_uuid = due.task_uuid AND s.state = 'pending' AND s.unfinished_parents = 0
        RETURNING s.task_uuid, s.step_uuid, s.ready_at
    ),
    readied AS (
        INSERT INTO tasker.ready_steps AS r (step_uuid, task_uuid, ready_at)
        SELECT p.step_uuid, p.task_uuid, p.ready_at FROM roots p
        ON CONFLICT DO NOTHING
        RETURNING r.step_uuid, r.task_uuid
    )
    SELECT p.task_uuid, p.step_uuid, t.namespace, t.priority
    FROM readied p
    CROSS JOIN LATERAL (SELECT k.namespace, k.priority, k.state FROM tasker.tasks k
                        WHERE k.task_uuid = p.task_uuid OFFSET 0) t
    WHERE t.state IN ('pending', 'in_progress');
END
$$;

-- The earliest retry due time, lease expiry or task start.
CREATE OR REPLACE FUNCTION tasker.next_deadline(p_namespaces text[] DEFAULT NULL) RETURNS timestamptz
LANGUAGE sql STABLE
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
    SELECT least(
        (SELECT min(s.next_retry_at) FROM tasker.workflow_steps s JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
         WHERE s.next_retry_at IS NOT NULL AND s.state = 'waiting_for_retry'
           AND tasker.namespace_matches(t.namespace, p_namespaces)),
        (SELECT min(q.visible_at) FROM tasker.step_queue q
         WHERE q.leased_by IS NOT NULL AND tasker.namespace_matches(q.namespace, p_namespaces)),
        (SELECT ts.start_at FROM tasker.task_starts ts
         WHERE tasker.namespace_matches(ts.namespace, p_namespaces)
         ORDER BY ts.start_at LIMIT 1))
$$;

-- A scheduled task's steps are not ready before its start.
CREATE OR REPLACE FUNCTION tasker.step_readiness(p_task_uuid uuid)
RETURNS TABLE (
    step_uuid uuid,
    name text,
    state text,
    attempts integer,
    max_attempts integer,
    total_parents integer,
    completed_parents integer,
    dependencies_satisfied boolean,
    retry_eligible boolean,
    next_retry_at timestamptz,
    ready boolean,
    ready_since timestamptz
)
LANGUAGE sql STABLE AS $$
    SELECT s.step_uuid, s.name, s.state, s.attempts, s.max_attempts,
           p.total::int,
           (p.total - s.unfinished_parents)::int,
           s.unfinished_parents = 0,
           -- another attempt may still be made for this step
           (s.state IN ('pending', 'waiting_for_retry') AND s.attempts < s.max_attempts
                AND (s.attempts = 0 OR s.retryable)),
           s.next_retry_at,
           (t.state IN ('pending', 'in_progress') AND s.state = 'pending' AND s.unfinished_parents = 0
                AND NOT t.scheduled),
           CASE WHEN s.unfinished_parents = 0 AND NOT t.scheduled THEN s.ready_at END
    FROM tasker.workflow_steps s
    CROSS JOIN LATERAL (SELECT k.state,
                               EXISTS (SELECT 1 FROM tasker.task_starts ts WHERE ts.task_uuid = k.task_uuid) AS scheduled
                        FROM tasker.tasks k WHERE k.task_uuid = s.task_uuid) t
    CROSS JOIN LATERAL (SELECT count(*) AS total FROM tasker.step_edges e
                        WHERE e.child_step_uuid = s.step_uuid) p
    WHERE s.task_uuid = p_task_uuid
    ORDER BY s.position, s.name
$$;

-- ... and its execution status says 'scheduled'.
CREATE OR REPLACE FUNCTION tasker.task_execution_context(p_task_uuid uuid)
RETURNS TABLE (
    task_uuid uuid,
    namespace text,
    task_state text,
    priority integer,
    total_steps integer,
    pending_steps integer,
    enqueued_steps integer,
    in_progress_steps integer,
    complete_steps integer,
    failed_steps integer,
    waiting_for_retry_steps integer,
    cancelled_steps integer,
    ready_steps integer,
    execution_status text
)
LANGUAGE sql STABLE AS $$
    WITH c AS (
        SELECT count(*)::int AS total,
               count(*) FILTER (WHERE s.state = 'pending')::int AS pending,
               count(*) FILTER (WHERE s.state = 'enqueued')::int AS enqueued,
               count(*) FILTER (WHERE s.state = 'in_progress')::int AS in_progress,
               count(*) FILTER (WHERE s.state IN ('complete', 'resolved_manually'))::int AS complete,
               count(*) FILTER (WHERE s.state = 'error')::int AS failed,
               count(*) FILTER (WHERE s.state = 'waiting_for_retry')::int AS waiting,
               count(*) FILTER (WHERE s.state = 'cancelled')::int AS cancelled,
               count(*) FILTER (WHERE s.state = 'pending' AND s.unfinished_parents = 0)::int AS ready
        FROM tasker.workflow_steps s WHERE s.task_uuid = p_task_uuid
    ),
    w AS (
        SELECT EXISTS (SELECT 1 FROM tasker.task_starts ts WHERE ts.task_uuid = p_task_uuid) AS scheduled
    )
    SELECT t.task_uuid, t.namespace, t.state, t.priority,
           c.total, c.pending, c.enqueued, c.in_progress, c.complete, c.failed, c.waiting,
           c.cancelled,
           CASE WHEN t.state IN ('pending', 'in_progress') AND NOT w.scheduled THEN c.ready ELSE 0 END,
           CASE
               WHEN t.state = 'cancelled' THEN 'cancelled'
               WHEN c.total > 0 AND c.complete = c.total THEN 'all_complete'
               WHEN w.scheduled AND t.state IN ('pending', 'in_progress') THEN 'scheduled'
               WHEN t.state IN ('pending', 'in_progress') AND c.ready > 0 THEN 'has_ready_steps'
               WHEN c.enqueued + c.in_progress > 0 THEN 'processing'
               WHEN c.failed > 0 THEN 'blocked_by_failures'
               ELSE 'waiting_for_dependencies'
           END
    FROM tasker.tasks t, c, w
    WHERE t.task_uuid = p_task_uuid
$$;

-- A cancelled task no longer waits for its start. The start is dropped first, under the
-- task's lock: a promotion under way holds the start's row, so the cancel waits for it and
-- then also removes what it made ready.
CREATE OR REPLACE FUNCTION tasker.cancel_task(p_task_uuid uuid, p_reason text, p_metadata jsonb DEFAULT '{}'::jsonb)
RETURNS text
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_state text;
BEGIN
    PERFORM set_config('tasker.transition_metadata',
        (coalesce(p_metadata, '{}'::jsonb) || jsonb_build_object('reason', p_reason))::text, true);
    SELECT t.state INTO v_state FROM tasker.tasks t WHERE t.task_uuid = p_task_uuid FOR NO KEY UPDATE;
    IF NOT FOUND THEN RETURN 'task_not_found'; END IF;
    IF v_state NOT IN ('pending', 'in_progress', 'error') THEN RETURN 'task_already_final'; END IF;
    DELETE FROM tasker.task_starts ts WHERE ts.task_uuid = p_task_uuid;
    UPDATE tasker.tasks t SET state = 'cancelled', completed_at = clock_timestamp()
    WHERE t.task_uuid = p_task_uuid;
    -- the queue rows of the steps cancelled, by step: the queue has no index that leads with
    -- the task, and under a backlog a walk of it would hold the task's lock meanwhile
    WITH cancelled AS (
        UPDATE tasker.workflow_steps s
        SET state = 'cancelled', completed_at = clock_timestamp(), next_retry_at = NULL
        WHERE s.task_uuid = p_task_uuid
          AND s.state IN ('pending', 'enqueued', 'in_progress', 'waiting_for_retry')
        RETURNING s.step_uuid
    )
    DELETE FROM tasker.step_queue q WHERE q.step_uuid IN (SELECT c.step_uuid FROM cancelled c);
    DELETE FROM tasker.ready_steps r WHERE r.task_uuid = p_task_uuid;
    RETURN 'cancelled';
END
$$;

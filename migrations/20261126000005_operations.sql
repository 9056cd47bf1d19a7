-- Operations: every state-changing action of the service is one function, so each is one
-- round trip and one transaction. Outcomes are returned as text codes (never raised) when they
-- are a normal answer to a caller (a stale attempt, a task claimed by another instance); the
-- service maps them to gRPC status codes.

-- Create a task with its DAG. p_steps is a JSON array of
--   {"step_uuid": uuid, "name": text, "depends_on": [text], "max_attempts": int,
--    "retryable": bool, "inputs": object}
-- The service validates the DAG first; the database still refuses unknown dependencies
-- (TK004), duplicate names (unique violation) and cycles (TK003). An idempotency key that
-- already names a task in the namespace returns that task (created = false) and writes nothing.
CREATE FUNCTION tasker.create_task(
    p_task_uuid uuid, p_namespace text, p_name text, p_priority integer, p_context jsonb,
    p_idempotency_key text, p_steps jsonb, p_metadata jsonb DEFAULT '{}'::jsonb
)
RETURNS TABLE (task_uuid uuid, created boolean, step_name text, step_uuid uuid)
LANGUAGE plpgsql AS $$
DECLARE
    v_existing uuid;
    v_missing text;
BEGIN
    PERFORM set_config('tasker.transition_metadata', p_metadata::text, true);
    INSERT INTO tasker.namespaces (name) VALUES (p_namespace) ON CONFLICT DO NOTHING;

    INSERT INTO tasker.tasks AS t (task_uuid, namespace, name, priority, context, idempotency_key)
    VALUES (p_task_uuid, p_namespace, p_name, p_priority, coalesce(p_context, '{}'::jsonb), p_idempotency_key)
    ON CONFLICT ON CONSTRAINT tasks_idempotency_key_unique DO NOTHING;
    IF NOT FOUND THEN
        SELECT t.task_uuid INTO v_existing FROM tasker.tasks t
        WHERE t.namespace = p_namespace AND t.idempotency_key = p_idempotency_key;
        RETURN QUERY SELECT v_existing, false, s.name, s.step_uuid
            FROM tasker.workflow_steps s WHERE s.task_uuid = v_existing ORDER BY s.created_at, s.name;
        RETURN;
    END IF;

    INSERT INTO tasker.workflow_steps (step_uuid, task_uuid, name, max_attempts, retryable, inputs)
    SELECT (e->>'step_uuid')::uuid, p_task_uuid, e->>'name',
           coalesce((e->>'max_attempts')::int, 3), coalesce((e->>'retryable')::boolean, true),
           coalesce(e->'inputs', '{}'::jsonb)
    FROM jsonb_array_elements(p_steps) WITH ORDINALITY AS x(e, i)
    ORDER BY i;

    SELECT d.dep INTO v_missing
    FROM jsonb_array_elements(p_steps) e, jsonb_array_elements_text(coalesce(e->'depends_on', '[]'::jsonb)) d(dep)
    WHERE NOT EXISTS (SELECT 1 FROM jsonb_array_elements(p_steps) o WHERE o->>'name' = d.dep)
    LIMIT 1;
    IF v_missing IS NOT NULL THEN
        RAISE EXCEPTION 'unknown dependency %', quote_literal(v_missing) USING ERRCODE = 'TK004';
    END IF;

    INSERT INTO tasker.step_edges (task_uuid, parent_step_uuid, child_step_uuid)
    SELECT DISTINCT p_task_uuid, (p->>'step_uuid')::uuid, (c->>'step_uuid')::uuid
    FROM jsonb_array_elements(p_steps) c,
         jsonb_array_elements_text(coalesce(c->'depends_on', '[]'::jsonb)) d(dep),
         jsonb_array_elements(p_steps) p
    WHERE p->>'name' = d.dep;

    RETURN QUERY SELECT p_task_uuid, true, s.name, s.step_uuid
        FROM tasker.workflow_steps s WHERE s.task_uuid = p_task_uuid ORDER BY s.created_at, s.name;
END
$$;

-- Claim a task and enqueue every ready step, in one transaction.
--
-- Claim: the task row lock, taken with SKIP LOCKED. A task locked by another instance's
-- enqueuer answers 'claimed_elsewhere' at once; the caller retries shortly, because the
-- holder's snapshot may predate a completion that made more steps ready.
-- Exactly once: the CAS pending -> enqueued plus the unique (step_uuid, attempt) queue key.
-- Durability: synchronous_commit = off for this transaction only. Enqueue state is derivable:
-- if a crash loses the commit, the steps are still pending and ready, and the startup sweep or
-- the fallback poller enqueues them again. Anything that depends on the enqueue (a worker's
-- fetch, a completion) commits synchronously later, which flushes the WAL up to and including
-- this commit, so nothing durable can ever rest on a lost enqueue.
CREATE FUNCTION tasker.enqueue_ready_steps(p_task_uuid uuid, p_metadata jsonb DEFAULT '{}'::jsonb)
RETURNS TABLE (outcome text, namespace text, priority integer, enqueued_steps uuid[],
               max_ready_wait_ms double precision)
LANGUAGE plpgsql AS $$
DECLARE
    v_task record;
    v_steps uuid[];
    v_wait double precision;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM set_config('tasker.transition_metadata', p_metadata::text, true);

    SELECT t.namespace, t.priority, t.state INTO v_task
    FROM tasker.tasks t WHERE t.task_uuid = p_task_uuid
    FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        IF EXISTS (SELECT 1 FROM tasker.tasks t WHERE t.task_uuid = p_task_uuid) THEN
            RETURN QUERY SELECT 'claimed_elsewhere'::text, NULL::text, NULL::integer, '{}'::uuid[], NULL::float8;
        ELSE
            RETURN QUERY SELECT 'task_not_found'::text, NULL::text, NULL::integer, '{}'::uuid[], NULL::float8;
        END IF;
        RETURN;
    END IF;
    IF v_task.state NOT IN ('pending', 'in_progress') THEN
        RETURN QUERY SELECT 'task_not_active'::text, v_task.namespace, v_task.priority, '{}'::uuid[], NULL::float8;
        RETURN;
    END IF;

    -- MATERIALIZED: evaluated once, not re-filtered on every rescan of the join below
    WITH ready AS MATERIALIZED (
        SELECT r.step_uuid, r.ready_since FROM tasker.ready_steps_of_task(p_task_uuid) r
    ),
    moved AS (
        UPDATE tasker.workflow_steps s
        SET state = 'enqueued', attempts = s.attempts + 1, enqueued_at = clock_timestamp(),
            next_retry_at = NULL
        FROM ready
        WHERE s.step_uuid = ready.step_uuid AND s.state = 'pending'
        RETURNING s.step_uuid, s.attempts, s.created_at, s.enqueued_at, ready.ready_since
    ),
    queued AS (
        INSERT INTO tasker.step_queue (namespace, task_uuid, step_uuid, attempt, priority, traceparent)
        SELECT v_task.namespace, p_task_uuid, m.step_uuid, m.attempts, v_task.priority,
               left(tasker.current_traceparent(), 128)
        FROM moved m ORDER BY m.created_at
        RETURNING step_queue.step_uuid
    )
    -- ready_since is when the step's last parent completed (or its backoff ended): the wait
    -- from there to enqueued_at is the completion -> enqueue latency the service reports.
    SELECT coalesce(array_agg(m.step_uuid ORDER BY m.created_at), '{}'::uuid[]),
           extract(epoch FROM max(m.enqueued_at - m.ready_since)) * 1000
    INTO v_steps, v_wait
    FROM moved m JOIN queued q ON q.step_uuid = m.step_uuid;

    IF cardinality(v_steps) = 0 THEN
        RETURN QUERY SELECT 'nothing_ready'::text, v_task.namespace, v_task.priority, v_steps, NULL::float8;
        RETURN;
    END IF;
    IF v_task.state = 'pending' THEN
        UPDATE tasker.tasks t SET state = 'in_progress' WHERE t.task_uuid = p_task_uuid AND t.state = 'pending';
    END IF;
    RETURN QUERY SELECT 'enqueued'::text, v_task.namespace, v_task.priority, v_steps, v_wait;
END
$$;

-- Lease up to p_max steps of a namespace to a worker: enqueued -> in_progress, message
-- invisible until the lease expires.
CREATE FUNCTION tasker.fetch_steps(p_namespace text, p_worker_id text, p_max integer, p_lease_ms bigint)
RETURNS TABLE (
    step_uuid uuid, task_uuid uuid, name text, attempt integer, inputs jsonb,
    parent_results jsonb, lease_expires_at timestamptz, enqueued_at timestamptz, traceparent text
)
LANGUAGE plpgsql AS $$
BEGIN
    -- PL/pgSQL for a plan cached per session (an SQL function is re-planned on every call)
    RETURN QUERY
    WITH picked AS (
        SELECT q.msg_id
        FROM tasker.step_queue q
        WHERE q.namespace = p_namespace AND q.leased_by IS NULL
        ORDER BY q.priority DESC, q.msg_id
        LIMIT p_max
        FOR UPDATE SKIP LOCKED
    ),
    leased AS (
        UPDATE tasker.step_queue q
        SET leased_by = p_worker_id,
            visible_at = clock_timestamp() + make_interval(secs => p_lease_ms / 1000.0),
            read_count = q.read_count + 1
        FROM picked WHERE q.msg_id = picked.msg_id
        RETURNING q.msg_id, q.step_uuid, q.attempt, q.visible_at, q.enqueued_at, q.traceparent
    ),
    started AS (
        UPDATE tasker.workflow_steps s
        SET state = 'in_progress', started_at = clock_timestamp()
        FROM leased l
        WHERE s.step_uuid = l.step_uuid AND s.state = 'enqueued' AND s.attempts = l.attempt
        RETURNING s.step_uuid, s.task_uuid, s.name, s.attempts, s.inputs
    )
    SELECT st.step_uuid, st.task_uuid, st.name, st.attempts, st.inputs,
           coalesce((SELECT jsonb_object_agg(ps.name, coalesce(ps.results, 'null'::jsonb))
                     FROM tasker.step_edges e JOIN tasker.workflow_steps ps ON ps.step_uuid = e.parent_step_uuid
                     WHERE e.child_step_uuid = st.step_uuid), '{}'::jsonb),
           l.visible_at, l.enqueued_at, l.traceparent
    FROM started st JOIN leased l ON l.step_uuid = st.step_uuid
    ORDER BY l.msg_id;
END
$$;

-- Why an attempt cannot be acted on, or NULL when the caller holds a live lease on it.
-- Locks the step row. Outcomes: step_not_found, not_in_progress, stale_attempt, lease_expired.
CREATE FUNCTION tasker.check_live_lease(p_step_uuid uuid, p_attempt integer)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_step record;
    v_visible timestamptz;
BEGIN
    SELECT s.state, s.attempts INTO v_step FROM tasker.workflow_steps s
    WHERE s.step_uuid = p_step_uuid FOR UPDATE;
    IF NOT FOUND THEN RETURN 'step_not_found'; END IF;
    IF v_step.attempts <> p_attempt THEN RETURN 'stale_attempt'; END IF;
    IF v_step.state <> 'in_progress' THEN RETURN 'not_in_progress'; END IF;
    SELECT q.visible_at INTO v_visible FROM tasker.step_queue q
    WHERE q.step_uuid = p_step_uuid AND q.attempt = p_attempt AND q.leased_by IS NOT NULL
    FOR UPDATE;
    IF NOT FOUND OR v_visible <= clock_timestamp() THEN RETURN 'lease_expired'; END IF;
    RETURN NULL;
END
$$;

-- The task of a step, with the task's progress lock taken (see lock_task_progress).
CREATE FUNCTION tasker.lock_progress_of_step(p_step_uuid uuid) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_task uuid;
BEGIN
    SELECT s.task_uuid INTO v_task FROM tasker.workflow_steps s WHERE s.step_uuid = p_step_uuid;
    IF FOUND THEN
        PERFORM tasker.lock_task_progress(v_task);
    END IF;
    RETURN v_task;
END
$$;

-- Finish the task when no step is left to do. Caller holds the task's progress lock.
CREATE FUNCTION tasker.complete_task_if_done(p_task_uuid uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM tasker.workflow_steps s
                   WHERE s.task_uuid = p_task_uuid AND s.state NOT IN ('complete', 'resolved_manually')) THEN
        UPDATE tasker.tasks t SET state = 'complete', completed_at = clock_timestamp()
        WHERE t.task_uuid = p_task_uuid AND t.state = 'in_progress';
    END IF;
END
$$;

CREATE FUNCTION tasker.complete_step(
    p_step_uuid uuid, p_attempt integer, p_results jsonb, p_metadata jsonb DEFAULT '{}'::jsonb
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_task uuid := tasker.lock_progress_of_step(p_step_uuid);
    v_problem text := tasker.check_live_lease(p_step_uuid, p_attempt);
BEGIN
    IF v_problem IS NOT NULL THEN RETURN v_problem; END IF;
    PERFORM set_config('tasker.transition_metadata', p_metadata::text, true);
    DELETE FROM tasker.step_queue q WHERE q.step_uuid = p_step_uuid AND q.attempt = p_attempt;
    UPDATE tasker.workflow_steps s
    SET state = 'complete', results = coalesce(p_results, '{}'::jsonb), completed_at = clock_timestamp()
    WHERE s.step_uuid = p_step_uuid AND s.state = 'in_progress' AND s.attempts = p_attempt;
    PERFORM tasker.complete_task_if_done(v_task);
    RETURN 'completed';
END
$$;

-- The end of a failed attempt (the caller checked the lease and holds the progress lock):
-- retry after the backoff when attempts remain and both the step and the failure allow it,
-- otherwise the step is in error and so is its task. A zero backoff returns the step to
-- pending at once, which notifies like any other readiness change.
CREATE FUNCTION tasker.record_attempt_failure(
    p_step_uuid uuid, p_error jsonb, p_retryable boolean, p_backoff_ms bigint
) RETURNS TABLE (outcome text, next_retry_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_step record;
    v_next timestamptz;
BEGIN
    SELECT s.task_uuid, s.attempts, s.max_attempts, s.retryable INTO v_step
    FROM tasker.workflow_steps s WHERE s.step_uuid = p_step_uuid;
    DELETE FROM tasker.step_queue q WHERE q.step_uuid = p_step_uuid AND q.attempt = v_step.attempts;
    IF p_retryable AND v_step.retryable AND v_step.attempts < v_step.max_attempts THEN
        -- a zero backoff is due at once by the readiness clock (the transaction start)
        v_next := CASE WHEN p_backoff_ms <= 0 THEN now()
                       ELSE clock_timestamp() + make_interval(secs => p_backoff_ms / 1000.0) END;
        UPDATE tasker.workflow_steps s
        SET state = 'waiting_for_retry', last_error = p_error, next_retry_at = v_next
        WHERE s.step_uuid = p_step_uuid AND s.state = 'in_progress';
        IF p_backoff_ms <= 0 THEN
            UPDATE tasker.workflow_steps s SET state = 'pending'
            WHERE s.step_uuid = p_step_uuid AND s.state = 'waiting_for_retry';
        END IF;
        RETURN QUERY SELECT 'retry_scheduled'::text, v_next;
    ELSE
        UPDATE tasker.workflow_steps s
        SET state = 'error', last_error = p_error, completed_at = clock_timestamp()
        WHERE s.step_uuid = p_step_uuid AND s.state = 'in_progress';
        UPDATE tasker.tasks t SET state = 'error', completed_at = clock_timestamp()
        WHERE t.task_uuid = v_step.task_uuid AND t.state = 'in_progress';
        RETURN QUERY SELECT 'failed'::text, NULL::timestamptz;
    END IF;
END
$$;

CREATE FUNCTION tasker.fail_step(
    p_step_uuid uuid, p_attempt integer, p_error jsonb, p_retryable boolean, p_backoff_ms bigint,
    p_metadata jsonb DEFAULT '{}'::jsonb
) RETURNS TABLE (outcome text, next_retry_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_task uuid := tasker.lock_progress_of_step(p_step_uuid);
    v_problem text := tasker.check_live_lease(p_step_uuid, p_attempt);
BEGIN
    IF v_problem IS NOT NULL THEN
        RETURN QUERY SELECT v_problem, NULL::timestamptz;
        RETURN;
    END IF;
    PERFORM set_config('tasker.transition_metadata', p_metadata::text, true);
    RETURN QUERY SELECT * FROM tasker.record_attempt_failure(p_step_uuid, p_error, p_retryable, p_backoff_ms);
END
$$;

CREATE FUNCTION tasker.extend_lease(p_step_uuid uuid, p_attempt integer, p_lease_ms bigint)
RETURNS TABLE (outcome text, lease_expires_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_problem text := tasker.check_live_lease(p_step_uuid, p_attempt);
    v_until timestamptz;
BEGIN
    IF v_problem IS NOT NULL THEN
        RETURN QUERY SELECT v_problem, NULL::timestamptz;
        RETURN;
    END IF;
    UPDATE tasker.step_queue q
    SET visible_at = clock_timestamp() + make_interval(secs => p_lease_ms / 1000.0)
    WHERE q.step_uuid = p_step_uuid AND q.attempt = p_attempt
    RETURNING q.visible_at INTO v_until;
    RETURN QUERY SELECT 'extended'::text, v_until;
END
$$;

-- Steps whose retry backoff has elapsed go back to pending (the trigger then notifies).
-- p_namespaces: NULL for all, or namespace patterns (see namespace_matches).
CREATE FUNCTION tasker.promote_due_retries(p_limit integer DEFAULT 500, p_namespaces text[] DEFAULT NULL)
RETURNS TABLE (task_uuid uuid, step_uuid uuid, namespace text, priority integer)
LANGUAGE sql AS $$
    WITH due AS (
        SELECT s.step_uuid FROM tasker.workflow_steps s
        JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
        WHERE s.state = 'waiting_for_retry' AND s.next_retry_at <= now()
          AND tasker.namespace_matches(t.namespace, p_namespaces)
        ORDER BY s.next_retry_at
        LIMIT p_limit
        FOR UPDATE OF s SKIP LOCKED
    )
    UPDATE tasker.workflow_steps s SET state = 'pending'
    FROM due, tasker.tasks t
    WHERE s.step_uuid = due.step_uuid AND s.state = 'waiting_for_retry' AND t.task_uuid = s.task_uuid
    RETURNING s.task_uuid, s.step_uuid, t.namespace, t.priority
$$;

-- Leases that ran out end their attempt as a retryable failure with no backoff: the worker
-- is presumed dead. max_attempts still applies.
CREATE FUNCTION tasker.expire_leases(p_limit integer DEFAULT 500, p_namespaces text[] DEFAULT NULL)
RETURNS TABLE (task_uuid uuid, step_uuid uuid, outcome text, namespace text, priority integer)
LANGUAGE plpgsql AS $$
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
        PERFORM tasker.lock_task_progress(v_msg.task_uuid);
        -- re-check under the lock: the worker may have answered in the meantime
        IF tasker.check_live_lease(v_msg.step_uuid, v_msg.attempt) = 'lease_expired'
           AND EXISTS (SELECT 1 FROM tasker.step_queue q WHERE q.step_uuid = v_msg.step_uuid AND q.attempt = v_msg.attempt)
        THEN
            SELECT f.outcome INTO v_outcome FROM tasker.record_attempt_failure(
                v_msg.step_uuid,
                jsonb_build_object('message', 'lease expired', 'worker_id', v_msg.leased_by),
                true, 0) f;
            RETURN QUERY SELECT v_msg.task_uuid, v_msg.step_uuid, v_outcome, v_msg.namespace, v_msg.priority;
        END IF;
    END LOOP;
END
$$;

-- The earliest moment at which a retry becomes due or a lease runs out: the service sleeps
-- until then instead of waiting for the next fallback poll.
CREATE FUNCTION tasker.next_deadline(p_namespaces text[] DEFAULT NULL) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT least(
        (SELECT min(s.next_retry_at) FROM tasker.workflow_steps s JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
         WHERE s.state = 'waiting_for_retry' AND tasker.namespace_matches(t.namespace, p_namespaces)),
        (SELECT min(q.visible_at) FROM tasker.step_queue q
         WHERE q.leased_by IS NOT NULL AND tasker.namespace_matches(q.namespace, p_namespaces)))
$$;

CREATE FUNCTION tasker.cancel_task(p_task_uuid uuid, p_reason text, p_metadata jsonb DEFAULT '{}'::jsonb)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_state text;
BEGIN
    PERFORM tasker.lock_task_progress(p_task_uuid);
    PERFORM set_config('tasker.transition_metadata',
        (coalesce(p_metadata, '{}'::jsonb) || jsonb_build_object('reason', p_reason))::text, true);
    SELECT t.state INTO v_state FROM tasker.tasks t WHERE t.task_uuid = p_task_uuid FOR UPDATE;
    IF NOT FOUND THEN RETURN 'task_not_found'; END IF;
    IF v_state NOT IN ('pending', 'in_progress', 'error') THEN RETURN 'task_already_final'; END IF;
    UPDATE tasker.tasks t SET state = 'cancelled', completed_at = clock_timestamp()
    WHERE t.task_uuid = p_task_uuid;
    UPDATE tasker.workflow_steps s SET state = 'cancelled', completed_at = clock_timestamp()
    WHERE s.task_uuid = p_task_uuid AND s.state IN ('pending', 'enqueued', 'in_progress', 'waiting_for_retry');
    DELETE FROM tasker.step_queue q WHERE q.task_uuid = p_task_uuid;
    RETURN 'cancelled';
END
$$;

-- An operator marks a step as done by hand; it counts as complete for its dependents. A task
-- in error goes back to in_progress once no failed step is left.
CREATE FUNCTION tasker.resolve_step_manually(
    p_step_uuid uuid, p_reason text, p_results jsonb DEFAULT NULL, p_metadata jsonb DEFAULT '{}'::jsonb
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_task uuid := tasker.lock_progress_of_step(p_step_uuid);
    v_state text;
BEGIN
    IF v_task IS NULL THEN RETURN 'step_not_found'; END IF;
    PERFORM set_config('tasker.transition_metadata',
        (coalesce(p_metadata, '{}'::jsonb) || jsonb_build_object('reason', p_reason))::text, true);
    SELECT s.state INTO v_state FROM tasker.workflow_steps s WHERE s.step_uuid = p_step_uuid FOR UPDATE;
    IF NOT tasker.step_transition_allowed(v_state, 'resolved_manually') THEN RETURN 'illegal_transition'; END IF;
    -- reopen first, so that the readiness trigger sees an active task
    IF NOT EXISTS (SELECT 1 FROM tasker.workflow_steps s
                   WHERE s.task_uuid = v_task AND s.state = 'error' AND s.step_uuid <> p_step_uuid) THEN
        UPDATE tasker.tasks t SET state = 'in_progress', completed_at = NULL
        WHERE t.task_uuid = v_task AND t.state = 'error';
    END IF;
    UPDATE tasker.workflow_steps s
    SET state = 'resolved_manually', results = coalesce(p_results, s.results), completed_at = clock_timestamp()
    WHERE s.step_uuid = p_step_uuid;
    PERFORM tasker.complete_task_if_done(v_task);
    RETURN 'resolved';
END
$$;

-- Many completions in one transaction (one commit, one pass through the NOTIFY commit lock).
-- Each item is exactly tasker.complete_step, with its own trace context; items are taken in
-- task order so that two batches never wait on each other's progress locks in a cycle.
-- Returns each item's outcome by its position in the input arrays.
CREATE FUNCTION tasker.complete_steps(
    p_steps uuid[], p_attempts integer[], p_results jsonb[], p_traceparents text[],
    p_metadata jsonb DEFAULT '{}'::jsonb
) RETURNS TABLE (idx integer, outcome text)
LANGUAGE plpgsql AS $$
DECLARE
    v_item record;
BEGIN
    FOR v_item IN
        SELECT i.ord::int AS ord, i.step_uuid, s.task_uuid
        FROM unnest(p_steps) WITH ORDINALITY AS i(step_uuid, ord)
        LEFT JOIN tasker.workflow_steps s ON s.step_uuid = i.step_uuid
        ORDER BY s.task_uuid NULLS FIRST, i.ord
    LOOP
        PERFORM set_config('tasker.traceparent', coalesce(p_traceparents[v_item.ord], ''), true);
        RETURN QUERY SELECT v_item.ord,
            tasker.complete_step(v_item.step_uuid, p_attempts[v_item.ord], p_results[v_item.ord], p_metadata);
    END LOOP;
END
$$;

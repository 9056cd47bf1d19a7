-- Older signatures, kept for a replica of the previous release during a rolling upgrade: it
-- calls these while the new replicas call the current ones (in the other files). They go
-- with the release after the next. Checked against the live database like the others
-- (tests/sql_layout.rs).


-- Complete an attempt. p_max_parent_results_bytes (NULL: no budget): refused with
-- 'parent_results_too_large', changing nothing, when these results would give a child more
-- parent results than that to be leased with.
-- (from migrations/20261127000001_baseline.sql)
CREATE FUNCTION tasker.complete_step(
    p_step_uuid uuid, p_attempt integer, p_results jsonb, p_metadata jsonb DEFAULT '{}'::jsonb,
    p_max_parent_results_bytes integer DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_task_uuid uuid;
    v_bytes integer;
    v_task record;
    v_problem text;
    v_finished record;
BEGIN
    -- what a child receives of this step: "<name>": <results>, as JSON text
    SELECT s.task_uuid, octet_length(s.name) + octet_length(coalesce(p_results, '{}'::jsonb)::text) + 4
    INTO v_task_uuid, v_bytes
    FROM tasker.workflow_steps s WHERE s.step_uuid = p_step_uuid;
    IF NOT FOUND THEN RETURN 'step_not_found'; END IF;
    SELECT t.namespace, t.state INTO v_task FROM tasker.tasks t
    WHERE t.task_uuid = v_task_uuid FOR NO KEY UPDATE;
    v_problem := tasker.check_live_lease(p_step_uuid, p_attempt);
    IF v_problem IS NOT NULL THEN RETURN v_problem; END IF;
    -- the children's counters cannot move meanwhile: every finish holds the task's row lock
    IF p_max_parent_results_bytes IS NOT NULL AND EXISTS (
        SELECT 1 FROM tasker.step_edges e
        CROSS JOIN LATERAL (SELECT c.parent_results_bytes FROM tasker.workflow_steps c
                            WHERE c.step_uuid = e.child_step_uuid OFFSET 0) c
        WHERE e.parent_step_uuid = p_step_uuid
          AND c.parent_results_bytes + v_bytes > p_max_parent_results_bytes) THEN
        RETURN 'parent_results_too_large';
    END IF;
    PERFORM set_config('tasker.transition_metadata', p_metadata::text, true);
    DELETE FROM tasker.step_queue q WHERE q.step_uuid = p_step_uuid AND q.attempt = p_attempt;
    UPDATE tasker.workflow_steps s
    SET state = 'complete', results = coalesce(p_results, '{}'::jsonb), completed_at = clock_timestamp()
    WHERE s.step_uuid = p_step_uuid AND s.state = 'in_progress' AND s.attempts = p_attempt;
    SELECT * INTO v_finished FROM tasker.finish_step(p_step_uuid, v_task_uuid, v_bytes);
    IF v_finished.ready_children > 0 AND v_finished.task_state IN ('pending', 'in_progress') THEN
        PERFORM tasker.send_task_ready(v_task_uuid, v_task.namespace, 'step_transition');
    END IF;
    RETURN 'completed';
END
$$;

-- Many completions in one transaction (one commit, one pass through the NOTIFY commit lock).
-- Each item is exactly tasker.complete_step, with its own trace context; items are taken in
-- task order, so two batches lock tasks in the same order and never wait on each other in a
-- cycle. Returns each item's outcome by its position in the input arrays.
-- (from migrations/20261127000001_baseline.sql)
CREATE FUNCTION tasker.complete_steps(
    p_steps uuid[], p_attempts integer[], p_results jsonb[], p_traceparents text[],
    p_metadata jsonb DEFAULT '{}'::jsonb, p_max_parent_results_bytes integer DEFAULT NULL
) RETURNS TABLE (idx integer, outcome text)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_item record;
BEGIN
    FOR v_item IN
        SELECT i.ord::int AS ord, i.step_uuid, s.task_uuid
        FROM unnest(p_steps) WITH ORDINALITY AS i(step_uuid, ord)
        LEFT JOIN LATERAL (SELECT w.task_uuid FROM tasker.workflow_steps w
                           WHERE w.step_uuid = i.step_uuid OFFSET 0) s ON true
        ORDER BY s.task_uuid NULLS FIRST, i.ord
    LOOP
        PERFORM set_config('tasker.traceparent', coalesce(p_traceparents[v_item.ord], ''), true);
        RETURN QUERY SELECT v_item.ord,
            tasker.complete_step(v_item.step_uuid, p_attempts[v_item.ord], p_results[v_item.ord], p_metadata,
                                 p_max_parent_results_bytes);
    END LOOP;
END
$$;

-- ExtendLease without a lease token (the previous release).
-- (from migrations/20261127000001_baseline.sql)
CREATE FUNCTION tasker.extend_lease(p_step_uuid uuid, p_attempt integer, p_lease_ms bigint)
RETURNS TABLE (outcome text, lease_expires_at timestamptz)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
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

-- FailStep without a lease token (the previous release).
-- (from migrations/20261127000001_baseline.sql)
CREATE FUNCTION tasker.fail_step(
    p_step_uuid uuid, p_attempt integer, p_error jsonb, p_retryable boolean, p_backoff_ms bigint,
    p_metadata jsonb DEFAULT '{}'::jsonb
) RETURNS TABLE (outcome text, next_retry_at timestamptz)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_task_uuid uuid;
    v_problem text;
BEGIN
    SELECT s.task_uuid INTO v_task_uuid FROM tasker.workflow_steps s WHERE s.step_uuid = p_step_uuid;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'step_not_found'::text, NULL::timestamptz;
        RETURN;
    END IF;
    PERFORM 1 FROM tasker.tasks t WHERE t.task_uuid = v_task_uuid FOR NO KEY UPDATE;
    v_problem := tasker.check_live_lease(p_step_uuid, p_attempt);
    IF v_problem IS NOT NULL THEN
        RETURN QUERY SELECT v_problem, NULL::timestamptz;
        RETURN;
    END IF;
    PERFORM set_config('tasker.transition_metadata', p_metadata::text, true);
    RETURN QUERY SELECT * FROM tasker.record_attempt_failure(p_step_uuid, p_error, p_retryable, p_backoff_ms);
END
$$;

-- The older heartbeat, still called by replicas of the previous release during a rolling
-- upgrade: they do not say, and are taken to serve every namespace (as they were); the
-- claimers they are told of are the same as everyone's.
-- (from migrations/20261127000007_claimers_serve_every_namespace.sql)
CREATE OR REPLACE FUNCTION tasker.replica_heartbeat(p_replica_id uuid, p_address text, p_version text,
                                                    p_gone_after_ms bigint, p_mode text,
                                                    p_listening boolean,
                                                    OUT other_replicas integer, OUT fleet_mode text,
                                                    OUT claimers uuid[])
LANGUAGE sql AS $$
    SELECT h.other_replicas, h.fleet_mode, h.claimers
    FROM tasker.replica_heartbeat(p_replica_id, p_address, p_version, p_gone_after_ms, p_mode,
                                  p_listening, true) h
$$;

-- ResolveStep without the results' size or the budget (the previous release).
-- (from migrations/20261127000006_resolve_step_fixes.sql)
CREATE OR REPLACE FUNCTION tasker.resolve_step_manually(
    p_step_uuid uuid, p_reason text, p_results jsonb DEFAULT NULL, p_metadata jsonb DEFAULT '{}'::jsonb
) RETURNS text
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_task_uuid uuid;
    v_task record;
    v_state text;
    v_bytes integer;
    v_finished record;
BEGIN
    SELECT s.task_uuid INTO v_task_uuid FROM tasker.workflow_steps s WHERE s.step_uuid = p_step_uuid;
    IF NOT FOUND THEN RETURN 'step_not_found'; END IF;
    SELECT t.namespace, t.state INTO v_task FROM tasker.tasks t
    WHERE t.task_uuid = v_task_uuid FOR NO KEY UPDATE;
    PERFORM set_config('tasker.transition_metadata',
        (coalesce(p_metadata, '{}'::jsonb) || jsonb_build_object('reason', p_reason))::text, true);
    SELECT s.state INTO v_state FROM tasker.workflow_steps s WHERE s.step_uuid = p_step_uuid FOR UPDATE;
    IF NOT tasker.step_transition_allowed(v_state, 'resolved_manually') THEN RETURN 'illegal_transition'; END IF;
    -- an operator's action starts a task no worker has touched: only a task in progress
    -- completes when its last step finishes (finish_step)
    IF v_task.state = 'pending' THEN
        UPDATE tasker.tasks t SET state = 'in_progress'
        WHERE t.task_uuid = v_task_uuid AND t.state = 'pending';
    END IF;
    -- reopen first, so that the readiness announcement sees an active task
    IF v_task.state = 'error' AND NOT EXISTS (
        SELECT 1 FROM tasker.workflow_steps s
        WHERE s.task_uuid = v_task_uuid AND s.state = 'error' AND s.step_uuid <> p_step_uuid) THEN
        UPDATE tasker.tasks t SET state = 'in_progress', completed_at = NULL
        WHERE t.task_uuid = v_task_uuid AND t.state = 'error';
    END IF;
    DELETE FROM tasker.step_queue q WHERE q.step_uuid = p_step_uuid;
    DELETE FROM tasker.ready_steps r WHERE r.step_uuid = p_step_uuid;
    UPDATE tasker.workflow_steps s
    SET state = 'resolved_manually', results = coalesce(p_results, s.results), completed_at = clock_timestamp()
    WHERE s.step_uuid = p_step_uuid
    RETURNING octet_length(s.name) + octet_length(coalesce(s.results, 'null'::jsonb)::text) + 4 INTO v_bytes;
    -- an operator's results are not held to the workers' budget, but they are counted
    SELECT * INTO v_finished FROM tasker.finish_step(p_step_uuid, v_task_uuid, v_bytes);
    -- announce what is ready now: this step's children, and steps made ready while the task
    -- was in error (a sibling's completion, a retry falling due), which nothing announced then
    IF v_finished.task_state IN ('pending', 'in_progress') AND (
        v_finished.ready_children > 0
        OR EXISTS (SELECT 1 FROM tasker.ready_steps r WHERE r.task_uuid = v_task_uuid)) THEN
        PERFORM tasker.send_task_ready(v_task_uuid, v_task.namespace, 'step_transition');
    END IF;
    RETURN 'resolved';
END
$$;

-- The previous release's claim-and-enqueue, for a replica of it during a rolling upgrade: its
-- parked fetches take the default queue.
-- (from migrations/20261204000006_step_queues.sql)
CREATE OR REPLACE FUNCTION tasker.enqueue_ready_steps(
    p_task_uuid uuid, p_metadata jsonb DEFAULT '{}'::jsonb, p_takers jsonb DEFAULT '[]'::jsonb,
    p_announce_as uuid DEFAULT NULL
)
RETURNS TABLE (outcome text, namespace text, priority integer, enqueued_steps uuid[],
               max_ready_wait_ms double precision, leased jsonb)
LANGUAGE sql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
    SELECT c.outcome, c.namespace, c.priority, c.enqueued_steps, c.max_ready_wait_ms,
           (SELECT coalesce(jsonb_agg(l - 'queue'), '[]'::jsonb) FROM jsonb_array_elements(c.leased) l)
    FROM tasker.claim_and_enqueue(p_task_uuid, p_metadata, p_takers, p_announce_as) c
$$;

-- The previous release's fetch: the default queue.
-- (from migrations/20261204000006_step_queues.sql)
CREATE OR REPLACE FUNCTION tasker.fetch_steps(p_namespace text, p_worker_id text, p_max integer, p_lease_ms bigint)
RETURNS TABLE (
    step_uuid uuid, task_uuid uuid, name text, attempt integer, inputs jsonb,
    parent_results jsonb, lease_expires_at timestamptz, enqueued_at timestamptz, traceparent text,
    lease_token uuid
)
LANGUAGE sql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
    SELECT f.step_uuid, f.task_uuid, f.name, f.attempt, f.inputs, f.parent_results,
           f.lease_expires_at, f.enqueued_at, f.traceparent, f.lease_token
    FROM tasker.fetch_steps(p_namespace, ARRAY['default'], p_worker_id, p_max, p_lease_ms) f
$$;

-- Plans that cannot drift as the tables grow.
--
-- PL/pgSQL caches a generic plan per statement and session, costed with the statistics of the
-- moment: a service started on an empty database caches plans for empty tables, and keeps
-- them until something invalidates them (with autovacuum off, nothing does). Measured in a
-- 200 steps/s soak with auto_explain: a sequential scan of workflow_steps to find one step's
-- parents, a hash join over every pending step to update one task's, and a materialized scan
-- of the whole primary key joined to the ready steps. CPU was 90 % busy at a tenth of this
-- machine's throughput and the completion -> enqueue p50 rose from 3 ms to seconds.
--
-- Every statement on the hot path touches a handful of rows by key, and is now written so
-- that its right plan is also its only sensible one, whatever the statistics say:
--   1. single-table statements with an equality on a unique key, or an ordered walk of the
--      one index made for them; joins to a parent or queued row are LATERAL subqueries that
--      cannot be flattened (OFFSET 0), so they run as a key probe per outer row;
--   2. no statement's WHERE implies the predicate of a partial index it should not use (a
--      partial index is otherwise a cheap-looking "scan everything and filter");
--   3. the functions plan with sequential, bitmap, hash-join and merge-join paths off, so
--      that not even a stale estimate for an empty table can choose a full scan. The settings
--      hold while the function (and what it calls) runs and are restored on return.
-- Reporting functions that scan many rows (ready_tasks, step_readiness,
-- task_execution_context) and create_task keep the planner's own choice.

-- Rule 2. The enqueue's UPDATE (step_uuid = ... AND state = 'pending') was planned as a walk
-- of the pending index over every task. The pending index now also requires attempts left, a
-- condition only the two readiness queries below state, so no UPDATE can use it. A pending
-- step without attempts left is never ready, so nothing they look for is missed.
DROP INDEX tasker.workflow_steps_pending_idx;
CREATE INDEX workflow_steps_pending_idx ON tasker.workflow_steps (task_uuid)
    WHERE state = 'pending' AND attempts < max_attempts;

-- The retry index likewise requires a due time, which the retry queries imply
-- (next_retry_at <= ...) and the by-key UPDATEs of a waiting step do not.
DROP INDEX tasker.workflow_steps_retry_due_idx;
CREATE INDEX workflow_steps_retry_due_idx ON tasker.workflow_steps (next_retry_at)
    WHERE state = 'waiting_for_retry' AND next_retry_at IS NOT NULL;

CREATE OR REPLACE FUNCTION tasker.next_deadline(p_namespaces text[] DEFAULT NULL) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT least(
        (SELECT min(s.next_retry_at) FROM tasker.workflow_steps s JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
         WHERE s.state = 'waiting_for_retry' AND s.next_retry_at IS NOT NULL
           AND tasker.namespace_matches(t.namespace, p_namespaces)),
        (SELECT min(q.visible_at) FROM tasker.step_queue q
         WHERE q.leased_by IS NOT NULL AND tasker.namespace_matches(q.namespace, p_namespaces)))
$$;

-- Nothing reads tasks_active_idx (ready_tasks starts from pending steps), every task state
-- change rewrote it, and it offered the same trap to the task UPDATEs.
DROP INDEX tasker.tasks_active_idx;

CREATE OR REPLACE FUNCTION tasker.ready_steps_of_task(p_task_uuid uuid)
RETURNS TABLE (step_uuid uuid, ready_since timestamptz, created_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT r.step_uuid, r.ready_since, r.created_at
    FROM tasker.ready_among(ARRAY(
        SELECT s.step_uuid FROM tasker.workflow_steps s
        WHERE s.task_uuid = p_task_uuid AND s.state = 'pending' AND s.attempts < s.max_attempts)) r
$$;

CREATE OR REPLACE FUNCTION tasker.ready_tasks(
    p_namespaces text[] DEFAULT NULL,
    p_limit integer DEFAULT 100,
    p_ready_before timestamptz DEFAULT 'infinity',
    p_offset integer DEFAULT 0
)
RETURNS TABLE (
    task_uuid uuid,
    namespace text,
    priority integer,
    computed_priority integer,
    ready_steps integer,
    ready_since timestamptz,
    task_state text
)
LANGUAGE sql STABLE AS $$
    WITH ready AS (
        SELECT r.task_uuid, r.ready_since AS since
        FROM tasker.ready_among(ARRAY(
            SELECT s.step_uuid FROM tasker.workflow_steps s
            WHERE s.state = 'pending' AND s.attempts < s.max_attempts)) r
    ),
    per_task AS (
        SELECT r.task_uuid, count(*)::int AS n, min(r.since) AS since
        FROM ready r
        GROUP BY r.task_uuid
    )
    SELECT t.task_uuid, t.namespace, t.priority,
           tasker.computed_priority(t.priority, pt.since) AS cp,
           pt.n, pt.since, t.state
    FROM per_task pt
    JOIN tasker.tasks t ON t.task_uuid = pt.task_uuid
    WHERE t.state IN ('pending', 'in_progress')
      AND tasker.namespace_matches(t.namespace, p_namespaces)
      AND pt.since < p_ready_before
    ORDER BY cp DESC, pt.since, t.task_uuid
    LIMIT p_limit OFFSET p_offset
$$;

-- One candidate at a time: the step by primary key, then its parents by the child-edge index
-- and a primary-key probe each. The conditions are those of the previous version.
CREATE OR REPLACE FUNCTION tasker.ready_among(p_steps uuid[])
RETURNS TABLE (step_uuid uuid, task_uuid uuid, ready_since timestamptz, created_at timestamptz)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_step uuid;
    v_s record;
    v_unfinished bigint;
    v_last_parent timestamptz;
BEGIN
    FOREACH v_step IN ARRAY coalesce(p_steps, '{}'::uuid[]) LOOP
        SELECT s.task_uuid, s.state, s.attempts, s.max_attempts, s.next_retry_at, s.created_at
        INTO v_s
        FROM tasker.workflow_steps s WHERE s.step_uuid = v_step;
        CONTINUE WHEN NOT FOUND
            OR v_s.state <> 'pending'
            OR v_s.attempts >= v_s.max_attempts
            OR (v_s.next_retry_at IS NOT NULL AND v_s.next_retry_at > now());
        SELECT count(*) FILTER (WHERE ps.state NOT IN ('complete', 'resolved_manually')),
               max(ps.completed_at)
        INTO v_unfinished, v_last_parent
        FROM tasker.step_edges e
        CROSS JOIN LATERAL (SELECT p.state, p.completed_at FROM tasker.workflow_steps p
                            WHERE p.step_uuid = e.parent_step_uuid OFFSET 0) ps
        WHERE e.child_step_uuid = v_step;
        CONTINUE WHEN v_unfinished > 0;
        step_uuid := v_step;
        task_uuid := v_s.task_uuid;
        ready_since := greatest(v_s.created_at, v_s.next_retry_at, v_last_parent);
        created_at := v_s.created_at;
        RETURN NEXT;
    END LOOP;
END
$$;

-- Claim and enqueue as before (see the previous migration for claim and durability), one
-- ready step at a time by primary key instead of an UPDATE joined to the ready set.
CREATE OR REPLACE FUNCTION tasker.enqueue_ready_steps(p_task_uuid uuid, p_metadata jsonb DEFAULT '{}'::jsonb)
RETURNS TABLE (outcome text, namespace text, priority integer, enqueued_steps uuid[],
               max_ready_wait_ms double precision)
LANGUAGE plpgsql AS $$
DECLARE
    v_task record;
    v_ready record;
    v_attempt integer;
    v_enqueued_at timestamptz;
    v_steps uuid[] := '{}';
    v_wait double precision;
    v_traceparent text := left(tasker.current_traceparent(), 128);
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

    FOR v_ready IN
        SELECT r.step_uuid, r.ready_since FROM tasker.ready_steps_of_task(p_task_uuid) r
        ORDER BY r.created_at, r.step_uuid
    LOOP
        UPDATE tasker.workflow_steps s
        SET state = 'enqueued', attempts = s.attempts + 1, enqueued_at = clock_timestamp(),
            next_retry_at = NULL
        WHERE s.step_uuid = v_ready.step_uuid AND s.state = 'pending'
        RETURNING s.attempts, s.enqueued_at INTO v_attempt, v_enqueued_at;
        CONTINUE WHEN NOT FOUND;
        INSERT INTO tasker.step_queue (namespace, task_uuid, step_uuid, attempt, priority, traceparent)
        VALUES (v_task.namespace, p_task_uuid, v_ready.step_uuid, v_attempt, v_task.priority, v_traceparent);
        v_steps := v_steps || v_ready.step_uuid;
        -- ready_since is when the step's last parent completed (or its backoff ended): the
        -- wait from there to enqueued_at is the completion -> enqueue latency reported
        v_wait := greatest(v_wait, extract(epoch FROM v_enqueued_at - v_ready.ready_since) * 1000);
    END LOOP;

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

-- Lease up to p_max steps of a namespace to a worker, best priority first: an ordered walk of
-- the fetch index, then each message and its step by key.
CREATE OR REPLACE FUNCTION tasker.fetch_steps(p_namespace text, p_worker_id text, p_max integer, p_lease_ms bigint)
RETURNS TABLE (
    step_uuid uuid, task_uuid uuid, name text, attempt integer, inputs jsonb,
    parent_results jsonb, lease_expires_at timestamptz, enqueued_at timestamptz, traceparent text
)
LANGUAGE plpgsql AS $$
DECLARE
    v_msg record;
    v_q record;
    v_s record;
BEGIN
    FOR v_msg IN
        SELECT q.msg_id
        FROM tasker.step_queue q
        WHERE q.namespace = p_namespace AND q.leased_by IS NULL
        ORDER BY q.priority DESC, q.msg_id
        LIMIT p_max
        FOR UPDATE SKIP LOCKED
    LOOP
        UPDATE tasker.step_queue q
        SET leased_by = p_worker_id,
            visible_at = clock_timestamp() + make_interval(secs => p_lease_ms / 1000.0),
            read_count = q.read_count + 1
        WHERE q.msg_id = v_msg.msg_id
        RETURNING q.step_uuid, q.attempt, q.visible_at, q.enqueued_at, q.traceparent INTO v_q;
        UPDATE tasker.workflow_steps s
        SET state = 'in_progress', started_at = clock_timestamp()
        WHERE s.step_uuid = v_q.step_uuid AND s.state = 'enqueued' AND s.attempts = v_q.attempt
        RETURNING s.task_uuid, s.name, s.inputs INTO v_s;
        CONTINUE WHEN NOT FOUND;
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
        lease_expires_at := v_q.visible_at;
        enqueued_at := v_q.enqueued_at;
        traceparent := v_q.traceparent;
        RETURN NEXT;
    END LOOP;
END
$$;

-- As before; the queue row is found by its unique (step, attempt) key and its lease checked
-- here, so that the lease index (leased_by IS NOT NULL) is not walked to find one row.
CREATE OR REPLACE FUNCTION tasker.check_live_lease(p_step_uuid uuid, p_attempt integer)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_step record;
    v_msg record;
BEGIN
    SELECT s.state, s.attempts INTO v_step FROM tasker.workflow_steps s
    WHERE s.step_uuid = p_step_uuid FOR UPDATE;
    IF NOT FOUND THEN RETURN 'step_not_found'; END IF;
    IF v_step.attempts <> p_attempt THEN RETURN 'stale_attempt'; END IF;
    IF v_step.state <> 'in_progress' THEN RETURN 'not_in_progress'; END IF;
    SELECT q.visible_at, q.leased_by INTO v_msg FROM tasker.step_queue q
    WHERE q.step_uuid = p_step_uuid AND q.attempt = p_attempt
    FOR UPDATE;
    IF NOT FOUND OR v_msg.leased_by IS NULL OR v_msg.visible_at <= clock_timestamp() THEN
        RETURN 'lease_expired';
    END IF;
    RETURN NULL;
END
$$;

-- As before; each item's task by a primary-key probe rather than a join.
CREATE OR REPLACE FUNCTION tasker.complete_steps(
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
        LEFT JOIN LATERAL (SELECT w.task_uuid FROM tasker.workflow_steps w
                           WHERE w.step_uuid = i.step_uuid OFFSET 0) s ON true
        ORDER BY s.task_uuid NULLS FIRST, i.ord
    LOOP
        PERFORM set_config('tasker.traceparent', coalesce(p_traceparents[v_item.ord], ''), true);
        RETURN QUERY SELECT v_item.ord,
            tasker.complete_step(v_item.step_uuid, p_attempts[v_item.ord], p_results[v_item.ord], p_metadata);
    END LOOP;
END
$$;

-- Rule 3.
DO $$
DECLARE
    v_fn regprocedure;
BEGIN
    FOREACH v_fn IN ARRAY ARRAY[
        'tasker.ready_among(uuid[])',
        'tasker.enqueue_ready_steps(uuid, jsonb)',
        'tasker.fetch_steps(text, text, integer, bigint)',
        'tasker.check_live_lease(uuid, integer)',
        'tasker.lock_progress_of_step(uuid)',
        'tasker.complete_task_if_done(uuid)',
        'tasker.complete_step(uuid, integer, jsonb, jsonb)',
        'tasker.complete_steps(uuid[], integer[], jsonb[], text[], jsonb)',
        'tasker.record_attempt_failure(uuid, jsonb, boolean, bigint)',
        'tasker.fail_step(uuid, integer, jsonb, boolean, bigint, jsonb)',
        'tasker.extend_lease(uuid, integer, bigint)',
        'tasker.promote_due_retries(integer, text[])',
        'tasker.expire_leases(integer, text[])',
        'tasker.next_deadline(text[])',
        'tasker.cancel_task(uuid, text, jsonb)',
        'tasker.resolve_step_manually(uuid, text, jsonb, jsonb)',
        'tasker.workflow_steps_guard()',
        'tasker.workflow_steps_history()',
        'tasker.tasks_guard()',
        'tasker.tasks_history()',
        'tasker.send_task_ready(uuid, integer, text, uuid, text)',
        'tasker.notify_task_ready_on_step_transition()',
        'tasker.notify_task_start()',
        'tasker.notify_task_state_change()'
    ]::regprocedure[] LOOP
        EXECUTE format('ALTER FUNCTION %s SET enable_seqscan = off SET enable_bitmapscan = off '
                       'SET enable_hashjoin = off SET enable_mergejoin = off', v_fn);
    END LOOP;
END
$$;

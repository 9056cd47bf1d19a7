-- Leases are held by whoever received them, durably, and what a step gives its children is
-- counted as it is sent.
--
-- 1. A lease token. A lease was identified by (step, attempt), which anyone who can read a
--    task knows: another worker could complete, fail or extend a step it never leased. Each
--    lease now gets an unguessable token (gen_random_uuid: 122 random bits), returned with
--    the leased step and required by complete_step, fail_step and extend_lease. A wrong token
--    changes nothing ('lease_not_held'). A lease put back on the queue loses its token.
-- 2. Durable leases. fetch_steps and the enqueue that leases to parked fetches committed with
--    synchronous_commit = off: after a PostgreSQL crash a lease a worker had received could
--    be lost, and the same (step, attempt) leased to a second worker. A transaction that
--    leases now commits synchronously (an enqueue that leases nothing stays asynchronous: its
--    state is derivable).
-- 3. Why a report is refused, precisely: a step of a cancelled task answers 'task_cancelled'
--    (it answered 'not_in_progress'), so that a worker can stop at once.
-- 4. Parent results counted as sent. The budget of parent results a step may be leased with
--    counted JSON text, but steps are delivered as protobuf, up to 5.5 times larger for
--    arrays of numbers: a step within every limit could be undeliverable. The service now
--    passes the protobuf size of the results (p_results_bytes); the function adds the parent's
--    name and the framing of its entry.
--
-- The functions of earlier migrations with the old signatures stay, so that a replica of the
-- previous release keeps working beside this one during a rolling upgrade (its workers do not
-- send tokens); this release calls only the new ones.

ALTER TABLE tasker.step_queue ADD COLUMN lease_token uuid;

-- Bytes a parent's results take in a child's parent_results, as sent: the results as a
-- protobuf Value (p_value_bytes, measured by the service), the parent's name, and the framing
-- of a map entry (two tags, two lengths, the entry's own tag and length: at most 16 bytes).
CREATE FUNCTION tasker.parent_entry_bytes(p_name text, p_value_bytes integer) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT octet_length(p_name) + p_value_bytes + 16
$$;

DROP FUNCTION tasker.fetch_steps(text, text, integer, bigint);
DROP FUNCTION tasker.lease_message(bigint, text, bigint);

-- Lease one queued message to a worker: the message invisible until the lease expires and
-- given a new token, its step enqueued -> in_progress; the step as the worker receives it,
-- its parents' results included (by the child-edge index and a primary-key probe per parent).
-- Nothing when the message's step is not enqueued at this attempt any more.
CREATE FUNCTION tasker.lease_message(p_msg_id bigint, p_worker_id text, p_lease_ms bigint)
RETURNS TABLE (
    step_uuid uuid, task_uuid uuid, name text, attempt integer, inputs jsonb,
    parent_results jsonb, lease_expires_at timestamptz, enqueued_at timestamptz, traceparent text,
    lease_token uuid
)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_q record;
    v_s record;
BEGIN
    UPDATE tasker.step_queue q
    SET leased_by = p_worker_id,
        visible_at = clock_timestamp() + make_interval(secs => p_lease_ms / 1000.0),
        read_count = q.read_count + 1,
        lease_token = gen_random_uuid()
    WHERE q.msg_id = p_msg_id
    RETURNING q.step_uuid, q.attempt, q.visible_at, q.enqueued_at, q.traceparent, q.lease_token
    INTO v_q;
    UPDATE tasker.workflow_steps s
    SET state = 'in_progress', started_at = clock_timestamp()
    WHERE s.step_uuid = v_q.step_uuid AND s.state = 'enqueued' AND s.attempts = v_q.attempt
    RETURNING s.task_uuid, s.name, s.inputs INTO v_s;
    IF NOT FOUND THEN RETURN; END IF;
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
    lease_token := v_q.lease_token;
    RETURN NEXT;
END
$$;

-- Lease up to p_max steps of a namespace to a worker, best priority first: an ordered walk of
-- the fetch index, then each message by key. Commits synchronously: a lease a worker has
-- received survives a crash of the database, so no second worker is given the same attempt.
CREATE FUNCTION tasker.fetch_steps(p_namespace text, p_worker_id text, p_max integer, p_lease_ms bigint)
RETURNS TABLE (
    step_uuid uuid, task_uuid uuid, name text, attempt integer, inputs jsonb,
    parent_results jsonb, lease_expires_at timestamptz, enqueued_at timestamptz, traceparent text,
    lease_token uuid
)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_msg record;
BEGIN
    FOR v_msg IN
        SELECT q.msg_id
        FROM tasker.step_queue q
        WHERE q.namespace = p_namespace AND q.leased_by IS NULL
        ORDER BY q.priority DESC, q.msg_id
        LIMIT p_max
        FOR UPDATE SKIP LOCKED
    LOOP
        RETURN QUERY SELECT * FROM tasker.lease_message(v_msg.msg_id, p_worker_id, p_lease_ms);
    END LOOP;
END
$$;

-- The baseline's claim-and-enqueue (see there), except that a pass that leases steps to parked
-- fetches commits synchronously: those leases reach workers, and must survive a crash.
CREATE OR REPLACE FUNCTION tasker.enqueue_ready_steps(
    p_task_uuid uuid, p_metadata jsonb DEFAULT '{}'::jsonb, p_takers jsonb DEFAULT '[]'::jsonb,
    p_announce_as uuid DEFAULT NULL
)
RETURNS TABLE (outcome text, namespace text, priority integer, enqueued_steps uuid[],
               max_ready_wait_ms double precision, leased jsonb)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_task record;
    v_steps uuid[];
    v_wait double precision;
    v_traceparent text := left(tasker.current_traceparent(), 128);
    v_taker record;
    v_msg record;
    v_handed integer := 0;
    v_leased jsonb := '[]'::jsonb;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM set_config('tasker.transition_metadata', p_metadata::text, true);
    IF NOT pg_try_advisory_xact_lock(hashtextextended('tasker.claim:' || p_task_uuid::text, 0)) THEN
        IF EXISTS (SELECT 1 FROM tasker.tasks t WHERE t.task_uuid = p_task_uuid) THEN
            RETURN QUERY SELECT 'claimed_elsewhere'::text, NULL::text, NULL::integer, '{}'::uuid[], NULL::float8, '[]'::jsonb;
        ELSE
            RETURN QUERY SELECT 'task_not_found'::text, NULL::text, NULL::integer, '{}'::uuid[], NULL::float8, '[]'::jsonb;
        END IF;
        RETURN;
    END IF;
    SELECT t.namespace, t.priority, t.state INTO v_task FROM tasker.tasks t WHERE t.task_uuid = p_task_uuid;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'task_not_found'::text, NULL::text, NULL::integer, '{}'::uuid[], NULL::float8, '[]'::jsonb;
        RETURN;
    END IF;
    IF v_task.state = 'pending' THEN
        -- this pass will move the task to in_progress: lock it first, like every change to a
        -- task (task, then steps)
        SELECT t.namespace, t.priority, t.state INTO v_task FROM tasker.tasks t
        WHERE t.task_uuid = p_task_uuid FOR NO KEY UPDATE;
    END IF;
    IF v_task.state NOT IN ('pending', 'in_progress') THEN
        RETURN QUERY SELECT 'task_not_active'::text, v_task.namespace, v_task.priority, '{}'::uuid[], NULL::float8, '[]'::jsonb;
        RETURN;
    END IF;

    WITH taken AS (
        DELETE FROM tasker.ready_steps r WHERE r.task_uuid = p_task_uuid
        RETURNING r.step_uuid
    ),
    moved AS (
        UPDATE tasker.workflow_steps s
        SET state = 'enqueued', attempts = s.attempts + 1, enqueued_at = clock_timestamp(),
            next_retry_at = NULL
        FROM taken
        WHERE s.step_uuid = taken.step_uuid AND s.state = 'pending' AND s.unfinished_parents = 0
        RETURNING s.step_uuid, s.attempts, s.position, s.enqueued_at, s.ready_at
    ),
    queued AS (
        INSERT INTO tasker.step_queue (namespace, task_uuid, step_uuid, attempt, priority, traceparent)
        SELECT v_task.namespace, p_task_uuid, m.step_uuid, m.attempts, v_task.priority, v_traceparent
        FROM moved m ORDER BY m.position
        RETURNING 1
    )
    SELECT coalesce(array_agg(m.step_uuid ORDER BY m.position), '{}'::uuid[]),
           extract(epoch FROM max(m.enqueued_at - m.ready_at)) * 1000
    INTO v_steps, v_wait
    FROM moved m;

    IF cardinality(v_steps) = 0 THEN
        RETURN QUERY SELECT 'nothing_ready'::text, v_task.namespace, v_task.priority, v_steps, NULL::float8, '[]'::jsonb;
        RETURN;
    END IF;
    IF v_task.state = 'pending' THEN
        UPDATE tasker.tasks t SET state = 'in_progress' WHERE t.task_uuid = p_task_uuid AND t.state = 'pending';
    END IF;
    -- hand the steps, in order, to the parked fetches, each up to its max
    FOR v_taker IN
        SELECT (x.ord - 1)::int AS idx, x.t->>'worker_id' AS worker_id, (x.t->>'max')::int AS max,
               (x.t->>'lease_ms')::bigint AS lease_ms
        FROM jsonb_array_elements(p_takers) WITH ORDINALITY AS x(t, ord)
        ORDER BY x.ord
    LOOP
        EXIT WHEN v_handed >= cardinality(v_steps);
        FOR v_msg IN
            SELECT q.msg_id FROM unnest(v_steps[v_handed + 1 : v_handed + v_taker.max]) AS u(step_uuid)
            CROSS JOIN LATERAL (SELECT m.msg_id FROM tasker.step_queue m
                                WHERE m.step_uuid = u.step_uuid AND m.leased_by IS NULL OFFSET 0) q
        LOOP
            v_leased := v_leased || (
                SELECT coalesce(jsonb_agg(to_jsonb(l) || jsonb_build_object('taker', v_taker.idx)), '[]'::jsonb)
                FROM tasker.lease_message(v_msg.msg_id, v_taker.worker_id, v_taker.lease_ms) l);
            v_handed := v_handed + 1;
        END LOOP;
    END LOOP;
    IF v_handed > 0 THEN
        -- these leases reach workers: durable before they are handed over
        PERFORM set_config('synchronous_commit', 'on', true);
    END IF;
    -- steps no fetch parked on this replica took: fetches parked on the other replicas hear of
    -- them (p_announce_as: this replica, given only while others are alive, so a single
    -- replica pays nothing for it)
    IF p_announce_as IS NOT NULL AND v_handed < cardinality(v_steps) THEN
        PERFORM pg_notify('tasker_steps_enqueued', json_build_object(
            'namespace', v_task.namespace, 'steps', cardinality(v_steps) - v_handed,
            'replica', p_announce_as)::text);
    END IF;
    RETURN QUERY SELECT 'enqueued'::text, v_task.namespace, v_task.priority, v_steps, v_wait, v_leased;
END
$$;

-- A lease handed to a fetch that had gone away before the steps reached it: the step goes back
-- on the queue at the same attempt (its worker never had it), its token void.
CREATE OR REPLACE FUNCTION tasker.release_lease(p_step_uuid uuid, p_attempt integer, p_worker_id text)
RETURNS boolean
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_task_uuid uuid;
BEGIN
    SELECT s.task_uuid INTO v_task_uuid FROM tasker.workflow_steps s WHERE s.step_uuid = p_step_uuid;
    IF NOT FOUND THEN RETURN false; END IF;
    PERFORM 1 FROM tasker.tasks t WHERE t.task_uuid = v_task_uuid FOR NO KEY UPDATE;
    PERFORM set_config('tasker.transition_metadata',
        jsonb_build_object('reason', 'lease undelivered', 'worker_id', p_worker_id)::text, true);
    UPDATE tasker.step_queue q SET leased_by = NULL, visible_at = clock_timestamp(), lease_token = NULL
    WHERE q.step_uuid = p_step_uuid AND q.attempt = p_attempt AND q.leased_by = p_worker_id;
    IF NOT FOUND THEN RETURN false; END IF;
    UPDATE tasker.workflow_steps s SET state = 'enqueued', started_at = NULL
    WHERE s.step_uuid = p_step_uuid AND s.state = 'in_progress' AND s.attempts = p_attempt;
    RETURN FOUND;
END
$$;

-- Why an attempt cannot be acted on by the holder of p_lease_token, or NULL when that token
-- holds a live lease on it (p_lease_token NULL: any holder, for the service's own sweeps).
-- Locks the step row. Outcomes: step_not_found, stale_attempt, task_cancelled,
-- not_in_progress, lease_expired, lease_not_held. The queue row is found by its unique
-- (step, attempt) key, not by walking the lease index.
CREATE FUNCTION tasker.check_lease(p_step_uuid uuid, p_attempt integer, p_lease_token uuid)
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
    IF v_step.attempts <> p_attempt THEN RETURN 'stale_attempt'; END IF;
    IF v_step.state = 'cancelled' THEN RETURN 'task_cancelled'; END IF;
    IF v_step.state <> 'in_progress' THEN RETURN 'not_in_progress'; END IF;
    SELECT q.visible_at, q.leased_by, q.lease_token INTO v_msg FROM tasker.step_queue q
    WHERE q.step_uuid = p_step_uuid AND q.attempt = p_attempt
    FOR UPDATE;
    IF NOT FOUND OR v_msg.leased_by IS NULL OR v_msg.visible_at <= clock_timestamp() THEN
        RETURN 'lease_expired';
    END IF;
    IF p_lease_token IS NOT NULL AND v_msg.lease_token IS DISTINCT FROM p_lease_token THEN
        RETURN 'lease_not_held';
    END IF;
    RETURN NULL;
END
$$;

-- Complete an attempt the caller holds (p_lease_token). p_results_bytes: the results' size as
-- a protobuf Value; p_max_parent_results_bytes (NULL: no budget): refused with
-- 'parent_results_too_large', changing nothing, when these results would give a child more
-- parent results than that to be leased with, as sent.
CREATE FUNCTION tasker.complete_step(
    p_step_uuid uuid, p_attempt integer, p_lease_token uuid, p_results jsonb,
    p_results_bytes integer, p_metadata jsonb DEFAULT '{}'::jsonb,
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
    SELECT s.task_uuid, tasker.parent_entry_bytes(s.name, p_results_bytes)
    INTO v_task_uuid, v_bytes
    FROM tasker.workflow_steps s WHERE s.step_uuid = p_step_uuid;
    IF NOT FOUND THEN RETURN 'step_not_found'; END IF;
    SELECT t.namespace, t.state INTO v_task FROM tasker.tasks t
    WHERE t.task_uuid = v_task_uuid FOR NO KEY UPDATE;
    v_problem := tasker.check_lease(p_step_uuid, p_attempt, p_lease_token);
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
    -- data_bytes: see 20261204000003
    UPDATE tasker.workflow_steps s
    SET state = 'complete', results = coalesce(p_results, '{}'::jsonb), completed_at = clock_timestamp(),
        data_bytes = s.data_bytes + p_results_bytes
    WHERE s.step_uuid = p_step_uuid AND s.state = 'in_progress' AND s.attempts = p_attempt;
    SELECT * INTO v_finished FROM tasker.finish_step(p_step_uuid, v_task_uuid, v_bytes);
    IF v_finished.ready_children > 0 AND v_finished.task_state IN ('pending', 'in_progress') THEN
        PERFORM tasker.send_task_ready(v_task_uuid, v_task.namespace, 'step_transition');
    END IF;
    RETURN 'completed';
END
$$;

-- Many completions in one transaction (one commit, one pass through the NOTIFY commit lock).
-- Each item is exactly tasker.complete_step, with its own token and trace context; items are
-- taken in task order, so two batches lock tasks in the same order and never wait on each
-- other in a cycle. Returns each item's outcome by its position in the input arrays.
CREATE FUNCTION tasker.complete_steps(
    p_steps uuid[], p_attempts integer[], p_lease_tokens uuid[], p_results jsonb[],
    p_results_bytes integer[], p_traceparents text[], p_metadata jsonb DEFAULT '{}'::jsonb,
    p_max_parent_results_bytes integer DEFAULT NULL
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
            tasker.complete_step(v_item.step_uuid, p_attempts[v_item.ord],
                                 p_lease_tokens[v_item.ord], p_results[v_item.ord],
                                 p_results_bytes[v_item.ord], p_metadata,
                                 p_max_parent_results_bytes);
    END LOOP;
END
$$;

CREATE FUNCTION tasker.fail_step(
    p_step_uuid uuid, p_attempt integer, p_lease_token uuid, p_error jsonb, p_retryable boolean,
    p_backoff_ms bigint, p_metadata jsonb DEFAULT '{}'::jsonb
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
    v_problem := tasker.check_lease(p_step_uuid, p_attempt, p_lease_token);
    IF v_problem IS NOT NULL THEN
        RETURN QUERY SELECT v_problem, NULL::timestamptz;
        RETURN;
    END IF;
    PERFORM set_config('tasker.transition_metadata', p_metadata::text, true);
    RETURN QUERY SELECT * FROM tasker.record_attempt_failure(p_step_uuid, p_error, p_retryable, p_backoff_ms);
END
$$;

CREATE FUNCTION tasker.extend_lease(p_step_uuid uuid, p_attempt integer, p_lease_token uuid,
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
    SET visible_at = clock_timestamp() + make_interval(secs => p_lease_ms / 1000.0)
    WHERE q.step_uuid = p_step_uuid AND q.attempt = p_attempt
    RETURNING q.visible_at INTO v_until;
    RETURN QUERY SELECT 'extended'::text, v_until;
END
$$;

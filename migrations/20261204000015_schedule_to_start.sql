-- Declared schedule-to-start timeouts (issue 23): StepDefinition.schedule_to_start, how long a
-- step queued for its workers may wait for one before it fails, for alerting.
--
-- workflow_steps.schedule_to_start_ms (NULL: none). When the step is queued (tasker.claim_and_
-- enqueue), its queue row gets start_by = enqueued + schedule_to_start (announced on
-- tasker_deadlines, so every replica's deadline scheduler wakes for it; only for such steps).
-- A row still unleased at start_by fails its step for good, without a retry (a retry would wait
-- for the same absent workers): enqueued -> error, last_error {"outcome":
-- "SCHEDULE_TO_START_TIMED_OUT", ...}, the task in error (tasker.fail_unstarted_steps, from the
-- deadline scheduler). A paused queue or a reached limit counts as waiting.
ALTER TABLE tasker.workflow_steps ADD COLUMN schedule_to_start_ms integer
    CONSTRAINT workflow_steps_schedule_to_start_valid CHECK (schedule_to_start_ms BETWEEN 1 AND 604800000);
ALTER TABLE tasker.step_queue ADD COLUMN start_by timestamptz;
-- only rows with a deadline: the index costs the others nothing, and a lease (which does not
-- change start_by) stays a HOT update
CREATE INDEX step_queue_start_by_idx ON tasker.step_queue (start_by) WHERE start_by IS NOT NULL;

-- Steps carry their schedule_to_start ("schedule_to_start_ms" in p_steps); otherwise
-- 20261204000013's.
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
                                       retry_policy, timeout_ms, schedule_to_start_ms)
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

-- A queued step with a schedule_to_start gets its deadline; otherwise 20261204000009's.
CREATE OR REPLACE FUNCTION tasker.claim_and_enqueue(
    p_task_uuid uuid, p_metadata jsonb DEFAULT '{}'::jsonb, p_takers jsonb DEFAULT '[]'::jsonb,
    p_announce_as uuid DEFAULT NULL
)
RETURNS TABLE (outcome text, namespace text, priority integer, enqueued_steps uuid[],
               max_ready_wait_ms double precision, leased jsonb, queued jsonb, held jsonb)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_task record;
    v_steps uuid[];
    v_queues text[];
    v_wait double precision;
    v_traceparent text := left(tasker.current_traceparent(), 128);
    v_lane record;
    v_gate record;
    v_grant record;
    v_taker record;
    v_msg_id bigint;
    v_rows integer;
    v_next integer;
    v_given integer[];
    v_handed integer := 0;
    v_leased jsonb := '[]'::jsonb;
    v_queued jsonb := '[]'::jsonb;
    v_held jsonb := '[]'::jsonb;
    v_open integer;
    v_max_per_key integer;
    v_running integer;
    v_start_within integer;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM set_config('tasker.transition_metadata', p_metadata::text, true);
    IF NOT pg_try_advisory_xact_lock(hashtextextended('tasker.claim:' || p_task_uuid::text, 0)) THEN
        IF EXISTS (SELECT 1 FROM tasker.tasks t WHERE t.task_uuid = p_task_uuid) THEN
            RETURN QUERY SELECT 'claimed_elsewhere'::text, NULL::text, NULL::integer, '{}'::uuid[], NULL::float8, '[]'::jsonb, '[]'::jsonb, '[]'::jsonb;
        ELSE
            RETURN QUERY SELECT 'task_not_found'::text, NULL::text, NULL::integer, '{}'::uuid[], NULL::float8, '[]'::jsonb, '[]'::jsonb, '[]'::jsonb;
        END IF;
        RETURN;
    END IF;
    SELECT t.namespace, t.priority, t.state, t.concurrency_key, t.created_at INTO v_task
    FROM tasker.tasks t WHERE t.task_uuid = p_task_uuid;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'task_not_found'::text, NULL::text, NULL::integer, '{}'::uuid[], NULL::float8, '[]'::jsonb, '[]'::jsonb, '[]'::jsonb;
        RETURN;
    END IF;
    IF v_task.state = 'pending' THEN
        -- this pass will move the task to in_progress: lock it first, like every change to a
        -- task (task, then steps)
        SELECT t.namespace, t.priority, t.state, t.concurrency_key, t.created_at INTO v_task
        FROM tasker.tasks t WHERE t.task_uuid = p_task_uuid FOR NO KEY UPDATE;
    END IF;
    -- a task with a concurrency key starts only in a free slot of its key, oldest first; it
    -- waits (pending, its steps ready) until a task of its key finishes
    IF v_task.state = 'pending' AND v_task.concurrency_key IS NOT NULL THEN
        SELECT n.max_tasks_per_key INTO v_max_per_key FROM tasker.namespaces n
        WHERE n.name = v_task.namespace;
        IF v_max_per_key IS NOT NULL THEN
            INSERT INTO tasker.key_slots (namespace, concurrency_key)
            VALUES (v_task.namespace, v_task.concurrency_key) ON CONFLICT DO NOTHING;
            SELECT k.running INTO v_running FROM tasker.key_slots k
            WHERE k.namespace = v_task.namespace AND k.concurrency_key = v_task.concurrency_key
            FOR NO KEY UPDATE;
            IF v_running >= v_max_per_key
               OR EXISTS (SELECT 1 FROM tasker.key_waiters w
                          WHERE w.namespace = v_task.namespace
                            AND w.concurrency_key = v_task.concurrency_key
                            AND (w.created_at, w.task_uuid) < (v_task.created_at, p_task_uuid)) THEN
                -- wait in line, out of the ready set, until its turn (tasker.start_waiting_on_key)
                INSERT INTO tasker.key_waiters (namespace, concurrency_key, created_at, task_uuid)
                VALUES (v_task.namespace, v_task.concurrency_key, v_task.created_at, p_task_uuid)
                ON CONFLICT DO NOTHING;
                DELETE FROM tasker.ready_steps r WHERE r.task_uuid = p_task_uuid;
                RETURN QUERY SELECT 'waiting_on_key'::text, v_task.namespace, v_task.priority, '{}'::uuid[], NULL::float8, '[]'::jsonb, '[]'::jsonb, '[]'::jsonb;
                RETURN;
            END IF;
        END IF;
    END IF;
    IF v_task.state NOT IN ('pending', 'in_progress') THEN
        RETURN QUERY SELECT 'task_not_active'::text, v_task.namespace, v_task.priority, '{}'::uuid[], NULL::float8, '[]'::jsonb, '[]'::jsonb, '[]'::jsonb;
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
        RETURNING s.step_uuid, s.attempts, s.position, s.enqueued_at, s.ready_at, s.queue,
                  s.schedule_to_start_ms
    ),
    queued AS (
        INSERT INTO tasker.step_queue (namespace, queue, task_uuid, step_uuid, attempt, priority,
                                       traceparent, start_by)
        SELECT v_task.namespace, m.queue, p_task_uuid, m.step_uuid, m.attempts, v_task.priority,
               v_traceparent,
               m.enqueued_at + make_interval(secs => m.schedule_to_start_ms / 1000.0)
        FROM moved m ORDER BY m.position
        RETURNING 1
    )
    SELECT coalesce(array_agg(m.step_uuid ORDER BY m.position), '{}'::uuid[]),
           coalesce(array_agg(m.queue ORDER BY m.position), '{}'::text[]),
           extract(epoch FROM max(m.enqueued_at - m.ready_at)) * 1000,
           min(m.schedule_to_start_ms)
    INTO v_steps, v_queues, v_wait, v_start_within
    FROM moved m;

    IF cardinality(v_steps) = 0 THEN
        RETURN QUERY SELECT 'nothing_ready'::text, v_task.namespace, v_task.priority, v_steps, NULL::float8, '[]'::jsonb, '[]'::jsonb, '[]'::jsonb;
        RETURN;
    END IF;
    IF v_task.state = 'pending' THEN
        UPDATE tasker.tasks t SET state = 'in_progress', holds_key_slot = (v_max_per_key IS NOT NULL)
        WHERE t.task_uuid = p_task_uuid AND t.state = 'pending';
        IF v_max_per_key IS NOT NULL THEN
            UPDATE tasker.key_slots k SET running = k.running + 1
            WHERE k.namespace = v_task.namespace AND k.concurrency_key = v_task.concurrency_key;
        END IF;
    END IF;
    v_given := array_fill(0, ARRAY[greatest(jsonb_array_length(p_takers), 1)]);
    -- per lane, in the order of its first step: hand its steps, in order, to the parked
    -- fetches that take its queue, each up to its max, as far as the lane allows
    FOR v_lane IN
        SELECT u.queue, array_agg(u.step_uuid ORDER BY u.ord) AS steps
        FROM unnest(v_steps, v_queues) WITH ORDINALITY AS u(step_uuid, queue, ord)
        GROUP BY u.queue
        ORDER BY min(u.ord)
    LOOP
        v_next := 1;
        -- the lane's pause and limit, read once (a lane without settings takes no function
        -- call: the common case costs one probe of a small table)
        SELECT g.paused, g.max_in_flight INTO v_gate
        FROM tasker.lane_gate(v_task.namespace, v_lane.queue) g;
        IF jsonb_array_length(p_takers) > 0 AND NOT v_gate.paused THEN
            SELECT coalesce(sum(greatest((x.t->>'max')::int - v_given[x.ord], 0)), 0)::int INTO v_open
            FROM jsonb_array_elements(p_takers) WITH ORDINALITY AS x(t, ord)
            WHERE coalesce(x.t->'queues', '["default"]'::jsonb) ? v_lane.queue;
            IF v_open > 0 THEN
                IF v_gate.max_in_flight IS NULL THEN
                    -- shared, as in lease_allowance: a limit starting now waits for this pass
                    PERFORM pg_advisory_xact_lock_shared(tasker.lane_lock_key(v_task.namespace, v_lane.queue));
                    SELECT least(v_open, cardinality(v_lane.steps)) AS granted, false AS holds_slot
                    INTO v_grant;
                ELSE
                    SELECT a.granted, a.holds_slot INTO v_grant
                    FROM tasker.lease_allowance(v_task.namespace, v_lane.queue,
                                                least(v_open, cardinality(v_lane.steps))) a;
                END IF;
                FOR v_taker IN
                    SELECT x.ord::int AS ord, x.t->>'worker_id' AS worker_id,
                           (x.t->>'max')::int AS max, (x.t->>'lease_ms')::bigint AS lease_ms
                    FROM jsonb_array_elements(p_takers) WITH ORDINALITY AS x(t, ord)
                    WHERE coalesce(x.t->'queues', '["default"]'::jsonb) ? v_lane.queue
                    ORDER BY x.ord
                LOOP
                    EXIT WHEN v_next > v_grant.granted;
                    WHILE v_next <= v_grant.granted AND v_given[v_taker.ord] < v_taker.max LOOP
                        SELECT m.msg_id INTO v_msg_id FROM tasker.step_queue m
                        WHERE m.step_uuid = v_lane.steps[v_next] AND m.leased_by IS NULL OFFSET 0;
                        v_leased := v_leased || (
                            SELECT coalesce(jsonb_agg(to_jsonb(l) || jsonb_build_object('taker', v_taker.ord - 1)), '[]'::jsonb)
                            FROM tasker.lease_queued(v_msg_id, v_taker.worker_id, v_taker.lease_ms,
                                                     v_grant.holds_slot) l);
                        v_given[v_taker.ord] := v_given[v_taker.ord] + 1;
                        v_next := v_next + 1;
                        v_handed := v_handed + 1;
                    END LOOP;
                END LOOP;
                IF v_grant.holds_slot AND v_next - 1 < v_grant.granted THEN
                    PERFORM tasker.free_slots(v_task.namespace, v_lane.queue, v_grant.granted - (v_next - 1));
                END IF;
            END IF;
        END IF;
        -- what is left on the lane: as many fetches may read it as the lane allows now
        IF v_next <= cardinality(v_lane.steps) THEN
            v_open := CASE
                WHEN v_gate.paused THEN 0
                WHEN v_gate.max_in_flight IS NULL THEN cardinality(v_lane.steps) - v_next + 1
                ELSE tasker.lane_room(v_task.namespace, v_lane.queue, cardinality(v_lane.steps) - v_next + 1)
            END;
            IF v_open > 0 THEN
                v_queued := v_queued || jsonb_build_array(jsonb_build_object('queue', v_lane.queue, 'steps', v_open));
            END IF;
            -- the rest wait for the lane's resume or a free slot
            IF v_open < cardinality(v_lane.steps) - v_next + 1 THEN
                v_held := v_held || jsonb_build_array(jsonb_build_object(
                    'queue', v_lane.queue, 'steps', cardinality(v_lane.steps) - v_next + 1 - v_open));
            END IF;
        END IF;
    END LOOP;
    IF v_start_within IS NOT NULL THEN
        -- a step that must start within a time: every replica's scheduler wakes for it
        PERFORM pg_notify('tasker_deadlines', json_build_object(
            'namespace', v_task.namespace,
            'at', clock_timestamp() + make_interval(secs => v_start_within / 1000.0))::text);
    END IF;
    IF v_handed > 0 THEN
        -- these leases reach workers: durable before they are handed over
        PERFORM set_config('synchronous_commit', 'on', true);
    END IF;
    -- steps no fetch parked on this replica took: fetches parked on the other replicas hear of
    -- them (p_announce_as: this replica, given only while others are alive, so a single
    -- replica pays nothing for it)
    IF p_announce_as IS NOT NULL THEN
        PERFORM pg_notify('tasker_steps_enqueued', json_build_object(
            'namespace', v_task.namespace, 'queue', l->>'queue', 'steps', (l->>'steps')::int,
            'replica', p_announce_as)::text)
        FROM jsonb_array_elements(v_queued) l;
    END IF;
    RETURN QUERY SELECT 'enqueued'::text, v_task.namespace, v_task.priority, v_steps, v_wait, v_leased, v_queued, v_held;
END
$$;

-- A queued step whose wait for a worker ran out fails for good.
CREATE OR REPLACE FUNCTION tasker.step_transition_allowed(p_from text, p_to text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT (p_from, p_to) IN (
        ('pending', 'enqueued'),
        ('pending', 'cancelled'),
        ('pending', 'resolved_manually'),
        ('enqueued', 'in_progress'),
        ('enqueued', 'cancelled'),
        -- no worker started it within its schedule_to_start (tasker.fail_unstarted_steps)
        ('enqueued', 'error'),
        -- a lease handed to a fetch that had gone before it was delivered: back on the queue,
        -- same attempt (the worker never had it)
        ('in_progress', 'enqueued'),
        ('in_progress', 'complete'),
        ('in_progress', 'waiting_for_retry'),
        ('in_progress', 'error'),
        ('in_progress', 'cancelled'),
        ('waiting_for_retry', 'pending'),
        ('waiting_for_retry', 'cancelled'),
        ('waiting_for_retry', 'resolved_manually'),
        ('error', 'resolved_manually'),
        -- an operator retried the errored task (tasker.retry_task)
        ('error', 'pending')
    )
$$;

-- Queued steps no worker took within their schedule_to_start fail for good, their tasks in
-- error. Claimed with SKIP LOCKED (replicas waking together fail each once), each re-checked
-- under its task's lock (a worker may have leased it meanwhile). One row per step failed.
CREATE FUNCTION tasker.fail_unstarted_steps(p_limit integer DEFAULT 500, p_namespaces text[] DEFAULT NULL)
RETURNS TABLE (task_uuid uuid, step_uuid uuid, namespace text, priority integer)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_msg record;
    v_error jsonb;
BEGIN
    PERFORM set_config('tasker.transition_metadata', '{"reason":"schedule_to_start_timed_out"}', true);
    FOR v_msg IN
        SELECT q.msg_id, q.task_uuid, q.step_uuid, q.attempt, q.namespace, q.priority, q.start_by,
               q.enqueued_at
        FROM tasker.step_queue q
        WHERE q.start_by IS NOT NULL AND q.start_by <= clock_timestamp() AND q.leased_by IS NULL
          AND tasker.namespace_matches(q.namespace, p_namespaces)
        ORDER BY q.start_by
        LIMIT p_limit
    LOOP
        PERFORM 1 FROM tasker.tasks t WHERE t.task_uuid = v_msg.task_uuid FOR NO KEY UPDATE;
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM tasker.step_queue q
                                  WHERE q.msg_id = v_msg.msg_id AND q.leased_by IS NULL);
        DELETE FROM tasker.step_queue q WHERE q.msg_id = v_msg.msg_id;
        v_error := jsonb_build_object(
            'message', format('no worker started attempt %s within its schedule_to_start of %s ms',
                              v_msg.attempt,
                              round(extract(epoch FROM v_msg.start_by - v_msg.enqueued_at) * 1000)),
            'outcome', 'SCHEDULE_TO_START_TIMED_OUT', 'attempt', v_msg.attempt);
        UPDATE tasker.workflow_steps s
        SET state = 'error', last_error = v_error, completed_at = clock_timestamp(),
            data_bytes = s.data_bytes - coalesce(octet_length(s.last_error::text), 0)
                         + octet_length(v_error::text)
        WHERE s.step_uuid = v_msg.step_uuid AND s.state = 'enqueued' AND s.attempts = v_msg.attempt;
        CONTINUE WHEN NOT FOUND;
        UPDATE tasker.tasks t SET state = 'error', completed_at = clock_timestamp()
        WHERE t.task_uuid = v_msg.task_uuid AND t.state = 'in_progress';
        RETURN QUERY SELECT v_msg.task_uuid, v_msg.step_uuid, v_msg.namespace, v_msg.priority;
    END LOOP;
END
$$;

-- The earliest retry due time, lease expiry, task start, schedule wake-up or deadline of a
-- queued step to be started.
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
         ORDER BY ts.start_at LIMIT 1),
        (SELECT sc.wake_at FROM tasker.schedules sc
         WHERE NOT sc.paused AND sc.wake_at IS NOT NULL
           AND tasker.namespace_matches(sc.namespace, p_namespaces)
         ORDER BY sc.wake_at LIMIT 1),
        (SELECT q.start_by FROM tasker.step_queue q
         WHERE q.start_by IS NOT NULL AND q.leased_by IS NULL
           AND tasker.namespace_matches(q.namespace, p_namespaces)
         ORDER BY q.start_by LIMIT 1))
$$;

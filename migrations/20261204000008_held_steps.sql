-- The claim-and-enqueue answer says which steps it left waiting on their queue's pause or
-- in-flight limit (`held`, per queue), so that the command stream can say so (issue 22).
-- The return type changes: the function is made again. The previous release's wrapper
-- (tasker.enqueue_ready_steps) reads it by column name and keeps working.
DROP FUNCTION tasker.claim_and_enqueue(uuid, jsonb, jsonb, uuid);

CREATE FUNCTION tasker.claim_and_enqueue(
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
        RETURNING s.step_uuid, s.attempts, s.position, s.enqueued_at, s.ready_at, s.queue
    ),
    queued AS (
        INSERT INTO tasker.step_queue (namespace, queue, task_uuid, step_uuid, attempt, priority, traceparent)
        SELECT v_task.namespace, m.queue, p_task_uuid, m.step_uuid, m.attempts, v_task.priority, v_traceparent
        FROM moved m ORDER BY m.position
        RETURNING 1
    )
    SELECT coalesce(array_agg(m.step_uuid ORDER BY m.position), '{}'::uuid[]),
           coalesce(array_agg(m.queue ORDER BY m.position), '{}'::text[]),
           extract(epoch FROM max(m.enqueued_at - m.ready_at)) * 1000
    INTO v_steps, v_queues, v_wait
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
        IF jsonb_array_length(p_takers) > 0 THEN
            SELECT coalesce(sum(greatest((x.t->>'max')::int - v_given[x.ord], 0)), 0)::int INTO v_open
            FROM jsonb_array_elements(p_takers) WITH ORDINALITY AS x(t, ord)
            WHERE coalesce(x.t->'queues', '["default"]'::jsonb) ? v_lane.queue;
            IF v_open > 0 THEN
                SELECT a.granted, a.holds_slot INTO v_grant
                FROM tasker.lease_allowance(v_task.namespace, v_lane.queue,
                                            least(v_open, cardinality(v_lane.steps))) a;
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
            v_open := tasker.lane_room(v_task.namespace, v_lane.queue, cardinality(v_lane.steps) - v_next + 1);
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

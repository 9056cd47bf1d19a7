-- A lane's lock is taken before its settings are read (issue 22: an in-flight limit is never
-- exceeded). claim_and_enqueue and fetch_steps read a lane's settings and, finding no limit,
-- then took the lane's shared lock: a limit set between the two (set_queue_limit holds the lock
-- exclusively while it counts the running leases) was not seen, and the lease granted right
-- after it held no slot, one more in flight than the limit counts. Now the shared lock comes
-- first: a limit being set waits for the pass and counts its leases, or the pass waits for
-- the limit and takes slots under it.

-- Claim a task and enqueue every ready step, in one transaction; then lease them to the
-- parked fetches in p_takers ([{"worker_id", "max", "lease_ms", "queues"}], first come first
-- served; no "queues": the default queue), each step to the first fetch that takes its queue,
-- as far as its lane's pause and limit allow. `leased` is a JSON array of the leased steps,
-- each with the index of its taker; `queued` ([{"queue", "steps"}]) counts, per lane, the steps
-- left on the queue that a fetch may lease now (a paused or full lane's are not counted: a
-- freed slot or a resume wakes its fetches); `held` counts, per lane, the steps left waiting
-- on its pause or limit.
--
-- A pending task with a concurrency key starts only in a free slot of its key (namespaces.
-- max_tasks_per_key), oldest first; otherwise it waits in line (tasker.key_waiters), its ready
-- steps out of the ready set, and the answer is 'waiting_on_key'.
-- Claim: a transaction-scoped advisory lock on the task, tried without waiting. A task claimed
-- by another instance's enqueuer answers 'claimed_elsewhere' at once; the caller retries
-- shortly, because the holder's snapshot may predate a completion that made more steps ready.
-- Exactly once: the CAS pending -> enqueued plus the unique (step_uuid, attempt) queue key.
-- Cost: the ready steps of this task, taken out of the ready set by its task index; nothing
-- else of the task; per lane, one probe of its settings (a function call only under a limit).
-- Durability: asynchronous commit while it only enqueues: enqueue state is derivable (if a
-- crash loses the commit, the steps are still pending and ready, and the start-up sweep or the
-- fallback poller enqueues them again). A pass that leases steps to parked fetches commits
-- synchronously: those leases reach workers, and must survive a crash. A step with a
-- schedule_to_start gets its queue row's start_by, announced on tasker_deadlines.
-- A step handed to a fetch is queued already leased: its queue row is written once, not
-- inserted and then updated (every hand-off and every eager completion paid for the second
-- row version and its index entries).
-- (from migrations/20261204000025_lane_lock_before_gate.sql)
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
    v_attempts integer[];
    v_enqueued_at timestamptz[];
    v_start_by timestamptz[];
    v_timeouts integer[];
    -- per step, by position: the taker it is handed to (its index in p_takers + 1, 0: none),
    -- whether its lease holds a slot, and its lease's token and end
    v_taken integer[];
    v_holds boolean[];
    v_tokens uuid[];
    v_expires timestamptz[];
    v_lease_ms bigint;
    v_wait double precision;
    v_traceparent text := left(tasker.current_traceparent(), 128);
    v_lane record;
    v_gate record;
    v_grant record;
    v_taker record;
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

    -- the steps move to enqueued here; their queue rows are written once it is known which
    -- of them go to the takers
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
                  s.schedule_to_start_ms, s.timeout_ms
    )
    SELECT coalesce(array_agg(m.step_uuid ORDER BY m.position), '{}'::uuid[]),
           coalesce(array_agg(m.queue ORDER BY m.position), '{}'::text[]),
           array_agg(m.attempts ORDER BY m.position),
           array_agg(m.enqueued_at ORDER BY m.position),
           array_agg(m.enqueued_at + make_interval(secs => m.schedule_to_start_ms / 1000.0)
                     ORDER BY m.position),
           array_agg(m.timeout_ms ORDER BY m.position),
           extract(epoch FROM max(m.enqueued_at - m.ready_at)) * 1000,
           min(m.schedule_to_start_ms)
    INTO v_steps, v_queues, v_attempts, v_enqueued_at, v_start_by, v_timeouts, v_wait,
         v_start_within
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
    v_taken := array_fill(0, ARRAY[cardinality(v_steps)]);
    v_holds := array_fill(false, ARRAY[cardinality(v_steps)]);
    v_tokens := array_fill(NULL::uuid, ARRAY[cardinality(v_steps)]);
    v_expires := array_fill(NULL::timestamptz, ARRAY[cardinality(v_steps)]);
    -- per lane, in the order of its first step: hand its steps, in order, to the parked
    -- fetches that take its queue, each up to its max, as far as the lane allows
    FOR v_lane IN
        SELECT u.queue, array_agg(u.step_uuid ORDER BY u.ord) AS steps,
               array_agg(u.ord::int ORDER BY u.ord) AS idx
        FROM unnest(v_steps, v_queues) WITH ORDINALITY AS u(step_uuid, queue, ord)
        GROUP BY u.queue
        ORDER BY min(u.ord)
    LOOP
        v_next := 1;
        IF jsonb_array_length(p_takers) > 0 THEN
            -- the lane's lock, shared, before its settings are read: a limit being set waits
            -- for this pass, which then counts, or this pass waits for the limit and sees it
            PERFORM pg_advisory_xact_lock_shared(tasker.lane_lock_key(v_task.namespace, v_lane.queue));
        END IF;
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
                    SELECT least(v_open, cardinality(v_lane.steps)) AS granted, false AS holds_slot
                    INTO v_grant;
                ELSE
                    SELECT a.granted, a.holds_slot INTO v_grant
                    FROM tasker.lease_allowance(v_task.namespace, v_lane.queue,
                                                least(v_open, cardinality(v_lane.steps))) a;
                END IF;
                FOR v_taker IN
                    SELECT x.ord::int AS ord, (x.t->>'max')::int AS max,
                           (x.t->>'lease_ms')::bigint AS lease_ms
                    FROM jsonb_array_elements(p_takers) WITH ORDINALITY AS x(t, ord)
                    WHERE coalesce(x.t->'queues', '["default"]'::jsonb) ? v_lane.queue
                    ORDER BY x.ord
                LOOP
                    EXIT WHEN v_next > v_grant.granted;
                    WHILE v_next <= v_grant.granted AND v_given[v_taker.ord] < v_taker.max LOOP
                        -- the lease of a step with a timeout ends no later than its start +
                        -- the timeout (as in lease_queued)
                        v_lease_ms := least(v_taker.lease_ms,
                                            coalesce(v_timeouts[v_lane.idx[v_next]], v_taker.lease_ms));
                        v_taken[v_lane.idx[v_next]] := v_taker.ord;
                        v_holds[v_lane.idx[v_next]] := v_grant.holds_slot;
                        v_tokens[v_lane.idx[v_next]] := gen_random_uuid();
                        v_expires[v_lane.idx[v_next]] :=
                            clock_timestamp() + make_interval(secs => v_lease_ms / 1000.0);
                        v_given[v_taker.ord] := v_given[v_taker.ord] + 1;
                        v_next := v_next + 1;
                        v_handed := v_handed + 1;
                    END LOOP;
                END LOOP;
                -- nothing of the grant is left over: it is at most what these takers can take,
                -- and every step up to it was handed to one of them
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
    -- the queue rows, in position order (the fetch order within a priority), the handed ones
    -- leased; then the handed steps start, and go out as lease_queued would give them
    INSERT INTO tasker.step_queue (namespace, queue, task_uuid, step_uuid, attempt, priority,
                                   enqueued_at, traceparent, start_by, leased_by, visible_at,
                                   read_count, lease_token, holds_slot)
    SELECT v_task.namespace, u.queue, p_task_uuid, u.step_uuid, u.attempt, v_task.priority,
           u.enqueued_at, v_traceparent, u.start_by,
           CASE WHEN u.taker > 0 THEN p_takers->(u.taker - 1)->>'worker_id' END,
           coalesce(u.expires, clock_timestamp()), (u.taker > 0)::int, u.token, u.holds
    FROM unnest(v_steps, v_queues, v_attempts, v_enqueued_at, v_start_by, v_taken, v_holds,
                v_tokens, v_expires) WITH ORDINALITY
         AS u(step_uuid, queue, attempt, enqueued_at, start_by, taker, holds, token, expires, ord)
    ORDER BY u.ord;
    IF v_handed > 0 THEN
        WITH started AS (
            UPDATE tasker.workflow_steps s
            SET state = 'in_progress', started_at = clock_timestamp()
            FROM unnest(v_steps, v_attempts, v_taken) WITH ORDINALITY AS u(step_uuid, attempt, taker, ord)
            WHERE u.taker > 0 AND s.step_uuid = u.step_uuid AND s.state = 'enqueued'
              AND s.attempts = u.attempt
            RETURNING s.step_uuid, s.task_uuid, s.name, s.inputs, u.attempt, u.taker, u.ord
        )
        SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'step_uuid', st.step_uuid, 'task_uuid', st.task_uuid, 'name', st.name,
                   'attempt', st.attempt, 'inputs', st.inputs,
                   'parent_results', (
                       SELECT coalesce(jsonb_object_agg(ps.name, coalesce(ps.results, 'null'::jsonb)), '{}'::jsonb)
                       FROM tasker.step_edges e
                       CROSS JOIN LATERAL (SELECT p.name, p.results FROM tasker.workflow_steps p
                                           WHERE p.step_uuid = e.parent_step_uuid OFFSET 0) ps
                       WHERE e.child_step_uuid = st.step_uuid),
                   'lease_expires_at', v_expires[st.ord], 'enqueued_at', v_enqueued_at[st.ord],
                   'traceparent', v_traceparent, 'lease_token', v_tokens[st.ord],
                   'queue', v_queues[st.ord], 'taker', st.taker - 1) ORDER BY st.ord), '[]'::jsonb)
        INTO v_leased
        FROM started st;
    END IF;
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

-- Lease up to p_max steps of the namespace's queues p_queues to a worker: the queues in the
-- order named, each best priority first, as far as each lane's pause and limit allow. A lane
-- without settings costs a probe of the settings and the walk of its fetch index, as a
-- namespace did before queues; a lane under a limit takes slots only for steps that are
-- there. Commits synchronously: a lease a worker has received survives a crash of the
-- database.
-- (from migrations/20261204000025_lane_lock_before_gate.sql)
CREATE OR REPLACE FUNCTION tasker.fetch_steps(p_namespace text, p_queues text[], p_worker_id text,
                                   p_max integer, p_lease_ms bigint)
RETURNS TABLE (
    step_uuid uuid, task_uuid uuid, name text, attempt integer, inputs jsonb,
    parent_results jsonb, lease_expires_at timestamptz, enqueued_at timestamptz, traceparent text,
    lease_token uuid, queue text
)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_queue text;
    v_gate record;
    v_grant record;
    v_msg record;
    v_rows integer;
    v_leased integer;
    v_left integer := p_max;
BEGIN
    FOREACH v_queue IN ARRAY p_queues LOOP
        EXIT WHEN v_left <= 0;
        -- the lane's lock, shared, before its settings are read: a limit being set waits for
        -- this fetch, which then counts, or this fetch waits for the limit and sees it
        PERFORM pg_advisory_xact_lock_shared(tasker.lane_lock_key(p_namespace, v_queue));
        SELECT g.paused, g.max_in_flight INTO v_gate FROM tasker.lane_gate(p_namespace, v_queue) g;
        CONTINUE WHEN v_gate.paused;
        IF v_gate.max_in_flight IS NULL THEN
            SELECT v_left AS granted, false AS holds_slot INTO v_grant;
        ELSE
            -- under a limit, slots are taken only for steps that are there
            CONTINUE WHEN NOT EXISTS (SELECT 1 FROM tasker.step_queue q
                                      WHERE q.namespace = p_namespace AND q.queue = v_queue
                                        AND q.leased_by IS NULL);
            SELECT a.granted, a.holds_slot INTO v_grant
            FROM tasker.lease_allowance(p_namespace, v_queue, v_left) a;
            CONTINUE WHEN v_grant.granted = 0;
        END IF;
        v_leased := 0;
        FOR v_msg IN
            SELECT q.msg_id
            FROM tasker.step_queue q
            WHERE q.namespace = p_namespace AND q.queue = v_queue AND q.leased_by IS NULL
            ORDER BY q.priority DESC, q.msg_id
            LIMIT v_grant.granted
            FOR UPDATE SKIP LOCKED
        LOOP
            RETURN QUERY SELECT * FROM tasker.lease_queued(v_msg.msg_id, p_worker_id, p_lease_ms,
                                                           v_grant.holds_slot);
            GET DIAGNOSTICS v_rows = ROW_COUNT;
            v_leased := v_leased + v_rows;
        END LOOP;
        IF v_grant.holds_slot AND v_leased < v_grant.granted THEN
            PERFORM tasker.free_slots(p_namespace, v_queue, v_grant.granted - v_leased);
        END IF;
        v_left := v_left - v_leased;
    END LOOP;
END
$$;

-- A step handed to a taker is enqueued and leased in one move (issue 25, the hop's cost): claim_
-- and_enqueue moved every ready step to enqueued and then, for each step handed to a parked
-- fetch or to an eager completion's worker, updated it again to in_progress: a second row
-- version, a second pass through the guard, per step of every hand-off. Now the ready steps
-- are read first, the takers chosen, and one statement moves each step, to enqueued or (handed)
-- straight to in_progress with its new attempt, and writes its queue row. The guard allows that
-- one move (pending -> in_progress with attempt + 1, an enqueue and a lease together) and the
-- history writes it as the two rows it always showed, pending -> enqueued and enqueued ->
-- in_progress.

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
-- A step handed to a fetch is enqueued and leased in one move: its row is updated once (pending
-- -> in_progress, the history recording both transitions) and its queue row written once,
-- leased (every hand-off and every eager completion paid for a second update of each).
-- (from migrations/20261204000023_steps_handed_in_one_move.sql)
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
    v_ready uuid[];
    v_steps uuid[];
    v_queues text[];
    v_timeouts integer[];
    v_enqueued uuid[];
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
    v_started integer;
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

    -- the ready steps, read first: which of them go to the takers is decided before they move
    SELECT coalesce(array_agg(r.step_uuid), '{}'::uuid[]),
           coalesce(array_agg(w.step_uuid ORDER BY w.position) FILTER (WHERE w.step_uuid IS NOT NULL), '{}'::uuid[]),
           coalesce(array_agg(w.queue ORDER BY w.position) FILTER (WHERE w.step_uuid IS NOT NULL), '{}'::text[]),
           array_agg(w.timeout_ms ORDER BY w.position) FILTER (WHERE w.step_uuid IS NOT NULL)
    INTO v_ready, v_steps, v_queues, v_timeouts
    FROM tasker.ready_steps r
    LEFT JOIN LATERAL (SELECT s.step_uuid, s.queue, s.timeout_ms, s.position
                       FROM tasker.workflow_steps s
                       WHERE s.step_uuid = r.step_uuid AND s.state = 'pending'
                         AND s.unfinished_parents = 0
                       OFFSET 0) w ON true
    WHERE r.task_uuid = p_task_uuid;

    IF cardinality(v_steps) = 0 THEN
        -- ready rows of steps that are not pending any more are dropped
        DELETE FROM tasker.ready_steps r WHERE r.task_uuid = p_task_uuid AND r.step_uuid = ANY (v_ready);
        RETURN QUERY SELECT 'nothing_ready'::text, v_task.namespace, v_task.priority, v_steps, NULL::float8, '[]'::jsonb, '[]'::jsonb, '[]'::jsonb;
        RETURN;
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
    -- the move, in one statement: the ready rows read are taken (rows added since stay for the
    -- next pass), each step that is still pending and ready is enqueued (pending -> enqueued,
    -- attempt + 1) or, handed to a taker, enqueued and leased at once (pending -> in_progress),
    -- and its queue row is written once, in position order (the fetch order within a
    -- priority), leased when handed
    WITH taken AS (
        DELETE FROM tasker.ready_steps r WHERE r.task_uuid = p_task_uuid AND r.step_uuid = ANY (v_ready)
    ),
    moved AS (
        UPDATE tasker.workflow_steps s
        SET state = CASE WHEN u.taker > 0 THEN 'in_progress' ELSE 'enqueued' END,
            attempts = s.attempts + 1, enqueued_at = clock_timestamp(),
            started_at = CASE WHEN u.taker > 0 THEN clock_timestamp() ELSE s.started_at END,
            next_retry_at = NULL
        FROM unnest(v_steps, v_taken) WITH ORDINALITY AS u(step_uuid, taker, ord)
        WHERE s.step_uuid = u.step_uuid AND s.state = 'pending' AND s.unfinished_parents = 0
        RETURNING s.step_uuid, s.task_uuid, s.name, s.inputs, s.attempts, s.position, s.queue,
                  s.enqueued_at, s.ready_at, s.schedule_to_start_ms, u.taker, u.ord
    ),
    queued AS (
        INSERT INTO tasker.step_queue (namespace, queue, task_uuid, step_uuid, attempt, priority,
                                       enqueued_at, traceparent, start_by, leased_by, visible_at,
                                       read_count, lease_token, holds_slot)
        SELECT v_task.namespace, m.queue, p_task_uuid, m.step_uuid, m.attempts, v_task.priority,
               m.enqueued_at, v_traceparent,
               m.enqueued_at + make_interval(secs => m.schedule_to_start_ms / 1000.0),
               CASE WHEN m.taker > 0 THEN p_takers->(m.taker - 1)->>'worker_id' END,
               coalesce(v_expires[m.ord], clock_timestamp()), (m.taker > 0)::int,
               v_tokens[m.ord], v_holds[m.ord]
        FROM moved m ORDER BY m.position
    )
    SELECT coalesce(array_agg(m.step_uuid ORDER BY m.position), '{}'::uuid[]),
           extract(epoch FROM max(m.enqueued_at - m.ready_at)) * 1000,
           min(m.schedule_to_start_ms),
           count(*) FILTER (WHERE m.taker > 0),
           coalesce(jsonb_agg(jsonb_build_object(
               'step_uuid', m.step_uuid, 'task_uuid', m.task_uuid, 'name', m.name,
               'attempt', m.attempts, 'inputs', m.inputs,
               'parent_results', (
                   SELECT coalesce(jsonb_object_agg(ps.name, coalesce(ps.results, 'null'::jsonb)), '{}'::jsonb)
                   FROM tasker.step_edges e
                   CROSS JOIN LATERAL (SELECT p.name, p.results FROM tasker.workflow_steps p
                                       WHERE p.step_uuid = e.parent_step_uuid OFFSET 0) ps
                   WHERE e.child_step_uuid = m.step_uuid),
               'lease_expires_at', v_expires[m.ord], 'enqueued_at', m.enqueued_at,
               'traceparent', v_traceparent, 'lease_token', v_tokens[m.ord],
               'queue', m.queue, 'taker', m.taker - 1) ORDER BY m.position)
               FILTER (WHERE m.taker > 0), '[]'::jsonb)
    INTO v_enqueued, v_wait, v_start_within, v_started, v_leased
    FROM moved m;
    IF v_started < v_handed THEN
        -- a step read as ready stopped being so before it moved (cancelled meanwhile): the
        -- slots granted for it are given back
        PERFORM tasker.free_slots(v_task.namespace, u.queue, count(*)::int)
        FROM unnest(v_steps, v_queues, v_taken, v_holds) AS u(step_uuid, queue, taker, holds)
        WHERE u.taker > 0 AND u.holds AND u.step_uuid <> ALL (v_enqueued)
        GROUP BY u.queue;
        v_handed := v_started;
    END IF;
    IF cardinality(v_enqueued) = 0 THEN
        RETURN QUERY SELECT 'nothing_ready'::text, v_task.namespace, v_task.priority, v_enqueued, NULL::float8, '[]'::jsonb, '[]'::jsonb, '[]'::jsonb;
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
    RETURN QUERY SELECT 'enqueued'::text, v_task.namespace, v_task.priority, v_enqueued, v_wait, v_leased, v_queued, v_held;
END
$$;

-- Before any update of a step: the transition must be legal (TK001, whoever writes), and
-- a step's identity and position are immutable. One move is legal beyond the table: pending
-- -> in_progress together with a new attempt, which is an enqueue and a lease in one update
-- (tasker.claim_and_enqueue handing a step to a taker); the history records both.
-- (from migrations/20261204000023_steps_handed_in_one_move.sql)
CREATE OR REPLACE FUNCTION tasker.workflow_steps_guard() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.state IS DISTINCT FROM OLD.state THEN
        IF NOT tasker.step_transition_allowed(OLD.state, NEW.state)
           AND NOT (OLD.state = 'pending' AND NEW.state = 'in_progress'
                    AND NEW.attempts = OLD.attempts + 1) THEN
            RAISE EXCEPTION 'illegal step transition % -> % for step %', OLD.state, NEW.state, OLD.step_uuid
                USING ERRCODE = 'TK001';
        END IF;
    END IF;
    IF NEW.task_uuid IS DISTINCT FROM OLD.task_uuid OR NEW.step_uuid IS DISTINCT FROM OLD.step_uuid
       OR NEW.position IS DISTINCT FROM OLD.position THEN
        RAISE EXCEPTION 'a step''s identity and position are immutable (step %)', OLD.step_uuid
            USING ERRCODE = 'TK001';
    END IF;
    NEW.updated_at := clock_timestamp();
    RETURN NEW;
END
$$;

-- A step's history row: every insert (creation) and state change. A creation row carries no
-- metadata (the task's creation row, written in the same transaction, has the request's);
-- the step names its task. An enqueue and a lease in one update (pending -> in_progress) are
-- two rows, pending -> enqueued and enqueued -> in_progress, as when they are two updates.
-- (from migrations/20261204000023_steps_handed_in_one_move.sql)
CREATE OR REPLACE FUNCTION tasker.workflow_steps_history() RETURNS trigger
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.state = 'pending' AND NEW.state = 'in_progress' THEN
        INSERT INTO tasker.step_transitions (step_uuid, from_state, to_state, attempt, metadata)
        SELECT NEW.step_uuid, f, t, NEW.attempts, tasker.transition_metadata()
        FROM (VALUES ('pending', 'enqueued', 1), ('enqueued', 'in_progress', 2)) AS m(f, t, o)
        ORDER BY m.o;
        RETURN NULL;
    END IF;
    INSERT INTO tasker.step_transitions (step_uuid, from_state, to_state, attempt, metadata)
    VALUES (NEW.step_uuid,
            CASE WHEN TG_OP = 'UPDATE' THEN OLD.state END,
            NEW.state, NEW.attempts,
            CASE WHEN TG_OP = 'UPDATE' THEN tasker.transition_metadata() ELSE '{}'::jsonb END);
    RETURN NULL;
END
$$;

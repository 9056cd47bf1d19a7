-- Steps on the hop: claim-and-enqueue (and the hand-off to parked fetches), leasing, a
-- worker's reports (complete, fail, extend) checked against its lease, and lease expiry.
--
-- The definitions that run, one per function: what a fresh database has after every migration
-- in migrations/. This file is not applied; the migrations are (append-only: a change is a new
-- migration). tests/sql_layout.rs fails when a function's live definition differs from the one
-- here, so a change to a function is made in a new migration and here, in the same commit.
-- Each definition names the migration it comes from.


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
-- max_tasks_per_key), oldest first: no older task of its key may start now (pending, not
-- waiting for a start time); otherwise it waits in line (tasker.key_waiters), its ready steps
-- out of the ready set, and the answer is 'waiting_on_key'. Taking a slot with more free, it
-- admits the oldest waiters to them.
-- Claim: a transaction-scoped advisory lock on the task, tried without waiting. A task claimed
-- by another instance's enqueuer answers 'claimed_elsewhere' at once; the caller retries
-- shortly, because the holder's snapshot may predate a completion that made more steps ready.
-- Exactly once: the CAS pending -> enqueued plus the unique (step_uuid, attempt) queue key.
-- Cost: the ready steps of this task, taken out of the ready set by its task index; nothing
-- else of the task; per lane, one probe of its settings, and under a limit one statement for
-- its slots when this backend's own shard has room (a function call only when it has not).
-- Durability: asynchronous commit while it only enqueues: enqueue state is derivable (if a
-- crash loses the commit, the steps are still pending and ready, and the start-up sweep or the
-- fallback poller enqueues them again). A pass that leases steps to parked fetches commits
-- synchronously: those leases reach workers, and must survive a crash. A step with a
-- schedule_to_start gets its queue row's start_by, announced on tasker_deadlines.
-- A step handed to a fetch is queued already leased: its queue row is written once, not
-- inserted and then updated (every hand-off and every eager completion paid for the second
-- row version and its index entries).
-- Generic plans only: two statements take the pass's arrays, whose lengths made PostgreSQL
-- plan them again at many calls.
-- (from migrations/20261205000037_keyed_tasks_start_oldest_first.sql)
CREATE OR REPLACE FUNCTION tasker.claim_and_enqueue(
    p_task_uuid uuid, p_metadata jsonb DEFAULT '{}'::jsonb, p_takers jsonb DEFAULT '[]'::jsonb,
    p_announce_as uuid DEFAULT NULL
)
RETURNS TABLE (outcome text, namespace text, priority integer, enqueued_steps uuid[],
               max_ready_wait_ms double precision, leased jsonb, queued jsonb, held jsonb)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
SET plan_cache_mode = force_generic_plan
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
    v_handed_steps uuid[] := '{}';
    v_holds boolean[];
    v_tokens uuid[];
    v_expires timestamptz[];
    v_lease_ms bigint;
    -- when the handed steps start: their leases and timeouts count from it
    v_now timestamptz;
    v_wait double precision;
    v_traceparent text := left(tasker.current_traceparent(), 128);
    v_lane record;
    v_gate record;
    v_granted integer;
    v_holds_slot boolean;
    v_room integer;
    -- this backend's slot shard of a limited lane, where its leases and room are looked for first
    v_own_shard integer := pg_backend_pid() % 16;
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
    v_admitted integer;
    v_start_within integer;
    v_set text;
BEGIN
    -- settings and the answer by assignment (an expression), not PERFORM or RETURN QUERY (a
    -- statement each, with its executor started and ended at every call)
    v_set := set_config('synchronous_commit', 'off', true);
    v_set := set_config('tasker.transition_metadata', p_metadata::text, true);
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
            -- oldest first: an older task of the key that may start now (pending, not waiting
            -- for a start time), whether in line or not yet claimed, goes before this one (a
            -- waiter just admitted to a freed slot is such a task until its claim)
            IF v_running >= v_max_per_key
               OR EXISTS (SELECT 1 FROM tasker.tasks o
                          WHERE o.namespace = v_task.namespace
                            AND o.concurrency_key = v_task.concurrency_key
                            AND o.completed_at IS NULL AND o.state = 'pending'
                            AND (o.created_at, o.task_uuid) < (v_task.created_at, p_task_uuid)
                            AND NOT EXISTS (SELECT 1 FROM tasker.task_starts ts
                                            WHERE ts.task_uuid = o.task_uuid)) THEN
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
        -- the taken steps as one array: a key look-up per step whatever the statistics (a
        -- join with the CTE let a plan cached on small tables scan every step, per call)
        WHERE s.step_uuid = ANY (ARRAY(SELECT t.step_uuid FROM taken t))
          AND s.state = 'pending' AND s.unfinished_parents = 0
        RETURNING s.step_uuid, s.attempts, s.position, s.enqueued_at, s.ready_at, s.queue,
                  s.schedule_to_start_ms, s.timeout_ms
    )
    -- one sort for the pass: the moved steps in position order feed every aggregate (an ORDER
    -- BY in each aggregate sorted the same rows six times; a plain aggregate over a sorted
    -- subquery keeps its order)
    SELECT coalesce(array_agg(m.step_uuid), '{}'::uuid[]),
           coalesce(array_agg(m.queue), '{}'::text[]),
           array_agg(m.attempts),
           array_agg(m.enqueued_at),
           array_agg(m.enqueued_at + make_interval(secs => m.schedule_to_start_ms / 1000.0)),
           array_agg(m.timeout_ms),
           extract(epoch FROM max(m.enqueued_at - m.ready_at)) * 1000,
           min(m.schedule_to_start_ms)
    INTO v_steps, v_queues, v_attempts, v_enqueued_at, v_start_by, v_timeouts, v_wait,
         v_start_within
    FROM (SELECT * FROM moved ORDER BY position) m;

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
            -- a newer task that claimed first waits in line behind this one: with slots still
            -- free, the oldest waiters are admitted now, not when a task of the key finishes
            IF v_running + 1 < v_max_per_key THEN
                v_admitted := tasker.start_waiting_on_key(v_task.namespace, v_task.concurrency_key,
                                                          v_max_per_key - v_running - 1);
            END IF;
        END IF;
    END IF;
    v_given := array_fill(0, ARRAY[greatest(jsonb_array_length(p_takers), 1)]);
    v_taken := array_fill(0, ARRAY[cardinality(v_steps)]);
    v_holds := array_fill(false, ARRAY[cardinality(v_steps)]);
    v_tokens := array_fill(NULL::uuid, ARRAY[cardinality(v_steps)]);
    v_expires := array_fill(NULL::timestamptz, ARRAY[cardinality(v_steps)]);
    v_now := clock_timestamp();
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
                v_granted := least(v_open, cardinality(v_lane.steps));
                v_holds_slot := v_gate.max_in_flight IS NOT NULL;
                IF v_holds_slot THEN
                    -- the slots from this backend's own shard when it has room for all of them
                    -- and no other transaction holds it: one statement (the lane's lock is
                    -- held and its gate read); else the shards one by one
                    UPDATE tasker.lane_slots s SET in_flight = s.in_flight + v_granted
                    WHERE s.namespace = v_task.namespace AND s.queue = v_lane.queue
                      AND s.shard = v_own_shard
                      AND EXISTS (SELECT 1 FROM tasker.lane_slots x
                                  WHERE x.namespace = v_task.namespace AND x.queue = v_lane.queue
                                    AND x.shard = v_own_shard
                                    AND x.in_flight + v_granted <= x.cap
                                  FOR NO KEY UPDATE SKIP LOCKED);
                    IF NOT FOUND THEN
                        SELECT a.granted, a.holds_slot INTO v_granted, v_holds_slot
                        FROM tasker.lease_allowance(v_task.namespace, v_lane.queue, v_granted) a;
                    END IF;
                END IF;
                FOR v_taker IN
                    SELECT x.ord::int AS ord, (x.t->>'max')::int AS max,
                           (x.t->>'lease_ms')::bigint AS lease_ms
                    FROM jsonb_array_elements(p_takers) WITH ORDINALITY AS x(t, ord)
                    WHERE coalesce(x.t->'queues', '["default"]'::jsonb) ? v_lane.queue
                    ORDER BY x.ord
                LOOP
                    EXIT WHEN v_next > v_granted;
                    WHILE v_next <= v_granted AND v_given[v_taker.ord] < v_taker.max LOOP
                        -- the lease of a step with a timeout ends no later than its start +
                        -- the timeout (as in lease_queued)
                        v_lease_ms := least(v_taker.lease_ms,
                                            coalesce(v_timeouts[v_lane.idx[v_next]], v_taker.lease_ms));
                        v_taken[v_lane.idx[v_next]] := v_taker.ord;
                        v_handed_steps := v_handed_steps || v_lane.steps[v_next];
                        v_holds[v_lane.idx[v_next]] := v_holds_slot;
                        v_tokens[v_lane.idx[v_next]] := gen_random_uuid();
                        v_expires[v_lane.idx[v_next]] :=
                            v_now + make_interval(secs => v_lease_ms / 1000.0);
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
            v_open := cardinality(v_lane.steps) - v_next + 1;
            IF v_gate.paused THEN
                v_open := 0;
            ELSIF v_gate.max_in_flight IS NOT NULL THEN
                -- room for all of them on this backend's own shard: one probe answers; else
                -- the room of all its shards
                SELECT s.cap - s.in_flight INTO v_room FROM tasker.lane_slots s
                WHERE s.namespace = v_task.namespace AND s.queue = v_lane.queue
                  AND s.shard = v_own_shard;
                IF v_room IS NULL OR v_room < v_open THEN
                    v_open := tasker.lane_room(v_task.namespace, v_lane.queue, v_open);
                END IF;
            END IF;
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
            SET state = 'in_progress', started_at = v_now
            FROM unnest(v_steps, v_attempts, v_taken) WITH ORDINALITY AS u(step_uuid, attempt, taker, ord)
            -- the handed steps by key (see the move to enqueued), then matched to their takers
            WHERE s.step_uuid = ANY (v_handed_steps)
              AND u.taker > 0 AND s.step_uuid = u.step_uuid AND s.state = 'enqueued'
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
        v_set := set_config('synchronous_commit', 'on', true);
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
    outcome := 'enqueued'; namespace := v_task.namespace; priority := v_task.priority;
    enqueued_steps := v_steps; max_ready_wait_ms := v_wait;
    leased := v_leased; queued := v_queued; held := v_held;
    RETURN NEXT;
END
$$;

-- Lease one queued message to a worker (as tasker.lease_message did), holding one of its
-- lane's slots when p_holds_slot; the step as the worker receives it, with its queue.
-- Nothing (and no slot held) when the message's step is not enqueued at this attempt any more.
-- The lease of a step with a timeout ends no later than the attempt's start + the timeout.
-- (from migrations/20261204000013_step_timeouts.sql)
CREATE FUNCTION tasker.lease_queued(p_msg_id bigint, p_worker_id text, p_lease_ms bigint,
                                               p_holds_slot boolean)
RETURNS TABLE (
    step_uuid uuid, task_uuid uuid, name text, attempt integer, inputs jsonb,
    parent_results jsonb, lease_expires_at timestamptz, enqueued_at timestamptz, traceparent text,
    lease_token uuid, queue text
)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_q record;
    v_s record;
    v_end timestamptz;
BEGIN
    UPDATE tasker.step_queue q
    SET leased_by = p_worker_id,
        visible_at = clock_timestamp() + make_interval(secs => p_lease_ms / 1000.0),
        read_count = q.read_count + 1,
        lease_token = gen_random_uuid(),
        holds_slot = p_holds_slot
    WHERE q.msg_id = p_msg_id
    RETURNING q.step_uuid, q.attempt, q.visible_at, q.enqueued_at, q.traceparent, q.lease_token,
              q.queue
    INTO v_q;
    UPDATE tasker.workflow_steps s
    SET state = 'in_progress', started_at = clock_timestamp()
    WHERE s.step_uuid = v_q.step_uuid AND s.state = 'enqueued' AND s.attempts = v_q.attempt
    RETURNING s.task_uuid, s.name, s.inputs, s.timeout_ms, s.started_at INTO v_s;
    IF NOT FOUND THEN
        IF p_holds_slot THEN
            -- the caller gives the unused grant back
            UPDATE tasker.step_queue q SET holds_slot = false WHERE q.msg_id = p_msg_id;
        END IF;
        RETURN;
    END IF;
    lease_expires_at := v_q.visible_at;
    IF v_s.timeout_ms IS NOT NULL THEN
        v_end := v_s.started_at + make_interval(secs => v_s.timeout_ms / 1000.0);
        IF v_end < v_q.visible_at THEN
            UPDATE tasker.step_queue q SET visible_at = v_end WHERE q.msg_id = p_msg_id;
            lease_expires_at := v_end;
        END IF;
    END IF;
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
    enqueued_at := v_q.enqueued_at;
    traceparent := v_q.traceparent;
    lease_token := v_q.lease_token;
    queue := v_q.queue;
    RETURN NEXT;
END
$$;

-- Lease up to p_max steps of the namespace's queues p_queues to a worker: the queues in the
-- order named, each best priority first, as far as each lane's pause and limit allow. A lane
-- without settings costs a probe of the settings and the walk of its fetch index, as a
-- namespace did before queues; a lane under a limit takes slots only for steps that are
-- there. Commits synchronously: a lease a worker has received survives a crash of the
-- database.
-- (from migrations/20261204000026_slots_taken_inline.sql)
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
    v_granted integer;
    v_holds_slot boolean;
    -- this backend's slot shard of a limited lane, where its leases are taken from first
    v_own_shard integer := pg_backend_pid() % 16;
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
        v_granted := v_left;
        v_holds_slot := v_gate.max_in_flight IS NOT NULL;
        IF v_holds_slot THEN
            -- under a limit, slots are taken only for steps that are there
            CONTINUE WHEN NOT EXISTS (SELECT 1 FROM tasker.step_queue q
                                      WHERE q.namespace = p_namespace AND q.queue = v_queue
                                        AND q.leased_by IS NULL);
            -- from this backend's own shard when it has room for all of them and no other
            -- transaction holds it: one statement (the lane's lock is held and its gate
            -- read); else the shards one by one
            UPDATE tasker.lane_slots s SET in_flight = s.in_flight + v_granted
            WHERE s.namespace = p_namespace AND s.queue = v_queue
              AND s.shard = v_own_shard
              AND EXISTS (SELECT 1 FROM tasker.lane_slots x
                          WHERE x.namespace = p_namespace AND x.queue = v_queue
                            AND x.shard = v_own_shard
                            AND x.in_flight + v_granted <= x.cap
                          FOR NO KEY UPDATE SKIP LOCKED);
            IF NOT FOUND THEN
                SELECT a.granted, a.holds_slot INTO v_granted, v_holds_slot
                FROM tasker.lease_allowance(p_namespace, v_queue, v_granted) a;
                CONTINUE WHEN v_granted = 0;
            END IF;
        END IF;
        v_leased := 0;
        FOR v_msg IN
            SELECT q.msg_id
            FROM tasker.step_queue q
            WHERE q.namespace = p_namespace AND q.queue = v_queue AND q.leased_by IS NULL
            ORDER BY q.priority DESC, q.msg_id
            LIMIT v_granted
            FOR UPDATE SKIP LOCKED
        LOOP
            RETURN QUERY SELECT * FROM tasker.lease_queued(v_msg.msg_id, p_worker_id, p_lease_ms,
                                                           v_holds_slot);
            GET DIAGNOSTICS v_rows = ROW_COUNT;
            v_leased := v_leased + v_rows;
        END LOOP;
        IF v_holds_slot AND v_leased < v_granted THEN
            PERFORM tasker.free_slots(p_namespace, v_queue, v_granted - v_leased);
        END IF;
        v_left := v_left - v_leased;
    END LOOP;
END
$$;

-- A lease handed to a fetch that had gone away before the steps reached it: the step goes back
-- on the queue at the same attempt (its worker never had it), its token void.
-- (from migrations/20261204000001_lease_tokens.sql)
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

-- Why an attempt cannot be acted on, or NULL when the caller holds a live lease on it. Locks
-- the step row. Outcomes: step_not_found, not_in_progress, stale_attempt, lease_expired. The
-- queue row is found by its unique (step, attempt) key, not by walking the lease index.
-- (from migrations/20261127000001_baseline.sql)
CREATE FUNCTION tasker.check_live_lease(p_step_uuid uuid, p_attempt integer)
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

-- Why an attempt cannot be acted on by the holder of p_lease_token, or NULL when that token
-- holds a live lease on it (p_lease_token NULL: any holder, for the service's own sweeps).
-- Locks the step row. Outcomes: step_not_found, stale_attempt, task_cancelled,
-- not_in_progress, lease_expired, lease_not_held, and timed_out (instead of stale, over or
-- expired) for an attempt that ran past its timeout. The queue row is found by its unique
-- (step, attempt) key, not by walking the lease index.
-- (from migrations/20261204000013_step_timeouts.sql)
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
    IF v_step.attempts <> p_attempt THEN
        IF tasker.attempt_timed_out(p_step_uuid, p_attempt) THEN RETURN 'timed_out'; END IF;
        RETURN 'stale_attempt';
    END IF;
    IF v_step.state = 'cancelled' THEN RETURN 'task_cancelled'; END IF;
    IF v_step.state <> 'in_progress' THEN
        IF tasker.attempt_timed_out(p_step_uuid, p_attempt) THEN RETURN 'timed_out'; END IF;
        RETURN 'not_in_progress';
    END IF;
    SELECT q.visible_at, q.leased_by, q.lease_token INTO v_msg FROM tasker.step_queue q
    WHERE q.step_uuid = p_step_uuid AND q.attempt = p_attempt
    FOR UPDATE;
    IF NOT FOUND OR v_msg.leased_by IS NULL OR v_msg.visible_at <= clock_timestamp() THEN
        IF tasker.attempt_timed_out(p_step_uuid, p_attempt) THEN RETURN 'timed_out'; END IF;
        RETURN 'lease_expired';
    END IF;
    IF p_lease_token IS NOT NULL AND v_msg.lease_token IS DISTINCT FROM p_lease_token THEN
        RETURN 'lease_not_held';
    END IF;
    RETURN NULL;
END
$$;

-- Whether attempt p_attempt of a step ended by its timeout, or runs past it now (its lease not
-- yet ended by the scheduler). Read only when a report is refused, so last_error (which may be
-- large) is not read on the way of every completion.
-- (from migrations/20261204000013_step_timeouts.sql)
CREATE FUNCTION tasker.attempt_timed_out(p_step_uuid uuid, p_attempt integer) RETURNS boolean
LANGUAGE sql STABLE
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
    SELECT coalesce((SELECT (s.last_error->>'outcome' = 'TIMED_OUT'
                             AND (s.last_error->>'attempt')::int = p_attempt)
                            OR (s.state = 'in_progress' AND s.attempts = p_attempt
                                AND s.timeout_ms IS NOT NULL
                                AND s.started_at + make_interval(secs => s.timeout_ms / 1000.0)
                                    <= clock_timestamp())
                     FROM tasker.workflow_steps s WHERE s.step_uuid = p_step_uuid), false)
$$;

-- A step finished (completed, or resolved manually): its children each have one unfinished
-- parent fewer and p_results_bytes more of parent results, and the task one step fewer to go.
-- Caller holds the task's row lock. Returns how many children became ready; the task's state
-- after the change.
-- (from migrations/20261205000035_lighter_hop_bookkeeping.sql)
CREATE FUNCTION tasker.finish_step(p_step_uuid uuid, p_task_uuid uuid, p_results_bytes integer,
                                   OUT ready_children integer, OUT task_state text)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_remaining integer;
BEGIN
    WITH released AS (
        UPDATE tasker.workflow_steps c
        SET unfinished_parents = c.unfinished_parents - 1,
            parent_results_bytes = c.parent_results_bytes + p_results_bytes,
            ready_at = CASE WHEN c.unfinished_parents = 1 THEN clock_timestamp() ELSE c.ready_at END
        FROM tasker.step_edges e
        WHERE e.parent_step_uuid = p_step_uuid AND c.step_uuid = e.child_step_uuid
        RETURNING c.step_uuid, c.unfinished_parents, c.state, c.ready_at
    ),
    became_ready AS (
        INSERT INTO tasker.ready_steps (step_uuid, task_uuid, ready_at)
        SELECT r.step_uuid, p_task_uuid, r.ready_at FROM released r
        WHERE r.unfinished_parents = 0 AND r.state = 'pending'
        RETURNING 1
    )
    SELECT count(*)::int INTO ready_children FROM became_ready;
    -- the task's state is named only when this was its last step: an update naming the state
    -- column has every trigger "OF state" of the table weighed (their WHEN clauses read and
    -- compiled again) at every hop
    UPDATE tasker.tasks t SET remaining_steps = t.remaining_steps - 1
    WHERE t.task_uuid = p_task_uuid
    RETURNING t.state, t.remaining_steps INTO task_state, v_remaining;
    IF v_remaining = 0 AND task_state = 'in_progress' THEN
        UPDATE tasker.tasks t SET state = 'complete', completed_at = clock_timestamp()
        WHERE t.task_uuid = p_task_uuid;
        task_state := 'complete';
    END IF;
END
$$;

-- Complete an attempt the caller holds (p_lease_token). p_results_bytes: the results' size as
-- a protobuf Value; p_max_parent_results_bytes (NULL: no budget): refused with
-- 'parent_results_too_large', changing nothing, when these results would give a child more
-- parent results than that to be leased with, as sent. `outcome` is 'completed' or why not;
-- with it, what the caller needs for a claim in the same transaction, read on the way: the
-- step's task and namespace, the worker whose lease ended, and whether steps of the active
-- task became ready. Those are announced on tasker_task_ready when p_announce; a caller that
-- claims the task itself (eager dispatch) passes false, and sends nothing.
-- (from migrations/20261205000036_hop_expressions_not_statements.sql)
CREATE FUNCTION tasker.complete_attempt(
    p_step_uuid uuid, p_attempt integer, p_lease_token uuid, p_results jsonb,
    p_results_bytes integer, p_metadata jsonb, p_max_parent_results_bytes integer,
    p_announce boolean,
    OUT outcome text, OUT task_uuid uuid, OUT namespace text, OUT worker_id text,
    OUT made_ready boolean
)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_task_uuid uuid;
    v_bytes integer;
    v_set text;
    v_finished record;
BEGIN
    made_ready := false;
    -- settings and calls by assignment (an expression, where a PERFORM or SELECT INTO is a
    -- statement with its executor started). The step and its task's lock stay two statements:
    -- a join of the two, planned once on small tables, walked every task by index.
    SELECT s.task_uuid, tasker.parent_entry_bytes(s.name, p_results_bytes)
    INTO v_task_uuid, v_bytes
    FROM tasker.workflow_steps s WHERE s.step_uuid = p_step_uuid;
    IF NOT FOUND THEN outcome := 'step_not_found'; RETURN; END IF;
    task_uuid := v_task_uuid;
    SELECT t.namespace INTO namespace FROM tasker.tasks t
    WHERE t.task_uuid = v_task_uuid FOR NO KEY UPDATE;
    outcome := tasker.check_lease(p_step_uuid, p_attempt, p_lease_token);
    IF outcome IS NOT NULL THEN RETURN; END IF;
    -- the children's counters cannot move meanwhile: every finish holds the task's row lock
    IF p_max_parent_results_bytes IS NOT NULL AND EXISTS (
        SELECT 1 FROM tasker.step_edges e
        CROSS JOIN LATERAL (SELECT c.parent_results_bytes FROM tasker.workflow_steps c
                            WHERE c.step_uuid = e.child_step_uuid OFFSET 0) c
        WHERE e.parent_step_uuid = p_step_uuid
          AND c.parent_results_bytes + v_bytes > p_max_parent_results_bytes) THEN
        outcome := 'parent_results_too_large';
        RETURN;
    END IF;
    v_set := set_config('tasker.transition_metadata', p_metadata::text, true);
    DELETE FROM tasker.step_queue q WHERE q.step_uuid = p_step_uuid AND q.attempt = p_attempt
    RETURNING q.leased_by INTO worker_id;
    -- data_bytes: see 20261204000003
    UPDATE tasker.workflow_steps s
    SET state = 'complete', results = coalesce(p_results, '{}'::jsonb), completed_at = clock_timestamp(),
        data_bytes = s.data_bytes + p_results_bytes
    WHERE s.step_uuid = p_step_uuid AND s.state = 'in_progress' AND s.attempts = p_attempt;
    v_finished := tasker.finish_step(p_step_uuid, v_task_uuid, v_bytes);
    made_ready := v_finished.ready_children > 0 AND v_finished.task_state IN ('pending', 'in_progress');
    IF made_ready AND p_announce THEN
        PERFORM tasker.send_task_ready(v_task_uuid, namespace, 'step_transition');
    END IF;
    outcome := 'completed';
END
$$;

-- Complete an attempt the caller holds: tasker.complete_attempt's outcome, its readiness
-- announced.
-- (from migrations/20261204000027_completion_answers_its_claim.sql)
CREATE OR REPLACE FUNCTION tasker.complete_step(
    p_step_uuid uuid, p_attempt integer, p_lease_token uuid, p_results jsonb,
    p_results_bytes integer, p_metadata jsonb DEFAULT '{}'::jsonb,
    p_max_parent_results_bytes integer DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_outcome text;
BEGIN
    SELECT c.outcome INTO v_outcome
    FROM tasker.complete_attempt(p_step_uuid, p_attempt, p_lease_token, p_results,
                                 p_results_bytes, p_metadata, p_max_parent_results_bytes, true) c;
    RETURN v_outcome;
END
$$;

-- Many completions in one transaction (one commit, one pass through the NOTIFY commit lock).
-- Each item is exactly tasker.complete_step (complete_attempt, announced), with its own token
-- and trace context; items are taken in task order, so two batches lock tasks in the same
-- order and never wait on each other in a cycle. Returns each item's outcome by its position
-- in the input arrays. (The service itself batches through complete_steps_and_claim.)
-- (from migrations/20261204000027_completion_answers_its_claim.sql)
CREATE OR REPLACE FUNCTION tasker.complete_steps(
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
        RETURN QUERY SELECT v_item.ord, c.outcome
            FROM tasker.complete_attempt(v_item.step_uuid, p_attempts[v_item.ord],
                                         p_lease_tokens[v_item.ord], p_results[v_item.ord],
                                         p_results_bytes[v_item.ord], p_metadata,
                                         p_max_parent_results_bytes, true) c;
    END LOOP;
END
$$;

-- Complete an attempt (exactly tasker.complete_attempt) and, when that made steps of its task
-- ready, claim the task and enqueue them in the same transaction (exactly
-- tasker.claim_and_enqueue), leasing them first to the completing worker and then to the
-- parked fetches: p_takers[0] is the completing worker's ask ({"max", "lease_ms", "queues"};
-- its worker_id is the completed lease's), the rest are parked fetches as for
-- claim_and_enqueue. `completion` is complete_step's answer, with the step's task and the
-- completed lease's worker; the other columns are claim_and_enqueue's, NULL outcome when no
-- claim was tried (refused, or nothing made ready).
-- When another holds the task's claim, the readiness notification is sent as a plain
-- completion sends it, and the holder's retry or the listener's pass enqueues the steps.
-- Commits synchronously: a completion is durable, whatever the enqueue would allow.
-- (from migrations/20261205000036_hop_expressions_not_statements.sql)
CREATE OR REPLACE FUNCTION tasker.complete_step_and_claim(
    p_step_uuid uuid, p_attempt integer, p_lease_token uuid, p_results jsonb,
    p_results_bytes integer, p_metadata jsonb, p_max_parent_results_bytes integer,
    p_enqueue_metadata jsonb, p_takers jsonb
)
RETURNS TABLE (completion text, task_uuid uuid, worker_id text, outcome text, namespace text,
               enqueued_steps uuid[], max_ready_wait_ms double precision, leased jsonb,
               queued jsonb, held jsonb)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_c record;
    v_e record;
    v_set text;
BEGIN
    -- the completion reads the step's task and its lease's worker on its way, and leaves the
    -- steps it made ready in the ready set, announcing nothing
    -- (the call, the settings and the answer by assignment: expressions, not statements)
    v_c := tasker.complete_attempt(p_step_uuid, p_attempt, p_lease_token, p_results,
                                   p_results_bytes, p_metadata, p_max_parent_results_bytes, false);
    IF NOT v_c.made_ready THEN
        completion := v_c.outcome; task_uuid := v_c.task_uuid; worker_id := v_c.worker_id;
        enqueued_steps := '{}'; leased := '[]'; queued := '[]'; held := '[]';
        RETURN NEXT;
        RETURN;
    END IF;
    SELECT * INTO v_e FROM tasker.claim_and_enqueue(
        v_c.task_uuid, p_enqueue_metadata,
        jsonb_set(p_takers, '{0,worker_id}', to_jsonb(coalesce(v_c.worker_id, ''))), NULL) e;
    -- claim_and_enqueue commits asynchronously when it hands nothing over: not a completion
    v_set := set_config('synchronous_commit', 'on', true);
    IF v_e.outcome = 'claimed_elsewhere' THEN
        PERFORM tasker.send_task_ready(v_c.task_uuid, v_c.namespace, 'step_transition');
    END IF;
    completion := v_c.outcome; task_uuid := v_c.task_uuid; worker_id := v_c.worker_id;
    outcome := v_e.outcome; namespace := v_e.namespace; enqueued_steps := v_e.enqueued_steps;
    max_ready_wait_ms := v_e.max_ready_wait_ms; leased := v_e.leased; queued := v_e.queued;
    held := v_e.held;
    RETURN NEXT;
END
$$;

-- Many completions in one transaction (one commit, one pass through the NOTIFY commit lock),
-- each item exactly tasker.complete_step (complete_attempt, announced), or, with a taker
-- (p_takers[i]: the completing worker's ask, as for complete_step_and_claim), exactly
-- tasker.complete_step_and_claim, with its own token and trace context. Items are taken in task order, so two batches lock tasks in
-- the same order and never wait on each other in a cycle. Returns each item's answer by its
-- position in the input arrays: complete_step_and_claim's columns (for an item without a taker,
-- the completion alone). Commits synchronously. Generic plans only: the first statement's
-- step array would otherwise have it planned again at every call.
-- (from migrations/20261205000036_hop_expressions_not_statements.sql)
CREATE OR REPLACE FUNCTION tasker.complete_steps_and_claim(
    p_steps uuid[], p_attempts integer[], p_lease_tokens uuid[], p_results jsonb[],
    p_results_bytes integer[], p_traceparents text[], p_takers jsonb[],
    p_metadata jsonb DEFAULT '{}'::jsonb, p_enqueue_metadata jsonb DEFAULT '{}'::jsonb,
    p_max_parent_results_bytes integer DEFAULT NULL
) RETURNS TABLE (idx integer, completion text, task_uuid uuid, worker_id text, outcome text,
                 namespace text, enqueued_steps uuid[], max_ready_wait_ms double precision,
                 leased jsonb, queued jsonb, held jsonb)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_item record;
    v_set text;
BEGIN
    FOR v_item IN
        SELECT i.ord::int AS ord, i.step_uuid, s.task_uuid
        FROM unnest(p_steps) WITH ORDINALITY AS i(step_uuid, ord)
        LEFT JOIN LATERAL (SELECT w.task_uuid FROM tasker.workflow_steps w
                           WHERE w.step_uuid = i.step_uuid OFFSET 0) s ON true
        ORDER BY s.task_uuid NULLS FIRST, i.ord
    LOOP
        v_set := set_config('tasker.traceparent', coalesce(p_traceparents[v_item.ord], ''), true);
        IF p_takers[v_item.ord] IS NULL THEN
            RETURN QUERY SELECT v_item.ord, c.outcome,
                NULL::uuid, NULL::text, NULL::text, NULL::text, '{}'::uuid[], NULL::float8,
                '[]'::jsonb, '[]'::jsonb, '[]'::jsonb
            FROM tasker.complete_attempt(v_item.step_uuid, p_attempts[v_item.ord],
                                         p_lease_tokens[v_item.ord], p_results[v_item.ord],
                                         p_results_bytes[v_item.ord], p_metadata,
                                         p_max_parent_results_bytes, true) c;
        ELSE
            RETURN QUERY SELECT v_item.ord, e.*
            FROM tasker.complete_step_and_claim(
                v_item.step_uuid, p_attempts[v_item.ord], p_lease_tokens[v_item.ord],
                p_results[v_item.ord], p_results_bytes[v_item.ord], p_metadata,
                p_max_parent_results_bytes, p_enqueue_metadata,
                jsonb_build_array(p_takers[v_item.ord])) e;
        END IF;
    END LOOP;
    -- an item's claim may have turned the commit asynchronous: completions are durable
    v_set := set_config('synchronous_commit', 'on', true);
END
$$;

-- The backoff of an attempt under a policy: initial * multiplier^(attempt - 1), at most max,
-- less a random part of up to jitter of it (so that failures of one burst do not all retry
-- together). NULL without a policy.
-- (from migrations/20261204000010_step_retry_policy.sql)
CREATE FUNCTION tasker.policy_backoff_ms(p_policy jsonb, p_attempt integer) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT round(b * (1 - coalesce((p_policy->>'jitter')::float8, 0) * random()))::bigint
    FROM (SELECT least((p_policy->>'max_ms')::float8,
                       (p_policy->>'initial_ms')::float8
                           * power(coalesce((p_policy->>'multiplier')::float8, 1),
                                   least(greatest(p_attempt - 1, 0), 100))) AS b) x
    WHERE p_policy IS NOT NULL
$$;

-- The end of a failed attempt (the caller checked the lease and holds the task's row lock):
-- retry after the backoff when attempts remain and both the step and the failure allow it,
-- otherwise the step is in error and so is its task. A zero backoff returns the step to
-- pending at once, which is a readiness change and is announced. data_bytes follows the last
-- error (which replaces the one before it; counted as JSON).
-- p_backoff_ms NULL: the worker gave none (the step's retry policy decides, else at once).
-- A retry's due time is announced on tasker_deadlines, so every replica's deadline scheduler
-- wakes for it.
-- (from migrations/20261204000011_deadline_notices.sql)
CREATE FUNCTION tasker.record_attempt_failure(
    p_step_uuid uuid, p_error jsonb, p_retryable boolean, p_backoff_ms bigint
) RETURNS TABLE (outcome text, next_retry_at timestamptz)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_step record;
    v_next timestamptz;
    v_backoff_ms bigint;
BEGIN
    SELECT s.task_uuid, s.attempts, s.max_attempts, s.retryable, s.retry_policy INTO v_step
    FROM tasker.workflow_steps s WHERE s.step_uuid = p_step_uuid;
    DELETE FROM tasker.step_queue q WHERE q.step_uuid = p_step_uuid AND q.attempt = v_step.attempts;
    IF p_retryable AND v_step.retryable AND v_step.attempts < v_step.max_attempts THEN
        -- the worker's backoff wins; without one, the step's declared policy; without a
        -- policy, at once
        v_backoff_ms := greatest(coalesce(p_backoff_ms,
                                          tasker.policy_backoff_ms(v_step.retry_policy, v_step.attempts),
                                          0), 0);
        v_next := clock_timestamp() + make_interval(secs => v_backoff_ms / 1000.0);
        IF v_backoff_ms > 0 THEN
            -- every replica's deadline scheduler wakes for it: the retry is met on time even
            -- if the replica that recorded the failure is gone
            PERFORM pg_notify('tasker_deadlines', json_build_object(
                'namespace', t.namespace, 'at', v_next)::text)
            FROM tasker.tasks t WHERE t.task_uuid = v_step.task_uuid;
        END IF;
        UPDATE tasker.workflow_steps s
        SET state = 'waiting_for_retry', last_error = p_error, next_retry_at = v_next,
            data_bytes = s.data_bytes - coalesce(octet_length(s.last_error::text), 0)
                         + octet_length(p_error::text)
        WHERE s.step_uuid = p_step_uuid AND s.state = 'in_progress';
        IF v_backoff_ms = 0 THEN
            UPDATE tasker.workflow_steps s SET state = 'pending', ready_at = clock_timestamp()
            WHERE s.step_uuid = p_step_uuid AND s.state = 'waiting_for_retry';
            INSERT INTO tasker.ready_steps (step_uuid, task_uuid) VALUES (p_step_uuid, v_step.task_uuid);
            PERFORM tasker.send_task_ready(v_step.task_uuid, t.namespace, 'step_transition')
            FROM tasker.tasks t WHERE t.task_uuid = v_step.task_uuid AND t.state IN ('pending', 'in_progress');
        END IF;
        RETURN QUERY SELECT 'retry_scheduled'::text, v_next;
    ELSE
        UPDATE tasker.workflow_steps s
        SET state = 'error', last_error = p_error, completed_at = clock_timestamp(),
            data_bytes = s.data_bytes - coalesce(octet_length(s.last_error::text), 0)
                         + octet_length(p_error::text)
        WHERE s.step_uuid = p_step_uuid AND s.state = 'in_progress';
        UPDATE tasker.tasks t SET state = 'error', completed_at = clock_timestamp()
        WHERE t.task_uuid = v_step.task_uuid AND t.state = 'in_progress';
        RETURN QUERY SELECT 'failed'::text, NULL::timestamptz;
    END IF;
END
$$;

-- A worker's report that an attempt failed: checked against the lease it holds
-- (p_lease_token), then tasker.record_attempt_failure. Outcomes as check_lease's, or
-- 'retry_scheduled' / 'failed'.
-- (from migrations/20261204000001_lease_tokens.sql)
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

-- Keep a lease the caller holds for p_lease_ms more from now, but never past the attempt's
-- start + its step's timeout: 'extended', or why not (as check_lease).
-- (from migrations/20261204000013_step_timeouts.sql)
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
    SET visible_at = least(clock_timestamp() + make_interval(secs => p_lease_ms / 1000.0),
                           s.started_at + make_interval(secs => s.timeout_ms / 1000.0))
    FROM (SELECT w.started_at, w.timeout_ms FROM tasker.workflow_steps w
          WHERE w.step_uuid = p_step_uuid) s
    WHERE q.step_uuid = p_step_uuid AND q.attempt = p_attempt
    RETURNING q.visible_at INTO v_until;
    RETURN QUERY SELECT 'extended'::text, v_until;
END
$$;

-- Leases that ran out end their attempt as a retryable failure with no backoff: the worker
-- is presumed dead. max_attempts still applies.
-- An expired lease is a failed attempt without a worker's backoff: the step's retry policy
-- decides. One that ended at the attempt's timeout is TIMED_OUT (last_error.outcome, history
-- reason "timed_out").
-- (from migrations/20261204000013_step_timeouts.sql)
CREATE FUNCTION tasker.expire_leases(p_limit integer DEFAULT 500, p_namespaces text[] DEFAULT NULL)
RETURNS TABLE (task_uuid uuid, step_uuid uuid, outcome text, namespace text, priority integer)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_msg record;
    v_outcome text;
    v_timeout integer;
BEGIN
    FOR v_msg IN
        SELECT q.task_uuid, q.step_uuid, q.attempt, q.leased_by, q.namespace, q.priority FROM tasker.step_queue q
        WHERE q.leased_by IS NOT NULL AND q.visible_at <= clock_timestamp()
          AND tasker.namespace_matches(q.namespace, p_namespaces)
        ORDER BY q.visible_at
        LIMIT p_limit
    LOOP
        PERFORM 1 FROM tasker.tasks t WHERE t.task_uuid = v_msg.task_uuid FOR NO KEY UPDATE;
        -- re-check under the locks: the worker may have answered in the meantime
        IF tasker.check_live_lease(v_msg.step_uuid, v_msg.attempt) = 'lease_expired'
           AND EXISTS (SELECT 1 FROM tasker.step_queue q WHERE q.step_uuid = v_msg.step_uuid AND q.attempt = v_msg.attempt)
        THEN
            -- a lease never outlives the timeout, so one ending at or after it is the timeout
            v_timeout := NULL;
            SELECT s.timeout_ms INTO v_timeout FROM tasker.workflow_steps s
            WHERE s.step_uuid = v_msg.step_uuid
              AND s.started_at + make_interval(secs => s.timeout_ms / 1000.0) <= clock_timestamp();
            IF v_timeout IS NOT NULL THEN
                PERFORM set_config('tasker.transition_metadata', '{"reason":"timed_out"}', true);
                SELECT f.outcome INTO v_outcome FROM tasker.record_attempt_failure(
                    v_msg.step_uuid,
                    jsonb_build_object('message', format('attempt %s ran past its timeout of %s ms',
                                                         v_msg.attempt, v_timeout),
                                       'outcome', 'TIMED_OUT', 'attempt', v_msg.attempt,
                                       'timeout_ms', v_timeout, 'worker_id', v_msg.leased_by),
                    true, NULL) f;
            ELSE
                PERFORM set_config('tasker.transition_metadata', '{"reason":"lease_expired"}', true);
                SELECT f.outcome INTO v_outcome FROM tasker.record_attempt_failure(
                    v_msg.step_uuid,
                    jsonb_build_object('message', 'lease expired', 'worker_id', v_msg.leased_by),
                    true, NULL) f;
            END IF;
            RETURN QUERY SELECT v_msg.task_uuid, v_msg.step_uuid, v_outcome, v_msg.namespace, v_msg.priority;
        END IF;
    END LOOP;
END
$$;

-- Queued steps no worker took within their schedule_to_start (step_queue.start_by) fail for
-- good (no retry: it would wait for the same absent workers), their tasks in error; SKIP
-- LOCKED, each re-checked under its task's lock. One row per step failed.
-- (from migrations/20261204000015_schedule_to_start.sql)
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

-- Bytes a parent's results take in a child's parent_results, as sent: the results as a
-- protobuf Value (p_value_bytes, measured by the service), the parent's name, and the framing
-- of a map entry (two tags, two lengths, the entry's own tag and length: at most 16 bytes).
-- (from migrations/20261204000001_lease_tokens.sql)
CREATE FUNCTION tasker.parent_entry_bytes(p_name text, p_value_bytes integer) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT octet_length(p_name) + p_value_bytes + 16
$$;

-- Keyed tasks start oldest first, also against a newer task whose claim comes first.
--
-- A keyed task of a limited namespace (max_tasks_per_key) waited in line only behind older
-- tasks already in line (tasker.key_waiters). Two windows let a newer task take a free slot
-- before an older one: an older task not yet claimed (its readiness event not yet handled),
-- and a waiter that start_waiting_on_key had just admitted to a freed slot (out of the line,
-- its claim still to come). The claim now looks for an older task of the key that may start
-- now: pending and not waiting for its start time (tasker.task_starts), in line or not, by a
-- partial index of the unfinished keyed tasks. The newer task waits in line behind it.
--
-- Waiting behind a task that is not in line must not strand the waiter: the older task's
-- claim, taking a slot with more free, admits the oldest waiters to them, and cancelling a
-- pending keyed task does the same with its key's free slots (a task that held a slot frees
-- it by its trigger, as before).
--
-- The index holds the keyed tasks not finished (completed_at NULL): the running ones of a key
-- (at most its limit) and the ones yet to start. Its predicate names completed_at, not state:
-- an update that sets completed_at is not HOT already (tasks_finished_idx), while the start
-- (pending -> in_progress) stays a HOT update, as it is for every task without a key.

CREATE INDEX tasks_unfinished_keyed_idx ON tasker.tasks (namespace, concurrency_key, created_at, task_uuid)
    WHERE concurrency_key IS NOT NULL AND completed_at IS NULL;

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

-- Cancel a task and every step not finished: their queue rows go (by step, the queue's index),
-- their retry times are cleared, a start it waits for is dropped (first: a promotion under way
-- holds it, so the cancel waits and then removes what it made ready). 'cancelled',
-- 'task_not_found' or 'task_already_final'. A pending keyed task cancelled admits the oldest
-- waiters of its key to its free slots.
-- (from migrations/20261205000037_keyed_tasks_start_oldest_first.sql)
CREATE OR REPLACE FUNCTION tasker.cancel_task(p_task_uuid uuid, p_reason text, p_metadata jsonb DEFAULT '{}'::jsonb)
RETURNS text
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_state text;
    v_namespace text;
    v_key text;
    v_max integer;
    v_running integer;
BEGIN
    PERFORM set_config('tasker.transition_metadata',
        (coalesce(p_metadata, '{}'::jsonb) || jsonb_build_object('reason', p_reason))::text, true);
    SELECT t.state, t.namespace, t.concurrency_key INTO v_state, v_namespace, v_key
    FROM tasker.tasks t WHERE t.task_uuid = p_task_uuid FOR NO KEY UPDATE;
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
    -- a pending keyed task held back newer ones of its key (oldest first): with slots free,
    -- the oldest waiters are admitted now (a task that held a slot frees it by its trigger)
    IF v_state = 'pending' AND v_key IS NOT NULL THEN
        SELECT n.max_tasks_per_key INTO v_max FROM tasker.namespaces n WHERE n.name = v_namespace;
        IF v_max IS NOT NULL THEN
            SELECT k.running INTO v_running FROM tasker.key_slots k
            WHERE k.namespace = v_namespace AND k.concurrency_key = v_key FOR NO KEY UPDATE;
            IF coalesce(v_running, 0) < v_max THEN
                PERFORM tasker.start_waiting_on_key(v_namespace, v_key, v_max - coalesce(v_running, 0));
            END IF;
        END IF;
    END IF;
    RETURN 'cancelled';
END
$$;

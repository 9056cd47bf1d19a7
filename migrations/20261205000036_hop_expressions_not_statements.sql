-- The hop's functions do by expression what they did by statement (issue 25: PostgreSQL's
-- CPU per step). In PL/pgSQL an assignment (`v := set_config(...)`, `v := f(...)`,
-- `outcome := ...; RETURN NEXT`) is evaluated as an expression; a PERFORM, a SELECT ... INTO
-- from a function, or a RETURN QUERY is a statement, with its plan checked and its executor
-- started and ended each time (pg_stat_statements does not count that start-up in a
-- statement's time: it showed as a third of tasker.claim_and_enqueue's time that none of
-- its statements accounted for). A hop ran some thirty statements; this takes nine of them:
-- the settings (five per hop), the answers of claim_and_enqueue and complete_step_and_claim,
-- and the calls of complete_attempt and finish_step. Nothing else changes. (Reading the step
-- and locking its task in one statement was tried: the join, planned once on small tables,
-- walked every task by index when they grew; tests/readiness.rs caught it.)
--
-- One backend running chains of 10 as the service does (each hop its own transaction),
-- interleaved with a copy of the database at migration 35, twelve runs of 200 chains each:
-- median 1,281 ms against 1,296 (0.99x), fastest 1,253 against 1,274.

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
-- (from migrations/20261205000036_hop_expressions_not_statements.sql)
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

-- Complete an attempt the caller holds (p_lease_token). p_results_bytes: the results' size as
-- a protobuf Value; p_max_parent_results_bytes (NULL: no budget): refused with
-- 'parent_results_too_large', changing nothing, when these results would give a child more
-- parent results than that to be leased with, as sent. `outcome` is 'completed' or why not;
-- with it, what the caller needs for a claim in the same transaction, read on the way: the
-- step's task and namespace, the worker whose lease ended, and whether steps of the active
-- task became ready. Those are announced on tasker_task_ready when p_announce; a caller that
-- claims the task itself (eager dispatch) passes false, and sends nothing.
-- (from migrations/20261205000036_hop_expressions_not_statements.sql)
CREATE OR REPLACE FUNCTION tasker.complete_attempt(
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

-- A lane's in-flight count, split over slot shards (issue 22).
--
-- The count was one column of the lane's settings row, incremented by every lease and
-- decremented by every lease's end, each holding the row's lock until its commit: every
-- lease and completion of a capped lane waited for the one before it to commit, even with
-- the limit far from reached (0.86x the hop at 64 chains, about 1,000 leases/s per lane).
-- Now the limit is split into 16 shards whose caps add up to it; a lease takes slots from a
-- shard no other transaction holds (SKIP LOCKED), a lease's end gives its slot back to one,
-- so concurrent hops of one lane take different rows. The sum of the caps is the limit, and no
-- shard goes over its cap, so the limit is never exceeded. A small limit stays on few shards
-- (one shard per 16 slots): a lane limited to 3 is counted exactly as before, on one row.
CREATE TABLE tasker.lane_slots (
    namespace  text NOT NULL,
    queue      text NOT NULL,
    shard      smallint NOT NULL,
    -- this shard's part of the lane's max_in_flight (0: a shard the limit does not use)
    cap        integer NOT NULL,
    -- leases holding a slot of this shard (step_queue.holds_slot); above cap only when a
    -- limit was lowered below the leases already running
    in_flight  integer NOT NULL DEFAULT 0,
    PRIMARY KEY (namespace, queue, shard),
    FOREIGN KEY (namespace, queue) REFERENCES tasker.queue_settings (namespace, queue)
        ON DELETE CASCADE,
    CONSTRAINT lane_slots_valid CHECK (shard BETWEEN 0 AND 15 AND cap >= 0 AND in_flight >= 0)
) WITH (fillfactor = 50);

-- Write a lane's shards for its limit: caps adding up to p_max (one shard per 16 slots, at
-- most 16 shards), p_running leases filled in shard order (the excess over the limit on shard
-- 0). The caller holds the lane's shard rows locked (or there are none yet).
CREATE FUNCTION tasker.spread_lane_slots(p_namespace text, p_queue text, p_max integer,
                                         p_running integer)
RETURNS void
LANGUAGE sql AS $$
    WITH k AS (SELECT least(16, greatest(1, p_max / 16)) AS n),
    shards AS (
        SELECT i AS shard,
               CASE WHEN i < k.n THEN p_max / k.n + (i < p_max % k.n)::int ELSE 0 END AS cap,
               CASE WHEN i < k.n THEN i * (p_max / k.n) + least(i, p_max % k.n) ELSE p_max END AS before
        FROM k, generate_series(0, 15) AS i
    )
    INSERT INTO tasker.lane_slots AS s (namespace, queue, shard, cap, in_flight)
    SELECT p_namespace, p_queue, shards.shard, shards.cap,
           least(greatest(p_running - shards.before, 0), shards.cap)
               + CASE WHEN shards.shard = 0 THEN greatest(p_running - p_max, 0) ELSE 0 END
    FROM shards
    ON CONFLICT (namespace, queue, shard) DO UPDATE
    SET cap = excluded.cap, in_flight = excluded.in_flight
$$;

-- The limits set before this migration, with the leases they counted.
SELECT tasker.spread_lane_slots(g.namespace, g.queue, g.max_in_flight,
                                (SELECT count(*)::int FROM tasker.step_queue q
                                 WHERE q.namespace = g.namespace AND q.queue = g.queue
                                   AND q.holds_slot))
FROM tasker.queue_settings g WHERE g.max_in_flight IS NOT NULL;

ALTER TABLE tasker.queue_settings DROP CONSTRAINT queue_settings_valid;
ALTER TABLE tasker.queue_settings DROP COLUMN in_flight;
ALTER TABLE tasker.queue_settings ADD CONSTRAINT queue_settings_valid CHECK (
    (max_in_flight IS NULL OR max_in_flight BETWEEN 1 AND 1000000)
    AND (queue <> '' OR max_in_flight IS NULL));

-- A lane's gate: whether it or its namespace is paused, and its in-flight limit (NULL: none).
-- A SQL function without SET clauses, so that the planner inlines it into its callers' kept
-- plans: the hop reads a lane's settings without a function call.
CREATE FUNCTION tasker.lane_gate(p_namespace text, p_queue text)
RETURNS TABLE (paused boolean, max_in_flight integer)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(bool_or(g.paused), false), max(g.max_in_flight) FILTER (WHERE g.queue = p_queue)
    FROM tasker.queue_settings g
    WHERE g.namespace = p_namespace AND g.queue IN ('', p_queue)
$$;

-- How many of p_want leases of a lane may be granted now, taking them: none while the
-- namespace or the queue is paused; under an in-flight limit, what its shards have left,
-- taken from shards no other transaction holds, and only when every shard with room is held
-- by another transaction, waiting for one of them (holds_slot says the grants hold slots, to
-- be given back by tasker.free_slots when unused). A grant may be smaller than the room left
-- while other transactions hold the rest; it is never more.
CREATE OR REPLACE FUNCTION tasker.lease_allowance(p_namespace text, p_queue text, p_want integer,
                                                  OUT granted integer, OUT holds_slot boolean)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_paused boolean;
    v_max integer;
    v_shard record;
    v_take integer;
    -- where this backend starts looking, so that concurrent leases start on different shards
    v_start integer := pg_backend_pid() % 16;
BEGIN
    granted := 0;
    holds_slot := false;
    IF p_want <= 0 THEN RETURN; END IF;
    PERFORM pg_advisory_xact_lock_shared(tasker.lane_lock_key(p_namespace, p_queue));
    SELECT g.paused, g.max_in_flight INTO v_paused, v_max
    FROM tasker.lane_gate(p_namespace, p_queue) g;
    IF v_paused THEN RETURN; END IF;
    IF v_max IS NULL THEN
        granted := p_want;
        RETURN;
    END IF;
    holds_slot := true;
    -- this backend's own shard first: one probe of the key (no sort), the common case
    SELECT s.shard, s.cap - s.in_flight AS room INTO v_shard
    FROM tasker.lane_slots s
    WHERE s.namespace = p_namespace AND s.queue = p_queue AND s.shard = v_start
      AND s.in_flight < s.cap
    FOR NO KEY UPDATE SKIP LOCKED;
    LOOP
        IF NOT FOUND THEN
            SELECT s.shard, s.cap - s.in_flight AS room INTO v_shard
            FROM tasker.lane_slots s
            WHERE s.namespace = p_namespace AND s.queue = p_queue AND s.in_flight < s.cap
            ORDER BY (s.shard + v_start) % 16
            LIMIT 1
            FOR NO KEY UPDATE SKIP LOCKED;
        END IF;
        IF NOT FOUND THEN
            EXIT WHEN granted > 0;
            -- every shard with room is held by a transaction still running: wait for one
            SELECT s.shard, s.cap - s.in_flight AS room INTO v_shard
            FROM tasker.lane_slots s
            WHERE s.namespace = p_namespace AND s.queue = p_queue AND s.in_flight < s.cap
            ORDER BY (s.shard + v_start) % 16
            LIMIT 1
            FOR NO KEY UPDATE;
            EXIT WHEN NOT FOUND;
        END IF;
        v_take := least(p_want - granted, v_shard.room);
        UPDATE tasker.lane_slots s SET in_flight = s.in_flight + v_take
        WHERE s.namespace = p_namespace AND s.queue = p_queue AND s.shard = v_shard.shard;
        granted := granted + v_take;
        EXIT WHEN granted >= p_want;
        v_shard := NULL;
        PERFORM 1 WHERE false;  -- FOUND := false: the next shard by the scan
    END LOOP;
END
$$;

-- How many of p_want queued steps of a lane a fetch could lease now, without taking anything:
-- none while paused, what its shards have left under a limit, else all. In PL/pgSQL, whose
-- plans are kept: a SQL function with SET clauses is planned again at every call (measured
-- 120 us a call, every hop that leaves a step for a fetch paid it).
CREATE OR REPLACE FUNCTION tasker.lane_room(p_namespace text, p_queue text, p_want integer) RETURNS integer
LANGUAGE plpgsql STABLE
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_paused boolean;
    v_max integer;
    v_room integer;
BEGIN
    SELECT g.paused, g.max_in_flight INTO v_paused, v_max
    FROM tasker.lane_gate(p_namespace, p_queue) g;
    IF v_paused THEN RETURN 0; END IF;
    IF v_max IS NULL THEN RETURN p_want; END IF;
    -- enough room on this backend's own shard: one probe of the key answers
    SELECT s.cap - s.in_flight INTO v_room FROM tasker.lane_slots s
    WHERE s.namespace = p_namespace AND s.queue = p_queue AND s.shard = pg_backend_pid() % 16;
    IF v_room >= p_want THEN RETURN p_want; END IF;
    SELECT coalesce(sum(greatest(s.cap - s.in_flight, 0)), 0)::int INTO v_room
    FROM tasker.lane_slots s
    WHERE s.namespace = p_namespace AND s.queue = p_queue;
    RETURN least(p_want, v_room);
END
$$;

-- Give back p_n slots of a lane (leases ended, or grants unused), to shards no other
-- transaction holds where it can. A slot freed on a shard that was full may start work that
-- waited for it: every replica hears of the lane (tasker_steps_enqueued without a replica)
-- and wakes a fetch parked on it, so a freed slot starts the next step at once, not at a
-- poll. A slot freed below a shard's cap wakes nobody: nothing waited for it.
CREATE OR REPLACE FUNCTION tasker.free_slots(p_namespace text, p_queue text, p_n integer) RETURNS void
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_shard record;
    v_take integer;
    v_left integer := p_n;
    v_opened integer := 0;
    v_start integer := pg_backend_pid() % 16;
BEGIN
    -- this backend's own shard first: one probe of the key (no sort)
    SELECT s.shard, s.cap, s.in_flight INTO v_shard
    FROM tasker.lane_slots s
    WHERE s.namespace = p_namespace AND s.queue = p_queue AND s.shard = v_start
      AND s.in_flight > 0
    FOR NO KEY UPDATE SKIP LOCKED;
    WHILE v_left > 0 LOOP
        IF NOT FOUND THEN
            SELECT s.shard, s.cap, s.in_flight INTO v_shard
            FROM tasker.lane_slots s
            WHERE s.namespace = p_namespace AND s.queue = p_queue AND s.in_flight > 0
            ORDER BY (s.shard + v_start) % 16
            LIMIT 1
            FOR NO KEY UPDATE SKIP LOCKED;
        END IF;
        IF NOT FOUND THEN
            SELECT s.shard, s.cap, s.in_flight INTO v_shard
            FROM tasker.lane_slots s
            WHERE s.namespace = p_namespace AND s.queue = p_queue AND s.in_flight > 0
            ORDER BY (s.shard + v_start) % 16
            LIMIT 1
            FOR NO KEY UPDATE;
            EXIT WHEN NOT FOUND;
        END IF;
        v_take := least(v_left, v_shard.in_flight);
        UPDATE tasker.lane_slots s SET in_flight = s.in_flight - v_take
        WHERE s.namespace = p_namespace AND s.queue = p_queue AND s.shard = v_shard.shard;
        IF v_shard.in_flight >= v_shard.cap THEN
            v_opened := v_opened + greatest(v_shard.cap - (v_shard.in_flight - v_take), 0);
        END IF;
        v_left := v_left - v_take;
        PERFORM 1 WHERE false;  -- FOUND := false: the next shard by the scan
    END LOOP;
    IF v_opened > 0 THEN
        PERFORM tasker.wake_lane(p_namespace, p_queue, v_opened);
    END IF;
END
$$;

-- Set a lane's in-flight limit (NULL: none). A limit that starts counts the leases already
-- running: the lane's exclusive lock waits for the leases being granted, the running leases
-- are marked as holding slots before the shards are locked (so a lease ending meanwhile
-- waits for this change and then gives its slot back to the new count), and the count is
-- read with the shards locked. Raising a limit wakes the work that waited. Returns the lane's
-- leases holding slots.
CREATE OR REPLACE FUNCTION tasker.set_queue_limit(p_namespace text, p_queue text, p_max_in_flight integer)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_running integer;
BEGIN
    PERFORM pg_advisory_xact_lock(tasker.lane_lock_key(p_namespace, p_queue));
    INSERT INTO tasker.queue_settings AS g (namespace, queue, max_in_flight)
    VALUES (p_namespace, p_queue, p_max_in_flight)
    ON CONFLICT (namespace, queue) DO UPDATE SET max_in_flight = p_max_in_flight, updated_at = clock_timestamp();
    IF p_max_in_flight IS NULL THEN
        UPDATE tasker.step_queue q SET holds_slot = false
        WHERE q.namespace = p_namespace AND q.queue = p_queue AND q.holds_slot;
        DELETE FROM tasker.lane_slots s WHERE s.namespace = p_namespace AND s.queue = p_queue;
        PERFORM tasker.wake_lane(p_namespace, p_queue, 1000);
        RETURN 0;
    END IF;
    UPDATE tasker.step_queue q SET holds_slot = true
    WHERE q.namespace = p_namespace AND q.queue = p_queue AND q.leased_by IS NOT NULL
      AND NOT q.holds_slot;
    PERFORM 1 FROM tasker.lane_slots s
    WHERE s.namespace = p_namespace AND s.queue = p_queue
    ORDER BY s.shard
    FOR UPDATE;
    SELECT count(*)::int INTO v_running FROM tasker.step_queue q
    WHERE q.namespace = p_namespace AND q.queue = p_queue AND q.leased_by IS NOT NULL
      AND q.holds_slot;
    PERFORM tasker.spread_lane_slots(p_namespace, p_queue, p_max_in_flight, v_running);
    IF p_max_in_flight > v_running THEN
        PERFORM tasker.wake_lane(p_namespace, p_queue, p_max_in_flight - v_running);
    END IF;
    RETURN v_running;
END
$$;

-- The hop reads a lane's gate inline and calls lease_allowance and lane_room only for a lane
-- under a limit: a lane without settings costs what a namespace cost before queues (each of
-- those calls was 20-55 us a step, and fetch_steps probed the fetch index twice).
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
        SELECT g.paused, g.max_in_flight INTO v_gate FROM tasker.lane_gate(p_namespace, v_queue) g;
        CONTINUE WHEN v_gate.paused;
        IF v_gate.max_in_flight IS NULL THEN
            -- shared, as in lease_allowance: a limit starting now waits for this fetch
            PERFORM pg_advisory_xact_lock_shared(tasker.lane_lock_key(p_namespace, v_queue));
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

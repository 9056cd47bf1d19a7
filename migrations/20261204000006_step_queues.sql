-- Step queues, in-flight limits per queue, pausing a queue or a namespace (issue 22).
--
-- A step belongs to a queue of its task's namespace ('default' unless its definition names
-- one); a worker fetches from the queues it names. A lane is a (namespace, queue): the queue's
-- rows, the fetch index, the parked fetches and the wake-ups are all per lane, so a step of a
-- queue nobody fetches delays no other.
--
-- Both column additions have a constant default: no table rewrite. The step's queue is not
-- in any index of workflow_steps, so the hop's updates stay HOT.
ALTER TABLE tasker.workflow_steps ADD COLUMN queue text NOT NULL DEFAULT 'default';
ALTER TABLE tasker.step_queue ADD COLUMN queue text NOT NULL DEFAULT 'default';
-- whether this lease holds one of its lane's in-flight slots (the lane had a limit when it
-- was leased, or got one while it ran); the slot is given back when the lease ends
ALTER TABLE tasker.step_queue ADD COLUMN holds_slot boolean NOT NULL DEFAULT false;
CREATE INDEX step_queue_lane_idx ON tasker.step_queue (namespace, queue, priority DESC, msg_id)
    WHERE leased_by IS NULL;
DROP INDEX tasker.step_queue_fetch_idx;

-- Settings of a lane, fleet-wide. queue '' is the namespace as a whole (only `paused`).
-- No row: no limit, not paused (the hop's check is one index probe that finds nothing).
CREATE TABLE tasker.queue_settings (
    namespace      text NOT NULL,
    queue          text NOT NULL,
    -- the most leases of the lane at once; NULL: no limit
    max_in_flight  integer,
    paused         boolean NOT NULL DEFAULT false,
    -- leases holding a slot (step_queue.holds_slot) while max_in_flight is set
    in_flight      integer NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (namespace, queue),
    CONSTRAINT queue_settings_valid CHECK (
        (max_in_flight IS NULL OR max_in_flight BETWEEN 1 AND 1000000)
        AND in_flight >= 0
        AND (queue <> '' OR max_in_flight IS NULL))
);

-- The advisory lock key of a lane: leases take it shared, a change of the lane's limit takes
-- it exclusively, so the leases running when a limit starts are all counted against it.
CREATE FUNCTION tasker.lane_lock_key(p_namespace text, p_queue text) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT hashtextextended('tasker.lane:' || p_namespace || '/' || p_queue, 0)
$$;

-- How many of p_want leases of a lane may be granted now, taking them: none while the
-- namespace or the queue is paused; under an in-flight limit, what is left of it (taken under
-- the settings row's lock, so concurrent fetches and enqueues on any replica never exceed it;
-- holds_slot says the grants hold slots, to be given back by tasker.free_slots when unused).
CREATE FUNCTION tasker.lease_allowance(p_namespace text, p_queue text, p_want integer,
                                       OUT granted integer, OUT holds_slot boolean)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_lane record;
BEGIN
    granted := greatest(p_want, 0);
    holds_slot := false;
    PERFORM pg_advisory_xact_lock_shared(tasker.lane_lock_key(p_namespace, p_queue));
    IF EXISTS (SELECT 1 FROM tasker.queue_settings g
               WHERE g.namespace = p_namespace AND g.queue = '' AND g.paused) THEN
        granted := 0;
        RETURN;
    END IF;
    SELECT g.paused, g.max_in_flight, g.in_flight INTO v_lane FROM tasker.queue_settings g
    WHERE g.namespace = p_namespace AND g.queue = p_queue FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF v_lane.paused THEN
        granted := 0;
        RETURN;
    END IF;
    IF v_lane.max_in_flight IS NOT NULL THEN
        granted := least(granted, greatest(v_lane.max_in_flight - v_lane.in_flight, 0));
        holds_slot := true;
        IF granted > 0 THEN
            UPDATE tasker.queue_settings g SET in_flight = g.in_flight + granted
            WHERE g.namespace = p_namespace AND g.queue = p_queue;
        END IF;
    END IF;
END
$$;

-- Give back p_n slots of a lane (leases ended, or grants unused). When work waits on the lane
-- and a slot is free, every replica hears of it (tasker_steps_enqueued without a replica) and
-- wakes a fetch parked on the lane: a freed slot starts the next step at once, not at a poll.
CREATE FUNCTION tasker.free_slots(p_namespace text, p_queue text, p_n integer) RETURNS void
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_free integer;
BEGIN
    IF p_n <= 0 THEN RETURN; END IF;
    UPDATE tasker.queue_settings g SET in_flight = greatest(g.in_flight - p_n, 0)
    WHERE g.namespace = p_namespace AND g.queue = p_queue
    RETURNING g.max_in_flight - g.in_flight INTO v_free;
    IF v_free > 0 THEN
        PERFORM tasker.wake_lane(p_namespace, p_queue, least(v_free, p_n));
    END IF;
END
$$;

-- Tell every replica that up to p_steps queued steps of a lane (p_queue NULL: of every queue of
-- the namespace) may be leased now, if any wait: their parked fetches of the lane read it.
CREATE FUNCTION tasker.wake_lane(p_namespace text, p_queue text, p_steps integer) RETURNS void
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM tasker.step_queue q
               WHERE q.namespace = p_namespace AND (p_queue IS NULL OR q.queue = p_queue)
                 AND q.leased_by IS NULL) THEN
        PERFORM pg_notify('tasker_steps_enqueued', json_build_object(
            'namespace', p_namespace, 'queue', p_queue, 'steps', p_steps)::text);
    END IF;
END
$$;

-- A lease that held a slot ended (its queue row deleted: completed, failed, expired, cancelled,
-- resolved) or was given back (released to the queue): its slot is free.
CREATE FUNCTION tasker.step_queue_slot_freed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tasker.free_slots(OLD.namespace, OLD.queue, 1);
    IF TG_OP = 'UPDATE' THEN
        NEW.holds_slot := false;
        RETURN NEW;
    END IF;
    RETURN OLD;
END
$$;
CREATE TRIGGER step_queue_slot_on_delete AFTER DELETE ON tasker.step_queue
    FOR EACH ROW WHEN (OLD.holds_slot) EXECUTE FUNCTION tasker.step_queue_slot_freed();
CREATE TRIGGER step_queue_slot_on_release BEFORE UPDATE ON tasker.step_queue
    FOR EACH ROW WHEN (OLD.holds_slot AND NEW.leased_by IS NULL)
    EXECUTE FUNCTION tasker.step_queue_slot_freed();

-- Set a lane's in-flight limit (NULL: none). A limit that starts counts the leases already
-- running (under the lane's exclusive lock, which waits for leases being granted); raising it
-- wakes the work that waited. Returns the lane's leases holding slots.
CREATE FUNCTION tasker.set_queue_limit(p_namespace text, p_queue text, p_max_in_flight integer)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_running integer;
    v_free integer;
BEGIN
    PERFORM pg_advisory_xact_lock(tasker.lane_lock_key(p_namespace, p_queue));
    INSERT INTO tasker.queue_settings AS g (namespace, queue, max_in_flight)
    VALUES (p_namespace, p_queue, p_max_in_flight)
    ON CONFLICT (namespace, queue) DO UPDATE SET max_in_flight = p_max_in_flight, updated_at = clock_timestamp();
    IF p_max_in_flight IS NULL THEN
        UPDATE tasker.step_queue q SET holds_slot = false
        WHERE q.namespace = p_namespace AND q.queue = p_queue AND q.holds_slot;
        UPDATE tasker.queue_settings g SET in_flight = 0
        WHERE g.namespace = p_namespace AND g.queue = p_queue;
        PERFORM tasker.wake_lane(p_namespace, p_queue, 1000);
        RETURN 0;
    END IF;
    UPDATE tasker.step_queue q SET holds_slot = true
    WHERE q.namespace = p_namespace AND q.queue = p_queue AND q.leased_by IS NOT NULL;
    GET DIAGNOSTICS v_running = ROW_COUNT;
    UPDATE tasker.queue_settings g SET in_flight = v_running
    WHERE g.namespace = p_namespace AND g.queue = p_queue
    RETURNING g.max_in_flight - g.in_flight INTO v_free;
    IF v_free > 0 THEN
        PERFORM tasker.wake_lane(p_namespace, p_queue, v_free);
    END IF;
    RETURN v_running;
END
$$;

-- Pause or resume a lane (p_queue '': the whole namespace). Resuming wakes the parked fetches
-- of the lane on every replica at once.
CREATE FUNCTION tasker.set_queue_paused(p_namespace text, p_queue text, p_paused boolean)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO tasker.queue_settings AS g (namespace, queue, paused)
    VALUES (p_namespace, p_queue, p_paused)
    ON CONFLICT (namespace, queue) DO UPDATE SET paused = p_paused, updated_at = clock_timestamp();
    IF NOT p_paused THEN
        PERFORM tasker.wake_lane(p_namespace, nullif(p_queue, ''), 1000);
    END IF;
END
$$;

-- Lease one queued message to a worker (as tasker.lease_message did), holding one of its
-- lane's slots when p_holds_slot; the step as the worker receives it, with its queue.
-- Nothing (and no slot held) when the message's step is not enqueued at this attempt any more.
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
    RETURNING s.task_uuid, s.name, s.inputs INTO v_s;
    IF NOT FOUND THEN
        IF p_holds_slot THEN
            -- the caller gives the unused grant back
            UPDATE tasker.step_queue q SET holds_slot = false WHERE q.msg_id = p_msg_id;
        END IF;
        RETURN;
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
    lease_expires_at := v_q.visible_at;
    enqueued_at := v_q.enqueued_at;
    traceparent := v_q.traceparent;
    lease_token := v_q.lease_token;
    queue := v_q.queue;
    RETURN NEXT;
END
$$;

-- Lease up to p_max steps of the namespace's queues p_queues to a worker: the queues in the
-- order named, each best priority first, as far as each lane's pause and limit allow. A lane
-- with nothing queued costs one probe of the fetch index. Commits synchronously: a lease a
-- worker has received survives a crash of the database.
CREATE FUNCTION tasker.fetch_steps(p_namespace text, p_queues text[], p_worker_id text,
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
    v_grant record;
    v_msg record;
    v_rows integer;
    v_leased integer;
    v_left integer := p_max;
BEGIN
    FOREACH v_queue IN ARRAY p_queues LOOP
        EXIT WHEN v_left <= 0;
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM tasker.step_queue q
                                  WHERE q.namespace = p_namespace AND q.queue = v_queue
                                    AND q.leased_by IS NULL);
        SELECT a.granted, a.holds_slot INTO v_grant
        FROM tasker.lease_allowance(p_namespace, v_queue, v_left) a;
        CONTINUE WHEN v_grant.granted = 0;
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

-- Claim a task and enqueue every ready step, in one transaction; then lease them to the
-- parked fetches in p_takers ([{"worker_id", "max", "lease_ms", "queues"}], first come first
-- served; no "queues": the default queue), each step to the first fetch that takes its queue,
-- as far as its lane's pause and limit allow. `leased` is a JSON array of the leased steps,
-- each with the index of its taker; `queued` ([{"queue", "steps"}]) counts, per lane, the steps
-- left on the queue that a fetch may lease now (a paused or full lane's are not counted: a
-- freed slot or a resume wakes its fetches).
--
-- Claim: a transaction-scoped advisory lock on the task, tried without waiting. A task claimed
-- by another instance's enqueuer answers 'claimed_elsewhere' at once; the caller retries
-- shortly, because the holder's snapshot may predate a completion that made more steps ready.
-- Exactly once: the CAS pending -> enqueued plus the unique (step_uuid, attempt) queue key.
-- Cost: the ready steps of this task, taken out of the ready set by its task index; nothing
-- else of the task; per lane handed to, one probe of its settings.
-- Durability: asynchronous commit while it only enqueues: enqueue state is derivable (if a
-- crash loses the commit, the steps are still pending and ready, and the start-up sweep or the
-- fallback poller enqueues them again). A pass that leases steps to parked fetches commits
-- synchronously: those leases reach workers, and must survive a crash.
CREATE FUNCTION tasker.claim_and_enqueue(
    p_task_uuid uuid, p_metadata jsonb DEFAULT '{}'::jsonb, p_takers jsonb DEFAULT '[]'::jsonb,
    p_announce_as uuid DEFAULT NULL
)
RETURNS TABLE (outcome text, namespace text, priority integer, enqueued_steps uuid[],
               max_ready_wait_ms double precision, leased jsonb, queued jsonb)
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
    v_open integer;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM set_config('tasker.transition_metadata', p_metadata::text, true);
    IF NOT pg_try_advisory_xact_lock(hashtextextended('tasker.claim:' || p_task_uuid::text, 0)) THEN
        IF EXISTS (SELECT 1 FROM tasker.tasks t WHERE t.task_uuid = p_task_uuid) THEN
            RETURN QUERY SELECT 'claimed_elsewhere'::text, NULL::text, NULL::integer, '{}'::uuid[], NULL::float8, '[]'::jsonb, '[]'::jsonb;
        ELSE
            RETURN QUERY SELECT 'task_not_found'::text, NULL::text, NULL::integer, '{}'::uuid[], NULL::float8, '[]'::jsonb, '[]'::jsonb;
        END IF;
        RETURN;
    END IF;
    SELECT t.namespace, t.priority, t.state INTO v_task FROM tasker.tasks t WHERE t.task_uuid = p_task_uuid;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'task_not_found'::text, NULL::text, NULL::integer, '{}'::uuid[], NULL::float8, '[]'::jsonb, '[]'::jsonb;
        RETURN;
    END IF;
    IF v_task.state = 'pending' THEN
        -- this pass will move the task to in_progress: lock it first, like every change to a
        -- task (task, then steps)
        SELECT t.namespace, t.priority, t.state INTO v_task FROM tasker.tasks t
        WHERE t.task_uuid = p_task_uuid FOR NO KEY UPDATE;
    END IF;
    IF v_task.state NOT IN ('pending', 'in_progress') THEN
        RETURN QUERY SELECT 'task_not_active'::text, v_task.namespace, v_task.priority, '{}'::uuid[], NULL::float8, '[]'::jsonb, '[]'::jsonb;
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
        RETURN QUERY SELECT 'nothing_ready'::text, v_task.namespace, v_task.priority, v_steps, NULL::float8, '[]'::jsonb, '[]'::jsonb;
        RETURN;
    END IF;
    IF v_task.state = 'pending' THEN
        UPDATE tasker.tasks t SET state = 'in_progress' WHERE t.task_uuid = p_task_uuid AND t.state = 'pending';
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
    RETURN QUERY SELECT 'enqueued'::text, v_task.namespace, v_task.priority, v_steps, v_wait, v_leased, v_queued;
END
$$;

-- How many of p_want queued steps of a lane a fetch could lease now, without taking anything:
-- none while paused, what is left under a limit, else all.
CREATE FUNCTION tasker.lane_room(p_namespace text, p_queue text, p_want integer) RETURNS integer
LANGUAGE sql STABLE
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
    SELECT CASE
        WHEN bool_or(g.paused) THEN 0
        ELSE least(p_want, coalesce(min(g.max_in_flight - g.in_flight), p_want))
    END
    FROM tasker.queue_settings g
    WHERE g.namespace = p_namespace AND g.queue IN ('', p_queue)
$$;

-- The previous release's claim-and-enqueue, for a replica of it during a rolling upgrade: its
-- parked fetches take the default queue.
CREATE OR REPLACE FUNCTION tasker.enqueue_ready_steps(
    p_task_uuid uuid, p_metadata jsonb DEFAULT '{}'::jsonb, p_takers jsonb DEFAULT '[]'::jsonb,
    p_announce_as uuid DEFAULT NULL
)
RETURNS TABLE (outcome text, namespace text, priority integer, enqueued_steps uuid[],
               max_ready_wait_ms double precision, leased jsonb)
LANGUAGE sql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
    SELECT c.outcome, c.namespace, c.priority, c.enqueued_steps, c.max_ready_wait_ms,
           (SELECT coalesce(jsonb_agg(l - 'queue'), '[]'::jsonb) FROM jsonb_array_elements(c.leased) l)
    FROM tasker.claim_and_enqueue(p_task_uuid, p_metadata, p_takers, p_announce_as) c
$$;

-- The previous release's fetch: the default queue.
CREATE OR REPLACE FUNCTION tasker.fetch_steps(p_namespace text, p_worker_id text, p_max integer, p_lease_ms bigint)
RETURNS TABLE (
    step_uuid uuid, task_uuid uuid, name text, attempt integer, inputs jsonb,
    parent_results jsonb, lease_expires_at timestamptz, enqueued_at timestamptz, traceparent text,
    lease_token uuid
)
LANGUAGE sql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
    SELECT f.step_uuid, f.task_uuid, f.name, f.attempt, f.inputs, f.parent_results,
           f.lease_expires_at, f.enqueued_at, f.traceparent, f.lease_token
    FROM tasker.fetch_steps(p_namespace, ARRAY['default'], p_worker_id, p_max, p_lease_ms) f
$$;

DROP FUNCTION tasker.lease_message(bigint, text, bigint);

-- Create a task with its DAG: as before, and each step in its queue ("queue" in p_steps,
-- default 'default'; the service checks the name).
CREATE OR REPLACE FUNCTION tasker.create_task(
    p_task_uuid uuid, p_namespace text, p_name text, p_priority integer, p_context jsonb,
    p_idempotency_key text, p_steps jsonb, p_metadata jsonb DEFAULT '{}'::jsonb,
    p_max_namespaces integer DEFAULT NULL, p_context_bytes integer DEFAULT NULL,
    p_create_namespace boolean DEFAULT true
)
RETURNS TABLE (task_uuid uuid, created boolean, step_name text, step_uuid uuid)
LANGUAGE plpgsql AS $$
DECLARE
    v_existing uuid;
    v_namespaces bigint;
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
                                   remaining_steps, context_bytes)
    VALUES (p_task_uuid, p_namespace, p_name, p_priority, coalesce(p_context, '{}'::jsonb),
            p_idempotency_key, jsonb_array_length(p_steps), p_context_bytes)
    ON CONFLICT ON CONSTRAINT tasks_idempotency_key_unique DO NOTHING;
    IF NOT FOUND THEN
        SELECT t.task_uuid INTO v_existing FROM tasker.tasks t
        WHERE t.namespace = p_namespace AND t.idempotency_key = p_idempotency_key;
        RETURN QUERY SELECT v_existing, false, s.name, s.step_uuid
            FROM tasker.workflow_steps s WHERE s.task_uuid = v_existing ORDER BY s.position;
        RETURN;
    END IF;

    INSERT INTO tasker.workflow_steps (step_uuid, task_uuid, name, position, unfinished_parents,
                                       ready_at, max_attempts, retryable, inputs, data_bytes, queue)
    SELECT (e->>'step_uuid')::uuid, p_task_uuid, e->>'name', (e->>'position')::int, p.n,
           CASE WHEN p.n = 0 THEN clock_timestamp() END,
           coalesce((e->>'max_attempts')::int, 3), coalesce((e->>'retryable')::boolean, true),
           coalesce(e->'inputs', '{}'::jsonb), (e->>'inputs_bytes')::int,
           coalesce(e->>'queue', 'default')
    FROM jsonb_array_elements(p_steps) AS x(e)
    CROSS JOIN LATERAL (SELECT count(DISTINCT d)::int AS n
                        FROM jsonb_array_elements_text(coalesce(e->'parents', '[]'::jsonb)) d) p
    ORDER BY (e->>'position')::int;

    INSERT INTO tasker.step_edges (task_uuid, parent_step_uuid, child_step_uuid)
    SELECT DISTINCT p_task_uuid, d::uuid, (e->>'step_uuid')::uuid
    FROM jsonb_array_elements(p_steps) AS x(e),
         jsonb_array_elements_text(coalesce(e->'parents', '[]'::jsonb)) d;

    INSERT INTO tasker.ready_steps (step_uuid, task_uuid, ready_at)
    SELECT s.step_uuid, p_task_uuid, s.ready_at FROM tasker.workflow_steps s
    WHERE s.task_uuid = p_task_uuid AND s.unfinished_parents = 0;

    -- a DAG has at least one root: it is ready now
    PERFORM tasker.send_task_ready(p_task_uuid, p_namespace, 'task_start');
    RETURN QUERY SELECT p_task_uuid, true, s.name, s.step_uuid
        FROM tasker.workflow_steps s WHERE s.task_uuid = p_task_uuid ORDER BY s.position;
END
$$;

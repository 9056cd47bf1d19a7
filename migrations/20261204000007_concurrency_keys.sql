-- Concurrency keys (issue 22): at most namespaces.max_tasks_per_key tasks with the same
-- tasks.concurrency_key in progress at once. A keyed task starts (its first claim-and-enqueue)
-- only in a free slot of its key, oldest first; until then it waits, pending, its ready steps
-- taken out of the ready set (so the fallback poller neither reads nor ranks a backlog of
-- waiting tasks ahead of the tasks it must rescue). A task holds its slot until it is complete
-- or cancelled (a task in error keeps it: an operator retries or cancels it); the finish gives
-- the slot to the oldest task waiting on the key: its ready steps go back into the ready set
-- and it gets a readiness notification, in the finishing transaction (if the notification is
-- lost, the poller finds the ready steps). Slots are per key, so one key's backlog never takes
-- another key's slot.
ALTER TABLE tasker.tasks ADD COLUMN concurrency_key text;
ALTER TABLE tasker.tasks ADD COLUMN holds_key_slot boolean NOT NULL DEFAULT false;
ALTER TABLE tasker.tasks ADD CONSTRAINT tasks_concurrency_key_valid
    CHECK (concurrency_key IS NULL OR length(concurrency_key) BETWEEN 1 AND 255);
ALTER TABLE tasker.namespaces ADD COLUMN max_tasks_per_key integer
    CONSTRAINT namespaces_max_tasks_per_key_valid CHECK (max_tasks_per_key BETWEEN 1 AND 1000000);
-- The tasks waiting on a key, oldest first. A table of its own: an index of tasks on their
-- state would make every task's state change a non-HOT update.
CREATE TABLE tasker.key_waiters (
    namespace        text NOT NULL,
    concurrency_key  text NOT NULL,
    created_at       timestamptz NOT NULL,
    task_uuid        uuid NOT NULL,
    PRIMARY KEY (namespace, concurrency_key, created_at, task_uuid)
);

-- Tasks of a key holding a slot; a row per key that ever had a limit.
CREATE TABLE tasker.key_slots (
    namespace        text NOT NULL,
    concurrency_key  text NOT NULL,
    running          integer NOT NULL DEFAULT 0 CHECK (running >= 0),
    PRIMARY KEY (namespace, concurrency_key)
);

-- Start up to p_n of the tasks waiting on a key, oldest first: each one's ready steps go back
-- into the ready set and it gets a readiness notification; its claim takes the slot (or finds
-- it taken and waits again).
CREATE FUNCTION tasker.start_waiting_on_key(p_namespace text, p_key text, p_n integer) RETURNS integer
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_task uuid;
    v_started integer := 0;
BEGIN
    WHILE v_started < p_n LOOP
        -- the oldest waiter; one cancelled while it waited is dropped and the next taken
        DELETE FROM tasker.key_waiters w
        WHERE (w.namespace, w.concurrency_key, w.created_at, w.task_uuid) =
              (SELECT o.namespace, o.concurrency_key, o.created_at, o.task_uuid
               FROM tasker.key_waiters o
               WHERE o.namespace = p_namespace AND o.concurrency_key = p_key
               ORDER BY o.created_at, o.task_uuid LIMIT 1)
        RETURNING w.task_uuid INTO v_task;
        EXIT WHEN NOT FOUND;
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM tasker.tasks t
                                  WHERE t.task_uuid = v_task AND t.state = 'pending');
        INSERT INTO tasker.ready_steps (step_uuid, task_uuid, ready_at)
        SELECT s.step_uuid, s.task_uuid, coalesce(s.ready_at, clock_timestamp())
        FROM tasker.workflow_steps s
        WHERE s.task_uuid = v_task AND s.state = 'pending' AND s.unfinished_parents = 0
        ON CONFLICT DO NOTHING;
        PERFORM tasker.send_task_ready(v_task, p_namespace, 'task_start');
        v_started := v_started + 1;
    END LOOP;
    RETURN v_started;
END
$$;

-- A task that held its key's slot is complete or cancelled: the slot goes to the oldest task
-- waiting on the key.
CREATE FUNCTION tasker.tasks_key_slot_freed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.holds_key_slot := false;
    UPDATE tasker.key_slots k SET running = greatest(k.running - 1, 0)
    WHERE k.namespace = NEW.namespace AND k.concurrency_key = NEW.concurrency_key;
    PERFORM tasker.start_waiting_on_key(NEW.namespace, NEW.concurrency_key, 1);
    RETURN NEW;
END
$$;
CREATE TRIGGER tasks_key_slot_freed BEFORE UPDATE OF state ON tasker.tasks
    FOR EACH ROW WHEN (OLD.holds_key_slot AND NEW.state IN ('complete', 'cancelled'))
    EXECUTE FUNCTION tasker.tasks_key_slot_freed();

-- Set (or with NULL remove) a namespace's limit of tasks per key. Raising it (or removing it)
-- starts the tasks that waited, as far as the new limit allows, at once.
CREATE FUNCTION tasker.set_max_tasks_per_key(p_namespace text, p_max integer) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_key record;
BEGIN
    UPDATE tasker.namespaces n SET max_tasks_per_key = p_max WHERE n.name = p_namespace;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF p_max IS NOT NULL THEN
        -- keyed tasks running when a limit starts count against it
        UPDATE tasker.tasks t SET holds_key_slot = true
        WHERE t.namespace = p_namespace AND t.concurrency_key IS NOT NULL
          AND t.state IN ('in_progress', 'error') AND NOT t.holds_key_slot;
        INSERT INTO tasker.key_slots AS k (namespace, concurrency_key, running)
        SELECT t.namespace, t.concurrency_key, count(*)::int FROM tasker.tasks t
        WHERE t.namespace = p_namespace AND t.concurrency_key IS NOT NULL AND t.holds_key_slot
        GROUP BY t.namespace, t.concurrency_key
        ON CONFLICT (namespace, concurrency_key) DO UPDATE SET running = EXCLUDED.running;
    END IF;
    FOR v_key IN
        SELECT DISTINCT w.concurrency_key FROM tasker.key_waiters w
        WHERE w.namespace = p_namespace
    LOOP
        PERFORM tasker.start_waiting_on_key(p_namespace, v_key.concurrency_key,
            CASE WHEN p_max IS NULL THEN 1000000
                 ELSE p_max - coalesce((SELECT k.running FROM tasker.key_slots k
                                        WHERE k.namespace = p_namespace
                                          AND k.concurrency_key = v_key.concurrency_key), 0)
            END);
    END LOOP;
    RETURN true;
END
$$;

CREATE OR REPLACE FUNCTION tasker.claim_and_enqueue(
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
    v_max_per_key integer;
    v_running integer;
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
    SELECT t.namespace, t.priority, t.state, t.concurrency_key, t.created_at INTO v_task
    FROM tasker.tasks t WHERE t.task_uuid = p_task_uuid;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'task_not_found'::text, NULL::text, NULL::integer, '{}'::uuid[], NULL::float8, '[]'::jsonb, '[]'::jsonb;
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
                RETURN QUERY SELECT 'waiting_on_key'::text, v_task.namespace, v_task.priority, '{}'::uuid[], NULL::float8, '[]'::jsonb, '[]'::jsonb;
                RETURN;
            END IF;
        END IF;
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

-- create_task gains the concurrency key (defaulted: a replica of the previous release calls it
-- with the arguments it knows).
DROP FUNCTION tasker.create_task(uuid, text, text, integer, jsonb, text, jsonb, jsonb, integer, integer, boolean);
CREATE FUNCTION tasker.create_task(
    p_task_uuid uuid, p_namespace text, p_name text, p_priority integer, p_context jsonb,
    p_idempotency_key text, p_steps jsonb, p_metadata jsonb DEFAULT '{}'::jsonb,
    p_max_namespaces integer DEFAULT NULL, p_context_bytes integer DEFAULT NULL,
    p_create_namespace boolean DEFAULT true, p_concurrency_key text DEFAULT NULL
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
                                   remaining_steps, context_bytes, concurrency_key)
    VALUES (p_task_uuid, p_namespace, p_name, p_priority, coalesce(p_context, '{}'::jsonb),
            p_idempotency_key, jsonb_array_length(p_steps), p_context_bytes, p_concurrency_key)
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

-- Tasks: creating one with its DAG, cancelling, retrying an errored one, resolving a step
-- by hand.
--
-- The definitions that run, one per function: what a fresh database has after every migration
-- in migrations/. This file is not applied; the migrations are (append-only: a change is a new
-- migration). tests/sql_layout.rs fails when a function's live definition differs from the one
-- here, so a change to a function is made in a new migration and here, in the same commit.
-- Each definition names the migration it comes from.


-- Create a task with its DAG. p_steps is a JSON array of {"step_uuid", "name", "position",
-- "parents": [uuid], "max_attempts", "retryable", "inputs", "inputs_bytes", "queue"} in which
-- the service resolved dependencies by name, ordered the steps topologically and checked the
-- queue names (absent: 'default'); the database still refuses a parent of another task
-- (23503, step_edges_parent_same_task), duplicate names (unique) and an edge against the order (TK003: a cycle). An
-- idempotency key that names a task of the namespace returns that task (created = false) and
-- writes nothing. A namespace not seen before is created when p_create_namespace (else
-- TK006), unless p_max_namespaces exist (TK005). p_context_bytes and "inputs_bytes": the
-- documents' sizes as sent (a page of tasks or steps is cut to the response budget by them
-- before any document is read). p_concurrency_key: the task's concurrency key (NULL: none).
-- "retry" in p_steps: the step's retry policy as the service resolved it (its own or the
-- task's default), stored as workflow_steps.retry_policy; "timeout_ms": an attempt's execution
-- limit; "schedule_to_start_ms": how long it may wait for a worker once queued. p_start_at in
-- the future: the task waits for it (tasker.task_starts, announced on tasker_deadlines) with
-- its roots out of the ready set; otherwise it is ready now.
-- p_announce: whether the task's readiness is announced (false: the caller claims the task in
-- this transaction, and sends nothing).
-- (from migrations/20261204000033_eager_task_start.sql)
CREATE FUNCTION tasker.insert_task(
    p_task_uuid uuid, p_namespace text, p_name text, p_priority integer, p_context jsonb,
    p_idempotency_key text, p_steps jsonb, p_metadata jsonb DEFAULT '{}'::jsonb,
    p_max_namespaces integer DEFAULT NULL, p_context_bytes integer DEFAULT NULL,
    p_create_namespace boolean DEFAULT true, p_concurrency_key text DEFAULT NULL,
    p_start_at timestamptz DEFAULT NULL, p_announce boolean DEFAULT true
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

    -- the steps, and the roots of a task that starts now in the ready set, in one statement
    -- (a query of the steps just written was planned again at every call)
    WITH created AS (
        INSERT INTO tasker.workflow_steps AS w (step_uuid, task_uuid, name, position, unfinished_parents,
                                           ready_at, max_attempts, retryable, inputs, data_bytes,
                                           queue, retry_policy, timeout_ms, schedule_to_start_ms)
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
        ORDER BY (e->>'position')::int
        RETURNING w.step_uuid, w.unfinished_parents, w.ready_at
    )
    INSERT INTO tasker.ready_steps (step_uuid, task_uuid, ready_at)
    SELECT c.step_uuid, p_task_uuid, c.ready_at FROM created c
    WHERE c.unfinished_parents = 0 AND NOT v_later;

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
    ELSIF p_announce THEN
        -- a DAG has at least one root: it is ready now
        PERFORM tasker.send_task_ready(p_task_uuid, p_namespace, 'task_start');
    END IF;
    -- the steps as written (the same query of the table was planned again at every call)
    RETURN QUERY SELECT p_task_uuid, true, e->>'name', (e->>'step_uuid')::uuid
        FROM jsonb_array_elements(p_steps) AS x(e) ORDER BY (e->>'position')::int;
END
$$;

-- Create a task with its DAG: tasker.insert_task, its readiness announced.
-- (from migrations/20261204000033_eager_task_start.sql)
CREATE OR REPLACE FUNCTION tasker.create_task(
    p_task_uuid uuid, p_namespace text, p_name text, p_priority integer, p_context jsonb,
    p_idempotency_key text, p_steps jsonb, p_metadata jsonb DEFAULT '{}'::jsonb,
    p_max_namespaces integer DEFAULT NULL, p_context_bytes integer DEFAULT NULL,
    p_create_namespace boolean DEFAULT true, p_concurrency_key text DEFAULT NULL,
    p_start_at timestamptz DEFAULT NULL
)
RETURNS TABLE (task_uuid uuid, created boolean, step_name text, step_uuid uuid)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY SELECT * FROM tasker.insert_task(
        p_task_uuid, p_namespace, p_name, p_priority, p_context, p_idempotency_key, p_steps,
        p_metadata, p_max_namespaces, p_context_bytes, p_create_namespace, p_concurrency_key,
        p_start_at, true);
END
$$;

-- Eager start: create a task (exactly tasker.insert_task) and claim it and enqueue its ready
-- steps in the same transaction (exactly tasker.claim_and_enqueue), leasing them to p_takers
-- (the creating worker's ask: [{"worker_id", "max", "lease_ms", "queues"}]); one row, the
-- steps as arrays in position order. NULL outcome when no claim was tried: the idempotency key
-- named an existing task, or the task starts later. No row for a task without steps. When
-- another holds the task's claim, the readiness notification is sent as a plain creation sends
-- it. Commits synchronously: a creation is durable, whatever the enqueue would allow.
-- (from migrations/20261204000033_eager_task_start.sql)
CREATE FUNCTION tasker.create_task_and_claim(
    p_task_uuid uuid, p_namespace text, p_name text, p_priority integer, p_context jsonb,
    p_idempotency_key text, p_steps jsonb, p_metadata jsonb, p_max_namespaces integer,
    p_context_bytes integer, p_create_namespace boolean, p_concurrency_key text,
    p_start_at timestamptz, p_enqueue_metadata jsonb, p_takers jsonb
)
RETURNS TABLE (task_uuid uuid, created boolean, step_names text[], step_uuids uuid[],
               outcome text, namespace text, enqueued_steps uuid[],
               max_ready_wait_ms double precision, leased jsonb, queued jsonb, held jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    v_task uuid;
    v_created boolean;
    v_names text[];
    v_uuids uuid[];
    v_e record;
BEGIN
    SELECT (array_agg(c.task_uuid))[1], bool_and(c.created),
           array_agg(c.step_name ORDER BY c.ord), array_agg(c.step_uuid ORDER BY c.ord)
    INTO v_task, v_created, v_names, v_uuids
    FROM tasker.insert_task(
        p_task_uuid, p_namespace, p_name, p_priority, p_context, p_idempotency_key, p_steps,
        p_metadata, p_max_namespaces, p_context_bytes, p_create_namespace, p_concurrency_key,
        p_start_at, false) WITH ORDINALITY AS c(task_uuid, created, step_name, step_uuid, ord);
    IF v_task IS NULL THEN
        RETURN;
    END IF;
    -- a task the idempotency key named already was started when it was created; a task that
    -- starts later has nothing ready now (its start is announced on tasker_deadlines)
    IF NOT v_created OR (p_start_at IS NOT NULL AND p_start_at > clock_timestamp()) THEN
        RETURN QUERY SELECT v_task, v_created, v_names, v_uuids, NULL::text, NULL::text,
                            '{}'::uuid[], NULL::float8, '[]'::jsonb, '[]'::jsonb, '[]'::jsonb;
        RETURN;
    END IF;
    SELECT * INTO v_e FROM tasker.claim_and_enqueue(v_task, p_enqueue_metadata, p_takers, NULL) e;
    -- claim_and_enqueue commits asynchronously when it hands nothing over: not a creation
    PERFORM set_config('synchronous_commit', 'on', true);
    IF v_e.outcome = 'claimed_elsewhere' THEN
        PERFORM tasker.send_task_ready(v_task, p_namespace, 'task_start');
    END IF;
    RETURN QUERY SELECT v_task, true, v_names, v_uuids, v_e.outcome, v_e.namespace,
                        v_e.enqueued_steps, v_e.max_ready_wait_ms, v_e.leased, v_e.queued, v_e.held;
END
$$;

-- Cancel a task and every step not finished: their queue rows go (by step, the queue's index),
-- their retry times are cleared, a start it waits for is dropped (first: a promotion under way
-- holds it, so the cancel waits and then removes what it made ready). 'cancelled',
-- 'task_not_found' or 'task_already_final'. A pending keyed task cancelled admits the oldest
-- waiters of its key to its free slots.
-- (from migrations/20261205000037_keyed_tasks_start_oldest_first.sql)
CREATE FUNCTION tasker.cancel_task(p_task_uuid uuid, p_reason text, p_metadata jsonb DEFAULT '{}'::jsonb)
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

-- A schedule's task finished (trigger tasks_schedule_task_finished, only for tasks a schedule
-- made): a tick it buffered (BUFFER_ONE) may run now; the schedule wakes at once, everywhere.
-- (from migrations/20261204000014_schedules.sql)
CREATE FUNCTION tasker.schedule_task_finished() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE tasker.schedules sc SET wake_at = clock_timestamp()
    WHERE sc.namespace = NEW.namespace AND sc.name = NEW.schedule_name
      AND sc.buffered_fire_at IS NOT NULL AND sc.last_task_uuid = NEW.task_uuid;
    IF FOUND THEN
        PERFORM pg_notify('tasker_deadlines',
                          json_build_object('namespace', NEW.namespace, 'at', clock_timestamp())::text);
    END IF;
    RETURN NULL;
END
$$;

-- Each errored step of the task gets p_extra_attempts more attempts (its max_attempts raised
-- from the attempts it used; at most 100 in all), becomes pending and ready, and the task goes
-- back to in progress; the readiness is announced. Returns 'retried', 'task_not_found',
-- 'task_not_in_error' (nothing changed), or 'attempts_exhausted' when a step would need more
-- than 100 attempts (nothing changed).
-- (from migrations/20261127000004_task_retry.sql)
CREATE FUNCTION tasker.retry_task(p_task_uuid uuid, p_extra_attempts integer,
                                  p_metadata jsonb DEFAULT '{}'::jsonb)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_task record;
BEGIN
    SELECT t.namespace, t.state INTO v_task FROM tasker.tasks t
    WHERE t.task_uuid = p_task_uuid FOR NO KEY UPDATE;
    IF NOT FOUND THEN RETURN 'task_not_found'; END IF;
    IF v_task.state <> 'error' THEN RETURN 'task_not_in_error'; END IF;
    IF EXISTS (SELECT 1 FROM tasker.workflow_steps s
               WHERE s.task_uuid = p_task_uuid AND s.state = 'error'
                 AND s.attempts + p_extra_attempts > 100) THEN
        RETURN 'attempts_exhausted';
    END IF;
    PERFORM set_config('tasker.transition_metadata', coalesce(p_metadata, '{}'::jsonb)::text, true);
    -- reopen first, so that the readiness announcement sees an active task
    UPDATE tasker.tasks t SET state = 'in_progress', completed_at = NULL
    WHERE t.task_uuid = p_task_uuid;
    WITH retried AS (
        UPDATE tasker.workflow_steps s
        SET state = 'pending', max_attempts = s.attempts + p_extra_attempts,
            next_retry_at = NULL, completed_at = NULL, ready_at = clock_timestamp()
        WHERE s.task_uuid = p_task_uuid AND s.state = 'error'
        RETURNING s.step_uuid, s.task_uuid, s.ready_at
    )
    INSERT INTO tasker.ready_steps AS r (step_uuid, task_uuid, ready_at)
    SELECT step_uuid, task_uuid, ready_at FROM retried
    ON CONFLICT (step_uuid) DO NOTHING;
    PERFORM tasker.send_task_ready(p_task_uuid, v_task.namespace, 'step_transition');
    RETURN 'retried';
END
$$;

-- An operator marks a step as done by hand; it counts as complete for its dependents. A task
-- in error goes on once no failed step is left; a task no worker has touched starts. Results
-- (p_results, of p_results_bytes as sent; NULL: the step's own, which a step that can be
-- resolved never has) are held to p_max_parent_results_bytes as a worker's are.
-- (from migrations/20261204000002_resolve_budget_and_retry_times.sql)
CREATE FUNCTION tasker.resolve_step_manually(
    p_step_uuid uuid, p_reason text, p_results jsonb, p_results_bytes integer,
    p_metadata jsonb DEFAULT '{}'::jsonb, p_max_parent_results_bytes integer DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_task_uuid uuid;
    v_task record;
    v_step record;
    v_bytes integer;
    v_finished record;
BEGIN
    SELECT s.task_uuid INTO v_task_uuid FROM tasker.workflow_steps s WHERE s.step_uuid = p_step_uuid;
    IF NOT FOUND THEN RETURN 'step_not_found'; END IF;
    SELECT t.namespace, t.state INTO v_task FROM tasker.tasks t
    WHERE t.task_uuid = v_task_uuid FOR NO KEY UPDATE;
    PERFORM set_config('tasker.transition_metadata',
        (coalesce(p_metadata, '{}'::jsonb) || jsonb_build_object('reason', p_reason))::text, true);
    SELECT s.state, s.name INTO v_step FROM tasker.workflow_steps s
    WHERE s.step_uuid = p_step_uuid FOR UPDATE;
    IF NOT tasker.step_transition_allowed(v_step.state, 'resolved_manually') THEN
        RETURN 'illegal_transition';
    END IF;
    -- a protobuf null Value is 2 bytes
    v_bytes := tasker.parent_entry_bytes(v_step.name,
                                         CASE WHEN p_results IS NULL THEN 2 ELSE p_results_bytes END);
    IF p_max_parent_results_bytes IS NOT NULL AND EXISTS (
        SELECT 1 FROM tasker.step_edges e
        CROSS JOIN LATERAL (SELECT c.parent_results_bytes FROM tasker.workflow_steps c
                            WHERE c.step_uuid = e.child_step_uuid OFFSET 0) c
        WHERE e.parent_step_uuid = p_step_uuid
          AND c.parent_results_bytes + v_bytes > p_max_parent_results_bytes) THEN
        RETURN 'parent_results_too_large';
    END IF;
    -- an operator's action starts a task no worker has touched: only a task in progress
    -- completes when its last step finishes (finish_step)
    IF v_task.state = 'pending' THEN
        UPDATE tasker.tasks t SET state = 'in_progress'
        WHERE t.task_uuid = v_task_uuid AND t.state = 'pending';
    END IF;
    -- reopen first, so that the readiness announcement sees an active task
    IF v_task.state = 'error' AND NOT EXISTS (
        SELECT 1 FROM tasker.workflow_steps s
        WHERE s.task_uuid = v_task_uuid AND s.state = 'error' AND s.step_uuid <> p_step_uuid) THEN
        UPDATE tasker.tasks t SET state = 'in_progress', completed_at = NULL
        WHERE t.task_uuid = v_task_uuid AND t.state = 'error';
    END IF;
    DELETE FROM tasker.step_queue q WHERE q.step_uuid = p_step_uuid;
    DELETE FROM tasker.ready_steps r WHERE r.step_uuid = p_step_uuid;
    -- data_bytes: see 20261204000003
    UPDATE tasker.workflow_steps s
    SET state = 'resolved_manually', results = coalesce(p_results, s.results),
        completed_at = clock_timestamp(), next_retry_at = NULL,
        data_bytes = s.data_bytes + CASE WHEN p_results IS NULL THEN 0 ELSE p_results_bytes END
    WHERE s.step_uuid = p_step_uuid;
    SELECT * INTO v_finished FROM tasker.finish_step(p_step_uuid, v_task_uuid, v_bytes);
    -- announce what is ready now: this step's children, and steps made ready while the task
    -- was in error (a sibling's completion, a retry falling due), which nothing announced then
    IF v_finished.task_state IN ('pending', 'in_progress') AND (
        v_finished.ready_children > 0
        OR EXISTS (SELECT 1 FROM tasker.ready_steps r WHERE r.task_uuid = v_task_uuid)) THEN
        PERFORM tasker.send_task_ready(v_task_uuid, v_task.namespace, 'step_transition');
    END IF;
    RETURN 'resolved';
END
$$;

-- Start up to p_n of the tasks waiting on a key, oldest first: each one's ready steps go back
-- into the ready set and it gets a readiness notification; its claim takes the slot (or finds
-- it taken and waits again).
-- (from migrations/20261204000007_concurrency_keys.sql)
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
-- (from migrations/20261204000007_concurrency_keys.sql)
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

-- Set (or with NULL remove) a namespace's limit of tasks per key. Raising it (or removing it)
-- starts the tasks that waited, as far as the new limit allows, at once.
-- (from migrations/20261204000007_concurrency_keys.sql)
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

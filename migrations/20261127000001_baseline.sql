-- Tasker's baseline schema. Migrations are append-only from here on: sqlx checksums every
-- applied file, so a change is a new migration, never an edit of this one.
--
-- Sections, in order: schema; state machine and history; readiness; notifications;
-- operations. Every function is defined once, here, with its settings inline.
--
-- Plans that cannot drift. PL/pgSQL caches a generic plan per statement and session, costed
-- with the statistics of the moment: a service started on an empty database would keep plans
-- made for empty tables (with autovacuum off, nothing invalidates them; measured in a soak:
-- sequential scans of workflow_steps for one step's parents, the completion -> enqueue p50
-- rising from 3 ms to seconds). So every statement on the hot path touches a handful of rows
-- by key and is written so that its right plan is its only sensible one:
--   1. single-table statements with an equality on a unique key, or an ordered walk of the
--      one index made for them; joins to a parent or queued row are LATERAL subqueries that
--      cannot be flattened (OFFSET 0), so they run as a key probe per outer row;
--   2. no statement's WHERE implies the predicate of a partial index it should not use;
--   3. hot functions plan with sequential, bitmap, hash-join and merge-join paths off (the
--      `SET` clauses in their definitions; they hold while the function runs). The test
--      `hot_path_functions_keep_their_planner_settings` fails if one loses them.
-- Reporting functions that scan many rows (ready_tasks, step_readiness,
-- task_execution_context) and create_task keep the planner's own choice.

-- Tasker schema: namespaces, tasks, workflow steps, the step DAG, transition history and the
-- step queue. Everything lives in schema `tasker`.
--
-- States (ARCHITECTURE.md):
--   step: pending -> enqueued -> in_progress -> complete
--         in_progress -> waiting_for_retry -> pending       (retry with backoff)
--         in_progress -> error                              (attempts exhausted / not retryable)
--         cancelled, resolved_manually (counts as complete for dependents)
--   task: pending -> in_progress -> complete | error | cancelled
-- The legal transitions are enforced by the triggers below; CHECK constraints
-- here keep the state vocabulary closed.

CREATE SCHEMA IF NOT EXISTS tasker;

-- Channel names are `tasker_task_ready.<namespace>` and `tasker_task_state.<namespace>`: an
-- 18-byte prefix. PostgreSQL truncates identifiers (and so channel names) to 63 bytes, so a
-- namespace may use at most 45 bytes. The charset keeps channel names unambiguous and safe to
-- LISTEN on without surprises from quoting.
CREATE FUNCTION tasker.namespace_name_problem(p_name text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_name IS NULL OR p_name = '' THEN 'must not be empty'
        WHEN octet_length(p_name) > 45 THEN
            'must be at most 45 bytes (is ' || octet_length(p_name) || ') so that channel "tasker_task_ready.<namespace>" fits the 63-byte identifier limit'
        WHEN p_name !~ '^[a-z0-9][a-z0-9_-]*$' THEN
            'must match ^[a-z0-9][a-z0-9_-]*$ (lower-case letters, digits, "_" and "-", starting with a letter or digit)'
        ELSE NULL
    END
$$;

CREATE TABLE tasker.namespaces (
    name        text PRIMARY KEY
                CONSTRAINT namespaces_name_valid CHECK (tasker.namespace_name_problem(name) IS NULL),
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Raise a readable error before the CHECK constraint would give a terse one.
CREATE FUNCTION tasker.namespaces_validate() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_problem text := tasker.namespace_name_problem(NEW.name);
BEGIN
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION 'invalid namespace name %: %', quote_literal(coalesce(NEW.name, '')), v_problem
            USING ERRCODE = 'TK002', COLUMN = 'name';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER namespaces_validate BEFORE INSERT OR UPDATE ON tasker.namespaces
    FOR EACH ROW EXECUTE FUNCTION tasker.namespaces_validate();

CREATE TABLE tasker.tasks (
    task_uuid        uuid PRIMARY KEY,
    namespace        text NOT NULL REFERENCES tasker.namespaces (name),
    name             text NOT NULL CHECK (length(name) BETWEEN 1 AND 255),
    priority         integer NOT NULL DEFAULT 0 CHECK (priority BETWEEN -1000 AND 1000),
    state            text NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'in_progress', 'complete', 'error', 'cancelled')),
    context          jsonb NOT NULL DEFAULT '{}'::jsonb,
    idempotency_key  text CHECK (idempotency_key IS NULL OR length(idempotency_key) BETWEEN 1 AND 255),
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    completed_at     timestamptz,
    CONSTRAINT tasks_idempotency_key_unique UNIQUE (namespace, idempotency_key)
);

CREATE TABLE tasker.workflow_steps (
    step_uuid      uuid PRIMARY KEY,
    task_uuid      uuid NOT NULL REFERENCES tasker.tasks (task_uuid),
    name           text NOT NULL CHECK (length(name) BETWEEN 1 AND 255),
    state          text NOT NULL DEFAULT 'pending'
                   CHECK (state IN ('pending', 'enqueued', 'in_progress', 'complete',
                                    'waiting_for_retry', 'error', 'cancelled', 'resolved_manually')),
    -- attempts counts enqueues: attempt N of a step is the N-th time it was put on the queue.
    attempts       integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts   integer NOT NULL DEFAULT 3 CHECK (max_attempts BETWEEN 1 AND 100),
    retryable      boolean NOT NULL DEFAULT true,
    next_retry_at  timestamptz,
    inputs         jsonb NOT NULL DEFAULT '{}'::jsonb,
    results        jsonb,
    last_error     jsonb,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    enqueued_at    timestamptz,
    started_at     timestamptz,
    completed_at   timestamptz,
    CONSTRAINT workflow_steps_name_unique UNIQUE (task_uuid, name),
    -- target of the edge foreign keys that keep both ends of an edge in one task
    CONSTRAINT workflow_steps_task_step_unique UNIQUE (task_uuid, step_uuid),
    CONSTRAINT workflow_steps_attempts_bounded CHECK (attempts <= max_attempts)
);
-- Readiness scans start from pending steps only; in a busy system they are a small minority.
CREATE INDEX workflow_steps_pending_idx ON tasker.workflow_steps (task_uuid)
    WHERE state = 'pending' AND attempts < max_attempts;
CREATE INDEX workflow_steps_retry_due_idx ON tasker.workflow_steps (next_retry_at)
    WHERE state = 'waiting_for_retry' AND next_retry_at IS NOT NULL;

CREATE TABLE tasker.step_edges (
    task_uuid         uuid NOT NULL,
    parent_step_uuid  uuid NOT NULL,
    child_step_uuid   uuid NOT NULL,
    PRIMARY KEY (parent_step_uuid, child_step_uuid),
    CONSTRAINT step_edges_no_self_edge CHECK (parent_step_uuid <> child_step_uuid),
    CONSTRAINT step_edges_parent_same_task FOREIGN KEY (task_uuid, parent_step_uuid)
        REFERENCES tasker.workflow_steps (task_uuid, step_uuid),
    CONSTRAINT step_edges_child_same_task FOREIGN KEY (task_uuid, child_step_uuid)
        REFERENCES tasker.workflow_steps (task_uuid, step_uuid)
);
CREATE INDEX step_edges_child_idx ON tasker.step_edges (child_step_uuid, parent_step_uuid);

-- Append-only history. Rows are written by the history triggers below, never updated.
CREATE TABLE tasker.step_transitions (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    step_uuid   uuid NOT NULL REFERENCES tasker.workflow_steps (step_uuid),
    task_uuid   uuid NOT NULL,
    from_state  text,
    to_state    text NOT NULL,
    attempt     integer NOT NULL,
    metadata    jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX step_transitions_step_idx ON tasker.step_transitions (step_uuid, id);

CREATE TABLE tasker.task_transitions (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_uuid   uuid NOT NULL REFERENCES tasker.tasks (task_uuid),
    from_state  text,
    to_state    text NOT NULL,
    metadata    jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX task_transitions_task_idx ON tasker.task_transitions (task_uuid, id);

CREATE FUNCTION tasker.history_is_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME USING ERRCODE = 'TK001';
END
$$;
CREATE TRIGGER step_transitions_append_only BEFORE UPDATE OR DELETE ON tasker.step_transitions
    FOR EACH ROW EXECUTE FUNCTION tasker.history_is_append_only();
CREATE TRIGGER task_transitions_append_only BEFORE UPDATE OR DELETE ON tasker.task_transitions
    FOR EACH ROW EXECUTE FUNCTION tasker.history_is_append_only();

-- The step queue: one row per enqueued step attempt, written in the same transaction as the
-- step's pending -> enqueued transition. The unique (step_uuid, attempt) makes "enqueued twice"
-- impossible rather than merely unlikely. `visible_at` is the visibility timeout: a fetched
-- message is invisible until its lease expires. The row is deleted when the attempt ends.
CREATE TABLE tasker.step_queue (
    msg_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    namespace    text NOT NULL REFERENCES tasker.namespaces (name),
    task_uuid    uuid NOT NULL,
    step_uuid    uuid NOT NULL REFERENCES tasker.workflow_steps (step_uuid),
    attempt      integer NOT NULL CHECK (attempt >= 1),
    priority     integer NOT NULL DEFAULT 0,
    enqueued_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    visible_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    read_count   integer NOT NULL DEFAULT 0,
    leased_by    text,
    -- W3C trace context of the enqueue, so the worker's lease continues the same trace
    traceparent  text CHECK (traceparent IS NULL OR length(traceparent) <= 128),
    CONSTRAINT step_queue_one_message_per_attempt UNIQUE (step_uuid, attempt)
);
CREATE INDEX step_queue_fetch_idx ON tasker.step_queue (namespace, priority DESC, msg_id)
    WHERE leased_by IS NULL;
CREATE INDEX step_queue_lease_idx ON tasker.step_queue (visible_at) WHERE leased_by IS NOT NULL;

-- The queue is a churn table (one insert and one delete per step attempt) and steps are
-- updated three times each: vacuum them by dead-row count, not by fraction of a table that
-- stays small, and leave room on each page for HOT updates. Without this, dead tuples pile
-- up between autovacuum runs and the fetch and readiness look-ups slow down over hours.
ALTER TABLE tasker.step_queue SET (
    autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 2000,
    autovacuum_vacuum_cost_delay = 0, fillfactor = 80);
ALTER TABLE tasker.workflow_steps SET (
    autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0, fillfactor = 80);
ALTER TABLE tasker.tasks SET (fillfactor = 90);

-- State machine enforcement and history.
--
-- Every state change is an UPDATE ... WHERE state = <from> (compare-and-swap) issued by the
-- operation functions below. The BEFORE trigger refuses any (from, to) pair that is not in
-- the state machine, whoever issues it (an operator's psql included), with SQLSTATE TK001.
-- The AFTER trigger writes the history row, so no code path can forget it. Callers attach
-- metadata to the history rows of the current transaction with
--   set_config('tasker.transition_metadata', '<json>', true).

CREATE FUNCTION tasker.step_transition_allowed(p_from text, p_to text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT (p_from, p_to) IN (
        ('pending', 'enqueued'),
        ('pending', 'cancelled'),
        ('pending', 'resolved_manually'),
        ('enqueued', 'in_progress'),
        ('enqueued', 'cancelled'),
        ('in_progress', 'complete'),
        ('in_progress', 'waiting_for_retry'),
        ('in_progress', 'error'),
        ('in_progress', 'cancelled'),
        ('waiting_for_retry', 'pending'),
        ('waiting_for_retry', 'cancelled'),
        ('waiting_for_retry', 'resolved_manually'),
        ('error', 'resolved_manually')
    )
$$;

CREATE FUNCTION tasker.task_transition_allowed(p_from text, p_to text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT (p_from, p_to) IN (
        ('pending', 'in_progress'),
        ('pending', 'cancelled'),
        ('in_progress', 'complete'),
        ('in_progress', 'error'),
        ('in_progress', 'cancelled'),
        -- an operator resolved the failed step manually: the task may go on
        ('error', 'in_progress'),
        ('error', 'cancelled')
    )
$$;

CREATE FUNCTION tasker.transition_metadata() RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('tasker.transition_metadata', true), '')::jsonb, '{}'::jsonb)
$$;

CREATE FUNCTION tasker.workflow_steps_guard() RETURNS trigger
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
BEGIN
    IF NEW.state IS DISTINCT FROM OLD.state THEN
        IF NOT tasker.step_transition_allowed(OLD.state, NEW.state) THEN
            RAISE EXCEPTION 'illegal step transition % -> % for step %', OLD.state, NEW.state, OLD.step_uuid
                USING ERRCODE = 'TK001';
        END IF;
    END IF;
    IF NEW.task_uuid IS DISTINCT FROM OLD.task_uuid OR NEW.step_uuid IS DISTINCT FROM OLD.step_uuid THEN
        RAISE EXCEPTION 'a step''s identity is immutable (step %)', OLD.step_uuid USING ERRCODE = 'TK001';
    END IF;
    NEW.updated_at := clock_timestamp();
    RETURN NEW;
END
$$;
CREATE TRIGGER workflow_steps_guard BEFORE UPDATE ON tasker.workflow_steps
    FOR EACH ROW EXECUTE FUNCTION tasker.workflow_steps_guard();

CREATE FUNCTION tasker.tasks_guard() RETURNS trigger
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
BEGIN
    IF NEW.state IS DISTINCT FROM OLD.state THEN
        IF NOT tasker.task_transition_allowed(OLD.state, NEW.state) THEN
            RAISE EXCEPTION 'illegal task transition % -> % for task %', OLD.state, NEW.state, OLD.task_uuid
                USING ERRCODE = 'TK001';
        END IF;
    END IF;
    IF NEW.task_uuid IS DISTINCT FROM OLD.task_uuid OR NEW.namespace IS DISTINCT FROM OLD.namespace THEN
        RAISE EXCEPTION 'a task''s identity and namespace are immutable (task %)', OLD.task_uuid
            USING ERRCODE = 'TK001';
    END IF;
    NEW.updated_at := clock_timestamp();
    RETURN NEW;
END
$$;
CREATE TRIGGER tasks_guard BEFORE UPDATE ON tasker.tasks
    FOR EACH ROW EXECUTE FUNCTION tasker.tasks_guard();

CREATE FUNCTION tasker.workflow_steps_history() RETURNS trigger
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
BEGIN
    INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, attempt, metadata)
    VALUES (NEW.step_uuid, NEW.task_uuid,
            CASE WHEN TG_OP = 'UPDATE' THEN OLD.state END,
            NEW.state, NEW.attempts, tasker.transition_metadata());
    RETURN NULL;
END
$$;
CREATE TRIGGER workflow_steps_history_insert AFTER INSERT ON tasker.workflow_steps
    FOR EACH ROW EXECUTE FUNCTION tasker.workflow_steps_history();
CREATE TRIGGER workflow_steps_history_update AFTER UPDATE OF state ON tasker.workflow_steps
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION tasker.workflow_steps_history();

CREATE FUNCTION tasker.tasks_history() RETURNS trigger
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
BEGIN
    INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, metadata)
    VALUES (NEW.task_uuid, CASE WHEN TG_OP = 'UPDATE' THEN OLD.state END, NEW.state,
            tasker.transition_metadata());
    RETURN NULL;
END
$$;
CREATE TRIGGER tasks_history_insert AFTER INSERT ON tasker.tasks
    FOR EACH ROW EXECUTE FUNCTION tasker.tasks_history();
CREATE TRIGGER tasks_history_update AFTER UPDATE OF state ON tasker.tasks
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION tasker.tasks_history();

-- New edges must not close a cycle. Checked once per statement over all inserted edges (a
-- task's whole DAG arrives in one INSERT): walk down from each new edge's child; reaching
-- that edge's parent means a cycle. CreateTask validates the DAG before writing; this is the
-- database's own guarantee.
CREATE FUNCTION tasker.step_edges_no_cycle() RETURNS trigger
LANGUAGE plpgsql
SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_edge record;
BEGIN
    WITH RECURSIVE walk(origin_parent, origin_child, step_uuid) AS (
        SELECT n.parent_step_uuid, n.child_step_uuid, n.child_step_uuid FROM new_edges n
        UNION
        SELECT w.origin_parent, w.origin_child, e.child_step_uuid
        FROM walk w JOIN tasker.step_edges e ON e.parent_step_uuid = w.step_uuid
    )
    SELECT origin_parent, origin_child INTO v_edge FROM walk WHERE step_uuid = origin_parent LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'edge % -> % would create a dependency cycle', v_edge.origin_parent, v_edge.origin_child
            USING ERRCODE = 'TK003';
    END IF;
    RETURN NULL;
END
$$;
-- The walk follows edges by index from a handful of new edges; a hash join over the whole
-- edge table (which the planner picked as the table grew: 4 -> 13 ms per task in a soak)
-- makes creation slower the longer the service runs.
CREATE TRIGGER step_edges_no_cycle AFTER INSERT ON tasker.step_edges
    REFERENCING NEW TABLE AS new_edges
    FOR EACH STATEMENT EXECUTE FUNCTION tasker.step_edges_no_cycle();
-- Edges are never updated: a changed edge is a different DAG.
CREATE TRIGGER step_edges_immutable BEFORE UPDATE ON tasker.step_edges
    FOR EACH ROW EXECUTE FUNCTION tasker.history_is_append_only();

-- Completions, failures, retries, cancellations and manual resolutions of one task are
-- serialized by this transaction-scoped advisory lock. Without it two parents of a join step
-- completing in concurrent transactions would each see the other still in progress, neither
-- would notify, and the join step would wait for the fallback poller. The lock is separate
-- from the task row lock that the enqueuer claims with SKIP LOCKED, so a completion never
-- makes an enqueuer skip. Key collisions only cost extra serialization.
CREATE FUNCTION tasker.lock_task_progress(p_task_uuid uuid) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(hashtextextended('tasker.task_progress:' || p_task_uuid::text, 0))
$$;

-- Readiness: which steps can run now, what state a task is in, which tasks have work.
--
-- A step is ready when it is pending, its task is pending or in_progress, every parent is
-- complete or resolved_manually, any retry backoff has elapsed and it has attempts left.

-- The one definition of "ready": among the given steps, those that are pending, have
-- attempts left, whose backoff has elapsed, and whose every parent is complete or
-- resolved_manually; with the moment each became ready (its last parent's completion, its
-- backoff's end, or its creation). Callers pass the candidates: the children of a step that
-- changed, the pending steps of one task, all pending steps. One candidate at a time: the
-- step by primary key, then its parents by the child-edge index and a primary-key probe each
-- (a set-based query over the array got a cached generic plan that drifted to hash joins
-- over full scans as the tables grew).
-- Time is the transaction's start (now()): every caller is a short transaction, and the retry
-- promotion uses the same clock.
CREATE FUNCTION tasker.ready_among(p_steps uuid[])
RETURNS TABLE (step_uuid uuid, task_uuid uuid, ready_since timestamptz, created_at timestamptz)
LANGUAGE plpgsql STABLE
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_step uuid;
    v_s record;
    v_unfinished bigint;
    v_last_parent timestamptz;
BEGIN
    FOREACH v_step IN ARRAY coalesce(p_steps, '{}'::uuid[]) LOOP
        SELECT s.task_uuid, s.state, s.attempts, s.max_attempts, s.next_retry_at, s.created_at
        INTO v_s
        FROM tasker.workflow_steps s WHERE s.step_uuid = v_step;
        CONTINUE WHEN NOT FOUND
            OR v_s.state <> 'pending'
            OR v_s.attempts >= v_s.max_attempts
            OR (v_s.next_retry_at IS NOT NULL AND v_s.next_retry_at > now());
        SELECT count(*) FILTER (WHERE ps.state NOT IN ('complete', 'resolved_manually')),
               max(ps.completed_at)
        INTO v_unfinished, v_last_parent
        FROM tasker.step_edges e
        CROSS JOIN LATERAL (SELECT p.state, p.completed_at FROM tasker.workflow_steps p
                            WHERE p.step_uuid = e.parent_step_uuid OFFSET 0) ps
        WHERE e.child_step_uuid = v_step;
        CONTINUE WHEN v_unfinished > 0;
        step_uuid := v_step;
        task_uuid := v_s.task_uuid;
        ready_since := greatest(v_s.created_at, v_s.next_retry_at, v_last_parent);
        created_at := v_s.created_at;
        RETURN NEXT;
    END LOOP;
END
$$;

-- The ready steps of one task (whatever the task's state), driven by the pending-steps index.
CREATE FUNCTION tasker.ready_steps_of_task(p_task_uuid uuid)
RETURNS TABLE (step_uuid uuid, ready_since timestamptz, created_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT r.step_uuid, r.ready_since, r.created_at
    FROM tasker.ready_among(ARRAY(
        SELECT s.step_uuid FROM tasker.workflow_steps s
        WHERE s.task_uuid = p_task_uuid AND s.state = 'pending' AND s.attempts < s.max_attempts)) r
$$;

CREATE FUNCTION tasker.step_readiness(p_task_uuid uuid)
RETURNS TABLE (
    step_uuid uuid,
    name text,
    state text,
    attempts integer,
    max_attempts integer,
    total_parents integer,
    completed_parents integer,
    dependencies_satisfied boolean,
    retry_eligible boolean,
    next_retry_at timestamptz,
    ready boolean,
    ready_since timestamptz
)
LANGUAGE sql STABLE AS $$
    SELECT s.step_uuid, s.name, s.state, s.attempts, s.max_attempts,
           coalesce(p.total, 0)::int,
           coalesce(p.done, 0)::int,
           coalesce(p.total = p.done, true),
           -- another attempt may still be made for this step
           (s.state IN ('pending', 'waiting_for_retry') AND s.attempts < s.max_attempts
                AND (s.attempts = 0 OR s.retryable)),
           s.next_retry_at,
           (t.state IN ('pending', 'in_progress')
                AND EXISTS (SELECT 1 FROM tasker.ready_among(ARRAY[s.step_uuid]))),
           greatest(s.created_at, p.last_done, s.next_retry_at)
    FROM tasker.workflow_steps s
    JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
    LEFT JOIN LATERAL (
        SELECT count(*) AS total,
               count(*) FILTER (WHERE ps.state IN ('complete', 'resolved_manually')) AS done,
               max(ps.completed_at) AS last_done
        FROM tasker.step_edges e
        JOIN tasker.workflow_steps ps ON ps.step_uuid = e.parent_step_uuid
        WHERE e.child_step_uuid = s.step_uuid
    ) p ON true
    WHERE s.task_uuid = p_task_uuid
    ORDER BY s.created_at, s.name
$$;

CREATE FUNCTION tasker.task_execution_context(p_task_uuid uuid)
RETURNS TABLE (
    task_uuid uuid,
    namespace text,
    task_state text,
    priority integer,
    total_steps integer,
    pending_steps integer,
    enqueued_steps integer,
    in_progress_steps integer,
    complete_steps integer,
    failed_steps integer,
    waiting_for_retry_steps integer,
    cancelled_steps integer,
    ready_steps integer,
    execution_status text
)
LANGUAGE sql STABLE AS $$
    WITH r AS (SELECT * FROM tasker.step_readiness(p_task_uuid)),
    c AS (
        SELECT count(*)::int AS total,
               count(*) FILTER (WHERE r.state = 'pending')::int AS pending,
               count(*) FILTER (WHERE r.state = 'enqueued')::int AS enqueued,
               count(*) FILTER (WHERE r.state = 'in_progress')::int AS in_progress,
               count(*) FILTER (WHERE r.state IN ('complete', 'resolved_manually'))::int AS complete,
               count(*) FILTER (WHERE r.state = 'error')::int AS failed,
               count(*) FILTER (WHERE r.state = 'waiting_for_retry')::int AS waiting,
               count(*) FILTER (WHERE r.state = 'cancelled')::int AS cancelled,
               count(*) FILTER (WHERE r.ready)::int AS ready
        FROM r
    )
    SELECT t.task_uuid, t.namespace, t.state, t.priority,
           c.total, c.pending, c.enqueued, c.in_progress, c.complete, c.failed, c.waiting,
           c.cancelled, c.ready,
           CASE
               WHEN t.state = 'cancelled' THEN 'cancelled'
               WHEN c.total > 0 AND c.complete = c.total THEN 'all_complete'
               WHEN c.ready > 0 THEN 'has_ready_steps'
               WHEN c.enqueued + c.in_progress > 0 THEN 'processing'
               WHEN c.failed > 0 THEN 'blocked_by_failures'
               ELSE 'waiting_for_dependencies'
           END
    FROM tasker.tasks t, c
    WHERE t.task_uuid = p_task_uuid
$$;

-- Aging boost: one priority point for every 60 seconds a task has had a ready step, so a
-- low-priority task is eventually served even under a steady stream of high-priority work.
CREATE FUNCTION tasker.computed_priority(p_priority integer, p_ready_since timestamptz)
RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT p_priority + least(floor(greatest(extract(epoch FROM clock_timestamp() - p_ready_since), 0) / 60), 100000)::int
$$;

-- Tasks with at least one ready step, best first. p_namespaces: NULL for all namespaces, or
-- a list of namespace patterns (see namespace_matches).
-- p_ready_before keeps only tasks whose oldest ready step has been ready since before it (the
-- fallback poller's age threshold; a lower bound on age only, never an upper one).
-- Cost: driven by the partial index on pending steps, then primary-key and edge-index look-ups;
-- it never scans finished work.
-- A namespace matches a pattern when equal to it, or, for a pattern ending in '*', when it
-- starts with what precedes the '*'.
CREATE FUNCTION tasker.namespace_matches(p_namespace text, p_patterns text[]) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT p_patterns IS NULL OR EXISTS (
        SELECT 1 FROM unnest(p_patterns) p
        WHERE CASE WHEN right(p, 1) = '*' THEN starts_with(p_namespace, left(p, -1))
                   ELSE p_namespace = p END)
$$;

CREATE FUNCTION tasker.ready_tasks(
    p_namespaces text[] DEFAULT NULL,
    p_limit integer DEFAULT 100,
    p_ready_before timestamptz DEFAULT 'infinity',
    p_offset integer DEFAULT 0
)
RETURNS TABLE (
    task_uuid uuid,
    namespace text,
    priority integer,
    computed_priority integer,
    ready_steps integer,
    ready_since timestamptz,
    task_state text
)
LANGUAGE sql STABLE AS $$
    WITH ready AS (
        SELECT r.task_uuid, r.ready_since AS since
        FROM tasker.ready_among(ARRAY(
            SELECT s.step_uuid FROM tasker.workflow_steps s
            WHERE s.state = 'pending' AND s.attempts < s.max_attempts)) r
    ),
    per_task AS (
        SELECT r.task_uuid, count(*)::int AS n, min(r.since) AS since
        FROM ready r
        GROUP BY r.task_uuid
    )
    SELECT t.task_uuid, t.namespace, t.priority,
           tasker.computed_priority(t.priority, pt.since) AS cp,
           pt.n, pt.since, t.state
    FROM per_task pt
    JOIN tasker.tasks t ON t.task_uuid = pt.task_uuid
    WHERE t.state IN ('pending', 'in_progress')
      AND tasker.namespace_matches(t.namespace, p_namespaces)
      AND pt.since < p_ready_before
    ORDER BY cp DESC, pt.since, t.task_uuid
    LIMIT p_limit OFFSET p_offset
$$;

-- Notification triggers: the database announces readiness the moment it changes.
--
-- Channels (payloads are small JSON documents, far below the 8000-byte limit):
--   tasker_task_ready, tasker_task_ready.<namespace>    a step became ready (TaskReady)
--   tasker_task_state, tasker_task_state.<namespace>    a task changed state (TaskStateChange)
--   tasker_namespace_created                            a namespace was created
--
-- The ready check looks only at the children of the step that changed (is every parent of
-- each child complete?), never at the whole task: O(children x parents), index-backed.
-- NOTIFY is delivered at commit, so a listener never hears of a state it cannot yet read.
-- When a request carries a W3C trace context it sets `tasker.traceparent` for its transaction
-- and the payload carries it on, so the trace follows the hop through the database.

CREATE FUNCTION tasker.current_traceparent() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT nullif(current_setting('tasker.traceparent', true), '')
$$;

CREATE FUNCTION tasker.send_task_ready(
    p_task_uuid uuid, p_ready_steps integer, p_triggered_by text,
    p_step_uuid uuid, p_step_state text
) RETURNS void
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_task record;
    v_payload jsonb;
    v_traceparent text := tasker.current_traceparent();
BEGIN
    SELECT t.namespace, t.priority, t.state INTO v_task FROM tasker.tasks t WHERE t.task_uuid = p_task_uuid;
    -- a finished or cancelled task has nothing to enqueue
    IF NOT FOUND OR v_task.state NOT IN ('pending', 'in_progress') THEN
        RETURN;
    END IF;
    v_payload := jsonb_build_object(
        'task_uuid', p_task_uuid,
        'namespace', v_task.namespace,
        'priority', v_task.priority,
        'ready_steps', p_ready_steps,
        'triggered_by', p_triggered_by,
        'step_uuid', p_step_uuid,
        'step_state', p_step_state,
        'task_state', v_task.state);
    IF v_traceparent IS NOT NULL THEN
        v_payload := v_payload || jsonb_build_object('traceparent', left(v_traceparent, 128));
    END IF;
    PERFORM pg_notify('tasker_task_ready', v_payload::text);
    PERFORM pg_notify('tasker_task_ready.' || v_task.namespace, v_payload::text);
END
$$;

CREATE FUNCTION tasker.notify_task_ready_on_step_transition() RETURNS trigger
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_ready integer;
BEGIN
    IF NEW.state IN ('complete', 'resolved_manually') THEN
        -- only the children of this step are judged
        SELECT count(*) INTO v_ready
        FROM tasker.ready_among(ARRAY(
            SELECT e.child_step_uuid FROM tasker.step_edges e WHERE e.parent_step_uuid = NEW.step_uuid));
    ELSIF NEW.state = 'pending' AND OLD.state = 'waiting_for_retry' THEN
        -- back from a retry backoff: the step itself is what became ready
        SELECT count(*) INTO v_ready FROM tasker.ready_among(ARRAY[NEW.step_uuid]);
    ELSE
        RETURN NULL;
    END IF;
    IF v_ready > 0 THEN
        PERFORM tasker.send_task_ready(NEW.task_uuid, v_ready, 'step_transition', NEW.step_uuid, NEW.state);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER workflow_steps_notify_ready AFTER UPDATE OF state ON tasker.workflow_steps
    FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state
          AND (NEW.state IN ('complete', 'resolved_manually')
               OR (NEW.state = 'pending' AND OLD.state = 'waiting_for_retry')))
    EXECUTE FUNCTION tasker.notify_task_ready_on_step_transition();

-- A new task's steps and edges are written after the task row, so the check runs at commit
-- (deferred constraint trigger), when the whole DAG is there.
CREATE FUNCTION tasker.notify_task_start() RETURNS trigger
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_ready integer;
BEGIN
    SELECT count(*) INTO v_ready FROM tasker.ready_steps_of_task(NEW.task_uuid);
    IF v_ready > 0 THEN
        PERFORM tasker.send_task_ready(NEW.task_uuid, v_ready, 'task_start', NULL, NULL);
    END IF;
    RETURN NULL;
END
$$;
CREATE CONSTRAINT TRIGGER tasks_notify_start AFTER INSERT ON tasker.tasks
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION tasker.notify_task_start();

CREATE FUNCTION tasker.notify_task_state_change() RETURNS trigger
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_payload jsonb := jsonb_build_object(
        'task_uuid', NEW.task_uuid,
        'namespace', NEW.namespace,
        'priority', NEW.priority,
        'from_state', OLD.state,
        'to_state', NEW.state);
    v_traceparent text := tasker.current_traceparent();
BEGIN
    IF v_traceparent IS NOT NULL THEN
        v_payload := v_payload || jsonb_build_object('traceparent', left(v_traceparent, 128));
    END IF;
    PERFORM pg_notify('tasker_task_state', v_payload::text);
    PERFORM pg_notify('tasker_task_state.' || NEW.namespace, v_payload::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER tasks_notify_state AFTER UPDATE OF state ON tasker.tasks
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION tasker.notify_task_state_change();

CREATE FUNCTION tasker.notify_namespace_created() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tasker_namespace_created', jsonb_build_object('namespace', NEW.name)::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER namespaces_notify_created AFTER INSERT ON tasker.namespaces
    FOR EACH ROW EXECUTE FUNCTION tasker.notify_namespace_created();

-- Operations: every state-changing action of the service is one function, so each is one
-- round trip and one transaction. Outcomes are returned as text codes (never raised) when they
-- are a normal answer to a caller (a stale attempt, a task claimed by another instance); the
-- service maps them to gRPC status codes.

-- Create a task with its DAG. p_steps is a JSON array of
--   {"step_uuid": uuid, "name": text, "depends_on": [text], "max_attempts": int,
--    "retryable": bool, "inputs": object}
-- The service validates the DAG first; the database still refuses unknown dependencies
-- (TK004), duplicate names (unique violation) and cycles (TK003). An idempotency key that
-- already names a task in the namespace returns that task (created = false) and writes nothing.
CREATE FUNCTION tasker.create_task(
    p_task_uuid uuid, p_namespace text, p_name text, p_priority integer, p_context jsonb,
    p_idempotency_key text, p_steps jsonb, p_metadata jsonb DEFAULT '{}'::jsonb
)
RETURNS TABLE (task_uuid uuid, created boolean, step_name text, step_uuid uuid)
LANGUAGE plpgsql AS $$
DECLARE
    v_existing uuid;
    v_missing text;
BEGIN
    PERFORM set_config('tasker.transition_metadata', p_metadata::text, true);
    INSERT INTO tasker.namespaces (name) VALUES (p_namespace) ON CONFLICT DO NOTHING;

    INSERT INTO tasker.tasks AS t (task_uuid, namespace, name, priority, context, idempotency_key)
    VALUES (p_task_uuid, p_namespace, p_name, p_priority, coalesce(p_context, '{}'::jsonb), p_idempotency_key)
    ON CONFLICT ON CONSTRAINT tasks_idempotency_key_unique DO NOTHING;
    IF NOT FOUND THEN
        SELECT t.task_uuid INTO v_existing FROM tasker.tasks t
        WHERE t.namespace = p_namespace AND t.idempotency_key = p_idempotency_key;
        RETURN QUERY SELECT v_existing, false, s.name, s.step_uuid
            FROM tasker.workflow_steps s WHERE s.task_uuid = v_existing ORDER BY s.created_at, s.name;
        RETURN;
    END IF;

    INSERT INTO tasker.workflow_steps (step_uuid, task_uuid, name, max_attempts, retryable, inputs)
    SELECT (e->>'step_uuid')::uuid, p_task_uuid, e->>'name',
           coalesce((e->>'max_attempts')::int, 3), coalesce((e->>'retryable')::boolean, true),
           coalesce(e->'inputs', '{}'::jsonb)
    FROM jsonb_array_elements(p_steps) WITH ORDINALITY AS x(e, i)
    ORDER BY i;

    SELECT d.dep INTO v_missing
    FROM jsonb_array_elements(p_steps) e, jsonb_array_elements_text(coalesce(e->'depends_on', '[]'::jsonb)) d(dep)
    WHERE NOT EXISTS (SELECT 1 FROM jsonb_array_elements(p_steps) o WHERE o->>'name' = d.dep)
    LIMIT 1;
    IF v_missing IS NOT NULL THEN
        RAISE EXCEPTION 'unknown dependency %', quote_literal(v_missing) USING ERRCODE = 'TK004';
    END IF;

    INSERT INTO tasker.step_edges (task_uuid, parent_step_uuid, child_step_uuid)
    SELECT DISTINCT p_task_uuid, (p->>'step_uuid')::uuid, (c->>'step_uuid')::uuid
    FROM jsonb_array_elements(p_steps) c,
         jsonb_array_elements_text(coalesce(c->'depends_on', '[]'::jsonb)) d(dep),
         jsonb_array_elements(p_steps) p
    WHERE p->>'name' = d.dep;

    RETURN QUERY SELECT p_task_uuid, true, s.name, s.step_uuid
        FROM tasker.workflow_steps s WHERE s.task_uuid = p_task_uuid ORDER BY s.created_at, s.name;
END
$$;

-- Claim a task and enqueue every ready step, in one transaction.
--
-- Claim: the task row lock, taken with SKIP LOCKED. A task locked by another instance's
-- enqueuer answers 'claimed_elsewhere' at once; the caller retries shortly, because the
-- holder's snapshot may predate a completion that made more steps ready.
-- Exactly once: the CAS pending -> enqueued plus the unique (step_uuid, attempt) queue key.
-- Durability: synchronous_commit = off for this transaction only. Enqueue state is derivable:
-- if a crash loses the commit, the steps are still pending and ready, and the startup sweep or
-- the fallback poller enqueues them again. Anything that depends on the enqueue (a worker's
-- fetch, a completion) commits synchronously later, which flushes the WAL up to and including
-- this commit, so nothing durable can ever rest on a lost enqueue.
CREATE FUNCTION tasker.enqueue_ready_steps(p_task_uuid uuid, p_metadata jsonb DEFAULT '{}'::jsonb)
RETURNS TABLE (outcome text, namespace text, priority integer, enqueued_steps uuid[],
               max_ready_wait_ms double precision)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_task record;
    v_ready record;
    v_attempt integer;
    v_enqueued_at timestamptz;
    v_steps uuid[] := '{}';
    v_wait double precision;
    v_traceparent text := left(tasker.current_traceparent(), 128);
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM set_config('tasker.transition_metadata', p_metadata::text, true);

    SELECT t.namespace, t.priority, t.state INTO v_task
    FROM tasker.tasks t WHERE t.task_uuid = p_task_uuid
    FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        IF EXISTS (SELECT 1 FROM tasker.tasks t WHERE t.task_uuid = p_task_uuid) THEN
            RETURN QUERY SELECT 'claimed_elsewhere'::text, NULL::text, NULL::integer, '{}'::uuid[], NULL::float8;
        ELSE
            RETURN QUERY SELECT 'task_not_found'::text, NULL::text, NULL::integer, '{}'::uuid[], NULL::float8;
        END IF;
        RETURN;
    END IF;
    IF v_task.state NOT IN ('pending', 'in_progress') THEN
        RETURN QUERY SELECT 'task_not_active'::text, v_task.namespace, v_task.priority, '{}'::uuid[], NULL::float8;
        RETURN;
    END IF;

    FOR v_ready IN
        SELECT r.step_uuid, r.ready_since FROM tasker.ready_steps_of_task(p_task_uuid) r
        ORDER BY r.created_at, r.step_uuid
    LOOP
        UPDATE tasker.workflow_steps s
        SET state = 'enqueued', attempts = s.attempts + 1, enqueued_at = clock_timestamp(),
            next_retry_at = NULL
        WHERE s.step_uuid = v_ready.step_uuid AND s.state = 'pending'
        RETURNING s.attempts, s.enqueued_at INTO v_attempt, v_enqueued_at;
        CONTINUE WHEN NOT FOUND;
        INSERT INTO tasker.step_queue (namespace, task_uuid, step_uuid, attempt, priority, traceparent)
        VALUES (v_task.namespace, p_task_uuid, v_ready.step_uuid, v_attempt, v_task.priority, v_traceparent);
        v_steps := v_steps || v_ready.step_uuid;
        -- ready_since is when the step's last parent completed (or its backoff ended): the
        -- wait from there to enqueued_at is the completion -> enqueue latency reported
        v_wait := greatest(v_wait, extract(epoch FROM v_enqueued_at - v_ready.ready_since) * 1000);
    END LOOP;

    IF cardinality(v_steps) = 0 THEN
        RETURN QUERY SELECT 'nothing_ready'::text, v_task.namespace, v_task.priority, v_steps, NULL::float8;
        RETURN;
    END IF;
    IF v_task.state = 'pending' THEN
        UPDATE tasker.tasks t SET state = 'in_progress' WHERE t.task_uuid = p_task_uuid AND t.state = 'pending';
    END IF;
    RETURN QUERY SELECT 'enqueued'::text, v_task.namespace, v_task.priority, v_steps, v_wait;
END
$$;

-- Lease up to p_max steps of a namespace to a worker: enqueued -> in_progress, message
-- invisible until the lease expires.
CREATE FUNCTION tasker.fetch_steps(p_namespace text, p_worker_id text, p_max integer, p_lease_ms bigint)
RETURNS TABLE (
    step_uuid uuid, task_uuid uuid, name text, attempt integer, inputs jsonb,
    parent_results jsonb, lease_expires_at timestamptz, enqueued_at timestamptz, traceparent text
)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_msg record;
    v_q record;
    v_s record;
BEGIN
    FOR v_msg IN
        SELECT q.msg_id
        FROM tasker.step_queue q
        WHERE q.namespace = p_namespace AND q.leased_by IS NULL
        ORDER BY q.priority DESC, q.msg_id
        LIMIT p_max
        FOR UPDATE SKIP LOCKED
    LOOP
        UPDATE tasker.step_queue q
        SET leased_by = p_worker_id,
            visible_at = clock_timestamp() + make_interval(secs => p_lease_ms / 1000.0),
            read_count = q.read_count + 1
        WHERE q.msg_id = v_msg.msg_id
        RETURNING q.step_uuid, q.attempt, q.visible_at, q.enqueued_at, q.traceparent INTO v_q;
        UPDATE tasker.workflow_steps s
        SET state = 'in_progress', started_at = clock_timestamp()
        WHERE s.step_uuid = v_q.step_uuid AND s.state = 'enqueued' AND s.attempts = v_q.attempt
        RETURNING s.task_uuid, s.name, s.inputs INTO v_s;
        CONTINUE WHEN NOT FOUND;
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
        RETURN NEXT;
    END LOOP;
END
$$;

-- Why an attempt cannot be acted on, or NULL when the caller holds a live lease on it.
-- Locks the step row. Outcomes: step_not_found, not_in_progress, stale_attempt, lease_expired.
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

-- The task of a step, with the task's progress lock taken (see lock_task_progress).
CREATE FUNCTION tasker.lock_progress_of_step(p_step_uuid uuid) RETURNS uuid
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_task uuid;
BEGIN
    SELECT s.task_uuid INTO v_task FROM tasker.workflow_steps s WHERE s.step_uuid = p_step_uuid;
    IF FOUND THEN
        PERFORM tasker.lock_task_progress(v_task);
    END IF;
    RETURN v_task;
END
$$;

-- Finish the task when no step is left to do. Caller holds the task's progress lock.
CREATE FUNCTION tasker.complete_task_if_done(p_task_uuid uuid) RETURNS void
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM tasker.workflow_steps s
                   WHERE s.task_uuid = p_task_uuid AND s.state NOT IN ('complete', 'resolved_manually')) THEN
        UPDATE tasker.tasks t SET state = 'complete', completed_at = clock_timestamp()
        WHERE t.task_uuid = p_task_uuid AND t.state = 'in_progress';
    END IF;
END
$$;

CREATE FUNCTION tasker.complete_step(
    p_step_uuid uuid, p_attempt integer, p_results jsonb, p_metadata jsonb DEFAULT '{}'::jsonb
) RETURNS text
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_task uuid := tasker.lock_progress_of_step(p_step_uuid);
    v_problem text := tasker.check_live_lease(p_step_uuid, p_attempt);
BEGIN
    IF v_problem IS NOT NULL THEN RETURN v_problem; END IF;
    PERFORM set_config('tasker.transition_metadata', p_metadata::text, true);
    DELETE FROM tasker.step_queue q WHERE q.step_uuid = p_step_uuid AND q.attempt = p_attempt;
    UPDATE tasker.workflow_steps s
    SET state = 'complete', results = coalesce(p_results, '{}'::jsonb), completed_at = clock_timestamp()
    WHERE s.step_uuid = p_step_uuid AND s.state = 'in_progress' AND s.attempts = p_attempt;
    PERFORM tasker.complete_task_if_done(v_task);
    RETURN 'completed';
END
$$;

-- The end of a failed attempt (the caller checked the lease and holds the progress lock):
-- retry after the backoff when attempts remain and both the step and the failure allow it,
-- otherwise the step is in error and so is its task. A zero backoff returns the step to
-- pending at once, which notifies like any other readiness change.
CREATE FUNCTION tasker.record_attempt_failure(
    p_step_uuid uuid, p_error jsonb, p_retryable boolean, p_backoff_ms bigint
) RETURNS TABLE (outcome text, next_retry_at timestamptz)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_step record;
    v_next timestamptz;
BEGIN
    SELECT s.task_uuid, s.attempts, s.max_attempts, s.retryable INTO v_step
    FROM tasker.workflow_steps s WHERE s.step_uuid = p_step_uuid;
    DELETE FROM tasker.step_queue q WHERE q.step_uuid = p_step_uuid AND q.attempt = v_step.attempts;
    IF p_retryable AND v_step.retryable AND v_step.attempts < v_step.max_attempts THEN
        -- a zero backoff is due at once by the readiness clock (the transaction start)
        v_next := CASE WHEN p_backoff_ms <= 0 THEN now()
                       ELSE clock_timestamp() + make_interval(secs => p_backoff_ms / 1000.0) END;
        UPDATE tasker.workflow_steps s
        SET state = 'waiting_for_retry', last_error = p_error, next_retry_at = v_next
        WHERE s.step_uuid = p_step_uuid AND s.state = 'in_progress';
        IF p_backoff_ms <= 0 THEN
            UPDATE tasker.workflow_steps s SET state = 'pending'
            WHERE s.step_uuid = p_step_uuid AND s.state = 'waiting_for_retry';
        END IF;
        RETURN QUERY SELECT 'retry_scheduled'::text, v_next;
    ELSE
        UPDATE tasker.workflow_steps s
        SET state = 'error', last_error = p_error, completed_at = clock_timestamp()
        WHERE s.step_uuid = p_step_uuid AND s.state = 'in_progress';
        UPDATE tasker.tasks t SET state = 'error', completed_at = clock_timestamp()
        WHERE t.task_uuid = v_step.task_uuid AND t.state = 'in_progress';
        RETURN QUERY SELECT 'failed'::text, NULL::timestamptz;
    END IF;
END
$$;

CREATE FUNCTION tasker.fail_step(
    p_step_uuid uuid, p_attempt integer, p_error jsonb, p_retryable boolean, p_backoff_ms bigint,
    p_metadata jsonb DEFAULT '{}'::jsonb
) RETURNS TABLE (outcome text, next_retry_at timestamptz)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_task uuid := tasker.lock_progress_of_step(p_step_uuid);
    v_problem text := tasker.check_live_lease(p_step_uuid, p_attempt);
BEGIN
    IF v_problem IS NOT NULL THEN
        RETURN QUERY SELECT v_problem, NULL::timestamptz;
        RETURN;
    END IF;
    PERFORM set_config('tasker.transition_metadata', p_metadata::text, true);
    RETURN QUERY SELECT * FROM tasker.record_attempt_failure(p_step_uuid, p_error, p_retryable, p_backoff_ms);
END
$$;

CREATE FUNCTION tasker.extend_lease(p_step_uuid uuid, p_attempt integer, p_lease_ms bigint)
RETURNS TABLE (outcome text, lease_expires_at timestamptz)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_problem text := tasker.check_live_lease(p_step_uuid, p_attempt);
    v_until timestamptz;
BEGIN
    IF v_problem IS NOT NULL THEN
        RETURN QUERY SELECT v_problem, NULL::timestamptz;
        RETURN;
    END IF;
    UPDATE tasker.step_queue q
    SET visible_at = clock_timestamp() + make_interval(secs => p_lease_ms / 1000.0)
    WHERE q.step_uuid = p_step_uuid AND q.attempt = p_attempt
    RETURNING q.visible_at INTO v_until;
    RETURN QUERY SELECT 'extended'::text, v_until;
END
$$;

-- Steps whose retry backoff has elapsed go back to pending (the trigger then notifies).
-- p_namespaces: NULL for all, or namespace patterns (see namespace_matches).
CREATE FUNCTION tasker.promote_due_retries(p_limit integer DEFAULT 500, p_namespaces text[] DEFAULT NULL)
RETURNS TABLE (task_uuid uuid, step_uuid uuid, namespace text, priority integer)
LANGUAGE sql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
    WITH due AS (
        SELECT s.step_uuid FROM tasker.workflow_steps s
        JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
        WHERE s.state = 'waiting_for_retry' AND s.next_retry_at <= now()
          AND tasker.namespace_matches(t.namespace, p_namespaces)
        ORDER BY s.next_retry_at
        LIMIT p_limit
        FOR UPDATE OF s SKIP LOCKED
    )
    UPDATE tasker.workflow_steps s SET state = 'pending'
    FROM due, tasker.tasks t
    WHERE s.step_uuid = due.step_uuid AND s.state = 'waiting_for_retry' AND t.task_uuid = s.task_uuid
    RETURNING s.task_uuid, s.step_uuid, t.namespace, t.priority
$$;

-- Leases that ran out end their attempt as a retryable failure with no backoff: the worker
-- is presumed dead. max_attempts still applies.
CREATE FUNCTION tasker.expire_leases(p_limit integer DEFAULT 500, p_namespaces text[] DEFAULT NULL)
RETURNS TABLE (task_uuid uuid, step_uuid uuid, outcome text, namespace text, priority integer)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_msg record;
    v_outcome text;
BEGIN
    PERFORM set_config('tasker.transition_metadata', '{"reason":"lease_expired"}', true);
    FOR v_msg IN
        SELECT q.task_uuid, q.step_uuid, q.attempt, q.leased_by, q.namespace, q.priority FROM tasker.step_queue q
        WHERE q.leased_by IS NOT NULL AND q.visible_at <= clock_timestamp()
          AND tasker.namespace_matches(q.namespace, p_namespaces)
        ORDER BY q.visible_at
        LIMIT p_limit
    LOOP
        PERFORM tasker.lock_task_progress(v_msg.task_uuid);
        -- re-check under the lock: the worker may have answered in the meantime
        IF tasker.check_live_lease(v_msg.step_uuid, v_msg.attempt) = 'lease_expired'
           AND EXISTS (SELECT 1 FROM tasker.step_queue q WHERE q.step_uuid = v_msg.step_uuid AND q.attempt = v_msg.attempt)
        THEN
            SELECT f.outcome INTO v_outcome FROM tasker.record_attempt_failure(
                v_msg.step_uuid,
                jsonb_build_object('message', 'lease expired', 'worker_id', v_msg.leased_by),
                true, 0) f;
            RETURN QUERY SELECT v_msg.task_uuid, v_msg.step_uuid, v_outcome, v_msg.namespace, v_msg.priority;
        END IF;
    END LOOP;
END
$$;

-- The earliest moment at which a retry becomes due or a lease runs out: the service sleeps
-- until then instead of waiting for the next fallback poll.
CREATE FUNCTION tasker.next_deadline(p_namespaces text[] DEFAULT NULL) RETURNS timestamptz
LANGUAGE sql STABLE
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
    SELECT least(
        (SELECT min(s.next_retry_at) FROM tasker.workflow_steps s JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
         WHERE s.state = 'waiting_for_retry' AND s.next_retry_at IS NOT NULL
           AND tasker.namespace_matches(t.namespace, p_namespaces)),
        (SELECT min(q.visible_at) FROM tasker.step_queue q
         WHERE q.leased_by IS NOT NULL AND tasker.namespace_matches(q.namespace, p_namespaces)))
$$;

CREATE FUNCTION tasker.cancel_task(p_task_uuid uuid, p_reason text, p_metadata jsonb DEFAULT '{}'::jsonb)
RETURNS text
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_state text;
BEGIN
    PERFORM tasker.lock_task_progress(p_task_uuid);
    PERFORM set_config('tasker.transition_metadata',
        (coalesce(p_metadata, '{}'::jsonb) || jsonb_build_object('reason', p_reason))::text, true);
    SELECT t.state INTO v_state FROM tasker.tasks t WHERE t.task_uuid = p_task_uuid FOR UPDATE;
    IF NOT FOUND THEN RETURN 'task_not_found'; END IF;
    IF v_state NOT IN ('pending', 'in_progress', 'error') THEN RETURN 'task_already_final'; END IF;
    UPDATE tasker.tasks t SET state = 'cancelled', completed_at = clock_timestamp()
    WHERE t.task_uuid = p_task_uuid;
    UPDATE tasker.workflow_steps s SET state = 'cancelled', completed_at = clock_timestamp()
    WHERE s.task_uuid = p_task_uuid AND s.state IN ('pending', 'enqueued', 'in_progress', 'waiting_for_retry');
    DELETE FROM tasker.step_queue q WHERE q.task_uuid = p_task_uuid;
    RETURN 'cancelled';
END
$$;

-- An operator marks a step as done by hand; it counts as complete for its dependents. A task
-- in error goes back to in_progress once no failed step is left.
CREATE FUNCTION tasker.resolve_step_manually(
    p_step_uuid uuid, p_reason text, p_results jsonb DEFAULT NULL, p_metadata jsonb DEFAULT '{}'::jsonb
) RETURNS text
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_task uuid := tasker.lock_progress_of_step(p_step_uuid);
    v_state text;
BEGIN
    IF v_task IS NULL THEN RETURN 'step_not_found'; END IF;
    PERFORM set_config('tasker.transition_metadata',
        (coalesce(p_metadata, '{}'::jsonb) || jsonb_build_object('reason', p_reason))::text, true);
    SELECT s.state INTO v_state FROM tasker.workflow_steps s WHERE s.step_uuid = p_step_uuid FOR UPDATE;
    IF NOT tasker.step_transition_allowed(v_state, 'resolved_manually') THEN RETURN 'illegal_transition'; END IF;
    -- reopen first, so that the readiness trigger sees an active task
    IF NOT EXISTS (SELECT 1 FROM tasker.workflow_steps s
                   WHERE s.task_uuid = v_task AND s.state = 'error' AND s.step_uuid <> p_step_uuid) THEN
        UPDATE tasker.tasks t SET state = 'in_progress', completed_at = NULL
        WHERE t.task_uuid = v_task AND t.state = 'error';
    END IF;
    UPDATE tasker.workflow_steps s
    SET state = 'resolved_manually', results = coalesce(p_results, s.results), completed_at = clock_timestamp()
    WHERE s.step_uuid = p_step_uuid;
    PERFORM tasker.complete_task_if_done(v_task);
    RETURN 'resolved';
END
$$;

-- Many completions in one transaction (one commit, one pass through the NOTIFY commit lock).
-- Each item is exactly tasker.complete_step, with its own trace context; items are taken in
-- task order so that two batches never wait on each other's progress locks in a cycle.
-- Returns each item's outcome by its position in the input arrays.
CREATE FUNCTION tasker.complete_steps(
    p_steps uuid[], p_attempts integer[], p_results jsonb[], p_traceparents text[],
    p_metadata jsonb DEFAULT '{}'::jsonb
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
        RETURN QUERY SELECT v_item.ord,
            tasker.complete_step(v_item.step_uuid, p_attempts[v_item.ord], p_results[v_item.ord], p_metadata);
    END LOOP;
END
$$;

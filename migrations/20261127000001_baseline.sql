-- Tasker's baseline schema. Migrations are append-only from here on: sqlx checksums every
-- applied file, so a change is a new migration, never an edit of this one.
--
-- Sections, in order: schema; state machine and history; readiness; notifications;
-- operations. Every function is defined once, here, with its settings inline.
--
-- What a hop costs. A completion and the enqueue it causes do work proportional to the
-- completed step's children and to the steps that became ready, never to the size of the
-- task or of the database:
--   * each step counts its unfinished parents (`unfinished_parents`); a completion decrements
--     its children's counters, and a child whose counter reaches 0 is ready;
--   * "ready" is `state = 'pending' AND unfinished_parents = 0`; the ready steps are also
--     rows of `ready_steps`, the ready set, which the enqueue's look-up and the poller's scan
--     read (they never walk what is pending but blocked);
--   * each task counts its remaining steps; the completion that brings it to 0 finishes it.
-- Changes to one task's steps are ordered by a lock on its task row, so two parents of a join
-- completing at once see each other's decrement and the join is announced exactly once.
--
-- Plans that cannot drift. PL/pgSQL caches a generic plan per statement and session, costed
-- with the statistics of the moment: a service started on an empty database would keep plans
-- made for empty tables (with autovacuum off, nothing invalidates them; measured in a soak:
-- sequential scans of workflow_steps for one step's parents, the completion -> enqueue p50
-- rising from 3 ms to seconds). So every statement on the hot path touches a handful of rows
-- by key and is written so that its right plan is its only sensible one:
--   1. single-table statements with an equality on a unique key, or a walk of the one index
--      made for them; joins run as a key probe per outer row;
--   2. no statement's WHERE implies the predicate of a partial index it should not use;
--   3. hot functions plan with sequential, bitmap, hash-join and merge-join paths off (the
--      `SET` clauses in their definitions; they hold while the function runs). The test
--      `hot_path_functions_keep_their_planner_settings` fails if one loses them.
-- Reporting functions that read a whole task (step_readiness, task_execution_context) and
-- create_task keep the planner's own choice.

-- States (ARCHITECTURE.md):
--   step: pending -> enqueued -> in_progress -> complete
--         in_progress -> waiting_for_retry -> pending       (retry with backoff)
--         in_progress -> error                              (attempts exhausted / not retryable)
--         cancelled, resolved_manually (counts as complete for dependents)
--   task: pending -> in_progress -> complete | error | cancelled
-- The legal transitions are enforced by the triggers below; one CHECK constraint per table
-- keeps the state vocabulary closed and the numbers in range. One, not one per column: every
-- INSERT and UPDATE reads each CHECK expression back from its stored form and prepares it, and
-- seven of them on the step table were 7 % of the database's time per hop (measured).

CREATE SCHEMA IF NOT EXISTS tasker;

-- Namespace names are short and plain so that a channel `<prefix>.<namespace>` always fits
-- PostgreSQL's 63-byte identifier limit (the longest prefix in use is 18 bytes) and needs no
-- quoting: at most 45 bytes of [a-z0-9_-].
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
    name             text NOT NULL,
    priority         integer NOT NULL DEFAULT 0,
    state            text NOT NULL DEFAULT 'pending',
    -- steps not yet complete or resolved manually: the completion that brings it to 0
    -- finishes the task, without looking at its other steps
    remaining_steps  integer NOT NULL,
    context          jsonb NOT NULL DEFAULT '{}'::jsonb,
    idempotency_key  text,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    completed_at     timestamptz,
    CONSTRAINT tasks_idempotency_key_unique UNIQUE (namespace, idempotency_key),
    CONSTRAINT tasks_valid CHECK (
        length(name) BETWEEN 1 AND 255
        AND priority BETWEEN -1000 AND 1000
        AND state IN ('pending', 'in_progress', 'complete', 'error', 'cancelled')
        AND remaining_steps >= 0
        AND (idempotency_key IS NULL OR length(idempotency_key) BETWEEN 1 AND 255))
);

CREATE TABLE tasker.workflow_steps (
    step_uuid           uuid PRIMARY KEY,
    task_uuid           uuid NOT NULL REFERENCES tasker.tasks (task_uuid),
    name                text NOT NULL,
    -- the step's place in a topological order of its task (parents come first), computed by
    -- the service; every edge must go from a lower position to a higher one, which rules out
    -- cycles with one comparison per edge
    position            integer NOT NULL,
    state               text NOT NULL DEFAULT 'pending',
    -- parents not yet complete or resolved manually; 0 and pending means ready
    unfinished_parents  integer NOT NULL,
    -- bytes of the parent results this step will be leased with (each finished parent's name
    -- and results as JSON text), so that a completion which would take a child past the
    -- service's budget is refused before anything changes
    parent_results_bytes integer NOT NULL DEFAULT 0,
    -- when the step last became ready: created without parents, its last parent finished, or
    -- its retry came due
    ready_at            timestamptz,
    -- attempts counts enqueues: attempt N of a step is the N-th time it was put on the queue
    attempts            integer NOT NULL DEFAULT 0,
    max_attempts        integer NOT NULL DEFAULT 3,
    retryable           boolean NOT NULL DEFAULT true,
    next_retry_at       timestamptz,
    inputs              jsonb NOT NULL DEFAULT '{}'::jsonb,
    results             jsonb,
    last_error          jsonb,
    created_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    enqueued_at         timestamptz,
    started_at          timestamptz,
    completed_at        timestamptz,
    CONSTRAINT workflow_steps_name_unique UNIQUE (task_uuid, name),
    -- target of the edge foreign keys that keep both ends of an edge in one task
    CONSTRAINT workflow_steps_task_step_unique UNIQUE (task_uuid, step_uuid),
    CONSTRAINT workflow_steps_valid CHECK (
        length(name) BETWEEN 1 AND 255
        AND position >= 0
        AND state IN ('pending', 'enqueued', 'in_progress', 'complete', 'waiting_for_retry',
                      'error', 'cancelled', 'resolved_manually')
        AND unfinished_parents >= 0
        AND max_attempts BETWEEN 1 AND 100
        AND attempts BETWEEN 0 AND max_attempts)
);
-- Steps with a retry due time. The predicate does not name `state`: no index of this table
-- depends on a column that the transitions of a hop change (state, attempts, the parents'
-- counter, timestamps, results), so those updates are HOT (no index entries written, the old
-- version pruned in place), with the room fillfactor 80 leaves on each page.
CREATE INDEX workflow_steps_retry_due_idx ON tasker.workflow_steps (next_retry_at)
    WHERE next_retry_at IS NOT NULL;

-- The ready set: one row per step that is ready (pending, no unfinished parent) and not yet
-- enqueued. A step enters it when it becomes ready (created without parents, its last parent
-- finished, its retry came due) and leaves it when it is enqueued, cancelled or resolved. The
-- enqueue's look-up for a task and the poller's scan of the whole database read what is ready
-- and nothing else. (A partial index on workflow_steps would do the same, but its predicate
-- would make every state change of every step write a new version to every index.)
CREATE TABLE tasker.ready_steps (
    step_uuid  uuid PRIMARY KEY,
    task_uuid  uuid NOT NULL,
    ready_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX ready_steps_task_idx ON tasker.ready_steps (task_uuid);

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

-- Append-only history. Rows are written by the history triggers below, never updated. No
-- foreign keys on the history and queue tables: their rows are written only by the triggers
-- and functions below, from the row they have just changed, and a foreign key would add a
-- look-up and a row lock on the step to every transition of every hop (measured: history
-- inserts were a fifth of the database's time per step).
CREATE TABLE tasker.step_transitions (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    step_uuid   uuid NOT NULL,
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
    task_uuid   uuid NOT NULL,
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
    namespace    text NOT NULL,
    task_uuid    uuid NOT NULL,
    step_uuid    uuid NOT NULL,
    attempt      integer NOT NULL,
    priority     integer NOT NULL DEFAULT 0,
    enqueued_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    visible_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    read_count   integer NOT NULL DEFAULT 0,
    leased_by    text,
    -- W3C trace context of the enqueue, so the worker's lease continues the same trace
    traceparent  text,
    CONSTRAINT step_queue_one_message_per_attempt UNIQUE (step_uuid, attempt),
    CONSTRAINT step_queue_valid CHECK (
        attempt >= 1 AND (traceparent IS NULL OR length(traceparent) <= 128))
);
CREATE INDEX step_queue_fetch_idx ON tasker.step_queue (namespace, priority DESC, msg_id)
    WHERE leased_by IS NULL;
CREATE INDEX step_queue_lease_idx ON tasker.step_queue (visible_at) WHERE leased_by IS NOT NULL;

-- The queue is a churn table (one insert and one delete per step attempt) and steps are
-- updated several times each: vacuum them by dead-row count, not by fraction of a table that
-- stays small, and leave room on each page for HOT updates. Without this, dead tuples pile
-- up between autovacuum runs and the fetch and readiness look-ups slow down over hours.
ALTER TABLE tasker.step_queue SET (
    autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 2000,
    autovacuum_vacuum_cost_delay = 0, fillfactor = 80);
ALTER TABLE tasker.ready_steps SET (
    autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 2000,
    autovacuum_vacuum_cost_delay = 0);
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
        -- a lease handed to a fetch that had gone before it was delivered: back on the queue,
        -- same attempt (the worker never had it)
        ('in_progress', 'enqueued'),
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
AS $$
BEGIN
    IF NEW.state IS DISTINCT FROM OLD.state THEN
        IF NOT tasker.step_transition_allowed(OLD.state, NEW.state) THEN
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
CREATE TRIGGER workflow_steps_guard BEFORE UPDATE ON tasker.workflow_steps
    FOR EACH ROW EXECUTE FUNCTION tasker.workflow_steps_guard();

CREATE FUNCTION tasker.tasks_guard() RETURNS trigger
LANGUAGE plpgsql
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

-- New edges must go from a lower position to a higher one. Positions are a topological order,
-- so no edge can close a cycle: the database's own guarantee, one comparison per edge (two
-- key look-ups), whatever the shape or size of the DAG. (A recursive walk of descendants per
-- new edge cost W^4 joins for a layered DAG of width W: 8 s and 167 MiB at W = 30.)
-- CreateTask validates the DAG and computes the positions before writing.
CREATE FUNCTION tasker.step_edges_in_order() RETURNS trigger
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_edge record;
BEGIN
    SELECT n.parent_step_uuid, n.child_step_uuid INTO v_edge
    FROM new_edges n
    CROSS JOIN LATERAL (SELECT s.position FROM tasker.workflow_steps s
                        WHERE s.step_uuid = n.parent_step_uuid OFFSET 0) p
    CROSS JOIN LATERAL (SELECT s.position FROM tasker.workflow_steps s
                        WHERE s.step_uuid = n.child_step_uuid OFFSET 0) c
    WHERE p.position >= c.position
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'edge % -> % goes against the task''s order: the dependencies form a cycle',
            v_edge.parent_step_uuid, v_edge.child_step_uuid
            USING ERRCODE = 'TK003';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER step_edges_in_order AFTER INSERT ON tasker.step_edges
    REFERENCING NEW TABLE AS new_edges
    FOR EACH STATEMENT EXECUTE FUNCTION tasker.step_edges_in_order();
-- Edges are never updated: a changed edge is a different DAG.
CREATE TRIGGER step_edges_immutable BEFORE UPDATE ON tasker.step_edges
    FOR EACH ROW EXECUTE FUNCTION tasker.history_is_append_only();

-- Every change to a task's steps (completion, failure, retry, expiry, cancellation, manual
-- resolution) first locks the task's row (FOR NO KEY UPDATE), so changes to one task are
-- serialized and always take their locks in the same order (task, then steps): two
-- completions that share a child cannot deadlock, and batches take their items in task
-- order. The enqueuer's claim is a separate advisory lock (see enqueue_ready_steps), so a
-- completion never makes an enqueuer skip the task.

-- Readiness: which steps can run now, what state a task is in, which tasks have work.
--
-- A step is ready when it is pending and none of its parents is unfinished
-- (`state = 'pending' AND unfinished_parents = 0`), which is when it has a row in
-- tasker.ready_steps; its task must be pending or in_progress for it to be enqueued. A step waiting out a retry backoff is `waiting_for_retry`, not
-- pending, until the backoff ends; a pending step always has attempts left (a step out of
-- attempts ends in `error`).

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
           p.total::int,
           (p.total - s.unfinished_parents)::int,
           s.unfinished_parents = 0,
           -- another attempt may still be made for this step
           (s.state IN ('pending', 'waiting_for_retry') AND s.attempts < s.max_attempts
                AND (s.attempts = 0 OR s.retryable)),
           s.next_retry_at,
           (t.state IN ('pending', 'in_progress') AND s.state = 'pending' AND s.unfinished_parents = 0),
           CASE WHEN s.unfinished_parents = 0 THEN s.ready_at END
    FROM tasker.workflow_steps s
    JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
    CROSS JOIN LATERAL (SELECT count(*) AS total FROM tasker.step_edges e
                        WHERE e.child_step_uuid = s.step_uuid) p
    WHERE s.task_uuid = p_task_uuid
    ORDER BY s.position, s.name
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
    WITH c AS (
        SELECT count(*)::int AS total,
               count(*) FILTER (WHERE s.state = 'pending')::int AS pending,
               count(*) FILTER (WHERE s.state = 'enqueued')::int AS enqueued,
               count(*) FILTER (WHERE s.state = 'in_progress')::int AS in_progress,
               count(*) FILTER (WHERE s.state IN ('complete', 'resolved_manually'))::int AS complete,
               count(*) FILTER (WHERE s.state = 'error')::int AS failed,
               count(*) FILTER (WHERE s.state = 'waiting_for_retry')::int AS waiting,
               count(*) FILTER (WHERE s.state = 'cancelled')::int AS cancelled,
               count(*) FILTER (WHERE s.state = 'pending' AND s.unfinished_parents = 0)::int AS ready
        FROM tasker.workflow_steps s WHERE s.task_uuid = p_task_uuid
    )
    SELECT t.task_uuid, t.namespace, t.state, t.priority,
           c.total, c.pending, c.enqueued, c.in_progress, c.complete, c.failed, c.waiting,
           c.cancelled,
           CASE WHEN t.state IN ('pending', 'in_progress') THEN c.ready ELSE 0 END,
           CASE
               WHEN t.state = 'cancelled' THEN 'cancelled'
               WHEN c.total > 0 AND c.complete = c.total THEN 'all_complete'
               WHEN t.state IN ('pending', 'in_progress') AND c.ready > 0 THEN 'has_ready_steps'
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

-- A namespace matches a pattern when equal to it, or, for a pattern ending in '*', when it
-- starts with what precedes the '*'. NULL patterns: every namespace.
CREATE FUNCTION tasker.namespace_matches(p_namespace text, p_patterns text[]) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT p_patterns IS NULL OR EXISTS (
        SELECT 1 FROM unnest(p_patterns) p
        WHERE CASE WHEN right(p, 1) = '*' THEN starts_with(p_namespace, left(p, -1))
                   ELSE p_namespace = p END)
$$;

-- Tasks with at least one ready step, best first. p_namespaces: NULL for all namespaces, or
-- a list of namespace patterns (see namespace_matches). p_ready_before keeps only tasks whose
-- oldest ready step has been ready since before it (the fallback poller's age threshold; a
-- lower bound on age only, never an upper one).
-- Cost: a scan of the ready set, which holds ready steps only (in normal operation a step is
-- in it for the milliseconds between becoming ready and being enqueued), then a primary-key
-- probe per task: it reads what is ready, not what is pending or finished.
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
LANGUAGE plpgsql STABLE
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
BEGIN
    RETURN QUERY
    WITH per_task AS (
        SELECT r.task_uuid, count(*)::int AS n, min(r.ready_at) AS since
        FROM tasker.ready_steps r
        GROUP BY r.task_uuid
    )
    SELECT t.task_uuid, t.namespace, t.priority,
           tasker.computed_priority(t.priority, pt.since) AS cp,
           pt.n, pt.since, t.state
    FROM per_task pt
    CROSS JOIN LATERAL (SELECT k.task_uuid, k.namespace, k.priority, k.state FROM tasker.tasks k
                        WHERE k.task_uuid = pt.task_uuid OFFSET 0) t
    WHERE t.state IN ('pending', 'in_progress')
      AND tasker.namespace_matches(t.namespace, p_namespaces)
      AND pt.since < p_ready_before
    ORDER BY cp DESC, pt.since, t.task_uuid
    LIMIT p_limit OFFSET p_offset;
END
$$;

-- Notifications: the database announces readiness the moment it changes.
--
-- Channels (payloads are small JSON documents, far below the 8000-byte limit):
--   tasker_task_ready    steps of a task became ready: {task_uuid, namespace, triggered_by}
--   tasker_task_state    a task changed state: {task_uuid, namespace, priority, from_state, to_state}
-- One channel each: PostgreSQL's notification queue is shared, and every listening connection
-- reads every entry whatever its channel, so per-namespace channels saved a listener nothing
-- and cost a second pg_notify per event. An instance serving some namespaces filters by the
-- payload's namespace.
-- NOTIFY is delivered at commit, so a listener never hears of a state it cannot yet read.
-- When a request carries a W3C trace context it sets `tasker.traceparent` for its transaction
-- and the payload carries it on, so the trace follows the hop through the database.

CREATE FUNCTION tasker.current_traceparent() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT nullif(current_setting('tasker.traceparent', true), '')
$$;

-- Announce that steps of an active task became ready.
CREATE FUNCTION tasker.send_task_ready(p_task_uuid uuid, p_namespace text, p_triggered_by text)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_traceparent text := tasker.current_traceparent();
    v_payload jsonb := jsonb_build_object(
        'task_uuid', p_task_uuid, 'namespace', p_namespace, 'triggered_by', p_triggered_by);
BEGIN
    IF v_traceparent IS NOT NULL THEN
        v_payload := v_payload || jsonb_build_object('traceparent', left(v_traceparent, 128));
    END IF;
    PERFORM pg_notify('tasker_task_ready', v_payload::text);
END
$$;

CREATE FUNCTION tasker.notify_task_state_change() RETURNS trigger
LANGUAGE plpgsql
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
    RETURN NULL;
END
$$;
CREATE TRIGGER tasks_notify_state AFTER UPDATE OF state ON tasker.tasks
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION tasker.notify_task_state_change();

-- Replicas: each running service process keeps a row here fresh (its heartbeat). One that stops
-- heart-beating is considered gone after the service's `gone_after`; its row is removed after
-- ten times that. Nothing else depends on these rows: they say who is alive.
CREATE TABLE tasker.replicas (
    replica_id    uuid PRIMARY KEY,
    address       text NOT NULL,
    version       text NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    heartbeat_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- The fleet's deployment mode, set through any replica (SetDeploymentMode, scope fleet): every
-- replica applies it unless it has its own override; NULL leaves each to its configuration.
CREATE TABLE tasker.fleet_settings (
    singleton        boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    deployment_mode  text CHECK (deployment_mode IN ('EventDrivenOnly', 'Hybrid', 'PollingOnly')),
    changed_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Set (or with NULL clear) the fleet's mode and announce it to the listening replicas; the
-- others read it with their next heartbeat.
CREATE FUNCTION tasker.set_fleet_mode(p_mode text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO tasker.fleet_settings AS f (singleton, deployment_mode) VALUES (true, p_mode)
    ON CONFLICT (singleton) DO UPDATE SET deployment_mode = p_mode, changed_at = clock_timestamp();
    PERFORM pg_notify('tasker_fleet_mode', json_build_object('mode', p_mode)::text);
END
$$;

-- A replica's heartbeat: its row created or refreshed, long-gone rows removed; returns how many
-- other replicas are alive, and the fleet's mode. Asynchronous commit: a lost heartbeat is
-- only a late one.
CREATE FUNCTION tasker.replica_heartbeat(p_replica_id uuid, p_address text, p_version text,
                                         p_gone_after_ms bigint,
                                         OUT other_replicas integer, OUT fleet_mode text)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    INSERT INTO tasker.replicas AS r (replica_id, address, version)
    VALUES (p_replica_id, p_address, p_version)
    ON CONFLICT (replica_id) DO UPDATE SET heartbeat_at = clock_timestamp();
    DELETE FROM tasker.replicas r
    WHERE r.heartbeat_at < clock_timestamp() - make_interval(secs => p_gone_after_ms * 10 / 1000.0);
    SELECT count(*)::int INTO other_replicas FROM tasker.replicas r
    WHERE r.replica_id <> p_replica_id
      AND r.heartbeat_at >= clock_timestamp() - make_interval(secs => p_gone_after_ms / 1000.0);
    SELECT f.deployment_mode INTO fleet_mode FROM tasker.fleet_settings f;
END
$$;

-- Operations: every state-changing action of the service is one function, so each is one
-- round trip and one transaction. Outcomes are returned as text codes (never raised) when they
-- are a normal answer to a caller (a stale attempt, a task claimed by another instance); the
-- service maps them to gRPC status codes and refuses any code it does not know.

-- Create a task with its DAG. p_steps is a JSON array of
--   {"step_uuid": uuid, "name": text, "position": int, "parents": [uuid], "max_attempts": int,
--    "retryable": bool, "inputs": object}
-- in which the service has resolved dependencies by name to the parents' uuids and ordered
-- the steps topologically (`position`). The database still refuses a parent that is not a
-- step of this task (foreign key), duplicate names (unique) and an edge against the order
-- (TK003: a cycle). An idempotency key that already names a task in the namespace returns that
-- task (created = false) and writes nothing. A task in a namespace not seen before creates the
-- namespace, unless p_max_namespaces exist already (TK005; NULL: no cap).
CREATE FUNCTION tasker.create_task(
    p_task_uuid uuid, p_namespace text, p_name text, p_priority integer, p_context jsonb,
    p_idempotency_key text, p_steps jsonb, p_metadata jsonb DEFAULT '{}'::jsonb,
    p_max_namespaces integer DEFAULT NULL
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
                                   remaining_steps)
    VALUES (p_task_uuid, p_namespace, p_name, p_priority, coalesce(p_context, '{}'::jsonb),
            p_idempotency_key, jsonb_array_length(p_steps))
    ON CONFLICT ON CONSTRAINT tasks_idempotency_key_unique DO NOTHING;
    IF NOT FOUND THEN
        SELECT t.task_uuid INTO v_existing FROM tasker.tasks t
        WHERE t.namespace = p_namespace AND t.idempotency_key = p_idempotency_key;
        RETURN QUERY SELECT v_existing, false, s.name, s.step_uuid
            FROM tasker.workflow_steps s WHERE s.task_uuid = v_existing ORDER BY s.position;
        RETURN;
    END IF;

    INSERT INTO tasker.workflow_steps (step_uuid, task_uuid, name, position, unfinished_parents,
                                       ready_at, max_attempts, retryable, inputs)
    SELECT (e->>'step_uuid')::uuid, p_task_uuid, e->>'name', (e->>'position')::int, p.n,
           CASE WHEN p.n = 0 THEN clock_timestamp() END,
           coalesce((e->>'max_attempts')::int, 3), coalesce((e->>'retryable')::boolean, true),
           coalesce(e->'inputs', '{}'::jsonb)
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

-- Claim a task and enqueue every ready step, in one transaction; then lease the first of them
-- to the parked fetches in p_takers ([{"worker_id", "max", "lease_ms"}], first come first
-- served), so that a waiting worker receives its step without a transaction of its own.
-- `leased` is a JSON array of the leased steps, each with the index of its taker.
--
-- Claim: a transaction-scoped advisory lock on the task, tried without waiting. A task claimed
-- by another instance's enqueuer answers 'claimed_elsewhere' at once; the caller retries
-- shortly, because the holder's snapshot may predate a completion that made more steps ready.
-- Exactly once: the CAS pending -> enqueued plus the unique (step_uuid, attempt) queue key.
-- Cost: the ready steps of this task, taken out of the ready set by its task index; nothing
-- else of the task.
-- Durability: synchronous_commit = off for this transaction only. Enqueue state is derivable:
-- if a crash loses the commit, the steps are still pending and ready, and the startup sweep or
-- the fallback poller enqueues them again. Anything that depends on the enqueue (a completion)
-- commits synchronously later, which flushes the WAL up to and including this commit, so
-- nothing durable can ever rest on a lost enqueue.
CREATE FUNCTION tasker.enqueue_ready_steps(
    p_task_uuid uuid, p_metadata jsonb DEFAULT '{}'::jsonb, p_takers jsonb DEFAULT '[]'::jsonb,
    p_announce_as uuid DEFAULT NULL
)
RETURNS TABLE (outcome text, namespace text, priority integer, enqueued_steps uuid[],
               max_ready_wait_ms double precision, leased jsonb)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_task record;
    v_steps uuid[];
    v_wait double precision;
    v_traceparent text := left(tasker.current_traceparent(), 128);
    v_taker record;
    v_msg record;
    v_handed integer := 0;
    v_leased jsonb := '[]'::jsonb;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM set_config('tasker.transition_metadata', p_metadata::text, true);
    IF NOT pg_try_advisory_xact_lock(hashtextextended('tasker.claim:' || p_task_uuid::text, 0)) THEN
        IF EXISTS (SELECT 1 FROM tasker.tasks t WHERE t.task_uuid = p_task_uuid) THEN
            RETURN QUERY SELECT 'claimed_elsewhere'::text, NULL::text, NULL::integer, '{}'::uuid[], NULL::float8, '[]'::jsonb;
        ELSE
            RETURN QUERY SELECT 'task_not_found'::text, NULL::text, NULL::integer, '{}'::uuid[], NULL::float8, '[]'::jsonb;
        END IF;
        RETURN;
    END IF;
    SELECT t.namespace, t.priority, t.state INTO v_task FROM tasker.tasks t WHERE t.task_uuid = p_task_uuid;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'task_not_found'::text, NULL::text, NULL::integer, '{}'::uuid[], NULL::float8, '[]'::jsonb;
        RETURN;
    END IF;
    IF v_task.state = 'pending' THEN
        -- this pass will move the task to in_progress: lock it first, like every change to a
        -- task (task, then steps)
        SELECT t.namespace, t.priority, t.state INTO v_task FROM tasker.tasks t
        WHERE t.task_uuid = p_task_uuid FOR NO KEY UPDATE;
    END IF;
    IF v_task.state NOT IN ('pending', 'in_progress') THEN
        RETURN QUERY SELECT 'task_not_active'::text, v_task.namespace, v_task.priority, '{}'::uuid[], NULL::float8, '[]'::jsonb;
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
        RETURNING s.step_uuid, s.attempts, s.position, s.enqueued_at, s.ready_at
    ),
    queued AS (
        INSERT INTO tasker.step_queue (namespace, task_uuid, step_uuid, attempt, priority, traceparent)
        SELECT v_task.namespace, p_task_uuid, m.step_uuid, m.attempts, v_task.priority, v_traceparent
        FROM moved m ORDER BY m.position
        RETURNING 1
    )
    -- ready_at is when the step's last parent finished (or its backoff ended): the wait from
    -- there to enqueued_at is the completion -> enqueue latency the service reports
    SELECT coalesce(array_agg(m.step_uuid ORDER BY m.position), '{}'::uuid[]),
           extract(epoch FROM max(m.enqueued_at - m.ready_at)) * 1000
    INTO v_steps, v_wait
    FROM moved m;

    IF cardinality(v_steps) = 0 THEN
        RETURN QUERY SELECT 'nothing_ready'::text, v_task.namespace, v_task.priority, v_steps, NULL::float8, '[]'::jsonb;
        RETURN;
    END IF;
    IF v_task.state = 'pending' THEN
        UPDATE tasker.tasks t SET state = 'in_progress' WHERE t.task_uuid = p_task_uuid AND t.state = 'pending';
    END IF;
    -- hand the steps, in order, to the parked fetches, each up to its max
    FOR v_taker IN
        SELECT (x.ord - 1)::int AS idx, x.t->>'worker_id' AS worker_id, (x.t->>'max')::int AS max,
               (x.t->>'lease_ms')::bigint AS lease_ms
        FROM jsonb_array_elements(p_takers) WITH ORDINALITY AS x(t, ord)
        ORDER BY x.ord
    LOOP
        EXIT WHEN v_handed >= cardinality(v_steps);
        FOR v_msg IN
            SELECT q.msg_id FROM unnest(v_steps[v_handed + 1 : v_handed + v_taker.max]) AS u(step_uuid)
            CROSS JOIN LATERAL (SELECT m.msg_id FROM tasker.step_queue m
                                WHERE m.step_uuid = u.step_uuid AND m.leased_by IS NULL OFFSET 0) q
        LOOP
            v_leased := v_leased || (
                SELECT coalesce(jsonb_agg(to_jsonb(l) || jsonb_build_object('taker', v_taker.idx)), '[]'::jsonb)
                FROM tasker.lease_message(v_msg.msg_id, v_taker.worker_id, v_taker.lease_ms) l);
            v_handed := v_handed + 1;
        END LOOP;
    END LOOP;
    -- steps no fetch parked on this replica took: fetches parked on the other replicas hear of
    -- them (p_announce_as: this replica, given only while others are alive, so a single
    -- replica pays nothing for it)
    IF p_announce_as IS NOT NULL AND v_handed < cardinality(v_steps) THEN
        PERFORM pg_notify('tasker_steps_enqueued', json_build_object(
            'namespace', v_task.namespace, 'steps', cardinality(v_steps) - v_handed,
            'replica', p_announce_as)::text);
    END IF;
    RETURN QUERY SELECT 'enqueued'::text, v_task.namespace, v_task.priority, v_steps, v_wait, v_leased;
END
$$;

-- Lease one queued message to a worker: the message invisible until the lease expires, its
-- step enqueued -> in_progress; the step as the worker receives it, its parents' results
-- included (by the child-edge index and a primary-key probe per parent). Nothing when the
-- message's step is not enqueued at this attempt any more.
CREATE FUNCTION tasker.lease_message(p_msg_id bigint, p_worker_id text, p_lease_ms bigint)
RETURNS TABLE (
    step_uuid uuid, task_uuid uuid, name text, attempt integer, inputs jsonb,
    parent_results jsonb, lease_expires_at timestamptz, enqueued_at timestamptz, traceparent text
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
        read_count = q.read_count + 1
    WHERE q.msg_id = p_msg_id
    RETURNING q.step_uuid, q.attempt, q.visible_at, q.enqueued_at, q.traceparent INTO v_q;
    UPDATE tasker.workflow_steps s
    SET state = 'in_progress', started_at = clock_timestamp()
    WHERE s.step_uuid = v_q.step_uuid AND s.state = 'enqueued' AND s.attempts = v_q.attempt
    RETURNING s.task_uuid, s.name, s.inputs INTO v_s;
    IF NOT FOUND THEN RETURN; END IF;
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
END
$$;

-- Lease up to p_max steps of a namespace to a worker, best priority first: an ordered walk of
-- the fetch index, then each message by key.
-- Durability: synchronous_commit = off. A lease lost in a crash leaves the step enqueued and
-- unleased, to be leased again (the worker's completion of the lost lease is refused); the
-- completion that builds on a lease commits synchronously and so flushes it first.
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
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    FOR v_msg IN
        SELECT q.msg_id
        FROM tasker.step_queue q
        WHERE q.namespace = p_namespace AND q.leased_by IS NULL
        ORDER BY q.priority DESC, q.msg_id
        LIMIT p_max
        FOR UPDATE SKIP LOCKED
    LOOP
        RETURN QUERY SELECT * FROM tasker.lease_message(v_msg.msg_id, p_worker_id, p_lease_ms);
    END LOOP;
END
$$;

-- A lease handed to a fetch that had gone away before the steps reached it: the step goes back
-- on the queue at the same attempt (its worker never had it), to be leased again.
CREATE FUNCTION tasker.release_lease(p_step_uuid uuid, p_attempt integer, p_worker_id text)
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
    UPDATE tasker.step_queue q SET leased_by = NULL, visible_at = clock_timestamp()
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

-- A step finished (completed, or resolved manually): its children each have one unfinished
-- parent fewer and p_results_bytes more of parent results, and the task one step fewer to go.
-- Caller holds the task's row lock. Returns how many children became ready; the task's state
-- after the change.
CREATE FUNCTION tasker.finish_step(p_step_uuid uuid, p_task_uuid uuid, p_results_bytes integer,
                                   OUT ready_children integer, OUT task_state text)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
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
    UPDATE tasker.tasks t
    SET remaining_steps = t.remaining_steps - 1,
        state = CASE WHEN t.remaining_steps = 1 AND t.state = 'in_progress' THEN 'complete' ELSE t.state END,
        completed_at = CASE WHEN t.remaining_steps = 1 AND t.state = 'in_progress'
                            THEN clock_timestamp() ELSE t.completed_at END
    WHERE t.task_uuid = p_task_uuid
    RETURNING t.state INTO task_state;
END
$$;

-- Complete an attempt. p_max_parent_results_bytes (NULL: no budget): refused with
-- 'parent_results_too_large', changing nothing, when these results would give a child more
-- parent results than that to be leased with.
CREATE FUNCTION tasker.complete_step(
    p_step_uuid uuid, p_attempt integer, p_results jsonb, p_metadata jsonb DEFAULT '{}'::jsonb,
    p_max_parent_results_bytes integer DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_task_uuid uuid;
    v_bytes integer;
    v_task record;
    v_problem text;
    v_finished record;
BEGIN
    -- what a child receives of this step: "<name>": <results>, as JSON text
    SELECT s.task_uuid, octet_length(s.name) + octet_length(coalesce(p_results, '{}'::jsonb)::text) + 4
    INTO v_task_uuid, v_bytes
    FROM tasker.workflow_steps s WHERE s.step_uuid = p_step_uuid;
    IF NOT FOUND THEN RETURN 'step_not_found'; END IF;
    SELECT t.namespace, t.state INTO v_task FROM tasker.tasks t
    WHERE t.task_uuid = v_task_uuid FOR NO KEY UPDATE;
    v_problem := tasker.check_live_lease(p_step_uuid, p_attempt);
    IF v_problem IS NOT NULL THEN RETURN v_problem; END IF;
    -- the children's counters cannot move meanwhile: every finish holds the task's row lock
    IF p_max_parent_results_bytes IS NOT NULL AND EXISTS (
        SELECT 1 FROM tasker.step_edges e
        CROSS JOIN LATERAL (SELECT c.parent_results_bytes FROM tasker.workflow_steps c
                            WHERE c.step_uuid = e.child_step_uuid OFFSET 0) c
        WHERE e.parent_step_uuid = p_step_uuid
          AND c.parent_results_bytes + v_bytes > p_max_parent_results_bytes) THEN
        RETURN 'parent_results_too_large';
    END IF;
    PERFORM set_config('tasker.transition_metadata', p_metadata::text, true);
    DELETE FROM tasker.step_queue q WHERE q.step_uuid = p_step_uuid AND q.attempt = p_attempt;
    UPDATE tasker.workflow_steps s
    SET state = 'complete', results = coalesce(p_results, '{}'::jsonb), completed_at = clock_timestamp()
    WHERE s.step_uuid = p_step_uuid AND s.state = 'in_progress' AND s.attempts = p_attempt;
    SELECT * INTO v_finished FROM tasker.finish_step(p_step_uuid, v_task_uuid, v_bytes);
    IF v_finished.ready_children > 0 AND v_finished.task_state IN ('pending', 'in_progress') THEN
        PERFORM tasker.send_task_ready(v_task_uuid, v_task.namespace, 'step_transition');
    END IF;
    RETURN 'completed';
END
$$;

-- Many completions in one transaction (one commit, one pass through the NOTIFY commit lock).
-- Each item is exactly tasker.complete_step, with its own trace context; items are taken in
-- task order, so two batches lock tasks in the same order and never wait on each other in a
-- cycle. Returns each item's outcome by its position in the input arrays.
CREATE FUNCTION tasker.complete_steps(
    p_steps uuid[], p_attempts integer[], p_results jsonb[], p_traceparents text[],
    p_metadata jsonb DEFAULT '{}'::jsonb, p_max_parent_results_bytes integer DEFAULT NULL
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
            tasker.complete_step(v_item.step_uuid, p_attempts[v_item.ord], p_results[v_item.ord], p_metadata,
                                 p_max_parent_results_bytes);
    END LOOP;
END
$$;

-- The end of a failed attempt (the caller checked the lease and holds the task's row lock):
-- retry after the backoff when attempts remain and both the step and the failure allow it,
-- otherwise the step is in error and so is its task. A zero backoff returns the step to
-- pending at once, which is a readiness change and is announced.
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
        v_next := clock_timestamp() + make_interval(secs => greatest(p_backoff_ms, 0) / 1000.0);
        UPDATE tasker.workflow_steps s
        SET state = 'waiting_for_retry', last_error = p_error, next_retry_at = v_next
        WHERE s.step_uuid = p_step_uuid AND s.state = 'in_progress';
        IF p_backoff_ms <= 0 THEN
            UPDATE tasker.workflow_steps s SET state = 'pending', ready_at = clock_timestamp()
            WHERE s.step_uuid = p_step_uuid AND s.state = 'waiting_for_retry';
            INSERT INTO tasker.ready_steps (step_uuid, task_uuid) VALUES (p_step_uuid, v_step.task_uuid);
            PERFORM tasker.send_task_ready(v_step.task_uuid, t.namespace, 'step_transition')
            FROM tasker.tasks t WHERE t.task_uuid = v_step.task_uuid AND t.state IN ('pending', 'in_progress');
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
    v_task_uuid uuid;
    v_problem text;
BEGIN
    SELECT s.task_uuid INTO v_task_uuid FROM tasker.workflow_steps s WHERE s.step_uuid = p_step_uuid;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'step_not_found'::text, NULL::timestamptz;
        RETURN;
    END IF;
    PERFORM 1 FROM tasker.tasks t WHERE t.task_uuid = v_task_uuid FOR NO KEY UPDATE;
    v_problem := tasker.check_live_lease(p_step_uuid, p_attempt);
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

-- Steps whose retry backoff has elapsed go back to pending (and so are ready: they ran, so no
-- parent is unfinished). The caller sends a command for each task returned.
-- p_namespaces: NULL for all, or namespace patterns (see namespace_matches).
CREATE FUNCTION tasker.promote_due_retries(p_limit integer DEFAULT 500, p_namespaces text[] DEFAULT NULL)
RETURNS TABLE (task_uuid uuid, step_uuid uuid, namespace text, priority integer)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
BEGIN
    RETURN QUERY
    WITH due AS (
        SELECT s.step_uuid FROM tasker.workflow_steps s
        WHERE s.next_retry_at IS NOT NULL AND s.next_retry_at <= clock_timestamp()
          AND s.state = 'waiting_for_retry'
        ORDER BY s.next_retry_at
        LIMIT p_limit
        FOR UPDATE OF s SKIP LOCKED
    ),
    promoted AS (
        UPDATE tasker.workflow_steps s SET state = 'pending', ready_at = clock_timestamp()
        FROM due
        WHERE s.step_uuid = due.step_uuid AND s.state = 'waiting_for_retry'
        RETURNING s.task_uuid, s.step_uuid, s.ready_at
    ),
    readied AS (
        INSERT INTO tasker.ready_steps AS r (step_uuid, task_uuid, ready_at)
        SELECT p.step_uuid, p.task_uuid, p.ready_at FROM promoted p
        RETURNING r.step_uuid, r.task_uuid
    )
    SELECT p.task_uuid, p.step_uuid, t.namespace, t.priority
    FROM readied p
    CROSS JOIN LATERAL (SELECT k.namespace, k.priority FROM tasker.tasks k
                        WHERE k.task_uuid = p.task_uuid OFFSET 0) t
    WHERE tasker.namespace_matches(t.namespace, p_namespaces);
END
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
        PERFORM 1 FROM tasker.tasks t WHERE t.task_uuid = v_msg.task_uuid FOR NO KEY UPDATE;
        -- re-check under the locks: the worker may have answered in the meantime
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
         WHERE s.next_retry_at IS NOT NULL AND s.state = 'waiting_for_retry'
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
    PERFORM set_config('tasker.transition_metadata',
        (coalesce(p_metadata, '{}'::jsonb) || jsonb_build_object('reason', p_reason))::text, true);
    SELECT t.state INTO v_state FROM tasker.tasks t WHERE t.task_uuid = p_task_uuid FOR NO KEY UPDATE;
    IF NOT FOUND THEN RETURN 'task_not_found'; END IF;
    IF v_state NOT IN ('pending', 'in_progress', 'error') THEN RETURN 'task_already_final'; END IF;
    UPDATE tasker.tasks t SET state = 'cancelled', completed_at = clock_timestamp()
    WHERE t.task_uuid = p_task_uuid;
    UPDATE tasker.workflow_steps s SET state = 'cancelled', completed_at = clock_timestamp()
    WHERE s.task_uuid = p_task_uuid AND s.state IN ('pending', 'enqueued', 'in_progress', 'waiting_for_retry');
    DELETE FROM tasker.step_queue q WHERE q.task_uuid = p_task_uuid;
    DELETE FROM tasker.ready_steps r WHERE r.task_uuid = p_task_uuid;
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
    v_task_uuid uuid;
    v_task record;
    v_state text;
    v_bytes integer;
    v_finished record;
BEGIN
    SELECT s.task_uuid INTO v_task_uuid FROM tasker.workflow_steps s WHERE s.step_uuid = p_step_uuid;
    IF NOT FOUND THEN RETURN 'step_not_found'; END IF;
    SELECT t.namespace, t.state INTO v_task FROM tasker.tasks t
    WHERE t.task_uuid = v_task_uuid FOR NO KEY UPDATE;
    PERFORM set_config('tasker.transition_metadata',
        (coalesce(p_metadata, '{}'::jsonb) || jsonb_build_object('reason', p_reason))::text, true);
    SELECT s.state INTO v_state FROM tasker.workflow_steps s WHERE s.step_uuid = p_step_uuid FOR UPDATE;
    IF NOT tasker.step_transition_allowed(v_state, 'resolved_manually') THEN RETURN 'illegal_transition'; END IF;
    -- reopen first, so that the readiness announcement sees an active task
    IF v_task.state = 'error' AND NOT EXISTS (
        SELECT 1 FROM tasker.workflow_steps s
        WHERE s.task_uuid = v_task_uuid AND s.state = 'error' AND s.step_uuid <> p_step_uuid) THEN
        UPDATE tasker.tasks t SET state = 'in_progress', completed_at = NULL
        WHERE t.task_uuid = v_task_uuid AND t.state = 'error';
    END IF;
    DELETE FROM tasker.step_queue q WHERE q.step_uuid = p_step_uuid;
    DELETE FROM tasker.ready_steps r WHERE r.step_uuid = p_step_uuid;
    UPDATE tasker.workflow_steps s
    SET state = 'resolved_manually', results = coalesce(p_results, s.results), completed_at = clock_timestamp()
    WHERE s.step_uuid = p_step_uuid
    RETURNING octet_length(s.name) + octet_length(coalesce(s.results, 'null'::jsonb)::text) + 4 INTO v_bytes;
    -- an operator's results are not held to the workers' budget, but they are counted
    SELECT * INTO v_finished FROM tasker.finish_step(p_step_uuid, v_task_uuid, v_bytes);
    IF v_finished.ready_children > 0 AND v_finished.task_state IN ('pending', 'in_progress') THEN
        PERFORM tasker.send_task_ready(v_task_uuid, v_task.namespace, 'step_transition');
    END IF;
    RETURN 'resolved';
END
$$;

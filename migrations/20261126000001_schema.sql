-- Tasker schema: namespaces, tasks, workflow steps, the step DAG, transition history and the
-- step queue. Everything lives in schema `tasker`.
--
-- States (ARCHITECTURE.md):
--   step: pending -> enqueued -> in_progress -> complete
--         in_progress -> waiting_for_retry -> pending       (retry with backoff)
--         in_progress -> error                              (attempts exhausted / not retryable)
--         cancelled, resolved_manually (counts as complete for dependents)
--   task: pending -> in_progress -> complete | error | cancelled
-- The legal transitions are enforced by triggers in the next migration; CHECK constraints
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
CREATE INDEX tasks_active_idx ON tasker.tasks (namespace, priority DESC, created_at)
    WHERE state IN ('pending', 'in_progress');

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
CREATE INDEX workflow_steps_pending_idx ON tasker.workflow_steps (task_uuid) WHERE state = 'pending';
CREATE INDEX workflow_steps_retry_due_idx ON tasker.workflow_steps (next_retry_at)
    WHERE state = 'waiting_for_retry';

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

-- Append-only history. Rows are written by triggers (next migration), never updated.
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

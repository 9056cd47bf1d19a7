-- The state machine: which transitions are legal, the guards that enforce them whoever
-- writes, and the append-only history every transition writes.
--
-- The definitions that run, one per function: what a fresh database has after every migration
-- in migrations/. This file is not applied; the migrations are (append-only: a change is a new
-- migration). tests/sql_layout.rs fails when a function's live definition differs from the one
-- here, so a change to a function is made in a new migration and here, in the same commit.
-- Each definition names the migration it comes from.


-- Refuses UPDATE on the history tables, row by row (TK001).
-- (from migrations/20261127000001_baseline.sql)
CREATE FUNCTION tasker.history_is_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME USING ERRCODE = 'TK001';
END
$$;

-- Refuses DELETE on the history tables (TK001), once per statement, unless the statement
-- runs inside the retention purge (tasker.purge_finished_tasks marks its own
-- transaction): history rows leave only with their task.
-- (from migrations/20261204000016_retention.sql)
CREATE FUNCTION tasker.history_leaves_only_by_retention() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('tasker.retention_purge', true) IS DISTINCT FROM 'on' THEN
        RAISE EXCEPTION '% is append-only: its rows leave only with their task, by retention (tasker.purge_finished_tasks)',
            TG_TABLE_NAME USING ERRCODE = 'TK001';
    END IF;
    RETURN NULL;
END
$$;

-- The step state machine: every legal (from, to) pair.
-- (from migrations/20261204000015_schedule_to_start.sql)
CREATE FUNCTION tasker.step_transition_allowed(p_from text, p_to text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT (p_from, p_to) IN (
        ('pending', 'enqueued'),
        ('pending', 'cancelled'),
        ('pending', 'resolved_manually'),
        ('enqueued', 'in_progress'),
        ('enqueued', 'cancelled'),
        -- no worker started it within its schedule_to_start (tasker.fail_unstarted_steps)
        ('enqueued', 'error'),
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
        ('error', 'resolved_manually'),
        -- an operator retried the errored task (tasker.retry_task)
        ('error', 'pending')
    )
$$;

-- The task state machine: every legal (from, to) pair.
-- (from migrations/20261127000001_baseline.sql)
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

-- The metadata the current transaction attaches to its history rows
-- (set_config('tasker.transition_metadata', <json>, true)).
-- (from migrations/20261127000001_baseline.sql)
CREATE FUNCTION tasker.transition_metadata() RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('tasker.transition_metadata', true), '')::jsonb, '{}'::jsonb)
$$;

-- Before any insert or update of a step: its row rules (23514, named as the CHECK constraints
-- they replace were: a CHECK is parsed and compiled again at every statement that writes the
-- table, a guard's expressions once per session); on an update, also a legal transition
-- (TK001, whoever writes) and an immutable identity and position.
-- (from migrations/20261204000030_row_rules_in_the_guards.sql)
CREATE OR REPLACE FUNCTION tasker.workflow_steps_guard() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
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
    END IF;
    -- one expression on the common path; a NULL passes, as in a CHECK (a NOT NULL column's
    -- constraint refuses it after this trigger)
    IF NOT (length(NEW.name) BETWEEN 1 AND 255
            AND NEW.position >= 0
            AND NEW.state IN ('pending', 'enqueued', 'in_progress', 'complete', 'waiting_for_retry',
                              'error', 'cancelled', 'resolved_manually')
            AND NEW.unfinished_parents >= 0
            AND NEW.max_attempts BETWEEN 1 AND 100
            AND NEW.attempts BETWEEN 0 AND NEW.max_attempts) THEN
        RAISE EXCEPTION 'new row for relation "workflow_steps" violates check constraint "workflow_steps_valid"'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'workflow_steps_valid',
                  SCHEMA = 'tasker', TABLE = 'workflow_steps',
                  DETAIL = 'length(name) 1..255, position >= 0, a known state, unfinished_parents >= 0, max_attempts 1..100, attempts 0..max_attempts';
    END IF;
    IF NEW.timeout_ms NOT BETWEEN 1 AND 604800000 THEN
        RAISE EXCEPTION 'new row for relation "workflow_steps" violates check constraint "workflow_steps_timeout_valid"'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'workflow_steps_timeout_valid',
                  SCHEMA = 'tasker', TABLE = 'workflow_steps', DETAIL = 'timeout_ms 1..604800000';
    END IF;
    IF NEW.schedule_to_start_ms NOT BETWEEN 1 AND 604800000 THEN
        RAISE EXCEPTION 'new row for relation "workflow_steps" violates check constraint "workflow_steps_schedule_to_start_valid"'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'workflow_steps_schedule_to_start_valid',
                  SCHEMA = 'tasker', TABLE = 'workflow_steps', DETAIL = 'schedule_to_start_ms 1..604800000';
    END IF;
    RETURN NEW;
END
$$;

-- Before any insert or update of a task: its row rules (23514, named as the CHECK constraints
-- they replace were); on an update, also a legal transition (TK001) and an immutable identity
-- and namespace.
-- (from migrations/20261204000030_row_rules_in_the_guards.sql)
CREATE OR REPLACE FUNCTION tasker.tasks_guard() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
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
    END IF;
    -- a NULL passes, as in a CHECK (a NOT NULL column's constraint refuses it after this)
    IF NOT (length(NEW.name) BETWEEN 1 AND 255
            AND NEW.priority BETWEEN -1000 AND 1000
            AND NEW.state IN ('pending', 'in_progress', 'complete', 'error', 'cancelled')
            AND NEW.remaining_steps >= 0
            AND (NEW.idempotency_key IS NULL OR length(NEW.idempotency_key) BETWEEN 1 AND 255)) THEN
        RAISE EXCEPTION 'new row for relation "tasks" violates check constraint "tasks_valid"'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'tasks_valid',
                  SCHEMA = 'tasker', TABLE = 'tasks',
                  DETAIL = 'length(name) 1..255, priority -1000..1000, a known state, remaining_steps >= 0, idempotency_key absent or of length 1..255';
    END IF;
    IF length(NEW.concurrency_key) NOT BETWEEN 1 AND 255 THEN
        RAISE EXCEPTION 'new row for relation "tasks" violates check constraint "tasks_concurrency_key_valid"'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'tasks_concurrency_key_valid',
                  SCHEMA = 'tasker', TABLE = 'tasks', DETAIL = 'concurrency_key absent or of length 1..255';
    END IF;
    RETURN NEW;
END
$$;

-- A step's history row: every insert (creation) and state change. A creation row carries no
-- metadata (the task's creation row, written in the same transaction, has the request's);
-- the step names its task.
-- No settings: it plans nothing that could scan (each SET clause cost a save and restore of
-- the settings at every row).
-- (from migrations/20261205000035_lighter_hop_bookkeeping.sql)
CREATE OR REPLACE FUNCTION tasker.workflow_steps_history() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    -- an update that left the state as it was writes none (the trigger's condition, here: a
    -- WHEN clause is read and compiled again at every statement that names the column)
    IF TG_OP = 'UPDATE' AND NEW.state IS NOT DISTINCT FROM OLD.state THEN
        RETURN NULL;
    END IF;
    INSERT INTO tasker.step_transitions (step_uuid, from_state, to_state, attempt, metadata)
    VALUES (NEW.step_uuid,
            CASE WHEN TG_OP = 'UPDATE' THEN OLD.state END,
            NEW.state, NEW.attempts,
            CASE WHEN TG_OP = 'UPDATE' THEN tasker.transition_metadata() ELSE '{}'::jsonb END);
    RETURN NULL;
END
$$;

-- After a task is created or changes state: its history row.
-- No settings, as for the steps' history.
-- (from migrations/20261205000035_lighter_hop_bookkeeping.sql)
CREATE OR REPLACE FUNCTION tasker.tasks_history() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, metadata)
    VALUES (NEW.task_uuid, CASE WHEN TG_OP = 'UPDATE' THEN OLD.state END, NEW.state,
            tasker.transition_metadata());
    RETURN NULL;
END
$$;

-- New edges go between two steps of the edge's task (the foreign keys
-- step_edges_parent_same_task and step_edges_child_same_task they replace: both ends locked
-- FOR KEY SHARE), from a lower position to a higher one. Positions are a topological order,
-- so no edge can close a cycle: the database's own guarantee, one comparison per edge (two
-- key look-ups, which also find the ends), whatever the shape or size of the DAG. (A recursive
-- walk of descendants per new edge cost W^4 joins for a layered DAG of width W: 8 s and
-- 167 MiB at W = 30.) CreateTask validates the DAG and computes the positions before writing.
-- (from migrations/20261205000038_keys_checked_per_statement.sql)
CREATE FUNCTION tasker.step_edges_in_order() RETURNS trigger
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_edge record;
BEGIN
    SELECT n.parent_step_uuid, n.child_step_uuid, n.task_uuid,
           p.position AS parent_position, c.position AS child_position INTO v_edge
    FROM new_edges n
    LEFT JOIN LATERAL (SELECT s.position FROM tasker.workflow_steps s
                       WHERE s.step_uuid = n.parent_step_uuid AND s.task_uuid = n.task_uuid
                       FOR KEY SHARE) p ON true
    LEFT JOIN LATERAL (SELECT s.position FROM tasker.workflow_steps s
                       WHERE s.step_uuid = n.child_step_uuid AND s.task_uuid = n.task_uuid
                       FOR KEY SHARE) c ON true
    WHERE p.position IS NULL OR c.position IS NULL OR p.position >= c.position
    LIMIT 1;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF v_edge.parent_position IS NULL THEN
        RAISE EXCEPTION 'edge % -> %: the parent is not a step of task %',
            v_edge.parent_step_uuid, v_edge.child_step_uuid, v_edge.task_uuid
            USING ERRCODE = '23503', CONSTRAINT = 'step_edges_parent_same_task',
                  TABLE = 'step_edges', SCHEMA = 'tasker';
    END IF;
    IF v_edge.child_position IS NULL THEN
        RAISE EXCEPTION 'edge % -> %: the child is not a step of task %',
            v_edge.parent_step_uuid, v_edge.child_step_uuid, v_edge.task_uuid
            USING ERRCODE = '23503', CONSTRAINT = 'step_edges_child_same_task',
                  TABLE = 'step_edges', SCHEMA = 'tasker';
    END IF;
    RAISE EXCEPTION 'edge % -> % goes against the task''s order: the dependencies form a cycle',
        v_edge.parent_step_uuid, v_edge.child_step_uuid
        USING ERRCODE = 'TK003';
END
$$;

-- New steps name a task that exists (the foreign key workflow_steps_task_uuid_fkey it
-- replaces, once per statement): the tasks are locked FOR KEY SHARE, as the key's check did.
-- (from migrations/20261205000038_keys_checked_per_statement.sql)
CREATE FUNCTION tasker.workflow_steps_task_exists() RETURNS trigger
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_tasks uuid[];
    v_found integer;
    v_missing record;
BEGIN
    v_tasks := ARRAY(SELECT DISTINCT n.task_uuid FROM new_steps n);
    SELECT count(*) INTO v_found
    FROM (SELECT 1 FROM tasker.tasks t WHERE t.task_uuid = ANY (v_tasks) FOR KEY SHARE OF t) l;
    IF v_found < cardinality(v_tasks) THEN
        SELECT n.step_uuid, n.task_uuid INTO v_missing FROM new_steps n
        WHERE NOT EXISTS (SELECT 1 FROM tasker.tasks t WHERE t.task_uuid = n.task_uuid)
        LIMIT 1;
        RAISE EXCEPTION 'step % names task %, which does not exist', v_missing.step_uuid, v_missing.task_uuid
            USING ERRCODE = '23503', CONSTRAINT = 'workflow_steps_task_uuid_fkey',
                  TABLE = 'workflow_steps', SCHEMA = 'tasker';
    END IF;
    RETURN NULL;
END
$$;

-- A deleted task leaves no step behind (the foreign key's NO ACTION, once per statement).
-- (from migrations/20261205000038_keys_checked_per_statement.sql)
CREATE FUNCTION tasker.tasks_deleted_leave_no_steps() RETURNS trigger
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_step record;
BEGIN
    SELECT s.step_uuid, s.task_uuid INTO v_step
    FROM old_tasks o JOIN tasker.workflow_steps s ON s.task_uuid = o.task_uuid
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'task % is deleted while its step % remains', v_step.task_uuid, v_step.step_uuid
            USING ERRCODE = '23503', CONSTRAINT = 'workflow_steps_task_uuid_fkey',
                  TABLE = 'workflow_steps', SCHEMA = 'tasker';
    END IF;
    RETURN NULL;
END
$$;

-- A deleted step leaves no edge behind (the edge keys' NO ACTION, once per statement).
-- (from migrations/20261205000038_keys_checked_per_statement.sql)
CREATE FUNCTION tasker.workflow_steps_deleted_leave_no_edges() RETURNS trigger
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_edge record;
BEGIN
    SELECT e.parent_step_uuid, e.child_step_uuid, e.end_deleted INTO v_edge
    FROM old_steps o
    JOIN LATERAL (SELECT x.parent_step_uuid, x.child_step_uuid, 'parent' AS end_deleted
                  FROM tasker.step_edges x WHERE x.parent_step_uuid = o.step_uuid
                  UNION ALL
                  SELECT x.parent_step_uuid, x.child_step_uuid, 'child'
                  FROM tasker.step_edges x WHERE x.child_step_uuid = o.step_uuid) e ON true
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'the % of edge % -> % is deleted while the edge remains',
            v_edge.end_deleted, v_edge.parent_step_uuid, v_edge.child_step_uuid
            USING ERRCODE = '23503', CONSTRAINT = format('step_edges_%s_same_task', v_edge.end_deleted),
                  TABLE = 'step_edges', SCHEMA = 'tasker';
    END IF;
    RETURN NULL;
END
$$;

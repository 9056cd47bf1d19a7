-- State machine enforcement and history.
--
-- Every state change is an UPDATE ... WHERE state = <from> (compare-and-swap) issued by the
-- functions in later migrations. The BEFORE trigger refuses any (from, to) pair that is not in
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
LANGUAGE plpgsql AS $$
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
LANGUAGE plpgsql AS $$
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
LANGUAGE plpgsql AS $$
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
LANGUAGE plpgsql AS $$
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
LANGUAGE plpgsql AS $$
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
ALTER FUNCTION tasker.step_edges_no_cycle() SET enable_hashjoin = off;
ALTER FUNCTION tasker.step_edges_no_cycle() SET enable_mergejoin = off;
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

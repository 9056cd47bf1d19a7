-- Retention: finished tasks leave with every row that refers to them, once finished for
-- longer than their namespace's retention; what each namespace keeps.
--
-- The definitions that run, one per function: what a fresh database has after every migration
-- in migrations/. This file is not applied; the migrations are (append-only: a change is a new
-- migration). tests/sql_layout.rs fails when a function's live definition differs from the one
-- here, so a change to a function is made in a new migration and here, in the same commit.
-- Each definition names the migration it comes from.


-- Remove up to p_limit tasks finished longer ago than their namespace's retention (complete
-- or cancelled: namespaces.retention_ms, else p_retention_ms; in error:
-- namespaces.error_retention_ms, else p_error_retention_ms, NULL meaning kept), oldest first,
-- in the namespaces p_namespaces matches (NULL: all), with their steps, edges, history, queue
-- and ready-set rows, their key waiter and start rows; the schedule runs and schedules that
-- name one forget it (task_uuid NULL). Unfinished tasks are never read. A task another
-- transaction holds (a late report, a retry, another replica's purge) is skipped, not waited
-- for. Answers what it removed: tasks, steps, and rows in all (history included).
-- (from migrations/20261204000016_retention.sql)
CREATE FUNCTION tasker.purge_finished_tasks(
    p_retention_ms bigint, p_error_retention_ms bigint, p_limit integer DEFAULT 100,
    p_namespaces text[] DEFAULT NULL
)
RETURNS TABLE (tasks integer, steps integer, rows_removed bigint)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_ns record;
    v_tasks uuid[] := '{}';
    v_steps uuid[];
    v_picked uuid[];
    v_now timestamptz := clock_timestamp();
    v_rows bigint := 0;
    v_n bigint;
BEGIN
    IF p_limit < 1 THEN
        RAISE EXCEPTION 'p_limit must be at least 1, is %', p_limit USING ERRCODE = '22023';
    END IF;
    FOR v_ns IN
        SELECT n.name, coalesce(n.retention_ms, p_retention_ms) AS keep_ms,
               coalesce(n.error_retention_ms, p_error_retention_ms) AS keep_error_ms
        FROM tasker.namespaces n
        WHERE tasker.namespace_matches(n.name, p_namespaces)
        ORDER BY n.name
    LOOP
        EXIT WHEN cardinality(v_tasks) >= p_limit;
        IF v_ns.keep_ms IS NOT NULL THEN
            SELECT coalesce(array_agg(f.task_uuid), '{}') INTO v_picked FROM (
                SELECT t.task_uuid FROM tasker.tasks t
                WHERE t.namespace = v_ns.name AND t.completed_at IS NOT NULL
                  AND t.completed_at < v_now - make_interval(secs => v_ns.keep_ms / 1000.0)
                  AND t.state IN ('complete', 'cancelled')
                ORDER BY t.completed_at
                LIMIT p_limit - cardinality(v_tasks)
                FOR UPDATE SKIP LOCKED) f;
            v_tasks := v_tasks || v_picked;
        END IF;
        IF v_ns.keep_error_ms IS NOT NULL AND cardinality(v_tasks) < p_limit THEN
            SELECT coalesce(array_agg(f.task_uuid), '{}') INTO v_picked FROM (
                SELECT t.task_uuid FROM tasker.tasks t
                WHERE t.namespace = v_ns.name AND t.completed_at IS NOT NULL
                  AND t.completed_at < v_now - make_interval(secs => v_ns.keep_error_ms / 1000.0)
                  AND t.state = 'error'
                ORDER BY t.completed_at
                LIMIT p_limit - cardinality(v_tasks)
                FOR UPDATE SKIP LOCKED) f;
            v_tasks := v_tasks || v_picked;
        END IF;
    END LOOP;
    IF cardinality(v_tasks) = 0 THEN
        RETURN QUERY SELECT 0, 0, 0::bigint;
        RETURN;
    END IF;
    -- the history's triggers let this transaction's deletes through
    PERFORM set_config('tasker.retention_purge', 'on', true);
    SELECT coalesce(array_agg(s.step_uuid), '{}') INTO v_steps
    FROM tasker.workflow_steps s WHERE s.task_uuid = ANY (v_tasks);

    -- every edge has both ends in its task: by its parent
    DELETE FROM tasker.step_edges e WHERE e.parent_step_uuid = ANY (v_steps);
    GET DIAGNOSTICS v_n = ROW_COUNT; v_rows := v_rows + v_n;
    -- leftovers of a cancelled task's attempts (a held lane slot is freed by its trigger)
    DELETE FROM tasker.step_queue q WHERE q.step_uuid = ANY (v_steps);
    GET DIAGNOSTICS v_n = ROW_COUNT; v_rows := v_rows + v_n;
    DELETE FROM tasker.ready_steps r WHERE r.task_uuid = ANY (v_tasks);
    GET DIAGNOSTICS v_n = ROW_COUNT; v_rows := v_rows + v_n;
    DELETE FROM tasker.step_transitions h WHERE h.step_uuid = ANY (v_steps);
    GET DIAGNOSTICS v_n = ROW_COUNT; v_rows := v_rows + v_n;
    DELETE FROM tasker.task_transitions h WHERE h.task_uuid = ANY (v_tasks);
    GET DIAGNOSTICS v_n = ROW_COUNT; v_rows := v_rows + v_n;
    DELETE FROM tasker.key_waiters w USING tasker.tasks t
    WHERE t.task_uuid = ANY (v_tasks) AND t.concurrency_key IS NOT NULL
      AND w.namespace = t.namespace AND w.concurrency_key = t.concurrency_key
      AND w.created_at = t.created_at AND w.task_uuid = t.task_uuid;
    GET DIAGNOSTICS v_n = ROW_COUNT; v_rows := v_rows + v_n;
    DELETE FROM tasker.task_starts st WHERE st.task_uuid = ANY (v_tasks);
    GET DIAGNOSTICS v_n = ROW_COUNT; v_rows := v_rows + v_n;
    -- a schedule's record of the runs stays; it no longer names a task that is gone
    UPDATE tasker.schedule_runs r SET task_uuid = NULL
    FROM tasker.tasks t
    WHERE t.task_uuid = ANY (v_tasks) AND t.schedule_name IS NOT NULL
      AND r.namespace = t.namespace AND r.schedule = t.schedule_name AND r.task_uuid = t.task_uuid;
    UPDATE tasker.schedules sc SET last_task_uuid = NULL
    FROM tasker.tasks t
    WHERE t.task_uuid = ANY (v_tasks) AND t.schedule_name IS NOT NULL
      AND sc.namespace = t.namespace AND sc.name = t.schedule_name AND sc.last_task_uuid = t.task_uuid;
    DELETE FROM tasker.workflow_steps s WHERE s.step_uuid = ANY (v_steps);
    GET DIAGNOSTICS v_n = ROW_COUNT; v_rows := v_rows + v_n;
    DELETE FROM tasker.tasks t WHERE t.task_uuid = ANY (v_tasks);
    GET DIAGNOSTICS v_n = ROW_COUNT; v_rows := v_rows + v_n;
    RETURN QUERY SELECT cardinality(v_tasks), cardinality(v_steps), v_rows;
END
$$;

-- Per namespace p_namespaces matches (NULL: all): its retention periods (its own, else the
-- defaults given) and when its oldest finished task still kept finished (complete or
-- cancelled, and in error). Two index probes per namespace.
-- (from migrations/20261204000016_retention.sql)
CREATE FUNCTION tasker.retention_status(
    p_retention_ms bigint, p_error_retention_ms bigint, p_namespaces text[] DEFAULT NULL
)
RETURNS TABLE (namespace text, retention_ms bigint, error_retention_ms bigint,
               oldest_finished timestamptz, oldest_error timestamptz)
LANGUAGE sql STABLE
AS $$
    SELECT n.name, coalesce(n.retention_ms, p_retention_ms),
           coalesce(n.error_retention_ms, p_error_retention_ms),
           (SELECT t.completed_at FROM tasker.tasks t
            WHERE t.namespace = n.name AND t.completed_at IS NOT NULL
              AND t.state IN ('complete', 'cancelled')
            ORDER BY t.completed_at LIMIT 1),
           (SELECT t.completed_at FROM tasker.tasks t
            WHERE t.namespace = n.name AND t.completed_at IS NOT NULL AND t.state = 'error'
            ORDER BY t.completed_at LIMIT 1)
    FROM tasker.namespaces n
    WHERE tasker.namespace_matches(n.name, p_namespaces)
    ORDER BY n.name
$$;

-- Readiness: what is ready in a task and which tasks have work, for the API, the fallback
-- poller and the deadline scheduler (retries that fell due, the next deadline).
--
-- The definitions that run, one per function: what a fresh database has after every migration
-- in migrations/. This file is not applied; the migrations are (append-only: a change is a new
-- migration). tests/sql_layout.rs fails when a function's live definition differs from the one
-- here, so a change to a function is made in a new migration and here, in the same commit.
-- Each definition names the migration it comes from.


-- Each step of a task with its readiness: parents done, retry eligibility, ready now and
-- since when (GetTaskReadiness); nothing of a task waiting for its start is ready. Reads the
-- whole task: for the API, not the hop.
-- (from migrations/20261204000012_task_start_times.sql)
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
           (t.state IN ('pending', 'in_progress') AND s.state = 'pending' AND s.unfinished_parents = 0
                AND NOT t.scheduled),
           CASE WHEN s.unfinished_parents = 0 AND NOT t.scheduled THEN s.ready_at END
    FROM tasker.workflow_steps s
    CROSS JOIN LATERAL (SELECT k.state,
                               EXISTS (SELECT 1 FROM tasker.task_starts ts WHERE ts.task_uuid = k.task_uuid) AS scheduled
                        FROM tasker.tasks k WHERE k.task_uuid = s.task_uuid) t
    CROSS JOIN LATERAL (SELECT count(*) AS total FROM tasker.step_edges e
                        WHERE e.child_step_uuid = s.step_uuid) p
    WHERE s.task_uuid = p_task_uuid
    ORDER BY s.position, s.name
$$;

-- A task's step counts by state and its execution status (GetTaskReadiness; 'scheduled' while
-- it waits for its start).
-- (from migrations/20261204000012_task_start_times.sql)
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
    ),
    w AS (
        SELECT EXISTS (SELECT 1 FROM tasker.task_starts ts WHERE ts.task_uuid = p_task_uuid) AS scheduled
    )
    SELECT t.task_uuid, t.namespace, t.state, t.priority,
           c.total, c.pending, c.enqueued, c.in_progress, c.complete, c.failed, c.waiting,
           c.cancelled,
           CASE WHEN t.state IN ('pending', 'in_progress') AND NOT w.scheduled THEN c.ready ELSE 0 END,
           CASE
               WHEN t.state = 'cancelled' THEN 'cancelled'
               WHEN c.total > 0 AND c.complete = c.total THEN 'all_complete'
               WHEN w.scheduled AND t.state IN ('pending', 'in_progress') THEN 'scheduled'
               WHEN t.state IN ('pending', 'in_progress') AND c.ready > 0 THEN 'has_ready_steps'
               WHEN c.enqueued + c.in_progress > 0 THEN 'processing'
               WHEN c.failed > 0 THEN 'blocked_by_failures'
               ELSE 'waiting_for_dependencies'
           END
    FROM tasker.tasks t, c, w
    WHERE t.task_uuid = p_task_uuid
$$;

-- Aging boost: one priority point for every 60 seconds a task has had a ready step, so a
-- low-priority task is eventually served even under a steady stream of high-priority work.
-- (from migrations/20261127000001_baseline.sql)
CREATE FUNCTION tasker.computed_priority(p_priority integer, p_ready_since timestamptz)
RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT p_priority + least(floor(greatest(extract(epoch FROM clock_timestamp() - p_ready_since), 0) / 60), 100000)::int
$$;

-- Tasks with at least one ready step, best first. p_namespaces: NULL for all namespaces, or
-- a list of namespace patterns (see namespace_matches). p_ready_before keeps only tasks whose
-- oldest ready step has been ready since before it (the fallback poller's age threshold; a
-- lower bound on age only, never an upper one).
-- Cost: a scan of the ready set, which holds ready steps only (in normal operation a step is
-- in it for the milliseconds between becoming ready and being enqueued), then a primary-key
-- probe per task: it reads what is ready, not what is pending or finished.
-- (from migrations/20261127000001_baseline.sql)
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

-- ListReadyTasks pages by key, not offset. The ranking ages every task by a point a minute
-- of waiting, so an offset into it moves while a client pages: tasks could show twice or not
-- at all. A page is now ranked as of the first page's time (carried in the page token) and
-- starts after the previous page's last task in that ranking: (computed priority DESC, ready
-- since, task uuid).
-- (from migrations/20261127000005_ready_tasks_pages.sql)
CREATE FUNCTION tasker.ready_tasks_page(
    p_namespaces text[],
    p_limit integer,
    p_as_of timestamptz,
    p_after_priority integer DEFAULT NULL,
    p_after_since timestamptz DEFAULT NULL,
    p_after_task uuid DEFAULT NULL
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
    ),
    ranked AS (
        SELECT t.task_uuid, t.namespace, t.priority,
               t.priority + least(floor(greatest(extract(epoch FROM p_as_of - pt.since), 0) / 60),
                                  100000)::int AS cp,
               pt.n, pt.since, t.state
        FROM per_task pt
        CROSS JOIN LATERAL (SELECT k.task_uuid, k.namespace, k.priority, k.state FROM tasker.tasks k
                            WHERE k.task_uuid = pt.task_uuid OFFSET 0) t
        WHERE t.state IN ('pending', 'in_progress')
          AND tasker.namespace_matches(t.namespace, p_namespaces)
    )
    SELECT r.task_uuid, r.namespace, r.priority, r.cp, r.n, r.since, r.state
    FROM ranked r
    WHERE p_after_task IS NULL
       OR r.cp < p_after_priority
       OR (r.cp = p_after_priority AND (r.since, r.task_uuid) > (p_after_since, p_after_task))
    ORDER BY r.cp DESC, r.since, r.task_uuid
    LIMIT p_limit;
END
$$;

-- Steps whose retry backoff has elapsed go back to pending (and so are ready: they ran, so no
-- parent is unfinished). The caller sends a command for each task returned.
-- p_namespaces: NULL for all, or namespace patterns (see namespace_matches).
-- (from migrations/20261127000001_baseline.sql)
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

-- Tasks whose start time came (tasker.task_starts): their root steps join the ready set, ready
-- from now; one row per root step, for the caller's readiness commands. Claimed with SKIP
-- LOCKED, so replicas waking for the same start promote it once.
-- (from migrations/20261204000012_task_start_times.sql)
CREATE FUNCTION tasker.promote_due_starts(p_limit integer DEFAULT 500, p_namespaces text[] DEFAULT NULL)
RETURNS TABLE (task_uuid uuid, step_uuid uuid, namespace text, priority integer)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
BEGIN
    RETURN QUERY
    WITH due AS (
        DELETE FROM tasker.task_starts d
        WHERE d.task_uuid IN (SELECT s.task_uuid FROM tasker.task_starts s
                              WHERE s.start_at <= clock_timestamp()
                                AND tasker.namespace_matches(s.namespace, p_namespaces)
                              ORDER BY s.start_at
                              LIMIT p_limit
                              FOR UPDATE SKIP LOCKED)
        RETURNING d.task_uuid
    ),
    roots AS (
        UPDATE tasker.workflow_steps s SET ready_at = clock_timestamp()
        FROM due
        WHERE s.task_uuid = due.task_uuid AND s.state = 'pending' AND s.unfinished_parents = 0
        RETURNING s.task_uuid, s.step_uuid, s.ready_at
    ),
    readied AS (
        INSERT INTO tasker.ready_steps AS r (step_uuid, task_uuid, ready_at)
        SELECT p.step_uuid, p.task_uuid, p.ready_at FROM roots p
        ON CONFLICT DO NOTHING
        RETURNING r.step_uuid, r.task_uuid
    )
    SELECT p.task_uuid, p.step_uuid, t.namespace, t.priority
    FROM readied p
    CROSS JOIN LATERAL (SELECT k.namespace, k.priority, k.state FROM tasker.tasks k
                        WHERE k.task_uuid = p.task_uuid OFFSET 0) t
    WHERE t.state IN ('pending', 'in_progress');
END
$$;

-- The earliest moment at which a retry becomes due, a lease runs out (or an attempt reaches its
-- timeout, which caps its lease), a scheduled task starts, a cron schedule wakes or a queued
-- step's schedule_to_start runs out: the service sleeps until then instead of waiting for the
-- next fallback poll.
-- (from migrations/20261204000015_schedule_to_start.sql)
CREATE FUNCTION tasker.next_deadline(p_namespaces text[] DEFAULT NULL) RETURNS timestamptz
LANGUAGE sql STABLE
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
    SELECT least(
        (SELECT min(s.next_retry_at) FROM tasker.workflow_steps s JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
         WHERE s.next_retry_at IS NOT NULL AND s.state = 'waiting_for_retry'
           AND tasker.namespace_matches(t.namespace, p_namespaces)),
        (SELECT min(q.visible_at) FROM tasker.step_queue q
         WHERE q.leased_by IS NOT NULL AND tasker.namespace_matches(q.namespace, p_namespaces)),
        (SELECT ts.start_at FROM tasker.task_starts ts
         WHERE tasker.namespace_matches(ts.namespace, p_namespaces)
         ORDER BY ts.start_at LIMIT 1),
        (SELECT sc.wake_at FROM tasker.schedules sc
         WHERE NOT sc.paused AND sc.wake_at IS NOT NULL
           AND tasker.namespace_matches(sc.namespace, p_namespaces)
         ORDER BY sc.wake_at LIMIT 1),
        (SELECT q.start_by FROM tasker.step_queue q
         WHERE q.start_by IS NOT NULL AND q.leased_by IS NULL
           AND tasker.namespace_matches(q.namespace, p_namespaces)
         ORDER BY q.start_by LIMIT 1))
$$;

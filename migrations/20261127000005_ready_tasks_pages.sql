-- ListReadyTasks pages by key, not offset. The ranking ages every task by a point a minute
-- of waiting, so an offset into it moves while a client pages: tasks could show twice or not
-- at all. A page is now ranked as of the first page's time (carried in the page token) and
-- starts after the previous page's last task in that ranking: (computed priority DESC, ready
-- since, task uuid).
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

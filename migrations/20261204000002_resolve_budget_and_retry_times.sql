-- ResolveStep and CancelTask: no retry time left behind, and an operator's results held to
-- the budget a worker's are.
--
-- 1. A step cancelled or resolved by hand while it waited for a retry kept its next_retry_at.
--    The deadline look-up walks the index of retry times (tasker.next_deadline), so every such
--    step made it slower, for ever (20,000 of them: 15-30 ms instead of 1.2 ms). Both now
--    clear it, and the ones left behind are cleared here.
-- 2. ResolveStep's results were counted into the children's parent results but not held to the
--    budget: an operator could make a child too large to deliver. They are now held to it
--    ('parent_results_too_large', nothing changed), counted as sent (p_results_bytes, the
--    results as a protobuf Value, measured by the service), as a worker's are.
--
-- tasker.cancel_task is otherwise 20261127000008's; tasker.resolve_step_manually otherwise
-- 20261127000006's, whose old signature stays for a replica of the previous release.

UPDATE tasker.workflow_steps SET next_retry_at = NULL
WHERE next_retry_at IS NOT NULL AND state <> 'waiting_for_retry';

CREATE OR REPLACE FUNCTION tasker.cancel_task(p_task_uuid uuid, p_reason text, p_metadata jsonb DEFAULT '{}'::jsonb)
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
    RETURN 'cancelled';
END
$$;

-- An operator marks a step as done by hand; it counts as complete for its dependents. A task
-- in error goes on once no failed step is left; a task no worker has touched starts. Results
-- (p_results, of p_results_bytes as sent; NULL: the step's own, which a step that can be
-- resolved never has) are held to p_max_parent_results_bytes as a worker's are.
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

-- ResolveStep: two fixes to tasker.resolve_step_manually (otherwise the baseline's).
--
-- 1. A task that had not started. A task goes from pending to in progress when its first
--    steps are enqueued, and only a task in progress completes when its last step finishes
--    (tasker.finish_step). An operator who resolved by hand every step of a task no worker had
--    touched left it pending with nothing left to run, for ever. Resolving a step of a pending
--    task now starts the task first (the same pending -> in_progress transition an enqueue
--    makes), so resolving its last step completes it.
-- 2. Steps that became ready while the task was in error (a sibling in flight completes, a
--    retry falls due): the enqueue refuses an inactive task and nothing announces them. When
--    the resolution reopened the task it announced readiness only if the resolved step's own
--    children became ready, so those other steps waited for a sweep (in EventDrivenOnly, until
--    the listener reconnected or the claimers changed). It now announces whenever the task is
--    active and has a ready step. (RetryTask always announced.)

CREATE OR REPLACE FUNCTION tasker.resolve_step_manually(
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
    UPDATE tasker.workflow_steps s
    SET state = 'resolved_manually', results = coalesce(p_results, s.results), completed_at = clock_timestamp()
    WHERE s.step_uuid = p_step_uuid
    RETURNING octet_length(s.name) + octet_length(coalesce(s.results, 'null'::jsonb)::text) + 4 INTO v_bytes;
    -- an operator's results are not held to the workers' budget, but they are counted
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

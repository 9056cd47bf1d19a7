-- CancelTask removes its queue rows by step, not by walking the queue.
--
-- tasker.cancel_task deleted the task's queue rows with `WHERE task_uuid = ...`, and no index
-- of tasker.step_queue leads with the task: each cancel read the whole queue (every queued and
-- leased step of every namespace) while holding the task's row lock. Only the steps the
-- cancel moves from enqueued or in progress can have queue rows, so it now deletes those, by
-- the (step_uuid, attempt) index. The function is otherwise the baseline's.

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
        UPDATE tasker.workflow_steps s SET state = 'cancelled', completed_at = clock_timestamp()
        WHERE s.task_uuid = p_task_uuid
          AND s.state IN ('pending', 'enqueued', 'in_progress', 'waiting_for_retry')
        RETURNING s.step_uuid
    )
    DELETE FROM tasker.step_queue q WHERE q.step_uuid IN (SELECT c.step_uuid FROM cancelled c);
    DELETE FROM tasker.ready_steps r WHERE r.task_uuid = p_task_uuid;
    RETURN 'cancelled';
END
$$;

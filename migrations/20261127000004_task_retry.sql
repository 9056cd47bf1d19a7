-- Retry an errored task: an operator gives each of its failed steps more attempts; the steps
-- become ready again and the task goes back to in progress.

CREATE OR REPLACE FUNCTION tasker.step_transition_allowed(p_from text, p_to text) RETURNS boolean
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
        ('error', 'resolved_manually'),
        -- an operator retried the errored task (tasker.retry_task)
        ('error', 'pending')
    )
$$;

-- Each errored step of the task gets p_extra_attempts more attempts (its max_attempts raised
-- from the attempts it used; at most 100 in all), becomes pending and ready, and the task goes
-- back to in progress; the readiness is announced. Returns 'retried', 'task_not_found',
-- 'task_not_in_error' (nothing changed), or 'attempts_exhausted' when a step would need more
-- than 100 attempts (nothing changed).
CREATE FUNCTION tasker.retry_task(p_task_uuid uuid, p_extra_attempts integer,
                                  p_metadata jsonb DEFAULT '{}'::jsonb)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_task record;
BEGIN
    SELECT t.namespace, t.state INTO v_task FROM tasker.tasks t
    WHERE t.task_uuid = p_task_uuid FOR NO KEY UPDATE;
    IF NOT FOUND THEN RETURN 'task_not_found'; END IF;
    IF v_task.state <> 'error' THEN RETURN 'task_not_in_error'; END IF;
    IF EXISTS (SELECT 1 FROM tasker.workflow_steps s
               WHERE s.task_uuid = p_task_uuid AND s.state = 'error'
                 AND s.attempts + p_extra_attempts > 100) THEN
        RETURN 'attempts_exhausted';
    END IF;
    PERFORM set_config('tasker.transition_metadata', coalesce(p_metadata, '{}'::jsonb)::text, true);
    -- reopen first, so that the readiness announcement sees an active task
    UPDATE tasker.tasks t SET state = 'in_progress', completed_at = NULL
    WHERE t.task_uuid = p_task_uuid;
    WITH retried AS (
        UPDATE tasker.workflow_steps s
        SET state = 'pending', max_attempts = s.attempts + p_extra_attempts,
            next_retry_at = NULL, completed_at = NULL, ready_at = clock_timestamp()
        WHERE s.task_uuid = p_task_uuid AND s.state = 'error'
        RETURNING s.step_uuid, s.task_uuid, s.ready_at
    )
    INSERT INTO tasker.ready_steps AS r (step_uuid, task_uuid, ready_at)
    SELECT step_uuid, task_uuid, ready_at FROM retried
    ON CONFLICT (step_uuid) DO NOTHING;
    PERFORM tasker.send_task_ready(p_task_uuid, v_task.namespace, 'step_transition');
    RETURN 'retried';
END
$$;

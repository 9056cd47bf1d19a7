-- A retry's due time is announced to every replica (issue 23): the deadline scheduler of the
-- replica that recorded the failure wakes for it already (a poke in memory), but if that
-- replica is gone, the others met it only at their poll-interval cap. Now each hears it on
-- tasker_deadlines ({namespace, at}) and wakes at the due time.
CREATE OR REPLACE FUNCTION tasker.record_attempt_failure(
    p_step_uuid uuid, p_error jsonb, p_retryable boolean, p_backoff_ms bigint
) RETURNS TABLE (outcome text, next_retry_at timestamptz)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_step record;
    v_next timestamptz;
    v_backoff_ms bigint;
BEGIN
    SELECT s.task_uuid, s.attempts, s.max_attempts, s.retryable, s.retry_policy INTO v_step
    FROM tasker.workflow_steps s WHERE s.step_uuid = p_step_uuid;
    DELETE FROM tasker.step_queue q WHERE q.step_uuid = p_step_uuid AND q.attempt = v_step.attempts;
    IF p_retryable AND v_step.retryable AND v_step.attempts < v_step.max_attempts THEN
        -- the worker's backoff wins; without one, the step's declared policy; without a
        -- policy, at once
        v_backoff_ms := greatest(coalesce(p_backoff_ms,
                                          tasker.policy_backoff_ms(v_step.retry_policy, v_step.attempts),
                                          0), 0);
        v_next := clock_timestamp() + make_interval(secs => v_backoff_ms / 1000.0);
        IF v_backoff_ms > 0 THEN
            -- every replica's deadline scheduler wakes for it: the retry is met on time even
            -- if the replica that recorded the failure is gone
            PERFORM pg_notify('tasker_deadlines', json_build_object(
                'namespace', t.namespace, 'at', v_next)::text)
            FROM tasker.tasks t WHERE t.task_uuid = v_step.task_uuid;
        END IF;
        UPDATE tasker.workflow_steps s
        SET state = 'waiting_for_retry', last_error = p_error, next_retry_at = v_next,
            data_bytes = s.data_bytes - coalesce(octet_length(s.last_error::text), 0)
                         + octet_length(p_error::text)
        WHERE s.step_uuid = p_step_uuid AND s.state = 'in_progress';
        IF v_backoff_ms = 0 THEN
            UPDATE tasker.workflow_steps s SET state = 'pending', ready_at = clock_timestamp()
            WHERE s.step_uuid = p_step_uuid AND s.state = 'waiting_for_retry';
            INSERT INTO tasker.ready_steps (step_uuid, task_uuid) VALUES (p_step_uuid, v_step.task_uuid);
            PERFORM tasker.send_task_ready(v_step.task_uuid, t.namespace, 'step_transition')
            FROM tasker.tasks t WHERE t.task_uuid = v_step.task_uuid AND t.state IN ('pending', 'in_progress');
        END IF;
        RETURN QUERY SELECT 'retry_scheduled'::text, v_next;
    ELSE
        UPDATE tasker.workflow_steps s
        SET state = 'error', last_error = p_error, completed_at = clock_timestamp(),
            data_bytes = s.data_bytes - coalesce(octet_length(s.last_error::text), 0)
                         + octet_length(p_error::text)
        WHERE s.step_uuid = p_step_uuid AND s.state = 'in_progress';
        UPDATE tasker.tasks t SET state = 'error', completed_at = clock_timestamp()
        WHERE t.task_uuid = v_step.task_uuid AND t.state = 'in_progress';
        RETURN QUERY SELECT 'failed'::text, NULL::timestamptz;
    END IF;
END
$$;

-- Notification triggers: the database announces readiness the moment it changes.
--
-- Channels (payloads are small JSON documents, far below the 8000-byte limit):
--   tasker_task_ready, tasker_task_ready.<namespace>    a step became ready (TaskReady)
--   tasker_task_state, tasker_task_state.<namespace>    a task changed state (TaskStateChange)
--   tasker_namespace_created                            a namespace was created
--
-- The ready check looks only at the children of the step that changed (is every parent of
-- each child complete?), never at the whole task: O(children x parents), index-backed.
-- NOTIFY is delivered at commit, so a listener never hears of a state it cannot yet read.
-- When a request carries a W3C trace context it sets `tasker.traceparent` for its transaction
-- and the payload carries it on, so the trace follows the hop through the database.

CREATE FUNCTION tasker.current_traceparent() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT nullif(current_setting('tasker.traceparent', true), '')
$$;

CREATE FUNCTION tasker.send_task_ready(
    p_task_uuid uuid, p_ready_steps integer, p_triggered_by text,
    p_step_uuid uuid, p_step_state text
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_task record;
    v_payload jsonb;
    v_traceparent text := tasker.current_traceparent();
BEGIN
    SELECT t.namespace, t.priority, t.state INTO v_task FROM tasker.tasks t WHERE t.task_uuid = p_task_uuid;
    -- a finished or cancelled task has nothing to enqueue
    IF NOT FOUND OR v_task.state NOT IN ('pending', 'in_progress') THEN
        RETURN;
    END IF;
    v_payload := jsonb_build_object(
        'task_uuid', p_task_uuid,
        'namespace', v_task.namespace,
        'priority', v_task.priority,
        'ready_steps', p_ready_steps,
        'triggered_by', p_triggered_by,
        'step_uuid', p_step_uuid,
        'step_state', p_step_state,
        'task_state', v_task.state);
    IF v_traceparent IS NOT NULL THEN
        v_payload := v_payload || jsonb_build_object('traceparent', left(v_traceparent, 128));
    END IF;
    PERFORM pg_notify('tasker_task_ready', v_payload::text);
    PERFORM pg_notify('tasker_task_ready.' || v_task.namespace, v_payload::text);
END
$$;

CREATE FUNCTION tasker.notify_task_ready_on_step_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_ready integer;
BEGIN
    IF NEW.state IN ('complete', 'resolved_manually') THEN
        -- only the children of this step are judged
        SELECT count(*) INTO v_ready
        FROM tasker.ready_among(ARRAY(
            SELECT e.child_step_uuid FROM tasker.step_edges e WHERE e.parent_step_uuid = NEW.step_uuid));
    ELSIF NEW.state = 'pending' AND OLD.state = 'waiting_for_retry' THEN
        -- back from a retry backoff: the step itself is what became ready
        SELECT count(*) INTO v_ready FROM tasker.ready_among(ARRAY[NEW.step_uuid]);
    ELSE
        RETURN NULL;
    END IF;
    IF v_ready > 0 THEN
        PERFORM tasker.send_task_ready(NEW.task_uuid, v_ready, 'step_transition', NEW.step_uuid, NEW.state);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER workflow_steps_notify_ready AFTER UPDATE OF state ON tasker.workflow_steps
    FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state
          AND (NEW.state IN ('complete', 'resolved_manually')
               OR (NEW.state = 'pending' AND OLD.state = 'waiting_for_retry')))
    EXECUTE FUNCTION tasker.notify_task_ready_on_step_transition();

-- A new task's steps and edges are written after the task row, so the check runs at commit
-- (deferred constraint trigger), when the whole DAG is there.
CREATE FUNCTION tasker.notify_task_start() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_ready integer;
BEGIN
    SELECT count(*) INTO v_ready FROM tasker.ready_steps_of_task(NEW.task_uuid);
    IF v_ready > 0 THEN
        PERFORM tasker.send_task_ready(NEW.task_uuid, v_ready, 'task_start', NULL, NULL);
    END IF;
    RETURN NULL;
END
$$;
CREATE CONSTRAINT TRIGGER tasks_notify_start AFTER INSERT ON tasker.tasks
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION tasker.notify_task_start();

CREATE FUNCTION tasker.notify_task_state_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_payload jsonb := jsonb_build_object(
        'task_uuid', NEW.task_uuid,
        'namespace', NEW.namespace,
        'priority', NEW.priority,
        'from_state', OLD.state,
        'to_state', NEW.state);
    v_traceparent text := tasker.current_traceparent();
BEGIN
    IF v_traceparent IS NOT NULL THEN
        v_payload := v_payload || jsonb_build_object('traceparent', left(v_traceparent, 128));
    END IF;
    PERFORM pg_notify('tasker_task_state', v_payload::text);
    PERFORM pg_notify('tasker_task_state.' || NEW.namespace, v_payload::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER tasks_notify_state AFTER UPDATE OF state ON tasker.tasks
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION tasker.notify_task_state_change();

CREATE FUNCTION tasker.notify_namespace_created() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tasker_namespace_created', jsonb_build_object('namespace', NEW.name)::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER namespaces_notify_created AFTER INSERT ON tasker.namespaces
    FOR EACH ROW EXECUTE FUNCTION tasker.notify_namespace_created();

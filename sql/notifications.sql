-- Notifications: the announcements the database makes the moment readiness or a task's
-- state changes (pg_notify on tasker_task_ready and tasker_task_state).
--
-- The definitions that run, one per function: what a fresh database has after every migration
-- in migrations/. This file is not applied; the migrations are (append-only: a change is a new
-- migration). tests/sql_layout.rs fails when a function's live definition differs from the one
-- here, so a change to a function is made in a new migration and here, in the same commit.
-- Each definition names the migration it comes from.


-- The W3C trace context the caller set for this transaction (`tasker.traceparent`), if any:
-- the announcements carry it, so a trace follows the hop through the database.
-- (from migrations/20261127000001_baseline.sql)
CREATE FUNCTION tasker.current_traceparent() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT nullif(current_setting('tasker.traceparent', true), '')
$$;

-- A replica's connections announce its id (`tasker.replica_id`, a connection setting); the
-- readiness announcement names the replica whose transaction made the steps ready, and that
-- replica claims the task first while it listens. Changes made by anything else carry none.
-- (from migrations/20261204000027_completion_answers_its_claim.sql)
CREATE OR REPLACE FUNCTION tasker.send_task_ready(p_task_uuid uuid, p_namespace text, p_triggered_by text)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_traceparent text;
    v_replica text;
    v_payload jsonb;
BEGIN
    v_traceparent := tasker.current_traceparent();
    v_replica := nullif(current_setting('tasker.replica_id', true), '');
    v_payload := jsonb_build_object(
        'task_uuid', p_task_uuid, 'namespace', p_namespace, 'triggered_by', p_triggered_by);
    IF v_traceparent IS NOT NULL THEN
        v_payload := v_payload || jsonb_build_object('traceparent', left(v_traceparent, 128));
    END IF;
    IF v_replica IS NOT NULL THEN
        v_payload := v_payload || jsonb_build_object('replica', v_replica);
    END IF;
    PERFORM pg_notify('tasker_task_ready', v_payload::text);
END
$$;

-- A task changed state: announced on tasker_task_state (WatchTask streams and observers
-- wake on it).
-- (from migrations/20261127000001_baseline.sql)
CREATE FUNCTION tasker.notify_task_state_change() RETURNS trigger
LANGUAGE plpgsql
AS $$
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
    RETURN NULL;
END
$$;

-- Replicas split the claiming: each registered replica also says its deployment mode and
-- whether its LISTEN connection is up. The replicas listening now are the "claimers": a
-- notification for a task is worked first by one of them only (a stable hash of the task over
-- the claimers, computed by the service), instead of by every replica racing for the claim.
-- When the claimers change, every replica sweeps for ready tasks, so an event that fell
-- between two views of the fleet is not lost.

ALTER TABLE tasker.replicas
    ADD COLUMN deployment_mode text
        CHECK (deployment_mode IN ('EventDrivenOnly', 'Hybrid', 'PollingOnly')),
    ADD COLUMN listening boolean NOT NULL DEFAULT false;

DROP FUNCTION tasker.replica_heartbeat(uuid, text, text, bigint);

-- A replica's heartbeat: its row created or refreshed (with its mode and listener state),
-- long-gone rows removed; returns how many other replicas are alive, the fleet's mode, and the
-- claimers (replicas alive and listening, this one included if it listens), sorted.
-- Asynchronous commit: a lost heartbeat is only a late one.
CREATE FUNCTION tasker.replica_heartbeat(p_replica_id uuid, p_address text, p_version text,
                                         p_gone_after_ms bigint, p_mode text,
                                         p_listening boolean,
                                         OUT other_replicas integer, OUT fleet_mode text,
                                         OUT claimers uuid[])
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    INSERT INTO tasker.replicas AS r (replica_id, address, version, deployment_mode, listening)
    VALUES (p_replica_id, p_address, p_version, p_mode, p_listening)
    ON CONFLICT (replica_id) DO UPDATE
        SET heartbeat_at = clock_timestamp(),
            deployment_mode = EXCLUDED.deployment_mode,
            listening = EXCLUDED.listening;
    DELETE FROM tasker.replicas r
    WHERE r.heartbeat_at < clock_timestamp() - make_interval(secs => p_gone_after_ms * 10 / 1000.0);
    SELECT count(*) FILTER (WHERE r.replica_id <> p_replica_id)::int,
           coalesce(array_agg(r.replica_id ORDER BY r.replica_id) FILTER (WHERE r.listening),
                    '{}'::uuid[])
      INTO other_replicas, claimers
      FROM tasker.replicas r
     WHERE r.heartbeat_at >= clock_timestamp() - make_interval(secs => p_gone_after_ms / 1000.0);
    SELECT f.deployment_mode INTO fleet_mode FROM tasker.fleet_settings f;
END
$$;

-- A replica's connections announce its id (`tasker.replica_id`, a connection setting); the
-- readiness announcement names the replica whose transaction made the steps ready, and that
-- replica claims the task first while it listens. Changes made by anything else carry none.
CREATE OR REPLACE FUNCTION tasker.send_task_ready(p_task_uuid uuid, p_namespace text, p_triggered_by text)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_traceparent text := tasker.current_traceparent();
    v_replica text := nullif(current_setting('tasker.replica_id', true), '');
    v_payload jsonb := jsonb_build_object(
        'task_uuid', p_task_uuid, 'namespace', p_namespace, 'triggered_by', p_triggered_by);
BEGIN
    IF v_traceparent IS NOT NULL THEN
        v_payload := v_payload || jsonb_build_object('traceparent', left(v_traceparent, 128));
    END IF;
    IF v_replica IS NOT NULL THEN
        v_payload := v_payload || jsonb_build_object('replica', v_replica);
    END IF;
    PERFORM pg_notify('tasker_task_ready', v_payload::text);
END
$$;

-- Replicas: the registry each service process heart-beats into, and the fleet's mode.
--
-- The definitions that run, one per function: what a fresh database has after every migration
-- in migrations/. This file is not applied; the migrations are (append-only: a change is a new
-- migration). tests/sql_layout.rs fails when a function's live definition differs from the one
-- here, so a change to a function is made in a new migration and here, in the same commit.
-- Each definition names the migration it comes from.


-- Set (or with NULL clear) the fleet's mode and announce it to the listening replicas; the
-- others read it with their next heartbeat.
-- (from migrations/20261127000001_baseline.sql)
CREATE FUNCTION tasker.set_fleet_mode(p_mode text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO tasker.fleet_settings AS f (singleton, deployment_mode) VALUES (true, p_mode)
    ON CONFLICT (singleton) DO UPDATE SET deployment_mode = p_mode, changed_at = clock_timestamp();
    PERFORM pg_notify('tasker_fleet_mode', json_build_object('mode', p_mode)::text);
END
$$;

-- A replica's heartbeat: its row created or refreshed (with its mode, whether its LISTEN
-- connection is up and whether it serves every namespace), long-gone rows removed; returns how
-- many other replicas are alive, the fleet's mode, and the claimers: the replicas alive,
-- listening and serving every namespace, sorted (a notification for a task is worked first by
-- one of them, chosen by the service). Asynchronous commit: a lost heartbeat is only a late one.
-- (from migrations/20261127000007_claimers_serve_every_namespace.sql)
CREATE FUNCTION tasker.replica_heartbeat(p_replica_id uuid, p_address text, p_version text,
                                         p_gone_after_ms bigint, p_mode text,
                                         p_listening boolean, p_serves_every_namespace boolean,
                                         OUT other_replicas integer, OUT fleet_mode text,
                                         OUT claimers uuid[])
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    INSERT INTO tasker.replicas AS r (replica_id, address, version, deployment_mode, listening,
                                      serves_every_namespace)
    VALUES (p_replica_id, p_address, p_version, p_mode, p_listening, p_serves_every_namespace)
    ON CONFLICT (replica_id) DO UPDATE
        SET heartbeat_at = clock_timestamp(),
            deployment_mode = EXCLUDED.deployment_mode,
            listening = EXCLUDED.listening,
            serves_every_namespace = EXCLUDED.serves_every_namespace;
    DELETE FROM tasker.replicas r
    WHERE r.heartbeat_at < clock_timestamp() - make_interval(secs => p_gone_after_ms * 10 / 1000.0);
    SELECT count(*) FILTER (WHERE r.replica_id <> p_replica_id)::int,
           coalesce(array_agg(r.replica_id ORDER BY r.replica_id)
                        FILTER (WHERE r.listening AND r.serves_every_namespace),
                    '{}'::uuid[])
      INTO other_replicas, claimers
      FROM tasker.replicas r
     WHERE r.heartbeat_at >= clock_timestamp() - make_interval(secs => p_gone_after_ms / 1000.0);
    SELECT f.deployment_mode INTO fleet_mode FROM tasker.fleet_settings f;
END
$$;

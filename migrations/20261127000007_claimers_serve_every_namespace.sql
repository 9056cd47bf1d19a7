-- Only a replica that serves every namespace is a claimer.
--
-- A replica configured for some namespaces only (orchestration.namespaces) drops the
-- readiness events of the others before the claim split. As a claimer it could be the one an
-- event falls to (as its origin, or by the hash), and every other replica would leave that
-- event to it: the task stranded until a sweep (in EventDrivenOnly, until the claimers next
-- change). So the registry now records whether a replica serves every namespace, and the
-- claimers are the replicas alive, listening and serving every namespace. A replica serving
-- some namespaces leaves every event to them; a fleet with no such replica has no claimers,
-- and each replica works the events of its own namespaces (as before the split).

ALTER TABLE tasker.replicas
    ADD COLUMN serves_every_namespace boolean NOT NULL DEFAULT true;

-- The heartbeat of 20261127000002 with one more argument: whether the replica serves every
-- namespace (the claimers count only those that do).
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

-- The older heartbeat, still called by replicas of the previous release during a rolling
-- upgrade: they do not say, and are taken to serve every namespace (as they were); the
-- claimers they are told of are the same as everyone's.
CREATE OR REPLACE FUNCTION tasker.replica_heartbeat(p_replica_id uuid, p_address text, p_version text,
                                                    p_gone_after_ms bigint, p_mode text,
                                                    p_listening boolean,
                                                    OUT other_replicas integer, OUT fleet_mode text,
                                                    OUT claimers uuid[])
LANGUAGE sql AS $$
    SELECT h.other_replicas, h.fleet_mode, h.claimers
    FROM tasker.replica_heartbeat(p_replica_id, p_address, p_version, p_gone_after_ms, p_mode,
                                  p_listening, true) h
$$;

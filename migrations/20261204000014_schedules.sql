-- Cron schedules (issue 23): a schedule's next tick is a deadline whose action is creating a
-- task. The service computes the ticks (a cron expression in an IANA time zone); the database
-- keeps what makes each tick happen once: the schedule's row, locked by the replica firing it,
-- advanced in the same transaction as the task it makes (whose idempotency key names the
-- schedule and the tick), and the deadline every replica's scheduler sleeps towards
-- (schedules.wake_at, read by tasker.next_deadline, announced on tasker_deadlines).
CREATE TABLE tasker.schedules (
    namespace        text NOT NULL,
    name             text NOT NULL,
    cron             text NOT NULL,
    time_zone        text NOT NULL,
    -- the CreateTaskRequest each tick makes, protobuf-encoded (as the service checked it)
    task             bytea NOT NULL,
    overlap          text NOT NULL CHECK (overlap IN ('allow', 'skip', 'buffer_one')),
    catch_up         text NOT NULL CHECK (catch_up IN ('skip', 'run_latest')),
    paused           boolean NOT NULL DEFAULT false,
    -- the next tick (NULL: the expression fires no more)
    next_fire_at     timestamptz,
    -- BUFFER_ONE: a tick kept until the schedule's previous task finishes
    buffered_fire_at timestamptz,
    -- the last task a tick made
    last_task_uuid   uuid,
    -- when the scheduler must look at the schedule: its next tick, or at once when a buffered
    -- tick may run (its previous task finished)
    wake_at          timestamptz,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (namespace, name)
);
CREATE INDEX schedules_wake_idx ON tasker.schedules (wake_at) WHERE NOT paused;

-- What the last ticks of each schedule did (the 100 latest are kept): 'created' (task_uuid),
-- 'skipped' (overlap SKIP, or BUFFER_ONE with a tick already buffered), 'buffered', 'missed'
-- (ticks no replica was up for, dropped by the catch-up policy: the latest of them, and how
-- many). catch_up: the latest missed tick, run by the catch-up policy.
CREATE TABLE tasker.schedule_runs (
    namespace   text NOT NULL,
    schedule    text NOT NULL,
    fire_at     timestamptz NOT NULL,
    outcome     text NOT NULL CHECK (outcome IN ('created', 'skipped', 'buffered', 'missed')),
    task_uuid   uuid,
    catch_up    boolean NOT NULL DEFAULT false,
    missed      integer NOT NULL DEFAULT 0,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (namespace, schedule, fire_at),
    FOREIGN KEY (namespace, schedule) REFERENCES tasker.schedules (namespace, name) ON DELETE CASCADE
);

-- The schedule that made a task (NULL: none), so that its end can release a buffered tick.
ALTER TABLE tasker.tasks ADD COLUMN schedule_name text;

-- A schedule's task finished: a tick it buffered (BUFFER_ONE) may run now. Only tasks made by
-- a schedule pass the trigger's WHEN; the others cost nothing.
CREATE FUNCTION tasker.schedule_task_finished() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE tasker.schedules sc SET wake_at = clock_timestamp()
    WHERE sc.namespace = NEW.namespace AND sc.name = NEW.schedule_name
      AND sc.buffered_fire_at IS NOT NULL AND sc.last_task_uuid = NEW.task_uuid;
    IF FOUND THEN
        PERFORM pg_notify('tasker_deadlines',
                          json_build_object('namespace', NEW.namespace, 'at', clock_timestamp())::text);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER tasks_schedule_task_finished AFTER UPDATE OF state ON tasker.tasks
    FOR EACH ROW WHEN (NEW.schedule_name IS NOT NULL AND NEW.state NOT IN ('pending', 'in_progress'))
    EXECUTE FUNCTION tasker.schedule_task_finished();

-- The earliest retry due time, lease expiry, task start or schedule wake-up.
CREATE OR REPLACE FUNCTION tasker.next_deadline(p_namespaces text[] DEFAULT NULL) RETURNS timestamptz
LANGUAGE sql STABLE
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
    SELECT least(
        (SELECT min(s.next_retry_at) FROM tasker.workflow_steps s JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
         WHERE s.next_retry_at IS NOT NULL AND s.state = 'waiting_for_retry'
           AND tasker.namespace_matches(t.namespace, p_namespaces)),
        (SELECT min(q.visible_at) FROM tasker.step_queue q
         WHERE q.leased_by IS NOT NULL AND tasker.namespace_matches(q.namespace, p_namespaces)),
        (SELECT ts.start_at FROM tasker.task_starts ts
         WHERE tasker.namespace_matches(ts.namespace, p_namespaces)
         ORDER BY ts.start_at LIMIT 1),
        (SELECT sc.wake_at FROM tasker.schedules sc
         WHERE NOT sc.paused AND sc.wake_at IS NOT NULL
           AND tasker.namespace_matches(sc.namespace, p_namespaces)
         ORDER BY sc.wake_at LIMIT 1))
$$;

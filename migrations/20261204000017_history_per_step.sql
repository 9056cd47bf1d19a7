-- Storage per finished step (issue 24, item 5): what a step's history rows carry that another
-- row already says, and vacuum settings for the tables the retention purge deletes from.
--
-- Measured with `tasker bench --storage` (docs/benchmarks.md): a finished step of a 10-step
-- chain kept about 1 KB of history, of which
--   * 108 bytes of its creation row were the task's creation metadata (the request's source
--     and digest), copied onto every step: the task's own creation row, written in the same
--     transaction, keeps it, so a step's creation row keeps none;
--   * 16 bytes of each of its four rows were its task's uuid: the step names its task.

-- The step's history row: as before, without the task's uuid, and a creation row without
-- the task's creation metadata.
CREATE OR REPLACE FUNCTION tasker.workflow_steps_history() RETURNS trigger
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
BEGIN
    INSERT INTO tasker.step_transitions (step_uuid, from_state, to_state, attempt, metadata)
    VALUES (NEW.step_uuid,
            CASE WHEN TG_OP = 'UPDATE' THEN OLD.state END,
            NEW.state, NEW.attempts,
            CASE WHEN TG_OP = 'UPDATE' THEN tasker.transition_metadata() ELSE '{}'::jsonb END);
    RETURN NULL;
END
$$;

ALTER TABLE tasker.step_transitions DROP COLUMN task_uuid;

-- The purge deletes from these tables as fast as the hop inserts into them: vacuum them by a
-- small fraction of dead rows (as workflow_steps already is), so that the space of purged
-- rows is reused before the tables grow, with autovacuum on. (With it off, the service's own
-- table maintenance vacuums them every minute.)
ALTER TABLE tasker.step_transitions SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0);
ALTER TABLE tasker.task_transitions SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0);
ALTER TABLE tasker.step_edges SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0);
ALTER TABLE tasker.tasks SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0);

-- A step's and a task's row rules are checked by their guard triggers, not by CHECK
-- constraints. PostgreSQL (15) reads a table's CHECK constraints from their stored node text and
-- compiles them again at every execution of a statement that writes the table: about 20 us per
-- single-row UPDATE of workflow_steps (its three CHECKs are some 7,000 characters of node
-- text), 33 us against 13 us without them, measured in a loop of 3,000 updates. A hop updates a
-- step about four times (ready, enqueued, started, complete) and its task once, each its own
-- statement: about a tenth of PostgreSQL's CPU per step in a profile of 8 chains (perf:
-- ExecConstraints -> stringToNode). A plpgsql guard compiles its expressions once per session;
-- the rules it adds to the trigger already firing on every update cost about 1 us.
--
-- The rules are the constraints' own, checked BEFORE INSERT OR UPDATE, and a violation is
-- reported as the constraint's was: SQLSTATE 23514 (check_violation) with the same constraint
-- name, which the service maps to the field it names. Like every trigger, they hold for every
-- writer but one that disables triggers (a superuser's session_replication_role = replica).
-- The rows already stored satisfied the constraints; nothing is rewritten.

ALTER TABLE tasker.workflow_steps
    DROP CONSTRAINT workflow_steps_valid,
    DROP CONSTRAINT workflow_steps_timeout_valid,
    DROP CONSTRAINT workflow_steps_schedule_to_start_valid;
ALTER TABLE tasker.tasks
    DROP CONSTRAINT tasks_valid,
    DROP CONSTRAINT tasks_concurrency_key_valid;

-- Before any insert or update of a step: its row rules (23514, named as the CHECK constraints
-- they replace were); on an update, also a legal transition (TK001, whoever writes) and an
-- immutable identity and position.
CREATE OR REPLACE FUNCTION tasker.workflow_steps_guard() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW.state IS DISTINCT FROM OLD.state THEN
            IF NOT tasker.step_transition_allowed(OLD.state, NEW.state) THEN
                RAISE EXCEPTION 'illegal step transition % -> % for step %', OLD.state, NEW.state, OLD.step_uuid
                    USING ERRCODE = 'TK001';
            END IF;
        END IF;
        IF NEW.task_uuid IS DISTINCT FROM OLD.task_uuid OR NEW.step_uuid IS DISTINCT FROM OLD.step_uuid
           OR NEW.position IS DISTINCT FROM OLD.position THEN
            RAISE EXCEPTION 'a step''s identity and position are immutable (step %)', OLD.step_uuid
                USING ERRCODE = 'TK001';
        END IF;
        NEW.updated_at := clock_timestamp();
    END IF;
    -- one expression on the common path; a NULL passes, as in a CHECK (a NOT NULL column's
    -- constraint refuses it after this trigger)
    IF NOT (length(NEW.name) BETWEEN 1 AND 255
            AND NEW.position >= 0
            AND NEW.state IN ('pending', 'enqueued', 'in_progress', 'complete', 'waiting_for_retry',
                              'error', 'cancelled', 'resolved_manually')
            AND NEW.unfinished_parents >= 0
            AND NEW.max_attempts BETWEEN 1 AND 100
            AND NEW.attempts BETWEEN 0 AND NEW.max_attempts) THEN
        RAISE EXCEPTION 'new row for relation "workflow_steps" violates check constraint "workflow_steps_valid"'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'workflow_steps_valid',
                  SCHEMA = 'tasker', TABLE = 'workflow_steps',
                  DETAIL = 'length(name) 1..255, position >= 0, a known state, unfinished_parents >= 0, max_attempts 1..100, attempts 0..max_attempts';
    END IF;
    IF NEW.timeout_ms NOT BETWEEN 1 AND 604800000 THEN
        RAISE EXCEPTION 'new row for relation "workflow_steps" violates check constraint "workflow_steps_timeout_valid"'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'workflow_steps_timeout_valid',
                  SCHEMA = 'tasker', TABLE = 'workflow_steps', DETAIL = 'timeout_ms 1..604800000';
    END IF;
    IF NEW.schedule_to_start_ms NOT BETWEEN 1 AND 604800000 THEN
        RAISE EXCEPTION 'new row for relation "workflow_steps" violates check constraint "workflow_steps_schedule_to_start_valid"'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'workflow_steps_schedule_to_start_valid',
                  SCHEMA = 'tasker', TABLE = 'workflow_steps', DETAIL = 'schedule_to_start_ms 1..604800000';
    END IF;
    RETURN NEW;
END
$$;

-- Before any insert or update of a task: its row rules (23514, named as the CHECK constraints
-- they replace were); on an update, also a legal transition (TK001) and an immutable identity
-- and namespace.
CREATE OR REPLACE FUNCTION tasker.tasks_guard() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW.state IS DISTINCT FROM OLD.state THEN
            IF NOT tasker.task_transition_allowed(OLD.state, NEW.state) THEN
                RAISE EXCEPTION 'illegal task transition % -> % for task %', OLD.state, NEW.state, OLD.task_uuid
                    USING ERRCODE = 'TK001';
            END IF;
        END IF;
        IF NEW.task_uuid IS DISTINCT FROM OLD.task_uuid OR NEW.namespace IS DISTINCT FROM OLD.namespace THEN
            RAISE EXCEPTION 'a task''s identity and namespace are immutable (task %)', OLD.task_uuid
                USING ERRCODE = 'TK001';
        END IF;
        NEW.updated_at := clock_timestamp();
    END IF;
    -- a NULL passes, as in a CHECK (a NOT NULL column's constraint refuses it after this)
    IF NOT (length(NEW.name) BETWEEN 1 AND 255
            AND NEW.priority BETWEEN -1000 AND 1000
            AND NEW.state IN ('pending', 'in_progress', 'complete', 'error', 'cancelled')
            AND NEW.remaining_steps >= 0
            AND (NEW.idempotency_key IS NULL OR length(NEW.idempotency_key) BETWEEN 1 AND 255)) THEN
        RAISE EXCEPTION 'new row for relation "tasks" violates check constraint "tasks_valid"'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'tasks_valid',
                  SCHEMA = 'tasker', TABLE = 'tasks',
                  DETAIL = 'length(name) 1..255, priority -1000..1000, a known state, remaining_steps >= 0, idempotency_key absent or of length 1..255';
    END IF;
    IF length(NEW.concurrency_key) NOT BETWEEN 1 AND 255 THEN
        RAISE EXCEPTION 'new row for relation "tasks" violates check constraint "tasks_concurrency_key_valid"'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'tasks_concurrency_key_valid',
                  SCHEMA = 'tasker', TABLE = 'tasks', DETAIL = 'concurrency_key absent or of length 1..255';
    END IF;
    RETURN NEW;
END
$$;

DROP TRIGGER workflow_steps_guard ON tasker.workflow_steps;
CREATE TRIGGER workflow_steps_guard BEFORE INSERT OR UPDATE ON tasker.workflow_steps
    FOR EACH ROW EXECUTE FUNCTION tasker.workflow_steps_guard();
DROP TRIGGER tasks_guard ON tasker.tasks;
CREATE TRIGGER tasks_guard BEFORE INSERT OR UPDATE ON tasker.tasks
    FOR EACH ROW EXECUTE FUNCTION tasker.tasks_guard();

-- The keys that tie steps to their task and edges to their steps are checked once per
-- statement, not row by row (issue 25: PostgreSQL's CPU per step).
--
-- Three foreign keys did it row by row: workflow_steps.task_uuid -> tasks, and both ends of
-- an edge -> workflow_steps (task_uuid, step_uuid). PostgreSQL checks a foreign key on every
-- insert, and on every update of a row version that the transaction itself wrote, even when
-- the key did not change: a hop updates its successor up to three times in one transaction,
-- so two checks of the task's key per hop (a query each, with its executor start-up), and a
-- chain of 10 created paid 10 checks of its task and 18 of its steps. Dropping the three on a
-- copy ran the hop's harness (one backend, chains of 10, each hop its own transaction) in
-- 0.945x the time.
--
-- What the keys guaranteed is kept, whoever writes:
-- - a step's task exists, and a step's ends of an edge are steps of the edge's task: checked
--   after each INSERT statement, for all its rows at once, with the rows referred to locked
--   FOR KEY SHARE as a foreign key's check locks them (a concurrent delete waits, or the insert
--   fails if the delete came first);
-- - nothing refers to a deleted task or step: checked after each DELETE statement on tasks and
--   workflow_steps (only the retention purge deletes them, children first);
-- - the keys do not change: the guards refuse an update of a step's task_uuid or step_uuid, of
--   a task's task_uuid, and of any edge (as before), so no update needs a check at all.
-- A violation raises 23503 naming the dropped constraint, as the foreign key did (the service
-- maps step_edges_*_same_task to an invalid steps.depends_on).

ALTER TABLE tasker.workflow_steps DROP CONSTRAINT workflow_steps_task_uuid_fkey;
ALTER TABLE tasker.step_edges DROP CONSTRAINT step_edges_parent_same_task;
ALTER TABLE tasker.step_edges DROP CONSTRAINT step_edges_child_same_task;

-- New steps name a task that exists (the foreign key workflow_steps_task_uuid_fkey it
-- replaces, once per statement): the tasks are locked FOR KEY SHARE, as the key's check did.
CREATE FUNCTION tasker.workflow_steps_task_exists() RETURNS trigger
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_tasks uuid[];
    v_found integer;
    v_missing record;
BEGIN
    v_tasks := ARRAY(SELECT DISTINCT n.task_uuid FROM new_steps n);
    SELECT count(*) INTO v_found
    FROM (SELECT 1 FROM tasker.tasks t WHERE t.task_uuid = ANY (v_tasks) FOR KEY SHARE OF t) l;
    IF v_found < cardinality(v_tasks) THEN
        SELECT n.step_uuid, n.task_uuid INTO v_missing FROM new_steps n
        WHERE NOT EXISTS (SELECT 1 FROM tasker.tasks t WHERE t.task_uuid = n.task_uuid)
        LIMIT 1;
        RAISE EXCEPTION 'step % names task %, which does not exist', v_missing.step_uuid, v_missing.task_uuid
            USING ERRCODE = '23503', CONSTRAINT = 'workflow_steps_task_uuid_fkey',
                  TABLE = 'workflow_steps', SCHEMA = 'tasker';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER workflow_steps_task_exists AFTER INSERT ON tasker.workflow_steps
    REFERENCING NEW TABLE AS new_steps
    FOR EACH STATEMENT EXECUTE FUNCTION tasker.workflow_steps_task_exists();

-- New edges go between two steps of the edge's task (the foreign keys
-- step_edges_parent_same_task and step_edges_child_same_task they replace: both ends locked
-- FOR KEY SHARE), from a lower position to a higher one. Positions are a topological order,
-- so no edge can close a cycle: the database's own guarantee, one comparison per edge (two
-- key look-ups, which also find the ends), whatever the shape or size of the DAG. (A recursive
-- walk of descendants per new edge cost W^4 joins for a layered DAG of width W: 8 s and
-- 167 MiB at W = 30.) CreateTask validates the DAG and computes the positions before writing.
CREATE OR REPLACE FUNCTION tasker.step_edges_in_order() RETURNS trigger
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_edge record;
BEGIN
    SELECT n.parent_step_uuid, n.child_step_uuid, n.task_uuid,
           p.position AS parent_position, c.position AS child_position INTO v_edge
    FROM new_edges n
    LEFT JOIN LATERAL (SELECT s.position FROM tasker.workflow_steps s
                       WHERE s.step_uuid = n.parent_step_uuid AND s.task_uuid = n.task_uuid
                       FOR KEY SHARE) p ON true
    LEFT JOIN LATERAL (SELECT s.position FROM tasker.workflow_steps s
                       WHERE s.step_uuid = n.child_step_uuid AND s.task_uuid = n.task_uuid
                       FOR KEY SHARE) c ON true
    WHERE p.position IS NULL OR c.position IS NULL OR p.position >= c.position
    LIMIT 1;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF v_edge.parent_position IS NULL THEN
        RAISE EXCEPTION 'edge % -> %: the parent is not a step of task %',
            v_edge.parent_step_uuid, v_edge.child_step_uuid, v_edge.task_uuid
            USING ERRCODE = '23503', CONSTRAINT = 'step_edges_parent_same_task',
                  TABLE = 'step_edges', SCHEMA = 'tasker';
    END IF;
    IF v_edge.child_position IS NULL THEN
        RAISE EXCEPTION 'edge % -> %: the child is not a step of task %',
            v_edge.parent_step_uuid, v_edge.child_step_uuid, v_edge.task_uuid
            USING ERRCODE = '23503', CONSTRAINT = 'step_edges_child_same_task',
                  TABLE = 'step_edges', SCHEMA = 'tasker';
    END IF;
    RAISE EXCEPTION 'edge % -> % goes against the task''s order: the dependencies form a cycle',
        v_edge.parent_step_uuid, v_edge.child_step_uuid
        USING ERRCODE = 'TK003';
END
$$;

-- A deleted task leaves no step behind (the foreign key's NO ACTION, once per statement).
CREATE FUNCTION tasker.tasks_deleted_leave_no_steps() RETURNS trigger
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_step record;
BEGIN
    SELECT s.step_uuid, s.task_uuid INTO v_step
    FROM old_tasks o JOIN tasker.workflow_steps s ON s.task_uuid = o.task_uuid
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'task % is deleted while its step % remains', v_step.task_uuid, v_step.step_uuid
            USING ERRCODE = '23503', CONSTRAINT = 'workflow_steps_task_uuid_fkey',
                  TABLE = 'workflow_steps', SCHEMA = 'tasker';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER tasks_deleted_leave_no_steps AFTER DELETE ON tasker.tasks
    REFERENCING OLD TABLE AS old_tasks
    FOR EACH STATEMENT EXECUTE FUNCTION tasker.tasks_deleted_leave_no_steps();

-- A deleted step leaves no edge behind (the edge keys' NO ACTION, once per statement).
CREATE FUNCTION tasker.workflow_steps_deleted_leave_no_edges() RETURNS trigger
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_edge record;
BEGIN
    SELECT e.parent_step_uuid, e.child_step_uuid, e.end_deleted INTO v_edge
    FROM old_steps o
    JOIN LATERAL (SELECT x.parent_step_uuid, x.child_step_uuid, 'parent' AS end_deleted
                  FROM tasker.step_edges x WHERE x.parent_step_uuid = o.step_uuid
                  UNION ALL
                  SELECT x.parent_step_uuid, x.child_step_uuid, 'child'
                  FROM tasker.step_edges x WHERE x.child_step_uuid = o.step_uuid) e ON true
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'the % of edge % -> % is deleted while the edge remains',
            v_edge.end_deleted, v_edge.parent_step_uuid, v_edge.child_step_uuid
            USING ERRCODE = '23503', CONSTRAINT = format('step_edges_%s_same_task', v_edge.end_deleted),
                  TABLE = 'step_edges', SCHEMA = 'tasker';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER workflow_steps_deleted_leave_no_edges AFTER DELETE ON tasker.workflow_steps
    REFERENCING OLD TABLE AS old_steps
    FOR EACH STATEMENT EXECUTE FUNCTION tasker.workflow_steps_deleted_leave_no_edges();

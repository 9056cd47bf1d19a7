-- An eager completion reads what its claim needs on its own way (issue 25: statements per
-- step). tasker.complete_step_and_claim read the step's task and its lease's worker before the
-- completion (which read the task again and deleted the lease's queue row), set a setting so
-- that the completion's readiness announcement was skipped, cleared it, and then looked in
-- the ready set for what the completion had made ready: five statements on every eager hop
-- for what the completion knows. tasker.complete_attempt is the completion with those as its
-- answer (the worker from the queue row it deletes; whether steps of the active task became
-- ready, from the children's counters) and p_announce in place of the setting. The service's
-- plain completion calls it; tasker.complete_step is its announced outcome (for other
-- callers), and complete_steps and complete_steps_and_claim complete their items with it.
-- tasker.send_task_ready no longer reads the setting.

-- Complete an attempt the caller holds (p_lease_token). p_results_bytes: the results' size as
-- a protobuf Value; p_max_parent_results_bytes (NULL: no budget): refused with
-- 'parent_results_too_large', changing nothing, when these results would give a child more
-- parent results than that to be leased with, as sent. `outcome` is 'completed' or why not;
-- with it, what the caller needs for a claim in the same transaction, read on the way: the
-- step's task and namespace, the worker whose lease ended, and whether steps of the active
-- task became ready. Those are announced on tasker_task_ready when p_announce; a caller that
-- claims the task itself (eager dispatch) passes false, and sends nothing.
-- (from migrations/20261204000027_completion_answers_its_claim.sql)
CREATE FUNCTION tasker.complete_attempt(
    p_step_uuid uuid, p_attempt integer, p_lease_token uuid, p_results jsonb,
    p_results_bytes integer, p_metadata jsonb, p_max_parent_results_bytes integer,
    p_announce boolean,
    OUT outcome text, OUT task_uuid uuid, OUT namespace text, OUT worker_id text,
    OUT made_ready boolean
)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_task_uuid uuid;
    v_bytes integer;
    v_task record;
    v_finished record;
BEGIN
    made_ready := false;
    SELECT s.task_uuid, tasker.parent_entry_bytes(s.name, p_results_bytes)
    INTO v_task_uuid, v_bytes
    FROM tasker.workflow_steps s WHERE s.step_uuid = p_step_uuid;
    IF NOT FOUND THEN outcome := 'step_not_found'; RETURN; END IF;
    task_uuid := v_task_uuid;
    SELECT t.namespace, t.state INTO v_task FROM tasker.tasks t
    WHERE t.task_uuid = v_task_uuid FOR NO KEY UPDATE;
    namespace := v_task.namespace;
    outcome := tasker.check_lease(p_step_uuid, p_attempt, p_lease_token);
    IF outcome IS NOT NULL THEN RETURN; END IF;
    -- the children's counters cannot move meanwhile: every finish holds the task's row lock
    IF p_max_parent_results_bytes IS NOT NULL AND EXISTS (
        SELECT 1 FROM tasker.step_edges e
        CROSS JOIN LATERAL (SELECT c.parent_results_bytes FROM tasker.workflow_steps c
                            WHERE c.step_uuid = e.child_step_uuid OFFSET 0) c
        WHERE e.parent_step_uuid = p_step_uuid
          AND c.parent_results_bytes + v_bytes > p_max_parent_results_bytes) THEN
        outcome := 'parent_results_too_large';
        RETURN;
    END IF;
    PERFORM set_config('tasker.transition_metadata', p_metadata::text, true);
    DELETE FROM tasker.step_queue q WHERE q.step_uuid = p_step_uuid AND q.attempt = p_attempt
    RETURNING q.leased_by INTO worker_id;
    -- data_bytes: see 20261204000003
    UPDATE tasker.workflow_steps s
    SET state = 'complete', results = coalesce(p_results, '{}'::jsonb), completed_at = clock_timestamp(),
        data_bytes = s.data_bytes + p_results_bytes
    WHERE s.step_uuid = p_step_uuid AND s.state = 'in_progress' AND s.attempts = p_attempt;
    SELECT * INTO v_finished FROM tasker.finish_step(p_step_uuid, v_task_uuid, v_bytes);
    made_ready := v_finished.ready_children > 0 AND v_finished.task_state IN ('pending', 'in_progress');
    IF made_ready AND p_announce THEN
        PERFORM tasker.send_task_ready(v_task_uuid, v_task.namespace, 'step_transition');
    END IF;
    outcome := 'completed';
END
$$;

-- Complete an attempt the caller holds: tasker.complete_attempt's outcome, its readiness
-- announced.
-- (from migrations/20261204000027_completion_answers_its_claim.sql)
CREATE OR REPLACE FUNCTION tasker.complete_step(
    p_step_uuid uuid, p_attempt integer, p_lease_token uuid, p_results jsonb,
    p_results_bytes integer, p_metadata jsonb DEFAULT '{}'::jsonb,
    p_max_parent_results_bytes integer DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_outcome text;
BEGIN
    SELECT c.outcome INTO v_outcome
    FROM tasker.complete_attempt(p_step_uuid, p_attempt, p_lease_token, p_results,
                                 p_results_bytes, p_metadata, p_max_parent_results_bytes, true) c;
    RETURN v_outcome;
END
$$;

-- Many completions in one transaction (one commit, one pass through the NOTIFY commit lock).
-- Each item is exactly tasker.complete_step (complete_attempt, announced), with its own token and trace context; items are
-- taken in task order, so two batches lock tasks in the same order and never wait on each
-- other in a cycle. Returns each item's outcome by its position in the input arrays.
-- (from migrations/20261204000027_completion_answers_its_claim.sql)
CREATE OR REPLACE FUNCTION tasker.complete_steps(
    p_steps uuid[], p_attempts integer[], p_lease_tokens uuid[], p_results jsonb[],
    p_results_bytes integer[], p_traceparents text[], p_metadata jsonb DEFAULT '{}'::jsonb,
    p_max_parent_results_bytes integer DEFAULT NULL
) RETURNS TABLE (idx integer, outcome text)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_item record;
BEGIN
    FOR v_item IN
        SELECT i.ord::int AS ord, i.step_uuid, s.task_uuid
        FROM unnest(p_steps) WITH ORDINALITY AS i(step_uuid, ord)
        LEFT JOIN LATERAL (SELECT w.task_uuid FROM tasker.workflow_steps w
                           WHERE w.step_uuid = i.step_uuid OFFSET 0) s ON true
        ORDER BY s.task_uuid NULLS FIRST, i.ord
    LOOP
        PERFORM set_config('tasker.traceparent', coalesce(p_traceparents[v_item.ord], ''), true);
        RETURN QUERY SELECT v_item.ord, c.outcome
            FROM tasker.complete_attempt(v_item.step_uuid, p_attempts[v_item.ord],
                                         p_lease_tokens[v_item.ord], p_results[v_item.ord],
                                         p_results_bytes[v_item.ord], p_metadata,
                                         p_max_parent_results_bytes, true) c;
    END LOOP;
END
$$;

-- Complete an attempt (exactly tasker.complete_attempt) and, when that made steps of its task
-- ready, claim the task and enqueue them in the same transaction (exactly
-- tasker.claim_and_enqueue), leasing them first to the completing worker and then to the
-- parked fetches: p_takers[0] is the completing worker's ask ({"max", "lease_ms", "queues"};
-- its worker_id is the completed lease's), the rest are parked fetches as for
-- claim_and_enqueue. `completion` is complete_step's answer, with the step's task and the
-- completed lease's worker; the other columns are claim_and_enqueue's, NULL outcome when no
-- claim was tried (refused, or nothing made ready).
-- When another holds the task's claim, the readiness notification is sent as a plain
-- completion sends it, and the holder's retry or the listener's pass enqueues the steps.
-- Commits synchronously: a completion is durable, whatever the enqueue would allow.
-- (from migrations/20261204000027_completion_answers_its_claim.sql)
CREATE OR REPLACE FUNCTION tasker.complete_step_and_claim(
    p_step_uuid uuid, p_attempt integer, p_lease_token uuid, p_results jsonb,
    p_results_bytes integer, p_metadata jsonb, p_max_parent_results_bytes integer,
    p_enqueue_metadata jsonb, p_takers jsonb
)
RETURNS TABLE (completion text, task_uuid uuid, worker_id text, outcome text, namespace text,
               enqueued_steps uuid[], max_ready_wait_ms double precision, leased jsonb,
               queued jsonb, held jsonb)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_c record;
    v_e record;
BEGIN
    -- the completion reads the step's task and its lease's worker on its way, and leaves the
    -- steps it made ready in the ready set, announcing nothing
    SELECT c.outcome, c.task_uuid, c.namespace, c.worker_id, c.made_ready INTO v_c
    FROM tasker.complete_attempt(p_step_uuid, p_attempt, p_lease_token, p_results,
                                 p_results_bytes, p_metadata, p_max_parent_results_bytes, false) c;
    IF NOT v_c.made_ready THEN
        RETURN QUERY SELECT v_c.outcome, v_c.task_uuid, v_c.worker_id, NULL::text, NULL::text,
                            '{}'::uuid[], NULL::float8, '[]'::jsonb, '[]'::jsonb, '[]'::jsonb;
        RETURN;
    END IF;
    SELECT * INTO v_e FROM tasker.claim_and_enqueue(
        v_c.task_uuid, p_enqueue_metadata,
        jsonb_set(p_takers, '{0,worker_id}', to_jsonb(coalesce(v_c.worker_id, ''))), NULL) e;
    -- claim_and_enqueue commits asynchronously when it hands nothing over: not a completion
    PERFORM set_config('synchronous_commit', 'on', true);
    IF v_e.outcome = 'claimed_elsewhere' THEN
        PERFORM tasker.send_task_ready(v_c.task_uuid, v_c.namespace, 'step_transition');
    END IF;
    RETURN QUERY SELECT v_c.outcome, v_c.task_uuid, v_c.worker_id, v_e.outcome, v_e.namespace,
                        v_e.enqueued_steps,
                        v_e.max_ready_wait_ms, v_e.leased, v_e.queued, v_e.held;
END
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

-- Many completions in one transaction (one commit, one pass through the NOTIFY commit lock),
-- each item exactly tasker.complete_step (complete_attempt, announced), or, with a taker (p_takers[i]: the completing
-- worker's ask, as for complete_step_and_claim), exactly tasker.complete_step_and_claim, with
-- its own token and trace context. Items are taken in task order, so two batches lock tasks in
-- the same order and never wait on each other in a cycle. Returns each item's answer by its
-- position in the input arrays: complete_step_and_claim's columns (for an item without a taker,
-- the completion alone). Commits synchronously.
-- (from migrations/20261204000027_completion_answers_its_claim.sql)
CREATE OR REPLACE FUNCTION tasker.complete_steps_and_claim(
    p_steps uuid[], p_attempts integer[], p_lease_tokens uuid[], p_results jsonb[],
    p_results_bytes integer[], p_traceparents text[], p_takers jsonb[],
    p_metadata jsonb DEFAULT '{}'::jsonb, p_enqueue_metadata jsonb DEFAULT '{}'::jsonb,
    p_max_parent_results_bytes integer DEFAULT NULL
) RETURNS TABLE (idx integer, completion text, task_uuid uuid, worker_id text, outcome text,
                 namespace text, enqueued_steps uuid[], max_ready_wait_ms double precision,
                 leased jsonb, queued jsonb, held jsonb)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_item record;
BEGIN
    FOR v_item IN
        SELECT i.ord::int AS ord, i.step_uuid, s.task_uuid
        FROM unnest(p_steps) WITH ORDINALITY AS i(step_uuid, ord)
        LEFT JOIN LATERAL (SELECT w.task_uuid FROM tasker.workflow_steps w
                           WHERE w.step_uuid = i.step_uuid OFFSET 0) s ON true
        ORDER BY s.task_uuid NULLS FIRST, i.ord
    LOOP
        PERFORM set_config('tasker.traceparent', coalesce(p_traceparents[v_item.ord], ''), true);
        IF p_takers[v_item.ord] IS NULL THEN
            RETURN QUERY SELECT v_item.ord, c.outcome,
                NULL::uuid, NULL::text, NULL::text, NULL::text, '{}'::uuid[], NULL::float8,
                '[]'::jsonb, '[]'::jsonb, '[]'::jsonb
            FROM tasker.complete_attempt(v_item.step_uuid, p_attempts[v_item.ord],
                                         p_lease_tokens[v_item.ord], p_results[v_item.ord],
                                         p_results_bytes[v_item.ord], p_metadata,
                                         p_max_parent_results_bytes, true) c;
        ELSE
            RETURN QUERY SELECT v_item.ord, e.*
            FROM tasker.complete_step_and_claim(
                v_item.step_uuid, p_attempts[v_item.ord], p_lease_tokens[v_item.ord],
                p_results[v_item.ord], p_results_bytes[v_item.ord], p_metadata,
                p_max_parent_results_bytes, p_enqueue_metadata,
                jsonb_build_array(p_takers[v_item.ord])) e;
        END IF;
    END LOOP;
    -- an item's claim may have turned the commit asynchronous: completions are durable
    PERFORM set_config('synchronous_commit', 'on', true);
END
$$;

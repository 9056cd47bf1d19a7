-- Eager dispatch (issue 25, lever 1): a worker that completes a step may ask for its next work
-- in the same call, and the completion's own transaction claims the task, enqueues the steps
-- it made ready and leases them to that worker. A chain's hop becomes one commit and one call,
-- instead of a completion commit, a notification, and an enqueue transaction of its own.

-- The readiness notification of a task whose claim-and-enqueue this very transaction runs
-- (tasker.ready_claimed_inline = the task's uuid) is not sent: the work it would ask for is
-- being done here. tasker.complete_step_and_claim sends it after all when the claim is held
-- elsewhere.
CREATE OR REPLACE FUNCTION tasker.send_task_ready(p_task_uuid uuid, p_namespace text, p_triggered_by text)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_traceparent text;
    v_replica text;
    v_payload jsonb;
BEGIN
    IF current_setting('tasker.ready_claimed_inline', true) = p_task_uuid::text THEN
        RETURN;
    END IF;
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

-- Complete an attempt (exactly tasker.complete_step) and, when that made steps of its task
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
CREATE FUNCTION tasker.complete_step_and_claim(
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
    v_task_uuid uuid;
    v_worker text;
    v_completion text;
    v_e record;
BEGIN
    SELECT s.task_uuid INTO v_task_uuid FROM tasker.workflow_steps s WHERE s.step_uuid = p_step_uuid;
    SELECT q.leased_by INTO v_worker FROM tasker.step_queue q
    WHERE q.step_uuid = p_step_uuid AND q.attempt = p_attempt;
    PERFORM set_config('tasker.ready_claimed_inline', coalesce(v_task_uuid::text, ''), true);
    v_completion := tasker.complete_step(p_step_uuid, p_attempt, p_lease_token, p_results,
                                         p_results_bytes, p_metadata, p_max_parent_results_bytes);
    PERFORM set_config('tasker.ready_claimed_inline', '', true);
    -- a completion that made steps ready left them in the ready set (and sent nothing)
    IF v_completion <> 'completed'
       OR NOT EXISTS (SELECT 1 FROM tasker.ready_steps r WHERE r.task_uuid = v_task_uuid) THEN
        RETURN QUERY SELECT v_completion, v_task_uuid, v_worker, NULL::text, NULL::text,
                            '{}'::uuid[], NULL::float8, '[]'::jsonb, '[]'::jsonb, '[]'::jsonb;
        RETURN;
    END IF;
    SELECT * INTO v_e FROM tasker.claim_and_enqueue(
        v_task_uuid, p_enqueue_metadata,
        jsonb_set(p_takers, '{0,worker_id}', to_jsonb(coalesce(v_worker, ''))), NULL) e;
    -- claim_and_enqueue commits asynchronously when it hands nothing over: not a completion
    PERFORM set_config('synchronous_commit', 'on', true);
    IF v_e.outcome = 'claimed_elsewhere' THEN
        PERFORM tasker.send_task_ready(v_task_uuid, t.namespace, 'step_transition')
        FROM tasker.tasks t WHERE t.task_uuid = v_task_uuid;
    END IF;
    RETURN QUERY SELECT v_completion, v_task_uuid, v_worker, v_e.outcome, v_e.namespace,
                        v_e.enqueued_steps,
                        v_e.max_ready_wait_ms, v_e.leased, v_e.queued, v_e.held;
END
$$;

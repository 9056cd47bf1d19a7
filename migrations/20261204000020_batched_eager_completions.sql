-- Eager completions batched with the others (issue 25): a completion asking for its next
-- steps had to commit alone, so a fan-out's leaves, completed at once by many workers that
-- all asked, lost the one-commit batches plain completions share. The batch function takes an
-- optional taker per item: an item with one is tasker.complete_step_and_claim, an item without
-- is tasker.complete_step, all in one transaction, items in task order as before.

-- Many completions in one transaction (one commit, one pass through the NOTIFY commit lock),
-- each item exactly tasker.complete_step, or, with a taker (p_takers[i]: the completing
-- worker's ask, as for complete_step_and_claim), exactly tasker.complete_step_and_claim, with
-- its own token and trace context. Items are taken in task order, so two batches lock tasks in
-- the same order and never wait on each other in a cycle. Returns each item's answer by its
-- position in the input arrays: complete_step_and_claim's columns (for an item without a taker,
-- the completion alone). Commits synchronously.
CREATE FUNCTION tasker.complete_steps_and_claim(
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
            RETURN QUERY SELECT v_item.ord,
                tasker.complete_step(v_item.step_uuid, p_attempts[v_item.ord],
                                     p_lease_tokens[v_item.ord], p_results[v_item.ord],
                                     p_results_bytes[v_item.ord], p_metadata,
                                     p_max_parent_results_bytes),
                NULL::uuid, NULL::text, NULL::text, NULL::text, '{}'::uuid[], NULL::float8,
                '[]'::jsonb, '[]'::jsonb, '[]'::jsonb;
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

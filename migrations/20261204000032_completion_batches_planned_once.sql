-- A batch of completions is not planned again at every call. Its first statement (the items
-- in task order: an unnest of the step array, each item's task looked up) has a parameter
-- array whose length only a custom plan knows, so PostgreSQL priced the generic plan above
-- the custom ones and planned it afresh at every batch: pg_stat_statements with
-- track_planning, 8 chains, 1,989 plans for 1,978 calls, 0.13 ms each (about 30 us a step).
-- plan_cache_mode = force_generic_plan for the function's call (its nested functions' statements
-- already settled on their generic plans after five custom ones each, as their plan counts show).

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
SET plan_cache_mode = force_generic_plan
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

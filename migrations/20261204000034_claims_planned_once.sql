-- A claim is not planned again at every call (issue 25, the hop's cost). Two statements of
-- tasker.claim_and_enqueue take the pass's arrays (the ready steps taken, the steps handed to
-- takers), whose lengths only a custom plan knows, so PostgreSQL kept pricing their generic
-- plans above the custom ones and planning them again: in the service, one chain with the Rust
-- worker on the Work stream, 8 s (pg_stat_statements with track_planning), 499 and 47 plans for
-- 3,744 claims (0.02 ms a hop); a single backend running 200 chains in one transaction planned
-- the second one 790 times in 2,000 calls and took 2.45-2.77 s against 1.96-2.03 s with this.
-- A claim inside a batch of completions was already planned once (complete_steps_and_claim
-- forces generic plans for everything it calls); the claims of lone completions (every hop of
-- one chain), of creations with next and of the processor's passes were not. With this the
-- same service run planned them 15 times (the first five of each of three connections).
ALTER FUNCTION tasker.claim_and_enqueue(uuid, jsonb, jsonb, uuid)
    SET plan_cache_mode = force_generic_plan;

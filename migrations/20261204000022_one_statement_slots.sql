-- Slots of a limited lane taken and given back in one statement in the common case (issue 22,
-- the hop under a limit that is not reached): a lease's end called tasker.free_slots from the
-- trigger, which probed this backend's own shard (a different backend's, usually, from the
-- one that took the slot: a miss), then scanned, then updated; a lease probed its own shard
-- and then updated it. Each is now one UPDATE whose subquery takes the row's lock with SKIP
-- LOCKED; the general paths (a grant across shards, every shard held by others) are as before.

-- How many of p_want leases of a lane may be granted now, taking them: none while the
-- namespace or the queue is paused; under an in-flight limit, what its shards have left,
-- taken from shards no other transaction holds, and only when every shard with room is held
-- by another transaction, waiting for one of them (holds_slot says the grants hold slots, to
-- be given back by tasker.free_slots when unused). A grant may be smaller than the room left
-- while other transactions hold the rest; it is never more.
-- The common case, this backend's own shard with room for all of it and held by no other
-- transaction, is one statement.
-- (from migrations/20261204000022_one_statement_slots.sql)
CREATE OR REPLACE FUNCTION tasker.lease_allowance(p_namespace text, p_queue text, p_want integer,
                                       OUT granted integer, OUT holds_slot boolean)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_paused boolean;
    v_max integer;
    v_shard record;
    v_take integer;
    -- where this backend starts looking, so that concurrent leases start on different shards
    v_start integer := pg_backend_pid() % 16;
BEGIN
    granted := 0;
    holds_slot := false;
    IF p_want <= 0 THEN RETURN; END IF;
    PERFORM pg_advisory_xact_lock_shared(tasker.lane_lock_key(p_namespace, p_queue));
    SELECT g.paused, g.max_in_flight INTO v_paused, v_max
    FROM tasker.lane_gate(p_namespace, p_queue) g;
    IF v_paused THEN RETURN; END IF;
    IF v_max IS NULL THEN
        granted := p_want;
        RETURN;
    END IF;
    holds_slot := true;
    -- this backend's own shard, when it has room for all of it and no other transaction holds
    -- it: the slots taken in one statement (the lock is taken, and the room checked on the
    -- newest version of the row, by the subquery)
    UPDATE tasker.lane_slots s SET in_flight = s.in_flight + p_want
    WHERE s.namespace = p_namespace AND s.queue = p_queue AND s.shard = v_start
      AND EXISTS (SELECT 1 FROM tasker.lane_slots x
                  WHERE x.namespace = p_namespace AND x.queue = p_queue AND x.shard = v_start
                    AND x.in_flight + p_want <= x.cap
                  FOR NO KEY UPDATE SKIP LOCKED);
    IF FOUND THEN
        granted := p_want;
        RETURN;
    END IF;
    -- otherwise shard by shard, from this backend's own (FOUND is false: the scan first)
    LOOP
        IF NOT FOUND THEN
            SELECT s.shard, s.cap - s.in_flight AS room INTO v_shard
            FROM tasker.lane_slots s
            WHERE s.namespace = p_namespace AND s.queue = p_queue AND s.in_flight < s.cap
            ORDER BY (s.shard + v_start) % 16
            LIMIT 1
            FOR NO KEY UPDATE SKIP LOCKED;
        END IF;
        IF NOT FOUND THEN
            EXIT WHEN granted > 0;
            -- every shard with room is held by a transaction still running: wait for one
            SELECT s.shard, s.cap - s.in_flight AS room INTO v_shard
            FROM tasker.lane_slots s
            WHERE s.namespace = p_namespace AND s.queue = p_queue AND s.in_flight < s.cap
            ORDER BY (s.shard + v_start) % 16
            LIMIT 1
            FOR NO KEY UPDATE;
            EXIT WHEN NOT FOUND;
        END IF;
        v_take := least(p_want - granted, v_shard.room);
        UPDATE tasker.lane_slots s SET in_flight = s.in_flight + v_take
        WHERE s.namespace = p_namespace AND s.queue = p_queue AND s.shard = v_shard.shard;
        granted := granted + v_take;
        EXIT WHEN granted >= p_want;
        v_shard := NULL;
        PERFORM 1 WHERE false;  -- FOUND := false: the next shard by the scan
    END LOOP;
END
$$;

-- A lease that held a slot ended (its queue row deleted: completed, failed, expired, cancelled,
-- resolved) or was given back (released to the queue): its slot is free. The common case is
-- one statement: a shard of the lane with leases, held by no other transaction, gives one
-- back, and a shard that was full wakes the lane's fetches (as tasker.free_slots does, which
-- takes the rest: every such shard held by others, or none left).
-- (from migrations/20261204000022_one_statement_slots.sql)
CREATE OR REPLACE FUNCTION tasker.step_queue_slot_freed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_was_full boolean;
BEGIN
    UPDATE tasker.lane_slots s SET in_flight = s.in_flight - 1
    WHERE s.namespace = OLD.namespace AND s.queue = OLD.queue
      AND s.shard = (SELECT x.shard FROM tasker.lane_slots x
                     WHERE x.namespace = OLD.namespace AND x.queue = OLD.queue
                       AND x.in_flight > 0
                     ORDER BY (x.shard + pg_backend_pid() % 16) % 16
                     LIMIT 1
                     FOR NO KEY UPDATE SKIP LOCKED)
    RETURNING s.in_flight + 1 = s.cap INTO v_was_full;
    IF NOT FOUND THEN
        PERFORM tasker.free_slots(OLD.namespace, OLD.queue, 1);
    ELSIF v_was_full THEN
        PERFORM tasker.wake_lane(OLD.namespace, OLD.queue, 1);
    END IF;
    IF TG_OP = 'UPDATE' THEN
        NEW.holds_slot := false;
        RETURN NEW;
    END IF;
    RETURN OLD;
END
$$;

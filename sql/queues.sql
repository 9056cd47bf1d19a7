-- Lanes: a (namespace, queue) and its settings. Whether a lease may be granted (pause,
-- in-flight limit), the slots a lease holds and gives back, waking the fetches parked on a
-- lane on every replica, and the admin's changes to a lane.
--
-- The definitions that run, one per function: what a fresh database has after every migration
-- in migrations/. This file is not applied; the migrations are (append-only: a change is a new
-- migration). tests/sql_layout.rs fails when a function's live definition differs from the one
-- here, so a change to a function is made in a new migration and here, in the same commit.
-- Each definition names the migration it comes from.

-- The advisory lock key of a lane: leases take it shared, a change of the lane's limit takes
-- it exclusively, so the leases running when a limit starts are all counted against it.
-- (from migrations/20261204000006_step_queues.sql)
CREATE FUNCTION tasker.lane_lock_key(p_namespace text, p_queue text) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT hashtextextended('tasker.lane:' || p_namespace || '/' || p_queue, 0)
$$;

-- How many of p_want leases of a lane may be granted now, taking them: none while the
-- namespace or the queue is paused; under an in-flight limit, what is left of it (taken under
-- the settings row's lock, so concurrent fetches and enqueues on any replica never exceed it;
-- holds_slot says the grants hold slots, to be given back by tasker.free_slots when unused).
-- (from migrations/20261204000006_step_queues.sql)
CREATE FUNCTION tasker.lease_allowance(p_namespace text, p_queue text, p_want integer,
                                       OUT granted integer, OUT holds_slot boolean)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_lane record;
BEGIN
    granted := greatest(p_want, 0);
    holds_slot := false;
    PERFORM pg_advisory_xact_lock_shared(tasker.lane_lock_key(p_namespace, p_queue));
    IF EXISTS (SELECT 1 FROM tasker.queue_settings g
               WHERE g.namespace = p_namespace AND g.queue = '' AND g.paused) THEN
        granted := 0;
        RETURN;
    END IF;
    SELECT g.paused, g.max_in_flight, g.in_flight INTO v_lane FROM tasker.queue_settings g
    WHERE g.namespace = p_namespace AND g.queue = p_queue FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF v_lane.paused THEN
        granted := 0;
        RETURN;
    END IF;
    IF v_lane.max_in_flight IS NOT NULL THEN
        granted := least(granted, greatest(v_lane.max_in_flight - v_lane.in_flight, 0));
        holds_slot := true;
        IF granted > 0 THEN
            UPDATE tasker.queue_settings g SET in_flight = g.in_flight + granted
            WHERE g.namespace = p_namespace AND g.queue = p_queue;
        END IF;
    END IF;
END
$$;

-- How many of p_want queued steps of a lane a fetch could lease now, without taking anything:
-- none while paused, what is left under a limit, else all.
-- (from migrations/20261204000006_step_queues.sql)
CREATE FUNCTION tasker.lane_room(p_namespace text, p_queue text, p_want integer) RETURNS integer
LANGUAGE sql STABLE
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
    SELECT CASE
        WHEN bool_or(g.paused) THEN 0
        ELSE least(p_want, coalesce(min(g.max_in_flight - g.in_flight), p_want))
    END
    FROM tasker.queue_settings g
    WHERE g.namespace = p_namespace AND g.queue IN ('', p_queue)
$$;

-- Give back p_n slots of a lane (leases ended, or grants unused). When work waits on the lane
-- and a slot is free, every replica hears of it (tasker_steps_enqueued without a replica) and
-- wakes a fetch parked on the lane: a freed slot starts the next step at once, not at a poll.
-- (from migrations/20261204000006_step_queues.sql)
CREATE FUNCTION tasker.free_slots(p_namespace text, p_queue text, p_n integer) RETURNS void
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_free integer;
BEGIN
    IF p_n <= 0 THEN RETURN; END IF;
    UPDATE tasker.queue_settings g SET in_flight = greatest(g.in_flight - p_n, 0)
    WHERE g.namespace = p_namespace AND g.queue = p_queue
    RETURNING g.max_in_flight - g.in_flight INTO v_free;
    IF v_free > 0 THEN
        PERFORM tasker.wake_lane(p_namespace, p_queue, least(v_free, p_n));
    END IF;
END
$$;

-- Tell every replica that up to p_steps queued steps of a lane (p_queue NULL: of every queue of
-- the namespace) may be leased now, if any wait: their parked fetches of the lane read it.
-- (from migrations/20261204000006_step_queues.sql)
CREATE FUNCTION tasker.wake_lane(p_namespace text, p_queue text, p_steps integer) RETURNS void
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM tasker.step_queue q
               WHERE q.namespace = p_namespace AND (p_queue IS NULL OR q.queue = p_queue)
                 AND q.leased_by IS NULL) THEN
        PERFORM pg_notify('tasker_steps_enqueued', json_build_object(
            'namespace', p_namespace, 'queue', p_queue, 'steps', p_steps)::text);
    END IF;
END
$$;

-- A lease that held a slot ended (its queue row deleted: completed, failed, expired, cancelled,
-- resolved) or was given back (released to the queue): its slot is free.
-- (from migrations/20261204000006_step_queues.sql)
CREATE FUNCTION tasker.step_queue_slot_freed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tasker.free_slots(OLD.namespace, OLD.queue, 1);
    IF TG_OP = 'UPDATE' THEN
        NEW.holds_slot := false;
        RETURN NEW;
    END IF;
    RETURN OLD;
END
$$;

-- Set a lane's in-flight limit (NULL: none). A limit that starts counts the leases already
-- running (under the lane's exclusive lock, which waits for leases being granted); raising it
-- wakes the work that waited. Returns the lane's leases holding slots.
-- (from migrations/20261204000006_step_queues.sql)
CREATE FUNCTION tasker.set_queue_limit(p_namespace text, p_queue text, p_max_in_flight integer)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_running integer;
    v_free integer;
BEGIN
    PERFORM pg_advisory_xact_lock(tasker.lane_lock_key(p_namespace, p_queue));
    INSERT INTO tasker.queue_settings AS g (namespace, queue, max_in_flight)
    VALUES (p_namespace, p_queue, p_max_in_flight)
    ON CONFLICT (namespace, queue) DO UPDATE SET max_in_flight = p_max_in_flight, updated_at = clock_timestamp();
    IF p_max_in_flight IS NULL THEN
        UPDATE tasker.step_queue q SET holds_slot = false
        WHERE q.namespace = p_namespace AND q.queue = p_queue AND q.holds_slot;
        UPDATE tasker.queue_settings g SET in_flight = 0
        WHERE g.namespace = p_namespace AND g.queue = p_queue;
        PERFORM tasker.wake_lane(p_namespace, p_queue, 1000);
        RETURN 0;
    END IF;
    UPDATE tasker.step_queue q SET holds_slot = true
    WHERE q.namespace = p_namespace AND q.queue = p_queue AND q.leased_by IS NOT NULL;
    GET DIAGNOSTICS v_running = ROW_COUNT;
    UPDATE tasker.queue_settings g SET in_flight = v_running
    WHERE g.namespace = p_namespace AND g.queue = p_queue
    RETURNING g.max_in_flight - g.in_flight INTO v_free;
    IF v_free > 0 THEN
        PERFORM tasker.wake_lane(p_namespace, p_queue, v_free);
    END IF;
    RETURN v_running;
END
$$;

-- Pause or resume a lane (p_queue '': the whole namespace). Resuming wakes the parked fetches
-- of the lane on every replica at once.
-- (from migrations/20261204000006_step_queues.sql)
CREATE FUNCTION tasker.set_queue_paused(p_namespace text, p_queue text, p_paused boolean)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO tasker.queue_settings AS g (namespace, queue, paused)
    VALUES (p_namespace, p_queue, p_paused)
    ON CONFLICT (namespace, queue) DO UPDATE SET paused = p_paused, updated_at = clock_timestamp();
    IF NOT p_paused THEN
        PERFORM tasker.wake_lane(p_namespace, nullif(p_queue, ''), 1000);
    END IF;
END
$$;

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

-- A lane's gate: whether it or its namespace is paused, and its in-flight limit (NULL: none).
-- A SQL function without SET clauses, so that the planner inlines it into its callers' kept
-- plans: the hop reads a lane's settings without a function call.
-- (from migrations/20261204000009_lane_slot_shards.sql)
CREATE FUNCTION tasker.lane_gate(p_namespace text, p_queue text)
RETURNS TABLE (paused boolean, max_in_flight integer)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(bool_or(g.paused), false), max(g.max_in_flight) FILTER (WHERE g.queue = p_queue)
    FROM tasker.queue_settings g
    WHERE g.namespace = p_namespace AND g.queue IN ('', p_queue)
$$;

-- How many of p_want leases of a lane may be granted now, taking them: none while the
-- namespace or the queue is paused; under an in-flight limit, what its shards have left,
-- taken from shards no other transaction holds, and only when every shard with room is held
-- by another transaction, waiting for one of them (holds_slot says the grants hold slots, to
-- be given back by tasker.free_slots when unused). A grant may be smaller than the room left
-- while other transactions hold the rest; it is never more.
-- The hop's callers (fetch_steps, claim_and_enqueue) take the common case themselves, in one
-- statement: this backend's own shard with room for all of it and held by no other
-- transaction; they call this when it has not.
-- (from migrations/20261204000026_slots_taken_inline.sql)
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
    -- shard by shard, from this backend's own
    PERFORM 1 WHERE false;  -- FOUND := false: the scan first
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

-- How many of p_want queued steps of a lane a fetch could lease now, without taking anything:
-- none while paused, what its shards have left under a limit, else all. In PL/pgSQL, whose
-- plans are kept: a SQL function with SET clauses is planned again at every call (measured
-- 120 us a call, every hop that leaves a step for a fetch paid it).
-- (from migrations/20261204000009_lane_slot_shards.sql)
CREATE FUNCTION tasker.lane_room(p_namespace text, p_queue text, p_want integer) RETURNS integer
LANGUAGE plpgsql STABLE
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_paused boolean;
    v_max integer;
    v_room integer;
BEGIN
    SELECT g.paused, g.max_in_flight INTO v_paused, v_max
    FROM tasker.lane_gate(p_namespace, p_queue) g;
    IF v_paused THEN RETURN 0; END IF;
    IF v_max IS NULL THEN RETURN p_want; END IF;
    -- enough room on this backend's own shard: one probe of the key answers
    SELECT s.cap - s.in_flight INTO v_room FROM tasker.lane_slots s
    WHERE s.namespace = p_namespace AND s.queue = p_queue AND s.shard = pg_backend_pid() % 16;
    IF v_room >= p_want THEN RETURN p_want; END IF;
    SELECT coalesce(sum(greatest(s.cap - s.in_flight, 0)), 0)::int INTO v_room
    FROM tasker.lane_slots s
    WHERE s.namespace = p_namespace AND s.queue = p_queue;
    RETURN least(p_want, v_room);
END
$$;

-- Give back p_n slots of a lane (leases ended, or grants unused), to shards no other
-- transaction holds where it can. A slot freed on a shard that was full may start work that
-- waited for it: every replica hears of the lane (tasker_steps_enqueued without a replica)
-- and wakes a fetch parked on it, so a freed slot starts the next step at once, not at a
-- poll. A slot freed below a shard's cap wakes nobody: nothing waited for it.
-- (from migrations/20261204000009_lane_slot_shards.sql)
CREATE FUNCTION tasker.free_slots(p_namespace text, p_queue text, p_n integer) RETURNS void
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_shard record;
    v_take integer;
    v_left integer := p_n;
    v_opened integer := 0;
    v_start integer := pg_backend_pid() % 16;
BEGIN
    -- this backend's own shard first: one probe of the key (no sort)
    SELECT s.shard, s.cap, s.in_flight INTO v_shard
    FROM tasker.lane_slots s
    WHERE s.namespace = p_namespace AND s.queue = p_queue AND s.shard = v_start
      AND s.in_flight > 0
    FOR NO KEY UPDATE SKIP LOCKED;
    WHILE v_left > 0 LOOP
        IF NOT FOUND THEN
            SELECT s.shard, s.cap, s.in_flight INTO v_shard
            FROM tasker.lane_slots s
            WHERE s.namespace = p_namespace AND s.queue = p_queue AND s.in_flight > 0
            ORDER BY (s.shard + v_start) % 16
            LIMIT 1
            FOR NO KEY UPDATE SKIP LOCKED;
        END IF;
        IF NOT FOUND THEN
            SELECT s.shard, s.cap, s.in_flight INTO v_shard
            FROM tasker.lane_slots s
            WHERE s.namespace = p_namespace AND s.queue = p_queue AND s.in_flight > 0
            ORDER BY (s.shard + v_start) % 16
            LIMIT 1
            FOR NO KEY UPDATE;
            EXIT WHEN NOT FOUND;
        END IF;
        v_take := least(v_left, v_shard.in_flight);
        UPDATE tasker.lane_slots s SET in_flight = s.in_flight - v_take
        WHERE s.namespace = p_namespace AND s.queue = p_queue AND s.shard = v_shard.shard;
        IF v_shard.in_flight >= v_shard.cap THEN
            v_opened := v_opened + greatest(v_shard.cap - (v_shard.in_flight - v_take), 0);
        END IF;
        v_left := v_left - v_take;
        PERFORM 1 WHERE false;  -- FOUND := false: the next shard by the scan
    END LOOP;
    IF v_opened > 0 THEN
        PERFORM tasker.wake_lane(p_namespace, p_queue, v_opened);
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

-- Write a lane's shards for its limit: caps adding up to p_max (one shard per 16 slots, at
-- most 16 shards), p_running leases filled in shard order (the excess over the limit on shard
-- 0). The caller holds the lane's shard rows locked (or there are none yet).
-- (from migrations/20261204000009_lane_slot_shards.sql)
CREATE FUNCTION tasker.spread_lane_slots(p_namespace text, p_queue text, p_max integer,
                                         p_running integer)
RETURNS void
LANGUAGE sql AS $$
    WITH k AS (SELECT least(16, greatest(1, p_max / 16)) AS n),
    shards AS (
        SELECT i AS shard,
               CASE WHEN i < k.n THEN p_max / k.n + (i < p_max % k.n)::int ELSE 0 END AS cap,
               CASE WHEN i < k.n THEN i * (p_max / k.n) + least(i, p_max % k.n) ELSE p_max END AS before
        FROM k, generate_series(0, 15) AS i
    )
    INSERT INTO tasker.lane_slots AS s (namespace, queue, shard, cap, in_flight)
    SELECT p_namespace, p_queue, shards.shard, shards.cap,
           least(greatest(p_running - shards.before, 0), shards.cap)
               + CASE WHEN shards.shard = 0 THEN greatest(p_running - p_max, 0) ELSE 0 END
    FROM shards
    ON CONFLICT (namespace, queue, shard) DO UPDATE
    SET cap = excluded.cap, in_flight = excluded.in_flight
$$;

-- Set a lane's in-flight limit (NULL: none). A limit that starts counts the leases already
-- running: the lane's exclusive lock waits for the leases being granted, the running leases
-- are marked as holding slots before the shards are locked (so a lease ending meanwhile
-- waits for this change and then gives its slot back to the new count), and the count is
-- read with the shards locked. Raising a limit wakes the work that waited. Returns the lane's
-- leases holding slots.
-- (from migrations/20261204000009_lane_slot_shards.sql)
CREATE FUNCTION tasker.set_queue_limit(p_namespace text, p_queue text, p_max_in_flight integer)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_running integer;
BEGIN
    PERFORM pg_advisory_xact_lock(tasker.lane_lock_key(p_namespace, p_queue));
    INSERT INTO tasker.queue_settings AS g (namespace, queue, max_in_flight)
    VALUES (p_namespace, p_queue, p_max_in_flight)
    ON CONFLICT (namespace, queue) DO UPDATE SET max_in_flight = p_max_in_flight, updated_at = clock_timestamp();
    IF p_max_in_flight IS NULL THEN
        UPDATE tasker.step_queue q SET holds_slot = false
        WHERE q.namespace = p_namespace AND q.queue = p_queue AND q.holds_slot;
        DELETE FROM tasker.lane_slots s WHERE s.namespace = p_namespace AND s.queue = p_queue;
        PERFORM tasker.wake_lane(p_namespace, p_queue, 1000);
        RETURN 0;
    END IF;
    UPDATE tasker.step_queue q SET holds_slot = true
    WHERE q.namespace = p_namespace AND q.queue = p_queue AND q.leased_by IS NOT NULL
      AND NOT q.holds_slot;
    PERFORM 1 FROM tasker.lane_slots s
    WHERE s.namespace = p_namespace AND s.queue = p_queue
    ORDER BY s.shard
    FOR UPDATE;
    SELECT count(*)::int INTO v_running FROM tasker.step_queue q
    WHERE q.namespace = p_namespace AND q.queue = p_queue AND q.leased_by IS NOT NULL
      AND q.holds_slot;
    PERFORM tasker.spread_lane_slots(p_namespace, p_queue, p_max_in_flight, v_running);
    IF p_max_in_flight > v_running THEN
        PERFORM tasker.wake_lane(p_namespace, p_queue, p_max_in_flight - v_running);
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

-- Namespaces: the name rule, the check that applies it, pattern matching for replicas that
-- serve some namespaces, and an admin's create and delete.
--
-- The definitions that run, one per function: what a fresh database has after every migration
-- in migrations/. This file is not applied; the migrations are (append-only: a change is a new
-- migration). tests/sql_layout.rs fails when a function's live definition differs from the one
-- here, so a change to a function is made in a new migration and here, in the same commit.
-- Each definition names the migration it comes from.


-- Namespace names are short and plain: at most 45 bytes of [a-z0-9_-], starting with a letter
-- or digit. A namespace is a label in metrics, logs, notification payloads and `tasker ctl`
-- output, and needs no quoting anywhere. (The cap once kept a per-namespace LISTEN channel
-- under the 63-byte identifier limit; those channels are gone, and the cap stays so that every
-- stored name remains valid.) The CHECK constraint of tasker.namespaces calls it.
-- (from migrations/20261204000005_namespace_rule_message.sql)
CREATE OR REPLACE FUNCTION tasker.namespace_name_problem(p_name text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_name IS NULL OR p_name = '' THEN 'must not be empty'
        WHEN octet_length(p_name) > 45 THEN
            'must be at most 45 bytes (is ' || octet_length(p_name) || ')'
        WHEN p_name !~ '^[a-z0-9][a-z0-9_-]*$' THEN
            'must match ^[a-z0-9][a-z0-9_-]*$ (lower-case letters, digits, "_" and "-", starting with a letter or digit)'
        ELSE NULL
    END
$$;

-- Raise a readable error before the CHECK constraint would give a terse one.
-- (from migrations/20261127000001_baseline.sql)
CREATE FUNCTION tasker.namespaces_validate() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_problem text := tasker.namespace_name_problem(NEW.name);
BEGIN
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION 'invalid namespace name %: %', quote_literal(coalesce(NEW.name, '')), v_problem
            USING ERRCODE = 'TK002', COLUMN = 'name';
    END IF;
    RETURN NEW;
END
$$;

-- A namespace matches a pattern when equal to it, or, for a pattern ending in '*', when it
-- starts with what precedes the '*'. NULL patterns: every namespace.
-- (from migrations/20261127000001_baseline.sql)
CREATE FUNCTION tasker.namespace_matches(p_namespace text, p_patterns text[]) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT p_patterns IS NULL OR EXISTS (
        SELECT 1 FROM unnest(p_patterns) p
        WHERE CASE WHEN right(p, 1) = '*' THEN starts_with(p_namespace, left(p, -1))
                   ELSE p_namespace = p END)
$$;

-- Create a namespace: 'created', or 'exists' (nothing changed). The cap is checked under the
-- same lock as create_task's first use, so concurrent creations cannot overshoot it (TK005).
-- (from migrations/20261204000004_namespace_lifecycle.sql)
CREATE FUNCTION tasker.create_namespace(p_name text, p_max_namespaces integer DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_namespaces bigint;
BEGIN
    IF EXISTS (SELECT 1 FROM tasker.namespaces n WHERE n.name = p_name) THEN
        RETURN 'exists';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('tasker.namespaces'));
    IF p_max_namespaces IS NOT NULL THEN
        SELECT count(*) INTO v_namespaces FROM tasker.namespaces;
        IF v_namespaces >= p_max_namespaces
           AND NOT EXISTS (SELECT 1 FROM tasker.namespaces n WHERE n.name = p_name) THEN
            RAISE EXCEPTION 'namespace % would be one more than the % allowed (database.max_namespaces)',
                quote_literal(p_name), p_max_namespaces
                USING ERRCODE = 'TK005';
        END IF;
    END IF;
    INSERT INTO tasker.namespaces (name) VALUES (p_name) ON CONFLICT DO NOTHING;
    RETURN CASE WHEN FOUND THEN 'created' ELSE 'exists' END;
END
$$;

-- Delete a namespace that holds no task (in any state): 'deleted', 'not_found', or
-- 'not_empty' (nothing changed). The row is locked first: a CreateTask in it that had found it
-- waits, then fails its foreign key (the service answers ABORTED: retry).
-- (from migrations/20261204000004_namespace_lifecycle.sql)
CREATE FUNCTION tasker.delete_namespace(p_name text)
RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM tasker.namespaces n WHERE n.name = p_name FOR UPDATE;
    IF NOT FOUND THEN RETURN 'not_found'; END IF;
    -- by the (namespace, created_at, task_uuid) index
    IF EXISTS (SELECT 1 FROM tasker.tasks t WHERE t.namespace = p_name) THEN
        RETURN 'not_empty';
    END IF;
    DELETE FROM tasker.namespaces n WHERE n.name = p_name;
    RETURN 'deleted';
END
$$;

-- Namespaces have a lifecycle. CreateTask made a namespace on first use and nothing removed
-- one, so any token that could create tasks could use up database.max_namespaces for good
-- (992 namespaces in 6.3 s). Now an admin creates namespaces (create_namespace: the same name
-- rule and cap as on first use, which database.create_namespaces_on_first_use can turn off,
-- as production does) and deletes an empty one (delete_namespace).

-- Create a namespace: 'created', or 'exists' (nothing changed). The cap is checked under the
-- same lock as create_task's first use, so concurrent creations cannot overshoot it (TK005).
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

-- The namespace name rule's message no longer explains the 45-byte cap by a per-namespace
-- LISTEN channel: there is none (every replica listens on the global channels and filters by
-- namespace). The cap itself stays, on its own merits: a namespace is a label in metrics,
-- logs, notification payloads and `tasker ctl` output, and every name stored so far keeps
-- being valid (raising the cap later is compatible; lowering it would not be).
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

-- NOTIFY takes a cluster-wide lock at commit, which serialises every completion behind
-- it (pgbench: ~4,200 claim+complete pairs/s with it, ~9,200 without). Only routes with
-- `concurrent: wait` have waiters to wake, so the caller says whether to notify.
DROP FUNCTION idemproxy_complete(text, text, uuid, integer, bytea, bytea, integer, bigint,
                                 boolean);
DROP FUNCTION idemproxy_release(text, text, uuid);

CREATE FUNCTION idemproxy_complete(p_scope text, p_key text, p_token uuid, p_status integer,
                                   p_headers bytea, p_body bytea, p_chunks integer,
                                   p_size bigint, p_omitted boolean,
                                   p_notify boolean DEFAULT true)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    UPDATE idemproxy_keys SET state = 2, status = p_status, headers = p_headers,
           body = p_body, body_chunks = p_chunks, body_size = p_size,
           body_omitted = p_omitted, completed_at = now(), locked_until = NULL
     WHERE scope = p_scope AND key = p_key AND lock_token = p_token AND state = 1;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF p_notify THEN
        PERFORM pg_notify('idemproxy', md5(p_scope || chr(31) || p_key));
    END IF;
    RETURN true;
END $$;

CREATE FUNCTION idemproxy_release(p_scope text, p_key text, p_token uuid,
                                  p_notify boolean DEFAULT true)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    DELETE FROM idemproxy_keys
     WHERE scope = p_scope AND key = p_key AND lock_token = p_token AND state = 1;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    DELETE FROM idemproxy_chunks WHERE scope = p_scope AND key = p_key AND lock_token = p_token;
    IF p_notify THEN
        PERFORM pg_notify('idemproxy', md5(p_scope || chr(31) || p_key));
    END IF;
    RETURN true;
END $$;

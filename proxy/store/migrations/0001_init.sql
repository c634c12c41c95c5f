-- idemproxy schema v1: one row per (scope, key); large bodies in chunk rows.
CREATE TABLE idemproxy_keys (
    scope         text        NOT NULL,
    key           text        NOT NULL,
    fingerprint   bytea       NOT NULL,
    state         smallint    NOT NULL,          -- 1 in flight, 2 completed
    lock_token    uuid        NOT NULL,          -- the claim's fencing token
    locked_until  timestamptz,                   -- lease end while in flight
    created_at    timestamptz NOT NULL DEFAULT now(),
    completed_at  timestamptz,
    expires_at    timestamptz NOT NULL,
    status        integer,
    headers       bytea,                         -- "name: value\r\n" pairs, order kept
    body          bytea,                         -- small bodies inline: one read per replay
    body_chunks   integer     NOT NULL DEFAULT 0,
    body_size     bigint      NOT NULL DEFAULT 0,
    body_omitted  boolean     NOT NULL DEFAULT false,
    takeovers     integer     NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idemproxy_keys_expires ON idemproxy_keys (expires_at);
ALTER TABLE idemproxy_keys ALTER COLUMN body SET STORAGE EXTERNAL;

CREATE TABLE idemproxy_chunks (
    scope       text    NOT NULL,
    key         text    NOT NULL,
    lock_token  uuid    NOT NULL,
    seq         integer NOT NULL,
    data        bytea   NOT NULL,
    PRIMARY KEY (scope, key, lock_token, seq)
);
ALTER TABLE idemproxy_chunks ALTER COLUMN data SET STORAGE EXTERNAL;

-- Claim a key in one round trip, race-safe under READ COMMITTED: each statement in a
-- VOLATILE plpgsql function takes a fresh snapshot, so after losing an INSERT race the
-- next SELECT sees the winner's committed row (a single-statement CTE could see nothing).
-- outcome: 1 claimed new, 2 taken over (expired row, or lease ended), 3 existing row.
CREATE FUNCTION idemproxy_claim(p_scope text, p_key text, p_fp bytea, p_token uuid,
                                p_lease float8, p_ttl float8)
RETURNS TABLE (outcome smallint, state smallint, fingerprint bytea, status integer,
               headers bytea, body bytea, body_chunks integer, body_size bigint,
               body_omitted boolean, lock_token uuid, expires_at timestamptz,
               lease_left float8)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    r idemproxy_keys%ROWTYPE;
    expired boolean;
BEGIN
    FOR attempt IN 1..10 LOOP
        SELECT * INTO r FROM idemproxy_keys k WHERE k.scope = p_scope AND k.key = p_key;
        IF NOT FOUND THEN
            INSERT INTO idemproxy_keys AS k (scope, key, fingerprint, state, lock_token,
                                             locked_until, expires_at)
            VALUES (p_scope, p_key, p_fp, 1, p_token,
                    now() + make_interval(secs => p_lease), now() + make_interval(secs => p_ttl))
            ON CONFLICT DO NOTHING;
            IF FOUND THEN
                RETURN QUERY SELECT 1::smallint, 1::smallint, p_fp, NULL::integer, NULL::bytea,
                    NULL::bytea, 0, 0::bigint, false, p_token,
                    now() + make_interval(secs => p_ttl), p_lease;
                RETURN;
            END IF;
            CONTINUE;  -- lost the insert race: read the winner's row
        END IF;
        expired := r.expires_at <= now();
        IF expired OR (r.state = 1 AND r.locked_until <= now() AND r.fingerprint = p_fp) THEN
            -- Compare-and-set on the old token: of two proxies taking over, one wins.
            UPDATE idemproxy_keys k SET
                fingerprint = p_fp, state = 1, lock_token = p_token,
                locked_until = now() + make_interval(secs => p_lease),
                created_at = CASE WHEN expired THEN now() ELSE k.created_at END,
                expires_at = CASE WHEN expired THEN now() + make_interval(secs => p_ttl)
                                  ELSE k.expires_at END,
                completed_at = NULL, status = NULL, headers = NULL, body = NULL,
                body_chunks = 0, body_size = 0, body_omitted = false,
                takeovers = CASE WHEN expired THEN 0 ELSE k.takeovers + 1 END
            WHERE k.scope = p_scope AND k.key = p_key AND k.lock_token = r.lock_token
              AND k.state = r.state;
            IF FOUND THEN
                DELETE FROM idemproxy_chunks c
                 WHERE c.scope = p_scope AND c.key = p_key AND c.lock_token = r.lock_token;
                RETURN QUERY SELECT (CASE WHEN expired THEN 1 ELSE 2 END)::smallint,
                    1::smallint, p_fp, NULL::integer, NULL::bytea, NULL::bytea, 0, 0::bigint,
                    false, p_token, x.expires_at, p_lease
                    FROM idemproxy_keys x WHERE x.scope = p_scope AND x.key = p_key;
                RETURN;
            END IF;
            CONTINUE;  -- someone else took it over first: read again
        END IF;
        RETURN QUERY SELECT 3::smallint, r.state, r.fingerprint, r.status, r.headers, r.body,
            r.body_chunks, r.body_size, r.body_omitted, r.lock_token, r.expires_at,
            COALESCE(EXTRACT(EPOCH FROM r.locked_until - now())::float8, 0);
        RETURN;
    END LOOP;
    RAISE EXCEPTION 'idemproxy_claim: no stable answer after 10 attempts';
END $$;

-- Complete a claim: a compare-and-set on its lock token, so a proxy whose lease was
-- taken over can never overwrite the new owner's result. Wakes waiters on any replica.
CREATE FUNCTION idemproxy_complete(p_scope text, p_key text, p_token uuid, p_status integer,
                                   p_headers bytea, p_body bytea, p_chunks integer,
                                   p_size bigint, p_omitted boolean)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    UPDATE idemproxy_keys SET state = 2, status = p_status, headers = p_headers,
           body = p_body, body_chunks = p_chunks, body_size = p_size,
           body_omitted = p_omitted, completed_at = now(), locked_until = NULL
     WHERE scope = p_scope AND key = p_key AND lock_token = p_token AND state = 1;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM pg_notify('idemproxy', md5(p_scope || chr(31) || p_key));
    RETURN true;
END $$;

-- Release a claim (the request never reached the upstream, or its answer is not kept).
CREATE FUNCTION idemproxy_release(p_scope text, p_key text, p_token uuid)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    DELETE FROM idemproxy_keys
     WHERE scope = p_scope AND key = p_key AND lock_token = p_token AND state = 1;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    DELETE FROM idemproxy_chunks WHERE scope = p_scope AND key = p_key AND lock_token = p_token;
    PERFORM pg_notify('idemproxy', md5(p_scope || chr(31) || p_key));
    RETURN true;
END $$;

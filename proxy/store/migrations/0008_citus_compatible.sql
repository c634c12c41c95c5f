-- The request-path functions in a form Citus accepts (issue #29), the same for one node:
-- `database.sharding: citus` runs these functions unchanged on the worker that holds the
-- key. Answers, locks and costs on a single node are those of before.
--
--  * idemproxy_claim's takeover UPDATE had now() inside CASE, which Citus refuses in a
--    modification (`non-IMMUTABLE functions are not allowed in CASE or COALESCE`). The
--    time is taken once into a variable: now() is the transaction's start in every
--    statement of a function anyway, so the value is the same.
--  * idemproxy_complete_many used array elements as SET values; Citus 14.0.1's UPDATE
--    deparser crashes the coordinator on that (SIGSEGV). Each element is copied into a
--    scalar first (and in idemproxy_claim_many's INSERT, for the same reason).
--  * idemproxy_renew: the lease renewal as a function, so with Citus it runs on the key's
--    worker and the lease is decided on the worker's clock, like the claim that set it.
--
-- CREATE OR REPLACE with the same signatures and result types: replicas still running
-- the previous version call them unchanged.
CREATE OR REPLACE FUNCTION idemproxy_claim(p_scope text, p_key text, p_fp bytea,
                                           p_token uuid, p_lease float8, p_ttl float8)
RETURNS SETOF idemproxy_claim_result
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    r idemproxy_keys%ROWTYPE;
    expired boolean;
    new_expiry timestamptz;
    ts timestamptz := now();
    lease_end timestamptz := ts + make_interval(secs => p_lease);
    ttl_end timestamptz := ts + make_interval(secs => p_ttl);
BEGIN
    FOR attempt IN 1..10 LOOP
        -- The answer for a replay or a concurrent duplicate, in one indexed read: a live
        -- row (or an in-flight one under a live lease), unless this claim may take it
        -- over (our fingerprint's lease ended).
        RETURN QUERY SELECT 3::smallint, k.state, k.fingerprint, k.status, k.headers, k.body,
            k.body_chunks, k.body_size, k.body_omitted, k.lock_token, k.expires_at,
            COALESCE(EXTRACT(EPOCH FROM k.locked_until - ts)::float8, 0)
          FROM idemproxy_keys k
         WHERE k.scope = p_scope AND k.key = p_key
           AND (k.expires_at > ts OR (k.state = 1 AND k.locked_until > ts))
           AND (k.state = 1 AND k.locked_until <= ts AND k.fingerprint = p_fp) IS NOT TRUE;
        IF FOUND THEN
            RETURN;
        END IF;
        INSERT INTO idemproxy_keys AS k (scope, key, fingerprint, state, lock_token,
                                         locked_until, expires_at)
        VALUES (p_scope, p_key, p_fp, 1, p_token, lease_end, ttl_end)
        ON CONFLICT DO NOTHING
        RETURNING k.expires_at INTO new_expiry;
        IF FOUND THEN
            RETURN NEXT ROW(1::smallint, 1::smallint, p_fp, NULL::integer, NULL::bytea,
                            NULL::bytea, 0, 0::bigint, false, p_token, new_expiry,
                            p_lease)::idemproxy_claim_result;
            RETURN;
        END IF;
        SELECT * INTO r FROM idemproxy_keys k WHERE k.scope = p_scope AND k.key = p_key;
        IF NOT FOUND THEN
            CONTINUE;  -- deleted meanwhile (released, purged): start again
        END IF;
        -- Expired only if no live lease holds it: a live flight is never "new".
        expired := r.expires_at <= ts AND (r.state = 1 AND r.locked_until > ts) IS NOT TRUE;
        IF expired OR (r.state = 1 AND r.locked_until <= ts AND r.fingerprint = p_fp) THEN
            -- Compare-and-set on the old token: of two proxies taking over, one wins.
            -- The times CASE chooses from are variables: Citus refuses now() in a CASE.
            UPDATE idemproxy_keys k SET
                fingerprint = p_fp, state = 1, lock_token = p_token,
                locked_until = lease_end,
                created_at = CASE WHEN expired THEN ts ELSE k.created_at END,
                expires_at = CASE WHEN expired THEN ttl_end ELSE k.expires_at END,
                completed_at = NULL, status = NULL, headers = NULL, body = NULL,
                body_chunks = 0, body_size = 0, body_omitted = false,
                takeovers = CASE WHEN expired THEN 0 ELSE k.takeovers + 1 END
            WHERE k.scope = p_scope AND k.key = p_key AND k.lock_token = r.lock_token
              AND k.state = r.state
            RETURNING k.expires_at INTO new_expiry;
            IF FOUND THEN
                DELETE FROM idemproxy_chunks c
                 WHERE c.scope = p_scope AND c.key = p_key AND c.lock_token = r.lock_token;
                RETURN NEXT ROW((CASE WHEN expired THEN 1 ELSE 2 END)::smallint, 1::smallint,
                                p_fp, NULL::integer, NULL::bytea, NULL::bytea, 0, 0::bigint,
                                false, p_token, new_expiry, p_lease)::idemproxy_claim_result;
                RETURN;
            END IF;
            CONTINUE;  -- someone else took it over first: read again
        END IF;
        RETURN NEXT ROW(3::smallint, r.state, r.fingerprint, r.status, r.headers, r.body,
                        r.body_chunks, r.body_size, r.body_omitted, r.lock_token, r.expires_at,
                        COALESCE(EXTRACT(EPOCH FROM r.locked_until - ts)::float8, 0)
                        )::idemproxy_claim_result;
        RETURN;
    END LOOP;
    RAISE EXCEPTION 'idemproxy_claim: no stable answer after 10 attempts';
END $$;

CREATE OR REPLACE FUNCTION idemproxy_claim_many(p_scopes text[], p_keys text[],
                                                p_fps bytea[], p_tokens uuid[],
                                                p_leases float8[], p_ttls float8[])
RETURNS SETOF idemproxy_claim_result
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    new_expiry timestamptz;
    s text;
    k_ text;
    fp bytea;
    tok uuid;
    lease float8;
    ttl float8;
BEGIN
    FOR i IN 1..cardinality(p_keys) LOOP
        s := p_scopes[i]; k_ := p_keys[i]; fp := p_fps[i]; tok := p_tokens[i];
        lease := p_leases[i]; ttl := p_ttls[i];
        INSERT INTO idemproxy_keys AS k (scope, key, fingerprint, state, lock_token,
                                         locked_until, expires_at)
        VALUES (s, k_, fp, 1, tok, now() + make_interval(secs => lease),
                now() + make_interval(secs => ttl))
        ON CONFLICT DO NOTHING
        RETURNING k.expires_at INTO new_expiry;
        IF FOUND THEN
            RETURN NEXT ROW(1::smallint, 1::smallint, fp, NULL::integer, NULL::bytea,
                            NULL::bytea, 0, 0::bigint, false, tok, new_expiry,
                            lease)::idemproxy_claim_result;
        ELSE
            RETURN QUERY SELECT * FROM idemproxy_claim(s, k_, fp, tok, lease, ttl);
        END IF;
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION idemproxy_complete_many(p_scopes text[], p_keys text[],
                                                   p_tokens uuid[], p_statuses integer[],
                                                   p_headers bytea[], p_bodies bytea[],
                                                   p_chunks integer[], p_sizes bigint[],
                                                   p_omitted boolean[])
RETURNS SETOF boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_status integer;
    v_headers bytea;
    v_body bytea;
    v_chunks integer;
    v_size bigint;
    v_omitted boolean;
BEGIN
    FOR i IN 1..cardinality(p_keys) LOOP
        v_status := p_statuses[i]; v_headers := p_headers[i]; v_body := p_bodies[i];
        v_chunks := p_chunks[i]; v_size := p_sizes[i]; v_omitted := p_omitted[i];
        UPDATE idemproxy_keys SET state = 2, status = v_status, headers = v_headers,
               body = v_body, body_chunks = v_chunks, body_size = v_size,
               body_omitted = v_omitted, completed_at = now(), locked_until = NULL
         WHERE scope = p_scopes[i] AND key = p_keys[i] AND lock_token = p_tokens[i]
           AND state = 1;
        RETURN NEXT FOUND;
    END LOOP;
END $$;

CREATE FUNCTION idemproxy_renew(p_scope text, p_key text, p_token uuid, p_lease float8)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    UPDATE idemproxy_keys SET locked_until = now() + make_interval(secs => p_lease)
     WHERE scope = p_scope AND key = p_key AND lock_token = p_token AND state = 1;
    RETURN FOUND;
END $$;

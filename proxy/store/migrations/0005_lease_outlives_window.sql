-- A live lease outlives the window (issue #17): a key is in flight until its claim
-- completes or its lease ends, whatever its TTL. Before this, with `ttl: 3s` and a
-- request in flight for 6 s, a retry at 4 s found the row expired, treated it as new and
-- ran a second, concurrent execution; the first result was then dropped ("taken over").
--
-- Now an expired row whose lease is live is still the in-flight row it is: a retry gets
-- 409 (or waits), and no one can claim it as new. `check-config` refuses lock_timeout >
-- ttl, so a lease outlives its window only when the heartbeat renews it for a long
-- flight; the sweeper leaves such rows alone (store/postgres.py). An answer completed
-- after its window ended is not replayed: the next request is a new one, as for any
-- expired key.
--
-- CREATE OR REPLACE with the same signature and result type: replicas still running see
-- the old function or the new one, never neither, and idemproxy_claim_many calls it.
CREATE OR REPLACE FUNCTION idemproxy_claim(p_scope text, p_key text, p_fp bytea,
                                           p_token uuid, p_lease float8, p_ttl float8)
RETURNS SETOF idemproxy_claim_result
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    r idemproxy_keys%ROWTYPE;
    expired boolean;
    new_expiry timestamptz;
BEGIN
    FOR attempt IN 1..10 LOOP
        -- The answer for a replay or a concurrent duplicate, in one indexed read: a live
        -- row (or an in-flight one under a live lease), unless this claim may take it
        -- over (our fingerprint's lease ended).
        RETURN QUERY SELECT 3::smallint, k.state, k.fingerprint, k.status, k.headers, k.body,
            k.body_chunks, k.body_size, k.body_omitted, k.lock_token, k.expires_at,
            COALESCE(EXTRACT(EPOCH FROM k.locked_until - now())::float8, 0)
          FROM idemproxy_keys k
         WHERE k.scope = p_scope AND k.key = p_key
           AND (k.expires_at > now() OR (k.state = 1 AND k.locked_until > now()))
           AND (k.state = 1 AND k.locked_until <= now() AND k.fingerprint = p_fp) IS NOT TRUE;
        IF FOUND THEN
            RETURN;
        END IF;
        INSERT INTO idemproxy_keys AS k (scope, key, fingerprint, state, lock_token,
                                         locked_until, expires_at)
        VALUES (p_scope, p_key, p_fp, 1, p_token,
                now() + make_interval(secs => p_lease), now() + make_interval(secs => p_ttl))
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
        expired := r.expires_at <= now()
                   AND (r.state = 1 AND r.locked_until > now()) IS NOT TRUE;
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
                        COALESCE(EXTRACT(EPOCH FROM r.locked_until - now())::float8, 0)
                        )::idemproxy_claim_result;
        RETURN;
    END LOOP;
    RAISE EXCEPTION 'idemproxy_claim: no stable answer after 10 attempts';
END $$;

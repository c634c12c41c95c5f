-- A step of the database's clock back never keeps a dead owner's lease alive (issue #25,
-- torture finding 5). 0009 took an in-flight row over only when its lease had ended on the
-- database's clock AND the taker had seen its heartbeat unchanged for a whole lease of its
-- own clock. A claim written while the database's clock ran ahead (+99 s in the torture
-- run) carries a lease that ends that far in the future once the clock is stepped back:
-- its owner died (or kept the claim for an unknown outcome) and every retry got 409 for
-- the size of the step, though the taker's evidence was there after one lease.
--
-- A renewal sets `locked_until = now() + lease`, so on a clock that only moves forward a
-- lease never ends more than one lease after now. One that does (`locked_until >
-- lease_end`) was written under a clock that has since gone back: the database's clock
-- is no witness for it either way, and the taker's evidence alone decides. Replicas
-- must agree on a route's `lock_timeout` (they share the config), since the taker's lease
-- is the yardstick. Only idemproxy_claim2 changes; idemproxy_claim2_many calls it for every
-- row that is not new. CREATE OR REPLACE keeps its Citus distribution (store/citus.py).

CREATE OR REPLACE FUNCTION idemproxy_claim2(p_scope text, p_key text, p_fp bytea, p_token uuid,
                                 p_lease float8, p_ttl float8, p_seen_token uuid,
                                 p_seen_beat bigint)
RETURNS SETOF idemproxy_claim2_result
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    r idemproxy_keys%ROWTYPE;
    expired boolean;
    takeover boolean;
    new_expiry timestamptz;
    ts timestamptz := now();
    lease_end timestamptz := ts + make_interval(secs => p_lease);
    ttl_end timestamptz := ts + make_interval(secs => p_ttl);
BEGIN
    FOR attempt IN 1..10 LOOP
        -- The answer for a replay or a concurrent duplicate, in one indexed read: every
        -- row but one this claim may replace (a completed row past its window, or an
        -- in-flight row whose lease ended, with the caller's evidence).
        RETURN QUERY SELECT 3::smallint, k.state, k.fingerprint, k.status, k.headers, k.body,
            k.body_chunks, k.body_size, k.body_omitted, k.lock_token, k.expires_at,
            COALESCE(EXTRACT(EPOCH FROM k.locked_until - ts)::float8, 0), k.heartbeat
          FROM idemproxy_keys k
         WHERE k.scope = p_scope AND k.key = p_key
           AND (k.state = 2 AND k.expires_at <= ts) IS NOT TRUE
           AND (k.state = 1 AND (k.locked_until <= ts OR k.locked_until > lease_end)
                AND k.lock_token = p_seen_token
                AND k.heartbeat = p_seen_beat
                AND (k.fingerprint = p_fp OR k.expires_at <= ts)) IS NOT TRUE;
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
                            p_lease, 0::bigint)::idemproxy_claim2_result;
            RETURN;
        END IF;
        SELECT * INTO r FROM idemproxy_keys k WHERE k.scope = p_scope AND k.key = p_key;
        IF NOT FOUND THEN
            CONTINUE;  -- deleted meanwhile (released, purged): start again
        END IF;
        expired := false;
        takeover := false;
        IF r.state = 1 THEN
            -- In flight: replaceable only with evidence that its owner stopped renewing.
            -- A lease ending past lease_end was written while the clock ran ahead.
            IF ((r.locked_until <= ts OR r.locked_until > lease_end)
                AND r.lock_token = p_seen_token
                AND r.heartbeat = p_seen_beat) IS TRUE THEN
                expired := r.expires_at <= ts;  -- past its window: a new claim
                takeover := NOT expired AND r.fingerprint = p_fp;
            END IF;
        ELSE
            expired := r.expires_at <= ts;
        END IF;
        IF expired OR takeover THEN
            -- Compare-and-set on the old token and heartbeat: of two proxies taking over,
            -- one wins, and a renewal that lands first keeps the owner's claim.
            UPDATE idemproxy_keys k SET
                fingerprint = p_fp, state = 1, lock_token = p_token,
                locked_until = lease_end, heartbeat = 0,
                created_at = CASE WHEN expired THEN ts ELSE k.created_at END,
                expires_at = CASE WHEN expired THEN ttl_end ELSE k.expires_at END,
                completed_at = NULL, status = NULL, headers = NULL, body = NULL,
                body_chunks = 0, body_size = 0, body_omitted = false,
                takeovers = CASE WHEN expired THEN 0 ELSE k.takeovers + 1 END
            WHERE k.scope = p_scope AND k.key = p_key AND k.lock_token = r.lock_token
              AND k.state = r.state AND k.heartbeat = r.heartbeat
            RETURNING k.expires_at INTO new_expiry;
            IF FOUND THEN
                DELETE FROM idemproxy_chunks c
                 WHERE c.scope = p_scope AND c.key = p_key AND c.lock_token = r.lock_token;
                RETURN NEXT ROW((CASE WHEN expired THEN 1 ELSE 2 END)::smallint, 1::smallint,
                                p_fp, NULL::integer, NULL::bytea, NULL::bytea, 0, 0::bigint,
                                false, p_token, new_expiry, p_lease,
                                0::bigint)::idemproxy_claim2_result;
                RETURN;
            END IF;
            CONTINUE;  -- someone else took it over, or its owner renewed: read again
        END IF;
        RETURN NEXT ROW(3::smallint, r.state, r.fingerprint, r.status, r.headers, r.body,
                        r.body_chunks, r.body_size, r.body_omitted, r.lock_token, r.expires_at,
                        COALESCE(EXTRACT(EPOCH FROM r.locked_until - ts)::float8, 0),
                        r.heartbeat)::idemproxy_claim2_result;
        RETURN;
    END LOOP;
    RAISE EXCEPTION 'idemproxy_claim2: no stable answer after 10 attempts';
END $$;

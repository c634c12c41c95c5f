-- A step of the database's clock alone never ends a live lease (issue #25, item 7).
-- Before this, a claim was taken over as soon as `locked_until <= now()` on the database's
-- clock: with the database under libfaketime, a +120 s step one second into a flight (or
-- -1 h during the claim, then back) let a retry execute the key a second time, and the
-- first answer was lost. An NTP step or a VM resume on the database host does the same.
--
-- Now a takeover also needs evidence on the taker's own monotonic clock: every renewal
-- bumps the row's `heartbeat`, and the taker presents the (lock_token, heartbeat) it saw
-- on the row at least `lock_timeout` ago by its own clock (proxy/store/sightings.py). The row
-- is taken over only if the lease ended on the database's clock AND it still shows that
-- same pair: the owner has not renewed for a whole lease of the taker's time. A live
-- owner renews every third of its lease, so its heartbeat moves long before that.
-- The same evidence is needed to replace an expired in-flight row as a new claim, and
-- the compare-and-set of the takeover includes the heartbeat, so a renewal that lands
-- between the read and the update wins.
--
-- New functions beside the old ones (idemproxy_claim, idemproxy_claim_many are unchanged,
-- for replicas still running the previous version during a rolling upgrade: their
-- renewals do not bump the heartbeat, so a new replica cannot gather evidence against
-- them faster than before, and the lease on the database's clock still protects them).
-- Adding a column with a constant default does not rewrite the table.
--
-- In the form 0008 gave the request path for Citus (issue #29): times taken once into
-- variables (Citus refuses now() in a CASE of a modification), array elements copied
-- into scalars before an INSERT; idemproxy_claim2 is distributed by its key like
-- idemproxy_claim (store/citus.py), and idemproxy_renew bumps the heartbeat.
ALTER TABLE idemproxy_keys ADD COLUMN heartbeat bigint NOT NULL DEFAULT 0;

CREATE OR REPLACE FUNCTION idemproxy_renew(p_scope text, p_key text, p_token uuid,
                                           p_lease float8)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    UPDATE idemproxy_keys SET locked_until = now() + make_interval(secs => p_lease),
           heartbeat = heartbeat + 1
     WHERE scope = p_scope AND key = p_key AND lock_token = p_token AND state = 1;
    RETURN FOUND;
END $$;

CREATE TYPE idemproxy_claim2_result AS (
    outcome smallint, state smallint, fingerprint bytea, status integer, headers bytea,
    body bytea, body_chunks integer, body_size bigint, body_omitted boolean,
    lock_token uuid, expires_at timestamptz, lease_left float8, heartbeat bigint);

-- outcome: 1 claimed new, 2 taken over (a dead claim, with evidence), 3 existing row.
-- p_seen_token, p_seen_beat: what the caller saw on this row at least a lease ago by its
-- own clock (NULL: no evidence, so no in-flight row is replaced).
CREATE FUNCTION idemproxy_claim2(p_scope text, p_key text, p_fp bytea, p_token uuid,
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
           AND (k.state = 1 AND k.locked_until <= ts AND k.lock_token = p_seen_token
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
            IF (r.locked_until <= ts AND r.lock_token = p_seen_token
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

-- idemproxy_claim_many (0007) with the evidence arrays: a new key is one INSERT, anything
-- else goes through idemproxy_claim2, in the caller's (scope, key) order.
CREATE FUNCTION idemproxy_claim2_many(p_scopes text[], p_keys text[], p_fps bytea[],
                                      p_tokens uuid[], p_leases float8[], p_ttls float8[],
                                      p_seen_tokens uuid[], p_seen_beats bigint[])
RETURNS SETOF idemproxy_claim2_result
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
                            lease, 0::bigint)::idemproxy_claim2_result;
        ELSE
            RETURN QUERY SELECT * FROM idemproxy_claim2(
                s, k_, fp, tok, lease, ttl, p_seen_tokens[i], p_seen_beats[i]);
        END IF;
    END LOOP;
END $$;

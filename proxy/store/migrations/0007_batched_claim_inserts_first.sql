-- A batched claim of a new key is one INSERT (issue #19). Under load nearly every first
-- request's claim runs in idemproxy_claim_many, which called idemproxy_claim for each
-- element through `RETURN QUERY SELECT * FROM ...`: a statement of its own per element
-- (executor start-up, a function call, a tuplestore), then in it an indexed read that
-- finds nothing for a new key, then the INSERT. Now each element first tries that same
-- INSERT ... ON CONFLICT DO NOTHING; only when a row is there (a replay, a duplicate, a
-- row to take over) does it call idemproxy_claim as before.
--
-- The answers are the same. An INSERT that succeeds means no row existed: exactly the
-- case in which idemproxy_claim's first read finds nothing and its own INSERT wins, and
-- the element returns what idemproxy_claim returns then (outcome 1, in flight, our token
-- and fingerprint, the new expiry, the lease). An INSERT that conflicts changes nothing
-- (no row written, nothing locked but what a concurrent inserter's wait implies, as for
-- idemproxy_claim's own INSERT), and idemproxy_claim decides with fresh snapshots, as it
-- did. Elements still run one after the other in the caller's (scope, key) order, so a
-- batch takes its row locks in the same global order as before (store/batch.py); a later
-- element for the same key sees the earlier one's row, in flight, as before.
--
-- CREATE OR REPLACE with the same signature and result type: replicas still running the
-- previous version call it unchanged.
CREATE OR REPLACE FUNCTION idemproxy_claim_many(p_scopes text[], p_keys text[],
                                                p_fps bytea[], p_tokens uuid[],
                                                p_leases float8[], p_ttls float8[])
RETURNS SETOF idemproxy_claim_result
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    new_expiry timestamptz;
BEGIN
    FOR i IN 1..cardinality(p_keys) LOOP
        INSERT INTO idemproxy_keys AS k (scope, key, fingerprint, state, lock_token,
                                         locked_until, expires_at)
        VALUES (p_scopes[i], p_keys[i], p_fps[i], 1, p_tokens[i],
                now() + make_interval(secs => p_leases[i]),
                now() + make_interval(secs => p_ttls[i]))
        ON CONFLICT DO NOTHING
        RETURNING k.expires_at INTO new_expiry;
        IF FOUND THEN
            RETURN NEXT ROW(1::smallint, 1::smallint, p_fps[i], NULL::integer, NULL::bytea,
                            NULL::bytea, 0, 0::bigint, false, p_tokens[i], new_expiry,
                            p_leases[i])::idemproxy_claim_result;
        ELSE
            RETURN QUERY SELECT * FROM idemproxy_claim(p_scopes[i], p_keys[i], p_fps[i],
                                                       p_tokens[i], p_leases[i], p_ttls[i]);
        END IF;
    END LOOP;
END $$;

-- Claims and completions in batches (proxy/store/batch.py): when every pooled connection
-- is busy, the calls that queue for the next one go to Postgres as one statement and one
-- transaction, so N first requests cost one commit instead of N. pgbench, 10 clients, the
-- loadtest's first-request pair (claim a new key, store a small response): 9.2k pairs/s
-- one at a time; 23.7k in batches of 4; 31.4k in batches of 8; 36.3k in batches of 16.
--
-- Each element runs the same statement as a call on its own, in the order given. The
-- caller sorts a batch by (scope, key), the same order in every process, so two batches
-- take their row locks in one global order and cannot deadlock each other. A later claim
-- of the same key in a batch sees the earlier one's row (one transaction), as a
-- concurrent duplicate would after it committed: in flight, so 409.
--
-- Both functions are new: replicas still running the previous version never call them.
CREATE FUNCTION idemproxy_claim_many(p_scopes text[], p_keys text[], p_fps bytea[],
                                     p_tokens uuid[], p_leases float8[], p_ttls float8[])
RETURNS SETOF idemproxy_claim_result
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    FOR i IN 1..cardinality(p_keys) LOOP
        RETURN QUERY SELECT * FROM idemproxy_claim(p_scopes[i], p_keys[i], p_fps[i],
                                                   p_tokens[i], p_leases[i], p_ttls[i]);
    END LOOP;
END $$;

-- The compare-and-set completion (no NOTIFY) for many keys: one boolean per element,
-- true when its token still owned the claim.
CREATE FUNCTION idemproxy_complete_many(p_scopes text[], p_keys text[], p_tokens uuid[],
                                        p_statuses integer[], p_headers bytea[],
                                        p_bodies bytea[], p_chunks integer[],
                                        p_sizes bigint[], p_omitted boolean[])
RETURNS SETOF boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    FOR i IN 1..cardinality(p_keys) LOOP
        UPDATE idemproxy_keys SET state = 2, status = p_statuses[i], headers = p_headers[i],
               body = p_bodies[i], body_chunks = p_chunks[i], body_size = p_sizes[i],
               body_omitted = p_omitted[i], completed_at = now(), locked_until = NULL
         WHERE scope = p_scopes[i] AND key = p_keys[i] AND lock_token = p_tokens[i]
           AND state = 1;
        RETURN NEXT FOUND;
    END LOOP;
END $$;

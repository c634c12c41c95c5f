-- A secret of this installation (#15). It keys the tenant hash in scopes, logs and the
-- admin API (proxy/sealing.py), so a tenant hash read from a log line cannot be tested
-- against guessed credentials offline (`printf 'Bearer guess' | sha256sum`). Generated
-- once, here: the same for every replica and across restarts. gen_random_uuid() draws
-- from the server's strong random source; two v4 UUIDs give 244 random bits.
CREATE TABLE idemproxy_installation (
    id      boolean PRIMARY KEY DEFAULT true CHECK (id),  -- exactly one row
    secret  bytea   NOT NULL
);
INSERT INTO idemproxy_installation (secret)
VALUES (uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()));

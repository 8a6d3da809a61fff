-- Gateway keys: one Tollgate key per app instead of provider keys, with per-key policy.
-- Read by the in-memory key cache (tollgate.policy.keys), managed by `tollgate keys`.

CREATE TABLE tollgate.gateway_keys (
    key_id            text        PRIMARY KEY,  -- public id: 'key_' + 12 random hex chars
    -- SHA-256 of the plaintext key; the plaintext itself is shown once and stored nowhere.
    -- A fast unsalted hash is the right tool here: a key carries 256 random bits, so there is
    -- no dictionary to guess from and a slow password hash would only slow the request path.
    key_hash          bytea       NOT NULL UNIQUE CHECK (octet_length(key_hash) = 32),
    -- The first 7 characters ('tg_' + 4 random ones) so people can recognise a key in
    -- `tollgate keys list`; that reveals 24 of its 256 random bits.
    key_prefix        text        NOT NULL,
    name              text        NOT NULL,
    end_user_id       text,                     -- NULL: the key is not bound to one end user
    enforce_user_id   boolean,                  -- NULL: inherit the global setting
    allowed_providers text[],                   -- NULL: any provider
    created_at        timestamptz NOT NULL DEFAULT now(),
    revoked_at        timestamptz,              -- NULL: active
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CHECK (key_id ~ '^key_[0-9a-f]{12}$'),
    CHECK (allowed_providers IS NULL OR cardinality(allowed_providers) > 0)
);

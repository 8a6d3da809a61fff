-- Per-key credential mode: 'inject' (Tollgate sends the provider key it holds; the app's
-- gateway key never leaves the gateway) or 'passthrough' (the app's own provider key goes
-- through untouched).
ALTER TABLE tollgate.gateway_keys
    ADD COLUMN credential_mode text NOT NULL DEFAULT 'inject'
        CHECK (credential_mode IN ('inject', 'passthrough'));

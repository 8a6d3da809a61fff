-- Hardening (issue 11): Tollgate's own failures are an outcome of their own, usage that a
-- provider reported inconsistently is flagged, and a record that could not be priced keeps
-- the reason next to its NULL cost (picked up again by `tollgate reprice`).
ALTER TABLE tollgate.requests DROP CONSTRAINT IF EXISTS requests_outcome_check;
ALTER TABLE tollgate.requests ADD CONSTRAINT requests_outcome_check
    CHECK (outcome IN ('ok', 'blocked', 'upstream_error', 'client_aborted', 'usage_missing',
                       'internal_error'));

ALTER TABLE tollgate.requests
    ADD COLUMN usage_flags text[] NOT NULL DEFAULT '{}',
    ADD COLUMN pricing_error text;

-- Finding the odd rows stays cheap: the index holds only flagged or unpriceable ones.
CREATE INDEX requests_flagged_idx ON tollgate.requests (created_at)
    WHERE usage_flags <> '{}' OR pricing_error IS NOT NULL;

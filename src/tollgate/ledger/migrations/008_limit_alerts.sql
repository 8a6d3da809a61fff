-- Limit alerts (issue 14): one row per limit, subject, period and threshold crossed, written
-- by the ledger writer in the transaction whose rows crossed it. The primary key makes each
-- alert fire once per period, however many replicas write (docs/limits.md).
CREATE TABLE tollgate.limit_alerts (
    limit_id     text        NOT NULL REFERENCES tollgate.limits ON DELETE CASCADE,
    subject      text        NOT NULL,
    period_start timestamptz NOT NULL,
    threshold    numeric     NOT NULL,
    spent        numeric     NOT NULL,   -- the limit's measure when it was crossed
    maximum      numeric     NOT NULL,
    fired_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (limit_id, subject, period_start, threshold)
);

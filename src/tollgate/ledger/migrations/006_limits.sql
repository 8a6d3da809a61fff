-- Limits (issue 14): budgets per end user, per gateway key, global, or named (charged only
-- when a request names them in x-tollgate-limit-ids). Managed by `tollgate limits`;
-- documented in docs/limits.md.

CREATE TABLE tollgate.limits (
    limit_id     text        PRIMARY KEY,
    -- user / key: the end user's or the key's own limit; with no subject, each user (key)
    -- has its own spend under it ("every end user: $5 a day"). global: all traffic. named:
    -- only requests that name it.
    scope        text        NOT NULL CHECK (scope IN ('user', 'key', 'global', 'named')),
    subject      text,
    measure      text        NOT NULL CHECK (measure IN ('usd', 'tokens', 'requests')),
    maximum      numeric     NOT NULL CHECK (maximum >= 0),
    period       text        NOT NULL
        CHECK (period IN ('minute', 'hour', 'day', 'week', 'month', 'total')),
    time_zone    text        NOT NULL DEFAULT 'UTC',
    mode         text        NOT NULL DEFAULT 'block' CHECK (mode IN ('block', 'warn')),
    -- Fractions of maximum at which an alert fires, once per period.
    thresholds   numeric[]   NOT NULL DEFAULT '{0.8,1.0}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CHECK (limit_id ~ '^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$'),
    CHECK (subject IS NULL OR scope IN ('user', 'key')),
    CHECK (subject IS NULL OR subject <> '')
);

-- The start of the calendar period of `at` in time zone `tz` (the epoch for 'total': one
-- period that never ends). Weeks start on Monday (ISO).
CREATE FUNCTION tollgate.limit_period_start(period text, tz text, at timestamptz)
RETURNS timestamptz LANGUAGE sql STABLE AS $$
    SELECT CASE period
        WHEN 'total' THEN 'epoch'::timestamptz
        ELSE date_trunc(period, at AT TIME ZONE tz) AT TIME ZONE tz
    END
$$;

-- Spend per limit, subject and period: written by the ledger writer in the transaction that
-- inserts the rows it is made of (only rows actually inserted, so a replayed journal charges
-- nothing twice), and filled from the ledger for the current period when a limit is created
-- or its scope, subject, period or time zone change.
CREATE TABLE tollgate.limit_spend (
    limit_id     text        NOT NULL REFERENCES tollgate.limits ON DELETE CASCADE,
    -- The user or key charged under a limit with no subject; '' otherwise.
    subject      text        NOT NULL DEFAULT '',
    period_start timestamptz NOT NULL,
    usd          numeric     NOT NULL DEFAULT 0,
    tokens       bigint      NOT NULL DEFAULT 0,
    requests     bigint      NOT NULL DEFAULT 0,
    -- Requests with no price (cost_usd NULL): their spend in usd is unknown, not zero.
    unpriced     bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (limit_id, subject, period_start)
);

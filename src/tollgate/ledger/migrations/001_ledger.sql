-- The usage ledger: one row per request, partitioned by month, plus the daily rollup.
-- Documented column by column in docs/ledger.md (a public interface).

CREATE SCHEMA IF NOT EXISTS tollgate;

CREATE TABLE tollgate.requests (
    request_id          uuid        NOT NULL,
    created_at          timestamptz NOT NULL,
    key_id              text,
    end_user_id         text,
    identity_source     text,
    provider            text,
    model               text,
    endpoint            text,
    streamed            boolean     NOT NULL DEFAULT false,
    status_code         integer,
    outcome             text        NOT NULL
        CHECK (outcome IN ('ok', 'blocked', 'upstream_error', 'client_aborted', 'usage_missing')),
    block_reason        text,
    input_tokens        bigint,
    cached_input_tokens bigint,
    cache_write_tokens  bigint,
    output_tokens       bigint,
    reasoning_tokens    bigint,
    total_tokens        bigint,
    units               jsonb,
    cost_usd            numeric(20, 10),
    latency_ms          integer,
    ttft_ms             integer,
    tags                text[]      NOT NULL DEFAULT '{}',
    limit_ids           text[]      NOT NULL DEFAULT '{}',
    use_case_id         text,
    use_case_name       text,
    use_case_version    text,
    logging_disabled    boolean     NOT NULL DEFAULT false,
    upstream_base_uri   text,
    -- request_id is a UUIDv7 whose timestamp is created_at, so (request_id, created_at)
    -- is as unique as request_id alone; Postgres needs the partition key in the key.
    PRIMARY KEY (request_id, created_at)
) PARTITION BY RANGE (created_at);

CREATE TABLE tollgate.requests_default PARTITION OF tollgate.requests DEFAULT;

CREATE INDEX requests_user_time_idx ON tollgate.requests (end_user_id, created_at);
CREATE INDEX requests_key_time_idx ON tollgate.requests (key_id, created_at);
CREATE INDEX requests_time_idx ON tollgate.requests (created_at);

-- Creates the monthly partitions covering [month of start, month of start + months).
CREATE FUNCTION tollgate.ensure_partitions(start timestamptz, months integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    first_month timestamptz := date_trunc('month', start AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    lo timestamptz;
    hi timestamptz;
    name text;
    created integer := 0;
BEGIN
    FOR i IN 0 .. months - 1 LOOP
        lo := first_month + make_interval(months => i);
        hi := lo + interval '1 month';
        name := 'requests_' || to_char(lo AT TIME ZONE 'UTC', 'YYYY_MM');
        IF to_regclass('tollgate.' || name) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE tollgate.%I PARTITION OF tollgate.requests FOR VALUES FROM (%L) TO (%L)',
                name, lo, hi);
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END $$;

SELECT tollgate.ensure_partitions(now() - interval '1 month', 4);

-- The rollup, kept in the same transaction as the inserts it summarises.
-- Empty strings stand for "none" in the key columns so the primary key can cover them.
CREATE TABLE tollgate.daily_usage (
    day                 date    NOT NULL,
    end_user_id         text    NOT NULL,
    key_id              text    NOT NULL,
    provider            text    NOT NULL,
    model               text    NOT NULL,
    requests            bigint  NOT NULL DEFAULT 0,
    blocked             bigint  NOT NULL DEFAULT 0,
    input_tokens        bigint  NOT NULL DEFAULT 0,
    cached_input_tokens bigint  NOT NULL DEFAULT 0,
    cache_write_tokens  bigint  NOT NULL DEFAULT 0,
    output_tokens       bigint  NOT NULL DEFAULT 0,
    reasoning_tokens    bigint  NOT NULL DEFAULT 0,
    total_tokens        bigint  NOT NULL DEFAULT 0,
    cost_usd            numeric(24, 10) NOT NULL DEFAULT 0,
    unpriced_requests   bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (day, end_user_id, key_id, provider, model)
);

CREATE INDEX daily_usage_user_day_idx ON tollgate.daily_usage (end_user_id, day);

-- Dashboard (issue 15): viewer tokens scoped to one gateway key, and two more rollups kept in
-- the writer's transaction like daily_usage, so that the dashboard's aggregate pages read a
-- few thousand rows whatever the size of the ledger. Documented in docs/ledger.md.

-- Read-only dashboard/API credentials that see one gateway key's rows only. Like gateway
-- keys: the plaintext is shown once, the SHA-256 of it is stored.
CREATE TABLE tollgate.viewer_tokens (
    viewer_id    text        PRIMARY KEY,      -- public id: 'vwr_' + 12 random hex chars
    token_hash   bytea       NOT NULL UNIQUE CHECK (octet_length(token_hash) = 32),
    token_prefix text        NOT NULL,         -- 'tgv_' + 4 random characters
    name         text        NOT NULL,
    key_id       text        NOT NULL REFERENCES tollgate.gateway_keys (key_id),
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz,
    CHECK (viewer_id ~ '^vwr_[0-9a-f]{12}$')
);

-- daily_usage summed per calendar month (UTC), same key columns: "this month's top users
-- and models" reads ~1/30 of the rows daily_usage would need.
CREATE TABLE tollgate.monthly_usage (
    month               date    NOT NULL CHECK (extract(day FROM month) = 1),
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
    PRIMARY KEY (month, end_user_id, key_id, provider, model)
);

CREATE INDEX monthly_usage_key_month_idx ON tollgate.monthly_usage (key_id, month);

-- daily_usage summed per day and gateway key: the time series of the overview (cost,
-- requests, the share without an end user) without a per-user scan.
CREATE TABLE tollgate.daily_totals (
    day                 date    NOT NULL,
    key_id              text    NOT NULL,
    requests            bigint  NOT NULL DEFAULT 0,
    blocked             bigint  NOT NULL DEFAULT 0,
    unattributed        bigint  NOT NULL DEFAULT 0,   -- requests with no end_user_id
    input_tokens        bigint  NOT NULL DEFAULT 0,
    cached_input_tokens bigint  NOT NULL DEFAULT 0,
    cache_write_tokens  bigint  NOT NULL DEFAULT 0,
    output_tokens       bigint  NOT NULL DEFAULT 0,
    reasoning_tokens    bigint  NOT NULL DEFAULT 0,
    total_tokens        bigint  NOT NULL DEFAULT 0,
    cost_usd            numeric(24, 10) NOT NULL DEFAULT 0,
    unpriced_requests   bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (day, key_id)
);

-- Both start from what daily_usage already holds (exact: kept in the same transactions).
INSERT INTO tollgate.monthly_usage
SELECT date_trunc('month', day)::date, end_user_id, key_id, provider, model,
       sum(requests), sum(blocked), sum(input_tokens), sum(cached_input_tokens),
       sum(cache_write_tokens), sum(output_tokens), sum(reasoning_tokens), sum(total_tokens),
       sum(cost_usd), sum(unpriced_requests)
FROM tollgate.daily_usage
GROUP BY 1, 2, 3, 4, 5;

INSERT INTO tollgate.daily_totals
SELECT day, key_id, sum(requests), sum(blocked),
       coalesce(sum(requests) FILTER (WHERE end_user_id = ''), 0),
       sum(input_tokens), sum(cached_input_tokens), sum(cache_write_tokens),
       sum(output_tokens), sum(reasoning_tokens), sum(total_tokens), sum(cost_usd),
       sum(unpriced_requests)
FROM tollgate.daily_usage
GROUP BY 1, 2;

-- The log's "outcome is not ok" filters (blocked, errors) walk this instead of every row.
CREATE INDEX requests_not_ok_idx ON tollgate.requests (outcome, created_at)
    WHERE outcome <> 'ok';

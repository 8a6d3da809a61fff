-- Dashboard (issue 15): viewer tokens scoped to one gateway key, and three more rollups kept
-- in the writer's transaction like daily_usage (ledger/rollups.py), so that the dashboard's
-- aggregate pages read a few thousand rows whatever the size of the ledger. Documented in
-- docs/ledger.md.

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

-- Per end user (and key) without the provider and model: what the Users page, a user's totals
-- and "top users" need. daily_usage has a row per model as well, ~5x as many.
CREATE TABLE tollgate.daily_users (
    day                 date    NOT NULL,
    end_user_id         text    NOT NULL,
    key_id              text    NOT NULL,
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
    PRIMARY KEY (day, end_user_id, key_id)
);

CREATE INDEX daily_users_user_day_idx ON tollgate.daily_users (end_user_id, day);

-- The same per calendar month (UTC): a period's whole months read ~1/30 of the rows.
CREATE TABLE tollgate.monthly_users (
    month               date    NOT NULL CHECK (extract(day FROM month) = 1),
    end_user_id         text    NOT NULL,
    key_id              text    NOT NULL,
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
    PRIMARY KEY (month, end_user_id, key_id)
);

CREATE INDEX monthly_users_user_month_idx ON tollgate.monthly_users (end_user_id, month);

-- Per day, key, provider and model, without the end user: the overview's time series, top
-- models and the share of requests that named no end user.
CREATE TABLE tollgate.daily_totals (
    day                 date    NOT NULL,
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
    unattributed        bigint  NOT NULL DEFAULT 0,   -- requests with no end_user_id
    PRIMARY KEY (day, key_id, provider, model)
);

-- All three start from what daily_usage already holds (exact: kept in the same transactions).
INSERT INTO tollgate.daily_users
SELECT day, end_user_id, key_id,
       sum(requests), sum(blocked), sum(input_tokens), sum(cached_input_tokens),
       sum(cache_write_tokens), sum(output_tokens), sum(reasoning_tokens), sum(total_tokens),
       sum(cost_usd), sum(unpriced_requests)
FROM tollgate.daily_usage
GROUP BY 1, 2, 3;

INSERT INTO tollgate.monthly_users
SELECT date_trunc('month', day)::date, end_user_id, key_id,
       sum(requests), sum(blocked), sum(input_tokens), sum(cached_input_tokens),
       sum(cache_write_tokens), sum(output_tokens), sum(reasoning_tokens), sum(total_tokens),
       sum(cost_usd), sum(unpriced_requests)
FROM tollgate.daily_usage
GROUP BY 1, 2, 3;

INSERT INTO tollgate.daily_totals
SELECT day, key_id, provider, model,
       sum(requests), sum(blocked), sum(input_tokens), sum(cached_input_tokens),
       sum(cache_write_tokens), sum(output_tokens), sum(reasoning_tokens), sum(total_tokens),
       sum(cost_usd), sum(unpriced_requests),
       coalesce(sum(requests) FILTER (WHERE end_user_id = ''), 0)
FROM tollgate.daily_usage
GROUP BY 1, 2, 3, 4;

-- The log's "outcome is not ok" filters (blocked, errors) walk this instead of every row.
CREATE INDEX requests_not_ok_idx ON tollgate.requests (outcome, created_at)
    WHERE outcome <> 'ok';

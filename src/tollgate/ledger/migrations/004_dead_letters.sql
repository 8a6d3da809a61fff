-- Records Postgres refused (a constraint, an encoding): kept with the error instead of
-- blocking the rest of their batch. `record` is the serialized tollgate.v1.UsageRecord.
CREATE TABLE tollgate.dead_letters (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id  text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    error       text        NOT NULL,
    record      bytea       NOT NULL
);

CREATE INDEX dead_letters_request_idx ON tollgate.dead_letters (request_id);

-- Tollgate processes enforcing limits (issue 14): each refresh of a replica's limit cache
-- marks it alive here, and each replica admits its share of a limit's remainder — the
-- remainder divided by the replicas alive — until its next refresh (docs/limits.md).
CREATE TABLE tollgate.limit_replicas (
    replica_id text        PRIMARY KEY,
    seen_at    timestamptz NOT NULL DEFAULT now()
);

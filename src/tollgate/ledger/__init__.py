"""The usage ledger in Postgres: migrations, the batched writer and read queries."""

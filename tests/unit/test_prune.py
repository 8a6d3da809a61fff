"""`tollgate prune`: dropping old monthly partitions of the ledger, against a real Postgres."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import tollgate_cli
from tollgate.app import run_migrations
from tollgate.ledger.prune import PruneRefused, partitions_ending_by, prune_partitions

# Months well before anything the migrations create around "now".
MONTHS = ("2025_01", "2025_02", "2025_03", "2025_04")


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    await run_migrations(database_url)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as c:
        await c.execute("SELECT tollgate.ensure_partitions('2025-01-01T00:00:00Z', 4)")
        # Two rows in each 2025 month (the 1st at midnight and the last second of the
        # month), one far in the past that only the default partition can take, and their
        # rollup rows.
        await c.execute(
            """
            INSERT INTO tollgate.requests (request_id, created_at, end_user_id, outcome)
            SELECT gen_random_uuid(), t, 'alice', 'ok'
            FROM unnest(ARRAY[
                '2025-01-01T00:00:00Z', '2025-01-31T23:59:59Z',
                '2025-02-01T00:00:00Z', '2025-02-28T23:59:59Z',
                '2025-03-01T00:00:00Z', '2025-03-31T23:59:59Z',
                '2025-04-01T00:00:00Z', '2025-04-30T23:59:59Z',
                '2019-06-15T12:00:00Z']::timestamptz[]) AS t
            """
        )
        await c.execute(
            """
            INSERT INTO tollgate.daily_usage (day, end_user_id, key_id, provider, model, requests)
            SELECT (created_at AT TIME ZONE 'UTC')::date, end_user_id, '', '', '', count(*)
            FROM tollgate.requests GROUP BY 1, 2
            """
        )
        yield c


async def partition_names(conn: psycopg.AsyncConnection[Any]) -> set[str]:
    cur = await conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'tollgate.requests'::regclass"
    )
    return {name for (name,) in await cur.fetchall()}


async def scalar(conn: psycopg.AsyncConnection[Any], query: str) -> Any:
    row = await (await conn.execute(query)).fetchone()
    assert row is not None
    return row[0]


async def test_drops_months_that_end_by_the_date(conn: psycopg.AsyncConnection[Any]) -> None:
    before = await partition_names(conn)
    assert {f"requests_{m}" for m in MONTHS} | {"requests_default"} <= before
    rollup = await scalar(conn, "SELECT sum(requests) FROM tollgate.daily_usage")

    dropped = await prune_partitions(conn, date(2025, 3, 1))

    assert dropped == ["requests_2025_01", "requests_2025_02"]
    assert await partition_names(conn) == before - set(dropped)
    for name in dropped:
        assert await scalar(conn, f"SELECT to_regclass('tollgate.{name}')") is None
    # Later months and their rows stay, the default partition and its row too.
    assert await scalar(conn, "SELECT count(*) FROM tollgate.requests_2025_03") == 2
    assert await scalar(conn, "SELECT count(*) FROM tollgate.requests_2025_04") == 2
    assert await scalar(conn, "SELECT count(*) FROM tollgate.requests_default") == 1
    assert await scalar(conn, "SELECT min(created_at) FROM tollgate.requests") == datetime(
        2019, 6, 15, 12, tzinfo=UTC
    )
    # The rollup outlives the detail.
    assert await scalar(conn, "SELECT sum(requests) FROM tollgate.daily_usage") == rollup
    # Nothing left to do for the same date.
    assert await prune_partitions(conn, date(2025, 3, 1)) == []


async def test_date_inside_a_month_keeps_that_month(conn: psycopg.AsyncConnection[Any]) -> None:
    assert await prune_partitions(conn, date(2025, 2, 28)) == ["requests_2025_01"]
    assert await scalar(conn, "SELECT count(*) FROM tollgate.requests_2025_02") == 2
    assert await prune_partitions(conn, date(2025, 3, 2)) == ["requests_2025_02"]
    assert await scalar(conn, "SELECT count(*) FROM tollgate.requests_2025_03") == 2


async def test_dry_run_changes_nothing(conn: psycopg.AsyncConnection[Any]) -> None:
    before = await partition_names(conn)
    rows = await scalar(conn, "SELECT count(*) FROM tollgate.requests")

    listed = await prune_partitions(conn, date(2025, 4, 1), dry_run=True)

    assert listed == ["requests_2025_01", "requests_2025_02", "requests_2025_03"]
    assert await partition_names(conn) == before
    assert await scalar(conn, "SELECT count(*) FROM tollgate.requests") == rows


async def test_range_comes_from_the_catalog_not_the_name(
    conn: psycopg.AsyncConnection[Any],
) -> None:
    # Named for May but covering May and June: it still holds June rows on 2025-06-01.
    await conn.execute(
        "CREATE TABLE tollgate.requests_2025_05 PARTITION OF tollgate.requests"
        " FOR VALUES FROM ('2025-05-01T00:00:00Z') TO ('2025-07-01T00:00:00Z')"
    )
    await conn.execute(
        "INSERT INTO tollgate.requests (request_id, created_at, outcome)"
        " VALUES (gen_random_uuid(), '2025-06-20T00:00:00Z', 'ok')"
    )
    found = await partitions_ending_by(conn, date(2025, 6, 1))
    assert [p.name for p in found] == [f"requests_{m}" for m in MONTHS]
    assert found[0].lower == datetime(2025, 1, 1, tzinfo=UTC)
    assert found[0].upper == datetime(2025, 2, 1, tzinfo=UTC)
    assert "requests_2025_05" not in await prune_partitions(conn, date(2025, 6, 1))
    assert await scalar(conn, "SELECT count(*) FROM tollgate.requests_2025_05") == 1
    assert await prune_partitions(conn, date(2025, 7, 1)) == ["requests_2025_05"]


async def test_refuses_a_date_after_today(conn: psycopg.AsyncConnection[Any]) -> None:
    before = await partition_names(conn)
    tomorrow = datetime.now(UTC).date() + timedelta(days=1)
    with pytest.raises(PruneRefused, match="after today"):
        await prune_partitions(conn, tomorrow)
    assert await partition_names(conn) == before


async def test_works_on_a_connection_outside_autocommit(database_url: str) -> None:
    await run_migrations(database_url)
    async with await psycopg.AsyncConnection.connect(database_url) as c:
        await c.execute("SELECT tollgate.ensure_partitions('2025-01-01T00:00:00Z', 2)")
        await c.commit()
        assert await prune_partitions(c, date(2025, 2, 1)) == ["requests_2025_01"]
    # Committed, not left in an open transaction that closing the connection would end.
    async with await psycopg.AsyncConnection.connect(database_url) as c:
        assert await scalar(c, "SELECT to_regclass('tollgate.requests_2025_01')") is None
        assert await scalar(c, "SELECT to_regclass('tollgate.requests_2025_02')") is not None


def cli(database_url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return tollgate_cli(database_url, tmp_path, "prune", *args)


async def test_prune_command(
    conn: psycopg.AsyncConnection[Any], database_url: str, tmp_path: Path
) -> None:
    before = await partition_names(conn)

    dry = cli(database_url, tmp_path, "--before", "2025-03-15", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[:2] == [
        "would drop tollgate.requests_2025_01",
        "would drop tollgate.requests_2025_02",
    ]
    assert "rollups (daily_usage, daily_users, monthly_users, daily_totals) are kept" in dry.stdout
    assert await partition_names(conn) == before

    done = cli(database_url, tmp_path, "--before", "2025-03-15")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:2] == [
        "dropped tollgate.requests_2025_01",
        "dropped tollgate.requests_2025_02",
    ]
    assert await partition_names(conn) == before - {"requests_2025_01", "requests_2025_02"}

    again = cli(database_url, tmp_path, "--before", "2025-03-15")
    assert again.returncode == 0, again.stderr
    assert "no ledger partition ends on or before 2025-03-15" in again.stdout

    bad = cli(database_url, tmp_path, "--before", "March")
    assert bad.returncode == 2
    assert "--before" in bad.stderr

    future = cli(database_url, tmp_path, "--before", "2999-01-01")
    assert future.returncode == 1
    assert "after today" in future.stderr

"""LedgerWriter and migrations against a real Postgres (embedded wheel)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from genai_prices import Usage, calc_price
from psycopg_pool import AsyncConnectionPool

from tollgate.app import run_migrations
from tollgate.ledger.journal import Journal
from tollgate.ledger.migrate import available_migrations
from tollgate.ledger.records import UsageRecord, new_request_id
from tollgate.ledger.rollups import derive_from_daily_usage, mismatch_query
from tollgate.ledger.writer import LedgerWriter
from tollgate.v1 import usage_pb2


def record(
    user: str | None, inp: int | None, out: int | None, *, model: str = "gpt-4o-mini"
) -> UsageRecord:
    r = UsageRecord(
        request_id=new_request_id(), outcome=usage_pb2.OUTCOME_OK, provider="openai", model=model
    )
    r.created_at.GetCurrentTime()
    r.created_at.nanos -= r.created_at.nanos % 1000
    if user is not None:
        r.end_user_id = user
    if inp is not None:
        r.input_tokens = inp
    if out is not None:
        r.output_tokens = out
        r.total_tokens = (inp or 0) + out
    return r


@pytest.fixture
async def pool(
    database_url: str,
) -> AsyncIterator[AsyncConnectionPool[psycopg.AsyncConnection[Any]]]:
    await run_migrations(database_url)
    p: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
        database_url, open=False
    )
    await p.open()
    await p.wait()
    yield p
    await p.close()


def make_writer(pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]], **kw: Any) -> LedgerWriter:
    options = {"queue_size": 1000, "batch_size": 100, "flush_interval_s": 0.01, **kw}
    return LedgerWriter(pool, **options)


async def fetch(
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]], query: str
) -> list[tuple[Any, ...]]:
    async with pool.connection() as conn:
        cur = await conn.execute(query)
        return await cur.fetchall()


async def test_migrations_apply_once(database_url: str) -> None:
    first = await run_migrations(database_url)
    assert first == [f"{m.version:03d}_{m.name}" for m in available_migrations()]
    assert await run_migrations(database_url) == []


async def test_batch_is_idempotent_and_rollup_matches(
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
) -> None:
    writer = make_writer(pool)
    batch = [
        record("alice", 10, 5),
        record("alice", 20, 7),
        record("bob", 3, None),
        record(None, None, None),
    ]
    assert await writer.write_batch(batch) == 4
    assert await writer.write_batch(batch) == 0  # replaying changes nothing
    assert await writer.write_batch([*batch[:2], record("bob", 1, 1)]) == 1
    rows = await fetch(
        pool, "SELECT count(*), sum(input_tokens), sum(output_tokens) FROM tollgate.requests"
    )
    assert rows == [(5, 34, 13)]
    rollup = await fetch(
        pool,
        "SELECT sum(requests), sum(input_tokens), sum(output_tokens), sum(cost_usd)"
        " FROM tollgate.daily_usage",
    )
    direct = await fetch(
        pool,
        "SELECT count(*), coalesce(sum(input_tokens),0), coalesce(sum(output_tokens),0),"
        " coalesce(sum(cost_usd),0) FROM tollgate.requests",
    )
    assert rollup == direct
    per_user = await fetch(
        pool, "SELECT end_user_id, requests FROM tollgate.daily_usage ORDER BY end_user_id"
    )
    assert per_user == [("", 1), ("alice", 2), ("bob", 2)]
    # Every other rollup agrees with the rows too, group by group.
    assert await fetch(pool, mismatch_query()) == [(0, 0, 0, 0)]
    totals = await fetch(pool, "SELECT sum(requests), sum(unattributed) FROM tollgate.daily_totals")
    assert totals == [(5, 1)]


async def test_null_tokens_stay_null(
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
) -> None:
    r = record("carol", None, None)
    await make_writer(pool).write_batch([r])
    rows = await fetch(pool, "SELECT input_tokens, output_tokens, cost_usd FROM tollgate.requests")
    assert rows == [(None, None, None)]


async def test_cost_is_genai_prices_exactly(
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
) -> None:
    await make_writer(pool).write_batch([record("dave", 1234, 567)])
    ((cost,),) = await fetch(pool, "SELECT cost_usd FROM tollgate.requests")
    expected = calc_price(
        Usage(input_tokens=1234, output_tokens=567), model_ref="gpt-4o-mini", provider_id="openai"
    )
    assert cost == Decimal(expected.total_price)
    assert cost > 0


async def test_unknown_model_has_null_cost_and_is_counted(
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
) -> None:
    writer = make_writer(pool)
    await writer.write_batch([record("erin", 5, 5, model="no-such-model-anywhere")])
    assert await fetch(pool, "SELECT cost_usd FROM tollgate.requests") == [(None,)]
    assert writer.stats.unpriced == 1


async def test_background_writer_drains_on_close(
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
) -> None:
    writer = make_writer(pool, batch_size=7)
    writer.start()
    for i in range(50):
        assert writer.submit(record(f"u{i % 5}", i, 1))
    await writer.close()
    assert await fetch(pool, "SELECT count(*) FROM tollgate.requests") == [(50,)]
    assert writer.stats.written == 50
    assert writer.stats.batches >= 50 // 7


async def test_submit_never_blocks_when_full(
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
) -> None:
    writer = make_writer(pool, queue_size=3)
    results = [writer.submit(record("f", 1, 1)) for _ in range(5)]
    assert results == [True, True, True, False, False]
    assert writer.stats.dropped == 2
    await asyncio.sleep(0)


async def test_monthly_partitions_exist(
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
) -> None:
    rows = await fetch(
        pool,
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'tollgate.requests'::regclass",
    )
    assert rows[0][0] >= 5  # default + previous, current and two coming months


async def test_writer_retries_until_postgres_can_take_the_batch(database_url: str) -> None:
    # No schema yet: every write fails until the migrations run, then the batch lands once.
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
        database_url, open=False
    )
    await pool.open()
    writer = make_writer(pool)
    writer.start()
    for i in range(5):
        writer.submit(record("retry-user", i + 1, 1))
    deadline = asyncio.get_running_loop().time() + 10
    while writer.stats.failed_attempts < 2:
        assert asyncio.get_running_loop().time() < deadline, "writer never attempted a write"
        await asyncio.sleep(0.02)
    await run_migrations(database_url)
    await writer.close(timeout_s=10)
    assert writer.stats.written == 5
    assert await fetch(pool, "SELECT count(*), sum(input_tokens) FROM tollgate.requests") == [
        (5, 15)
    ]
    await pool.close()


async def test_checkpoint_advances_only_over_batches_committed_in_order(
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]], tmp_path: Path
) -> None:
    # Three batches in flight at once; the first one is held back until the other two are in
    # Postgres. Until it commits the checkpoint must not move: a crash then replays all six
    # (the two later batches as harmless duplicates) instead of losing the first two.
    journal = Journal(tmp_path / "journal")
    records = [record(f"order-{i}", i + 1, 1) for i in range(6)]
    for r in records:
        journal.append(r)
    start, end = journal.checkpoint_pos, journal.read(0, 6).end
    release = asyncio.Event()

    class FirstBatchHeld(LedgerWriter):
        async def _write_with_retry(self, batch: Sequence[UsageRecord]) -> bool:
            if batch[0].request_id == records[0].request_id:
                await release.wait()
            return await super()._write_with_retry(batch)

    writer = FirstBatchHeld(
        pool, queue_size=1, batch_size=2, flush_interval_s=0.01, journal=journal, concurrency=3
    )
    writer.start()
    deadline = asyncio.get_running_loop().time() + 10
    while await fetch(pool, "SELECT count(*) FROM tollgate.requests") != [(4,)]:
        assert asyncio.get_running_loop().time() < deadline, "later batches never committed"
        await asyncio.sleep(0.02)
    assert journal.checkpoint_pos == start
    assert writer.pending == 6
    release.set()
    await writer.close(timeout_s=10)
    assert journal.checkpoint_pos == end
    assert writer.pending == 0
    assert await fetch(pool, "SELECT count(*), sum(requests) FROM tollgate.daily_usage") == [(6, 6)]
    journal.close()


async def test_concurrent_batches_sharing_rollup_rows_add_up(
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
) -> None:
    # Four connections write batches that all touch the same rollup rows at once: the rows are
    # locked in one order, so no deadlock, and every record is counted exactly once.
    writer = make_writer(pool, batch_size=50, queue_size=2000, concurrency=4)
    writer.start()
    for i in range(1000):
        writer.submit(record(f"shared-{i % 7}", 10, 1))
    await writer.close(timeout_s=30)
    assert writer.stats.written == 1000
    assert writer.stats.failed_attempts == 0  # a deadlock would have cost a retry
    assert await fetch(
        pool, "SELECT count(*), sum(requests), sum(input_tokens) FROM tollgate.daily_usage"
    ) == [(7, 1000, 10_000)]


async def test_rollups_derived_from_daily_usage_equal_the_kept_ones(
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
) -> None:
    writer = make_writer(pool)
    batch = [record("alice", 10, 5), record("bob", 3, None), record(None, 7, 1)]
    batch[1].key_id = "key_0123456789ab"
    assert await writer.write_batch(batch) == 3
    async with pool.connection() as conn:
        for table in ("daily_users", "monthly_users", "daily_totals"):
            await conn.execute(f"DELETE FROM tollgate.{table}")
        for statement in derive_from_daily_usage():
            await conn.execute(statement)
        cur = await conn.execute(mismatch_query())
        assert await cur.fetchone() == (0, 0, 0, 0)
        cur = await conn.execute("SELECT count(*), sum(unattributed) FROM tollgate.daily_totals")
        assert await cur.fetchone() == (2, 1)

#!/usr/bin/env python3
"""Benchmark of the ledger itself: writer throughput and dashboard queries on 10M rows.

Two parts, each on a fresh database in an embedded Postgres started for the run (in a
temporary directory, default settings as `tollgate up` uses them: fsync on,
shared_buffers 128 MB):

* **writer**: N realistic UsageRecords (2,000 users, 50 gateway keys, 6 models over three
  providers, tags, every token field) are appended to a real journal (not timed), then a real
  ``LedgerWriter`` on that journal is started and timed until every record is committed: the
  production path (read and parse the journal, price, encode, COPY, move + rollup, advance
  the checkpoint), as after an outage or behind a busy minute. The cases (``WRITER_CASES``)
  vary one thing at a time: batch size, batches in flight at once, records arriving already
  priced, and created_at spread over the last 10 minutes (a backlog of recent traffic) or
  over the whole month (almost every record its own ``daily_usage`` row: the rollup's worst
  case). Afterwards the row count must equal N and ``daily_usage`` must equal the sums over
  ``requests``, group by group. A breakdown times each step of one batch on its own and
  keeps the EXPLAIN ANALYZE of the move.
* **summary**: ``tollgate.requests`` is filled with ≥ 10M rows by SQL (``INSERT … SELECT …
  generate_series`` in chunks of 1M rows, ~3 months, 10,000 users with a skewed
  distribution), ``daily_usage`` is built from it with one ``INSERT … SELECT … GROUP BY``,
  then ``VACUUM (ANALYZE)``. Timed, with a warm cache: one user's month from
  ``daily_usage`` and from ``requests``, for random users and for the heaviest user, and the
  month's top 10 users from ``daily_usage``; EXPLAIN (ANALYZE, BUFFERS) of each goes to the
  results file. The SQL blocks of the "Example queries" section of docs/ledger.md are run
  too (read-only, timed), so the documentation's queries are known to work.

Prints a Markdown report and writes ``bench/results/ledger-<UTC timestamp>.json``. Every
wait is bounded; Postgres and its data directory are removed at the end, also on Ctrl-C
(``--keep-data`` keeps the directory for a look with psql).

Usage: ``python bench/ledger_bench.py [--records N] [--rows N] [--skip-writer]
[--skip-summary] [--quick] [--keep-data]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import psycopg
from psycopg_pool import AsyncConnectionPool

from tollgate.app import run_migrations
from tollgate.ledger import writer as writer_module
from tollgate.ledger.copy_text import copy_rows
from tollgate.ledger.journal import Journal
from tollgate.ledger.records import COLUMNS, UsageRecord, new_request_id
from tollgate.ledger.writer import LedgerWriter, record_cost
from tollgate.localstack import EmbeddedPostgres
from tollgate.pricing import PriceBook
from tollgate.v1 import usage_pb2

BENCH_DIR: Final = Path(__file__).resolve().parent
REPO: Final = BENCH_DIR.parent
RESULTS_DIR: Final = BENCH_DIR / "results"
LEDGER_DOC: Final = REPO / "docs" / "ledger.md"

WRITER_GOAL_PER_S: Final = 50_000
SUMMARY_GOAL_MS: Final = 100.0
WRITER_USERS: Final = 2_000
WRITER_KEYS: Final = 50
SUMMARY_USERS: Final = 10_000
SUMMARY_MONTHS: Final = 3  # the current month and the two before it
FILL_CHUNK: Final = 1_000_000
QUERY_RUNS: Final = 50
QUERY_WARMUP: Final = 3
PROFILE_BATCHES: Final = 3
SEED: Final = 20261123

# Bounds on every wait, so that the run stops by itself.
FILL_STATEMENT_TIMEOUT: Final = "20min"
QUERY_STATEMENT_TIMEOUT: Final = "120s"


class BenchError(RuntimeError):
    """The benchmark could not set up, run or verify a measurement."""


# -- what the ledger holds ----------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    provider: str
    name: str
    share: float
    endpoint: str
    base_uri: str
    input_per_mtok: Decimal  # list prices, for the SQL fill and the pre-priced writer run
    output_per_mtok: Decimal


_OPENAI: Final = "https://api.openai.com"
_ANTHROPIC: Final = "https://api.anthropic.com"
_GEMINI: Final = "https://generativelanguage.googleapis.com"
_GEMINI_FLASH_PATH: Final = "/v1beta/models/gemini-2.5-flash:generateContent"
MODELS: Final = tuple(
    Model(provider, name, share, endpoint, base_uri, Decimal(inp), Decimal(out))
    for provider, name, share, endpoint, base_uri, inp, out in (
        ("openai", "gpt-4o-mini", 0.35, "/v1/chat/completions", _OPENAI, "0.15", "0.60"),
        ("openai", "gpt-4.1", 0.15, "/v1/chat/completions", _OPENAI, "2.00", "8.00"),
        ("openai", "o4-mini", 0.10, "/v1/responses", _OPENAI, "1.10", "4.40"),
        ("anthropic", "claude-sonnet-4-5", 0.20, "/v1/messages", _ANTHROPIC, "3.00", "15.00"),
        ("anthropic", "claude-haiku-4-5", 0.10, "/v1/messages", _ANTHROPIC, "1.00", "5.00"),
        ("gemini", "gemini-2.5-flash", 0.10, _GEMINI_FLASH_PATH, _GEMINI, "0.30", "2.50"),
    )
)
TAG_ENVS: Final = ("prod", "staging")
TAG_FEATURES: Final = ("chat", "search", "summarize", "agent", "batch")
BLOCK_REASONS: Final = (
    "user_id_required",
    "invalid_gateway_key",
    "provider_not_allowed",
    "invalid_user_id",
)
IDENTITY_SOURCES: Final = ("header", "jwt", "key")


def _key_ids(count: int) -> list[str]:
    return [f"key_{(i * 0x9E3779B1 + 0x5BD1E995) & 0xFFFFFFFFFFFF:012x}" for i in range(count)]


def _outcome(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.94:
        return usage_pb2.OUTCOME_OK
    if roll < 0.96:
        return usage_pb2.OUTCOME_BLOCKED
    if roll < 0.985:
        return usage_pb2.OUTCOME_UPSTREAM_ERROR
    if roll < 0.995:
        return usage_pb2.OUTCOME_CLIENT_ABORTED
    return usage_pb2.OUTCOME_USAGE_MISSING


def make_records(count: int, start: datetime, end: datetime, seed: int) -> list[UsageRecord]:
    """``count`` records in time order, as the request path would hand them over."""
    rng = random.Random(seed)
    keys = _key_ids(WRITER_KEYS)
    weights = [m.share for m in MODELS]
    start_us = int(start.timestamp() * 1_000_000)
    span_us = int((end - start).total_seconds() * 1_000_000)
    times = sorted(start_us + rng.randrange(span_us) for _ in range(count))
    records: list[UsageRecord] = []
    for at_us in times:
        user = int(WRITER_USERS * rng.random() ** 2.5)  # a few heavy users, a long tail
        model = rng.choices(MODELS, weights)[0]
        outcome = _outcome(rng)
        r = UsageRecord(
            request_id=new_request_id(at_us // 1000),
            outcome=outcome,
            provider=model.provider,
            model=model.name,
            endpoint=model.endpoint,
            streamed=rng.random() < 0.4,
            upstream_base_uri=model.base_uri,
            latency_ms=200 + int(rng.random() ** 2 * 20_000),
        )
        r.created_at.FromMicroseconds(at_us)
        if rng.random() < 0.95:
            r.key_id = keys[user % WRITER_KEYS]
        if not (outcome == usage_pb2.OUTCOME_BLOCKED and rng.random() < 0.5):
            r.end_user_id = f"user_{user:05d}"
            r.identity_source = rng.choice(IDENTITY_SOURCES)
        if r.streamed:
            r.ttft_ms = r.latency_ms // 5
        tags_roll = rng.random()
        if tags_roll >= 0.2:
            r.tags.append(TAG_ENVS[0] if rng.random() < 0.8 else TAG_ENVS[1])
        if tags_roll >= 0.5:
            r.tags.append(TAG_FEATURES[user % len(TAG_FEATURES)])
        if rng.random() < 0.1:
            r.limit_ids.append("lim_user_daily")
        if rng.random() < 0.15:
            r.use_case_id = f"uc_{user % 8}"
            r.use_case_name = f"use case {user % 8}"
            r.use_case_version = "v1"
        r.logging_disabled = rng.random() < 0.01
        if outcome == usage_pb2.OUTCOME_BLOCKED:
            r.block_reason = rng.choice(BLOCK_REASONS)
            r.status_code = 401 if r.block_reason == "invalid_gateway_key" else 400
        elif outcome == usage_pb2.OUTCOME_UPSTREAM_ERROR:
            r.status_code = rng.choice((429, 500, 503))
        elif outcome == usage_pb2.OUTCOME_USAGE_MISSING:
            r.status_code = 200
        elif outcome == usage_pb2.OUTCOME_OK:
            r.status_code = 200
            _set_tokens(r, model, rng)
        records.append(r)
    return records


def _set_tokens(r: UsageRecord, model: Model, rng: random.Random) -> None:
    inp = 50 + int(rng.random() ** 3 * 12_000)
    out = 10 + int(rng.random() ** 2 * 1_500)
    cached = inp // 2 if rng.random() < 0.3 else 0
    r.input_tokens = inp
    r.output_tokens = out
    r.cached_input_tokens = cached
    if model.provider == "anthropic":
        r.cache_write_tokens = inp // 3 if rng.random() < 0.05 else 0
    elif model.provider == "openai":
        r.reasoning_tokens = out * 3 // 5 if model.name == "o4-mini" else 0
        r.total_tokens = inp + out
    else:
        r.reasoning_tokens = out // 5
        r.total_tokens = inp + out + r.reasoning_tokens
    if model.name == "gpt-4.1" and rng.random() < 0.01:
        r.units["images"] = 1.0


def list_price(r: UsageRecord) -> str | None:
    """The cost from the list prices above: for the run where records arrive priced."""
    if not r.HasField("input_tokens"):
        return None
    model = next(m for m in MODELS if m.name == r.model)
    cost = (
        r.input_tokens * model.input_per_mtok + r.output_tokens * model.output_per_mtok
    ) / 1_000_000
    return str(cost)


# -- Postgres -------------------------------------------------------------------------------


class Cluster:
    """The embedded Postgres of the run; one fresh database per measurement."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.server = EmbeddedPostgres(work_dir / "pgdata", log_path=work_dir / "postgres.log")

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop(timeout_s=30)

    def admin_url(self) -> str:
        return self.server.url_for("postgres")

    def fresh_database(self, name: str) -> str:
        with psycopg.connect(self.admin_url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        url = self.server.url_for(name)
        asyncio.run(run_migrations(url))
        return url

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.admin_url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def cpu_s(self) -> float:
        """CPU seconds used so far by the postmaster and its live and reaped children."""
        pid = self.server.pid
        if pid is None:
            return 0.0
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            # fields[0] is state; ppid, utime, stime, cutime, cstime are fields 4, 14-17.
            if entry.name == str(pid):
                total += sum(int(fields[i]) for i in (11, 12, 13, 14))
            elif fields[1] == str(pid):
                total += int(fields[11]) + int(fields[12])
        return total / ticks


# -- part 1: the writer -----------------------------------------------------------------------


@dataclass(frozen=True)
class WriterCase:
    """One writer measurement: how records arrive and how the writer is set up."""

    mode: str  # "priced by the writer" (production) or "cost on the record"
    window: str  # "10 min" (a backlog of recent traffic) or "month" (spread over the month)
    batch_size: int
    concurrency: int


# The production path first, then one change at a time against it.
WRITER_CASES: Final = (
    WriterCase("priced by the writer", "10 min", 5_000, 2),  # Tollgate's defaults
    WriterCase("priced by the writer", "10 min", 1_000, 2),
    WriterCase("priced by the writer", "10 min", 5_000, 1),
    WriterCase("priced by the writer", "10 min", 5_000, 3),
    WriterCase("cost on the record", "10 min", 5_000, 2),
    WriterCase("priced by the writer", "month", 5_000, 2),
)


@dataclass
class WriterRun:
    mode: str
    window: str
    batch_size: int
    concurrency: int
    records: int
    written: int
    batches: int
    seconds: float
    records_per_s: float
    python_cpu_s: float
    postgres_cpu_s: float
    rows_in_requests: int
    rollup_groups: int
    rollup_mismatches: int
    goal_met: bool


_ROLLUP_FROM_REQUESTS = """
SELECT (created_at AT TIME ZONE 'UTC')::date, coalesce(end_user_id, ''), coalesce(key_id, ''),
       coalesce(provider, ''), coalesce(model, ''), count(*),
       count(*) FILTER (WHERE outcome = 'blocked'),
       coalesce(sum(input_tokens), 0), coalesce(sum(cached_input_tokens), 0),
       coalesce(sum(cache_write_tokens), 0), coalesce(sum(output_tokens), 0),
       coalesce(sum(reasoning_tokens), 0), coalesce(sum(total_tokens), 0),
       coalesce(sum(cost_usd), 0)::numeric(24, 10),
       count(*) FILTER (WHERE cost_usd IS NULL AND outcome <> 'blocked')
FROM tollgate.requests GROUP BY 1, 2, 3, 4, 5
"""
_ROLLUP_STORED = """
SELECT day, end_user_id, key_id, provider, model, requests, blocked, input_tokens,
       cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
       total_tokens, cost_usd, unpriced_requests
FROM tollgate.daily_usage
"""
_ROLLUP_CHECK = f"""
SELECT (SELECT count(*) FROM tollgate.requests),
       (SELECT count(*) FROM tollgate.daily_usage),
       (SELECT count(*) FROM ({_ROLLUP_FROM_REQUESTS} EXCEPT {_ROLLUP_STORED}) AS missing)
     + (SELECT count(*) FROM ({_ROLLUP_STORED} EXCEPT {_ROLLUP_FROM_REQUESTS}) AS extra)
"""


def _fill_journal(directory: Path, records: Sequence[UsageRecord]) -> Journal:
    """A journal holding ``records``, as the request path leaves it (not timed)."""
    journal = Journal(directory)
    for record in records:
        journal.append(record)
    journal.sync()
    return journal


async def _drain_journal(
    url: str, journal: Journal, case: WriterCase, cluster: Cluster
) -> tuple[float, float, float, int, int]:
    """Start a real LedgerWriter on a journal full of records (as after an outage, or the
    backlog of a busy minute) and time it until every record is committed."""
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
        url, min_size=case.concurrency + 1, max_size=case.concurrency + 2, open=False
    )
    await pool.open()
    await pool.wait(timeout=30)
    try:
        writer = LedgerWriter(
            pool,
            queue_size=1,
            batch_size=case.batch_size,
            flush_interval_s=0.1,
            journal=journal,
            concurrency=case.concurrency,
        )
        total = writer.pending
        deadline = time.monotonic() + 60 + total / 500
        cpu0, pg0 = time.process_time(), cluster.cpu_s()
        t0 = time.perf_counter()
        writer.start()
        while writer.pending:
            if time.monotonic() > deadline:
                raise BenchError(f"writer did not drain: {writer.pending:,} records left")
            await asyncio.sleep(0.005)
        seconds = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        pg_cpu = cluster.cpu_s() - pg0
        await writer.close(timeout_s=30)
        return seconds, cpu, pg_cpu, writer.stats.written, writer.stats.batches
    finally:
        await pool.close()


def writer_run(
    cluster: Cluster, work_dir: Path, records: Sequence[UsageRecord], case: WriterCase
) -> WriterRun:
    name = "bench_writer"
    url = cluster.fresh_database(name)
    journal_dir = work_dir / "journal"
    shutil.rmtree(journal_dir, ignore_errors=True)
    journal = _fill_journal(journal_dir, records)
    try:
        seconds, cpu, pg_cpu, written, batches = asyncio.run(
            _drain_journal(url, journal, case, cluster)
        )
    finally:
        journal.close()
        shutil.rmtree(journal_dir, ignore_errors=True)
    with psycopg.connect(url) as conn:
        conn.execute(f"SET statement_timeout = '{QUERY_STATEMENT_TIMEOUT}'")
        row = conn.execute(_ROLLUP_CHECK).fetchone()
    assert row is not None
    rows, groups, mismatches = (int(v) for v in row)
    cluster.drop_database(name)
    rate = len(records) / seconds
    return WriterRun(
        mode=case.mode,
        window=case.window,
        batch_size=case.batch_size,
        concurrency=case.concurrency,
        records=len(records),
        written=written,
        batches=batches,
        seconds=round(seconds, 2),
        records_per_s=round(rate),
        python_cpu_s=round(cpu, 1),
        postgres_cpu_s=round(pg_cpu, 1),
        rows_in_requests=rows,
        rollup_groups=groups,
        rollup_mismatches=mismatches,
        goal_met=rate >= WRITER_GOAL_PER_S and rows == len(records) and mismatches == 0,
    )


@dataclass
class CeilingRun:
    schema: str
    batch_size: int
    connections: int
    records: int
    seconds: float
    records_per_s: float
    postgres_cpu_s: float
    postgres_us_per_record: float


_SECONDARY_INDEXES: Final = (
    "tollgate.requests_user_time_idx",
    "tollgate.requests_key_time_idx",
    "tollgate.requests_time_idx",
)


async def _store_encoded(url: str, batches: Sequence[bytes], connections: int) -> None:
    """The writer's own statements over ``connections`` connections, nothing else."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for data in batches:
        queue.put_nowait(data)

    async def work(conn: psycopg.AsyncConnection[Any]) -> None:
        while not queue.empty():
            data = queue.get_nowait()
            async with conn.transaction():
                await conn.execute(writer_module._PREPARE)
                async with conn.cursor() as cur:
                    async with cur.copy(writer_module._COPY) as copy:
                        await copy.write(data)
                    await cur.execute(writer_module._MOVE_AND_ROLL_UP)

    conns = [await psycopg.AsyncConnection.connect(url) for _ in range(connections)]
    try:
        await asyncio.gather(*(work(c) for c in conns))
    finally:
        for conn in conns:
            await conn.close()


def encode_batches(records: Sequence[UsageRecord], batch_size: int) -> list[bytes]:
    """``records`` priced and encoded as the writer would, batch by batch."""
    prices = PriceBook()
    costs = [record_cost(prices, r) for r in records]
    return [
        copy_rows(records[i : i + batch_size], costs[i : i + batch_size])
        for i in range(0, len(records), batch_size)
    ]


def ceiling_run(
    cluster: Cluster,
    batches: Sequence[bytes],
    records: int,
    batch_size: int,
    connections: int,
    *,
    secondary_indexes: bool,
) -> CeilingRun:
    """Postgres alone: ``records`` records in ``batches`` priced and encoded beforehand (not
    timed), then only the writer's SQL, on ``connections`` connections so Postgres may use
    every core. No writer design with these statements can be faster on this machine."""
    name = "bench_writer_ceiling"
    url = cluster.fresh_database(name)
    if not secondary_indexes:
        with psycopg.connect(url, autocommit=True) as conn:
            for index in _SECONDARY_INDEXES:
                conn.execute(f"DROP INDEX {index}")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
    pg0 = cluster.cpu_s()
    t0 = time.perf_counter()
    asyncio.run(_store_encoded(url, batches, connections))
    seconds = time.perf_counter() - t0
    pg_cpu = cluster.cpu_s() - pg0
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM tollgate.requests").fetchone()
    cluster.drop_database(name)
    if row is None or row[0] != records:
        raise BenchError(f"ceiling run stored {row} rows instead of {records}")
    return CeilingRun(
        schema="as migrated" if secondary_indexes else "without the 3 secondary indexes",
        batch_size=batch_size,
        connections=connections,
        records=records,
        seconds=round(seconds, 2),
        records_per_s=round(records / seconds),
        postgres_cpu_s=round(pg_cpu, 1),
        postgres_us_per_record=round(pg_cpu / records * 1e6, 1),
    )


async def _profile(url: str, batches: list[list[bytes]]) -> dict[str, Any]:
    """The writer's statements (taken from its module) one step at a time, one connection."""
    steps: dict[str, list[float]] = {
        "parse the journal record": [],
        "pricing": [],
        "encode COPY text": [],
        "COPY into staging": [],
        "INSERT … SELECT + rollup": [],
        "commit": [],
    }
    explain = ""
    prices = PriceBook()
    async with await psycopg.AsyncConnection.connect(url) as conn:
        for n, blobs in enumerate(batches):
            t = time.perf_counter()
            batch = [UsageRecord.FromString(b) for b in blobs]
            steps["parse the journal record"].append(time.perf_counter() - t)
            t = time.perf_counter()
            costs = [record_cost(prices, r) for r in batch]
            steps["pricing"].append(time.perf_counter() - t)
            t = time.perf_counter()
            data = copy_rows(batch, costs)
            steps["encode COPY text"].append(time.perf_counter() - t)
            await conn.execute(writer_module._PREPARE)
            t = time.perf_counter()
            async with conn.cursor() as cur, cur.copy(writer_module._COPY) as copy:
                await copy.write(data)
            steps["COPY into staging"].append(time.perf_counter() - t)
            t = time.perf_counter()
            move = writer_module._MOVE_AND_ROLL_UP
            if n == len(batches) - 1:
                cur = await conn.execute("EXPLAIN (ANALYZE, BUFFERS, WAL) " + move)
                explain = "\n".join(str(r[0]) for r in await cur.fetchall())
            else:
                await (await conn.execute(move)).fetchall()
            steps["INSERT … SELECT + rollup"].append(time.perf_counter() - t)
            t = time.perf_counter()
            await conn.commit()
            steps["commit"].append(time.perf_counter() - t)
    size = len(batches[0])
    per_record = {k: round(statistics.median(v) / size * 1e6, 2) for k, v in steps.items() if v}
    return {
        "batch_size": size,
        "batches": len(batches),
        "us_per_record_median": per_record,
        "explain_move": explain,
    }


def writer_profile(cluster: Cluster, start: datetime, end: datetime) -> dict[str, Any]:
    """Each step of the writer's work on its own, batch after batch, on a fresh ledger."""
    size = WRITER_CASES[0].batch_size
    name = "bench_writer_profile"
    url = cluster.fresh_database(name)
    records = make_records(size * (PROFILE_BATCHES + 1), start, end, SEED + 1)
    blobs = [r.SerializeToString() for r in records]
    batches = [blobs[i : i + size] for i in range(0, len(blobs), size)]
    try:
        return asyncio.run(_profile(url, batches))
    finally:
        cluster.drop_database(name)


def run_writer_part(cluster: Cluster, count: int, report: dict[str, Any]) -> None:
    now = datetime.now(UTC)
    starts = {
        "10 min": now - timedelta(minutes=10),
        "month": now.replace(day=1, hour=0, minute=0, second=0, microsecond=0),
    }
    built: dict[str, list[UsageRecord]] = {}
    priced: dict[str, list[UsageRecord]] = {}
    runs: list[WriterRun] = []
    for case in WRITER_CASES:
        if case.window not in built:
            _progress(f"writer: building {count:,} records ({case.window}) in memory")
            built[case.window] = make_records(count, starts[case.window], now, SEED)
        records = built[case.window]
        if case.mode == "cost on the record":
            if case.window not in priced:
                priced[case.window] = []
                for r in records:
                    copy = UsageRecord()
                    copy.CopyFrom(r)
                    cost = list_price(r)
                    if cost is not None:
                        copy.cost_usd = cost
                    priced[case.window].append(copy)
            records = priced[case.window]
        _progress(
            f"writer: {count:,} records, {case.mode}, {case.window}, batch {case.batch_size:,}"
            f", {case.concurrency} at once"
        )
        run = writer_run(cluster, cluster.work_dir, records, case)
        _progress(
            f"  {run.records_per_s:,} records/s ({run.seconds}s); rows {run.rows_in_requests:,}"
            f", rollup mismatches {run.rollup_mismatches}"
        )
        runs.append(run)
        if run.rows_in_requests != count or run.rollup_mismatches:
            raise BenchError(f"writer run did not verify: {run}")
    report["writer"] = [r.__dict__ for r in runs]
    ceilings: list[CeilingRun] = []
    size = WRITER_CASES[0].batch_size
    encoded = encode_batches(built["10 min"], size)
    for secondary in (True, False):
        _progress(f"writer: Postgres alone, secondary indexes {secondary}")
        ceiling = ceiling_run(cluster, encoded, count, size, 2, secondary_indexes=secondary)
        _progress(f"  {ceiling.records_per_s:,} records/s")
        ceilings.append(ceiling)
    report["writer_ceiling"] = [c.__dict__ for c in ceilings]
    _progress("writer: profiling one batch step by step")
    report["writer_profile"] = writer_profile(cluster, starts["10 min"], now)


# -- part 2: 10M rows and the dashboard's queries -------------------------------------------


def _model_case(expr: Callable[[Model], str], else_: str = "NULL") -> str:
    whens = " ".join(f"WHEN {n} THEN {expr(m)}" for n, m in enumerate(MODELS, 1))
    return f"CASE m {whens} ELSE {else_} END"


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _model_pick() -> str:
    edges: list[str] = []
    total = 0.0
    for n, model in enumerate(MODELS[:-1], 1):
        total += model.share
        edges.append(f"WHEN r_model < {total:.4f} THEN {n}")
    return f"CASE {' '.join(edges)} ELSE {len(MODELS)} END"


def _fill_sql() -> str:
    """One chunk of rows: ``%(lo)s..%(hi)s`` of ``%(total)s`` spread over [start, end)."""
    keys = "ARRAY[" + ", ".join(_sql_text(k) for k in _key_ids(WRITER_KEYS)) + "]"
    reasons = "ARRAY[" + ", ".join(_sql_text(b) for b in BLOCK_REASONS) + "]"
    features = "ARRAY[" + ", ".join(_sql_text(f) for f in TAG_FEATURES) + "]"
    sources = "ARRAY[" + ", ".join(_sql_text(s) for s in IDENTITY_SOURCES) + "]"
    provider = _model_case(lambda m: _sql_text(m.provider))
    anthropic = _model_case(lambda m: "true" if m.provider == "anthropic" else "false")
    return f"""
INSERT INTO tollgate.requests ({", ".join(COLUMNS)})
SELECT
    (lpad(to_hex((extract(epoch FROM ts) * 1000)::bigint), 12, '0') || '7'
        || substr(md5(i::text), 1, 3) || '8' || lpad(to_hex(i), 15, '0'))::uuid,
    ts,
    CASE WHEN r_key < 0.05 THEN NULL ELSE ({keys})[1 + mod(u, {WRITER_KEYS})] END,
    CASE WHEN no_user THEN NULL ELSE 'user_' || lpad(u::text, 5, '0') END,
    CASE WHEN no_user THEN NULL ELSE ({sources})[1 + mod((r_misc * 300)::int, 3)] END,
    {provider},
    {_model_case(lambda m: _sql_text(m.name))},
    {_model_case(lambda m: _sql_text(m.endpoint))},
    r_stream < 0.4,
    CASE outcome WHEN 'ok' THEN 200 WHEN 'usage_missing' THEN 200
        WHEN 'blocked' THEN 400 WHEN 'upstream_error' THEN 429 END,
    outcome,
    CASE WHEN outcome = 'blocked' THEN ({reasons})[1 + mod((r_misc * 400)::int, 4)] END,
    inp, cached,
    CASE WHEN inp IS NULL THEN NULL WHEN {anthropic} THEN
        CASE WHEN r_misc < 0.05 THEN inp / 3 ELSE 0 END END,
    outp,
    CASE WHEN inp IS NULL OR {anthropic} THEN NULL
        WHEN m = 3 THEN outp * 3 / 5 WHEN m = 6 THEN outp / 5 ELSE 0 END,
    CASE WHEN inp IS NULL OR {anthropic} THEN NULL
        WHEN m = 6 THEN inp + outp + outp / 5 ELSE inp + outp END,
    NULL,
    CASE WHEN inp IS NULL OR r_misc > 0.997 THEN NULL ELSE
        (inp * {_model_case(lambda m: str(m.input_per_mtok))}
         + outp * {_model_case(lambda m: str(m.output_per_mtok))}) / 1000000 END,
    '{{}}'::text[],  -- usage_flags
    NULL,  -- pricing_error
    200 + (r_lat * r_lat * 20000)::int,
    CASE WHEN r_stream < 0.4 THEN 40 + (r_lat * r_lat * 4000)::int END,
    CASE WHEN r_tag < 0.2 THEN '{{}}'::text[]
         WHEN r_tag < 0.5 THEN ARRAY[CASE WHEN r_misc < 0.8 THEN 'prod' ELSE 'staging' END]
         ELSE ARRAY[CASE WHEN r_misc < 0.8 THEN 'prod' ELSE 'staging' END,
                    ({features})[1 + mod(u, {len(TAG_FEATURES)})]] END,
    CASE WHEN r_key > 0.9 THEN ARRAY['lim_user_daily'] ELSE '{{}}'::text[] END,
    CASE WHEN r_tag > 0.85 THEN 'uc_' || mod(u, 8) END,
    CASE WHEN r_tag > 0.85 THEN 'use case ' || mod(u, 8) END,
    CASE WHEN r_tag > 0.85 THEN 'v1' END,
    r_lat > 0.99,
    {_model_case(lambda m: _sql_text(m.base_uri))}
FROM (
    SELECT i, ts, u, m, no_user, outcome, r_key, r_misc, r_stream, r_lat, r_tag,
           CASE WHEN outcome = 'ok' THEN 50 + (r_in * r_in * r_in * 12000)::bigint END AS inp,
           CASE WHEN outcome = 'ok' THEN 10 + (r_out * r_out * 1500)::bigint END AS outp,
           CASE WHEN outcome <> 'ok' THEN NULL
                WHEN r_cache < 0.3 THEN (25 + (r_in * r_in * r_in * 6000))::bigint
                ELSE 0 END AS cached
    FROM (
        SELECT i, ts, r_key, r_misc, r_stream, r_lat, r_tag, r_in, r_out, r_cache,
               mod(({SUMMARY_USERS} * power(r_user, 2.5))::int, {SUMMARY_USERS}) AS u,
               {_model_pick()} AS m,
               CASE WHEN r_outcome < 0.94 THEN 'ok' WHEN r_outcome < 0.96 THEN 'blocked'
                    WHEN r_outcome < 0.985 THEN 'upstream_error'
                    WHEN r_outcome < 0.995 THEN 'client_aborted'
                    ELSE 'usage_missing' END AS outcome,
               r_misc < 0.02 OR (r_outcome BETWEEN 0.94 AND 0.95) AS no_user
        FROM (
            SELECT i,
                   %(start)s::timestamptz
                       + make_interval(secs => %(span_s)s * (i - 1 + random()) / %(total)s)
                       AS ts,
                   random() AS r_user, random() AS r_model, random() AS r_outcome,
                   random() AS r_key, random() AS r_misc, random() AS r_stream,
                   random() AS r_lat, random() AS r_tag, random() AS r_in,
                   random() AS r_out, random() AS r_cache
            FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS i
        ) AS draws
    ) AS picked
) AS shaped
"""


_BUILD_ROLLUP = f"""
INSERT INTO tollgate.daily_usage (
    day, end_user_id, key_id, provider, model, requests, blocked, input_tokens,
    cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, total_tokens,
    cost_usd, unpriced_requests)
{_ROLLUP_FROM_REQUESTS}
"""

MONTH_START_DAY: Final = "date_trunc('month', now() AT TIME ZONE 'UTC')::date"
MONTH_START_TS: Final = "date_trunc('month', now(), 'UTC')"

SUMMARY_QUERIES: Final = {
    "user month, daily_usage": f"""
SELECT sum(requests) AS requests, sum(blocked) AS blocked, sum(input_tokens) AS input_tokens,
       sum(output_tokens) AS output_tokens, sum(total_tokens) AS total_tokens,
       sum(cost_usd) AS cost_usd, sum(unpriced_requests) AS unpriced
FROM tollgate.daily_usage
WHERE end_user_id = %s AND day >= {MONTH_START_DAY}
""",
    "user month, requests": f"""
SELECT count(*) AS requests, count(*) FILTER (WHERE outcome = 'blocked') AS blocked,
       sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
       sum(total_tokens) AS total_tokens, sum(cost_usd) AS cost_usd,
       count(*) FILTER (WHERE cost_usd IS NULL AND outcome <> 'blocked') AS unpriced
FROM tollgate.requests
WHERE end_user_id = %s AND created_at >= {MONTH_START_TS}
""",
    "top 10 users this month, daily_usage": f"""
SELECT end_user_id, sum(cost_usd) AS cost_usd, sum(requests) AS requests
FROM tollgate.daily_usage
WHERE day >= {MONTH_START_DAY}
GROUP BY end_user_id
ORDER BY cost_usd DESC
LIMIT 10
""",
}


@dataclass
class QueryTiming:
    query: str
    users: str
    runs: int
    median_ms: float
    p95_ms: float
    max_ms: float
    rows_median: float
    under_goal: bool


def _nearest_rank(sorted_values: list[float], pct: float) -> float:
    return sorted_values[max(1, math.ceil(pct / 100 * len(sorted_values))) - 1]


def _time_query(
    conn: psycopg.Connection[Any], name: str, sql: str, users: Sequence[str | None], label: str
) -> QueryTiming:
    def once(user: str | None) -> tuple[float, int]:
        params = (user,) if user is not None else None
        t = time.perf_counter()
        rows = conn.execute(sql, params, prepare=True).fetchall()
        return (time.perf_counter() - t) * 1000, len(rows)

    for user in users[:QUERY_WARMUP]:
        once(user)
    samples = [once(users[n % len(users)]) for n in range(QUERY_RUNS)]
    times = sorted(ms for ms, _ in samples)
    p95 = _nearest_rank(times, 95)
    return QueryTiming(
        query=name,
        users=label,
        runs=len(times),
        median_ms=round(statistics.median(times), 2),
        p95_ms=round(p95, 2),
        max_ms=round(times[-1], 2),
        rows_median=statistics.median(n for _, n in samples),
        under_goal=p95 < SUMMARY_GOAL_MS,
    )


def _explain(conn: psycopg.Connection[Any], sql: str, user: str | None) -> str:
    cur = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, (user,) if user else None)
    return "\n".join(str(r[0]) for r in cur.fetchall())


def _doc_queries() -> list[tuple[str, str]]:
    """(title, SQL) of each statement in the "Example queries" section of docs/ledger.md."""
    text = LEDGER_DOC.read_text("utf-8")
    section = re.search(r"^## Example queries\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if section is None:
        return []
    found: list[tuple[str, str]] = []
    for block in re.findall(r"```sql\n(.*?)```", section.group(1), re.S):
        title, lines = "", []
        for line in block.splitlines():
            if not lines and line.startswith("--"):
                title = title or line.lstrip("- ").strip().split(" (")[0]
                continue
            if not line.strip() and not lines:
                continue
            lines.append(line)
            if line.rstrip().endswith(";"):
                found.append((title, "\n".join(lines).rstrip().rstrip(";")))
                title, lines = "", []
    return found


def _run_doc_queries(conn: psycopg.Connection[Any], sample_user: str) -> list[dict[str, Any]]:
    out = []
    for title, sql in _doc_queries():
        # The docs name an example user; ask about one that exists here.
        sql = sql.replace("'user_7a3f'", _sql_text(sample_user))
        times, rows = [], 0
        for _ in range(3):
            with conn.transaction():
                conn.execute("SET TRANSACTION READ ONLY")
                t = time.perf_counter()
                rows = len(conn.execute(sql).fetchall())
                times.append((time.perf_counter() - t) * 1000)
        out.append({"query": title, "median_ms": round(statistics.median(times), 1), "rows": rows})
    return out


def _relation_mb(conn: psycopg.Connection[Any]) -> dict[str, float]:
    cur = conn.execute(
        """
        SELECT 'requests (all partitions, with indexes)',
               sum(pg_total_relation_size(i.inhrelid)) / 1048576.0
        FROM pg_inherits i WHERE i.inhparent = 'tollgate.requests'::regclass
        UNION ALL
        SELECT 'daily_usage (with indexes)',
               pg_total_relation_size('tollgate.daily_usage') / 1048576.0
        """
    )
    return {name: round(float(mb), 1) for name, mb in cur.fetchall()}


def fill_summary_ledger(
    cluster: Cluster, rows: int, name: str = "bench_ledger"
) -> tuple[str, dict[str, Any]]:
    """A fresh database ``name`` whose ``requests`` holds ``rows`` rows over the current month
    and the ``SUMMARY_MONTHS - 1`` before it (up to now), with ``daily_usage`` built from them
    and both VACUUM ANALYZEd; returns its URL and what the fill took. max_wal_size stays
    raised for the bulk load: the caller resets it (``ALTER SYSTEM RESET max_wal_size``)."""
    now = datetime.now(UTC)
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    start = month_start
    for _ in range(SUMMARY_MONTHS - 1):
        start = (start - timedelta(days=1)).replace(day=1)
    span_s = (now - start).total_seconds()
    url = cluster.fresh_database(name)
    fill: dict[str, Any] = {"rows": rows, "from": start.isoformat(), "to": now.isoformat()}
    with psycopg.connect(cluster.admin_url(), autocommit=True) as admin:
        # Bulk loading only: fewer forced checkpoints while 10M rows go in.
        admin.execute("ALTER SYSTEM SET max_wal_size = '8GB'")
        admin.execute("SELECT pg_reload_conf()")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"SET statement_timeout = '{FILL_STATEMENT_TIMEOUT}'")
        conn.execute("SET synchronous_commit = off")
        conn.execute("SET work_mem = '256MB'")
        conn.execute("SET maintenance_work_mem = '1GB'")
        conn.execute("SELECT tollgate.ensure_partitions(%s, %s)", (start, SUMMARY_MONTHS + 1))
        sql = _fill_sql()
        chunks: list[float] = []
        t_fill = time.perf_counter()
        for lo in range(1, rows + 1, FILL_CHUNK):
            hi = min(lo + FILL_CHUNK - 1, rows)
            t = time.perf_counter()
            conn.execute(sql, {"lo": lo, "hi": hi, "total": rows, "start": start, "span_s": span_s})
            chunks.append(round(time.perf_counter() - t, 1))
            _progress(f"summary: {hi:,} of {rows:,} rows in ({chunks[-1]}s for this chunk)")
        fill["insert_s"] = round(time.perf_counter() - t_fill, 1)
        fill["chunk_s"] = chunks
        fill["rows_per_s"] = round(rows / fill["insert_s"])
        t = time.perf_counter()
        conn.execute(_BUILD_ROLLUP)
        fill["rollup_build_s"] = round(time.perf_counter() - t, 1)
        _progress(f"summary: daily_usage built in {fill['rollup_build_s']}s; VACUUM ANALYZE")
        t = time.perf_counter()
        conn.execute("VACUUM (ANALYZE) tollgate.requests, tollgate.daily_usage")
        fill["vacuum_analyze_s"] = round(time.perf_counter() - t, 1)
        counts = conn.execute(
            f"SELECT (SELECT count(*) FROM tollgate.requests),"
            f" (SELECT count(*) FROM tollgate.daily_usage),"
            f" (SELECT count(*) FROM tollgate.requests WHERE created_at >= {MONTH_START_TS}),"
            f" (SELECT count(*) FROM tollgate.daily_usage WHERE day >= {MONTH_START_DAY}),"
            f" (SELECT count(DISTINCT end_user_id) FROM tollgate.daily_usage"
            f" WHERE end_user_id <> '')"
        ).fetchone()
        assert counts is not None
        (
            fill["rows_in_requests"],
            fill["daily_usage_rows"],
            fill["rows_this_month"],
            fill["daily_usage_rows_this_month"],
            fill["users"],
        ) = (int(c) for c in counts)
        fill["size_mb"] = _relation_mb(conn)
        if fill["rows_in_requests"] != rows:
            raise BenchError(f"filled {fill['rows_in_requests']:,} rows, expected {rows:,}")
    return url, fill


def run_summary_part(cluster: Cluster, rows: int, report: dict[str, Any]) -> None:
    url, report["summary_fill"] = fill_summary_ledger(cluster, rows)

    rng = random.Random(SEED)
    users = [f"user_{n:05d}" for n in rng.sample(range(SUMMARY_USERS), QUERY_RUNS)]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"SET statement_timeout = '{QUERY_STATEMENT_TIMEOUT}'")
        heaviest_row = conn.execute(
            f"SELECT end_user_id FROM tollgate.daily_usage WHERE day >= {MONTH_START_DAY}"
            " AND end_user_id <> '' GROUP BY 1 ORDER BY sum(requests) DESC LIMIT 1"
        ).fetchone()
        assert heaviest_row is not None
        heaviest = str(heaviest_row[0])
        timings: list[QueryTiming] = []
        plans: dict[str, str] = {}
        for name, sql in SUMMARY_QUERIES.items():
            if "%s" not in sql:
                _progress(f"summary: timing {name}")
                timings.append(_time_query(conn, name, sql, [None], "-"))
                plans[name] = _explain(conn, sql, None)
                continue
            for label, pool in (("50 random", users), (f"heaviest ({heaviest})", [heaviest])):
                _progress(f"summary: timing {name}, {label} users")
                timings.append(_time_query(conn, name, sql, pool, label))
                plans[f"{name}, {label}"] = _explain(conn, sql, pool[0])
        report["summary_queries"] = [t.__dict__ for t in timings]
        report["summary_plans"] = plans
        report["summary_heaviest_user"] = heaviest
        _progress("summary: running the example queries of docs/ledger.md")
        report["doc_queries"] = _run_doc_queries(conn, users[0])
    with psycopg.connect(cluster.admin_url(), autocommit=True) as admin:
        admin.execute("ALTER SYSTEM RESET max_wal_size")
        admin.execute("SELECT pg_reload_conf()")


# -- report ---------------------------------------------------------------------------------


def finish_report(
    report: dict[str, Any],
    render: Callable[[dict[str, Any]], str],
    name: str,
    started: datetime,
    t0: float,
) -> None:
    """Print the report as Markdown and write it to ``bench/results/<name>-<UTC time>.json``."""
    report["elapsed_s"] = round(time.monotonic() - t0, 1)
    report["host"]["load_average_at_end"] = os.getloadavg()
    print(render(report))
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"{name}-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nresults: {out.relative_to(REPO)} (total {report['elapsed_s']}s)")


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def markdown(report: dict[str, Any]) -> str:
    lines: list[str] = [
        f"## Ledger benchmark, {report['started_at'][:16].replace('T', ' ')} UTC",
        "",
        f"- Machine: {report['host']['cores']} cores, shared by this process (the writer and "
        "its Python work) and Postgres; Postgres 18 with default settings (shared_buffers "
        "128 MB, fsync on).",
    ]
    if "writer" in report:
        lines += [
            "",
            f"### Writer: journal → all committed (goal ≥ {WRITER_GOAL_PER_S:,}/s)",
            "",
            "| mode | created_at | batch | at once | records | seconds | records/s"
            " | Python CPU s | Postgres CPU s | rows | rollup | goal |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for w in report["writer"]:
            rollup = "equal" if w["rollup_mismatches"] == 0 else f"{w['rollup_mismatches']} off"
            lines.append(
                f"| {w['mode']} | {w['window']} | {w['batch_size']:,} | {w['concurrency']} "
                f"| {w['records']:,} | {w['seconds']} "
                f"| {w['records_per_s']:,} | {w['python_cpu_s']} | {w['postgres_cpu_s']} "
                f"| {w['rows_in_requests']:,} | {rollup} | {'met' if w['goal_met'] else 'MISSED'} |"
            )
        missed = [w for w in report["writer"] if not w["goal_met"]]
        if missed:
            best = max(w["records_per_s"] for w in report["writer"])
            lines += [
                "",
                f"The writer did NOT reach {WRITER_GOAL_PER_S:,} records/s on this machine "
                f"(best {best:,}/s); see the step breakdown below.",
            ]
        lines += [
            "",
            "Postgres alone (batches priced and encoded beforehand, only the writer's SQL, "
            "created_at over 10 min): the most any writer with these statements can store here.",
            "",
            "| schema | batch | connections | records/s | Postgres CPU µs/record |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {c['schema']} | {c['batch_size']:,} | {c['connections']} "
            f"| {c['records_per_s']:,} | {c['postgres_us_per_record']} |"
            for c in report.get("writer_ceiling", [])
        ]
        prof = report["writer_profile"]
        lines += [
            "",
            f"Step breakdown, one batch of {prof['batch_size']:,} at a time, median of "
            f"{prof['batches']} (µs per record; 20 µs/record = 50,000 records/s):",
            "",
            "| step | µs/record |",
            "|---|---:|",
        ]
        lines += [f"| {k} | {v} |" for k, v in prof["us_per_record_median"].items()]
    if "summary_fill" in report:
        f = report["summary_fill"]
        sizes = ", ".join(f"{k} {v:,} MB" for k, v in f["size_mb"].items())
        lines += [
            "",
            f"### Dashboard queries on {f['rows_in_requests']:,} rows "
            f"(goal: per-user summary under {SUMMARY_GOAL_MS:.0f} ms)",
            "",
            f"- Fill: {f['insert_s']}s ({f['rows_per_s']:,} rows/s) by INSERT … SELECT in "
            f"chunks of {FILL_CHUNK:,}; daily_usage ({f['daily_usage_rows']:,} rows) built in "
            f"{f['rollup_build_s']}s; VACUUM ANALYZE {f['vacuum_analyze_s']}s.",
            f"- {f['users']:,} users, {f['rows_this_month']:,} rows this month "
            f"({f['daily_usage_rows_this_month']:,} daily_usage rows). Sizes: {sizes}.",
            f"- {QUERY_RUNS} runs per line after {QUERY_WARMUP} warm-up runs, prepared "
            "statements, warm cache; time is client-side (execute + fetch).",
            "",
            "| query | users | median ms | p95 ms | max ms | rows | p95 under goal |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for q in report["summary_queries"]:
            lines.append(
                f"| {q['query']} | {q['users']} | {q['median_ms']} | {q['p95_ms']} "
                f"| {q['max_ms']} | {q['rows_median']:g} | {'yes' if q['under_goal'] else 'no'} |"
            )
        if report.get("doc_queries"):
            lines += [
                "",
                "Example queries of docs/ledger.md on the same data (median of 3):",
                "",
                "| query | ms | rows |",
                "|---|---:|---:|",
            ]
            lines += [
                f"| {q['query']} | {q['median_ms']} | {q['rows']} |" for q in report["doc_queries"]
            ]
    return "\n".join(lines)


# -- the run --------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--records", type=int, help="records through the writer (default 300,000)")
    p.add_argument("--rows", type=int, help="rows in the summary ledger (default 10,000,000)")
    p.add_argument("--skip-writer", action="store_true", help="no writer measurement")
    p.add_argument("--skip-summary", action="store_true", help="no 10M-row ledger")
    p.add_argument("--quick", action="store_true", help="smoke run: 30k records, 1M rows")
    p.add_argument(
        "--keep-data", action="store_true", help="keep the Postgres data directory afterwards"
    )
    return p


def _stop_on_sigterm() -> None:
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


@contextlib.contextmanager
def running_cluster(keep: bool, prefix: str = "tollgate-ledger-bench-") -> Iterator[Cluster]:
    work_dir = Path(tempfile.mkdtemp(prefix=prefix))
    work_dir.chmod(0o755)  # Postgres runs as an unprivileged user when we are root
    cluster = Cluster(work_dir)
    try:
        cluster.start()
        yield cluster
    except Exception:
        _progress(f"last lines of {cluster.server.log_path}:\n{cluster.server.tail()}")
        raise
    finally:
        cluster.stop()
        if keep:
            _progress(f"data kept in {work_dir} (start Postgres on {work_dir / 'pgdata'})")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    records = args.records or (30_000 if args.quick else 300_000)
    rows = args.rows or (1_000_000 if args.quick else 10_000_000)
    if records < 1 or rows < 1:
        raise SystemExit("--records and --rows must be positive")
    _stop_on_sigterm()
    started = datetime.now(UTC)
    t0 = time.monotonic()
    report: dict[str, Any] = {
        "started_at": started.isoformat(),
        "host": {
            "cores": os.cpu_count() or 0,
            "machine": platform.machine(),
            "system": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_start": os.getloadavg(),
            "note": "Postgres and the benchmark process share these cores",
        },
        "config": {
            "records": 0 if args.skip_writer else records,
            "rows": 0 if args.skip_summary else rows,
            "writer_cases": [c.__dict__ for c in WRITER_CASES],
            "fill_chunk": FILL_CHUNK,
            "query_runs": QUERY_RUNS,
        },
    }
    try:
        with running_cluster(args.keep_data) as cluster:
            with psycopg.connect(cluster.admin_url()) as conn:
                version = conn.execute("SHOW server_version").fetchone()
            report["postgres"] = version[0] if version else "unknown"
            if not args.skip_writer:
                run_writer_part(cluster, records, report)
            if not args.skip_summary:
                run_summary_part(cluster, rows, report)
    except KeyboardInterrupt:
        _progress("\ninterrupted; Postgres stopped and its directory removed")
        return 130
    except (BenchError, psycopg.Error) as exc:
        _progress(f"ledger bench failed: {exc}")
        return 1
    finish_report(report, markdown, "ledger", started, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

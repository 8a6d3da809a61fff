"""The ledger writer: takes UsageRecords off the request path and stores them in batches.

The request path calls :meth:`LedgerWriter.submit`, which never blocks and never awaits
Postgres. With a :class:`~tollgate.ledger.journal.Journal` (always, in `serve`/`up`), submit
appends the record to the journal and the writer ships journal records in order, with up to
``concurrency`` batches in flight on separate connections, advancing the journal's checkpoint
over each run of batches committed in order; without a journal (tests, tools) records wait
in a bounded in-memory queue. Each batch is COPYed into a per-connection staging table and moved
with ``INSERT … ON CONFLICT DO NOTHING RETURNING``; ``tollgate.daily_usage`` is updated only
from the rows actually inserted, in the same transaction, so writing a batch twice changes
nothing. A batch that Postgres refuses for its data is written record by record and the
refused records go to ``tollgate.dead_letters`` with the error; the rest commit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool

from tollgate.ledger.copy_text import copy_rows
from tollgate.ledger.journal import Journal, JournalEntry
from tollgate.ledger.records import COLUMNS, OUTCOME_NAMES, UsageRecord, optional
from tollgate.pricing import PriceBook
from tollgate.v1 import usage_pb2

__all__ = ["LedgerWriter", "WriterStats", "record_cost"]

log = logging.getLogger(__name__)

_COLS = ", ".join(COLUMNS)

# Once per transaction: the connection's staging table (kept, emptied at each commit), and
# enough memory for the rollup's hash aggregate of a whole batch (the default 4 MB spills).
_PREPARE = (
    "CREATE TEMP TABLE IF NOT EXISTS incoming_requests"
    " (LIKE tollgate.requests INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;"
    " SET LOCAL work_mem = '64MB'"
)
_COPY = f"COPY pg_temp.incoming_requests ({_COLS}) FROM STDIN"

_MOVE_AND_ROLL_UP = f"""
WITH inserted AS (
    INSERT INTO tollgate.requests ({_COLS})
    SELECT {_COLS} FROM pg_temp.incoming_requests
    ON CONFLICT DO NOTHING
    RETURNING *
), rolled AS (
    INSERT INTO tollgate.daily_usage AS d (
        day, end_user_id, key_id, provider, model, requests, blocked,
        input_tokens, cached_input_tokens, cache_write_tokens, output_tokens,
        reasoning_tokens, total_tokens, cost_usd, unpriced_requests)
    SELECT (created_at AT TIME ZONE 'UTC')::date,
           coalesce(end_user_id, ''), coalesce(key_id, ''),
           coalesce(provider, ''), coalesce(model, ''),
           count(*), count(*) FILTER (WHERE outcome = 'blocked'),
           coalesce(sum(input_tokens), 0), coalesce(sum(cached_input_tokens), 0),
           coalesce(sum(cache_write_tokens), 0), coalesce(sum(output_tokens), 0),
           coalesce(sum(reasoning_tokens), 0), coalesce(sum(total_tokens), 0),
           coalesce(sum(cost_usd), 0),
           count(*) FILTER (WHERE cost_usd IS NULL AND outcome <> 'blocked')
    FROM inserted
    GROUP BY 1, 2, 3, 4, 5
    -- Concurrent batches lock rollup rows in one order, so they cannot deadlock.
    ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (day, end_user_id, key_id, provider, model) DO UPDATE SET
        requests = d.requests + EXCLUDED.requests,
        blocked = d.blocked + EXCLUDED.blocked,
        input_tokens = d.input_tokens + EXCLUDED.input_tokens,
        cached_input_tokens = d.cached_input_tokens + EXCLUDED.cached_input_tokens,
        cache_write_tokens = d.cache_write_tokens + EXCLUDED.cache_write_tokens,
        output_tokens = d.output_tokens + EXCLUDED.output_tokens,
        reasoning_tokens = d.reasoning_tokens + EXCLUDED.reasoning_tokens,
        total_tokens = d.total_tokens + EXCLUDED.total_tokens,
        cost_usd = d.cost_usd + EXCLUDED.cost_usd,
        unpriced_requests = d.unpriced_requests + EXCLUDED.unpriced_requests
    RETURNING 1
)
SELECT count(*) FROM inserted
"""

_PARTITIONS_AHEAD = "SELECT tollgate.ensure_partitions(now(), 3)"


@dataclass
class WriterStats:
    """Counters of the writer since start (exported as Prometheus metrics)."""

    submitted: int = 0
    written: int = 0
    duplicates: int = 0
    dropped: int = 0
    batches: int = 0
    failed_attempts: int = 0
    unpriced: int = 0
    replayed: int = 0
    dead_letters: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)


@dataclass
class _Batch:
    """Records shipped in one transaction; ``end`` is the journal position after them."""

    records: list[UsageRecord]
    end: int
    done: bool = False


_T = TypeVar("_T")

_DEAD_LETTER = "INSERT INTO tollgate.dead_letters (request_id, error, record) VALUES (%s, %s, %s)"
# Postgres refused the data itself (not the connection): retrying the batch cannot help.
_DATA_ERRORS = (psycopg.DataError, psycopg.IntegrityError)


class LedgerWriter:
    """Batches UsageRecords into Postgres off the request path."""

    def __init__(
        self,
        pool: AsyncConnectionPool[psycopg.AsyncConnection[object]],
        *,
        queue_size: int,
        batch_size: int,
        flush_interval_s: float,
        prices: PriceBook | None = None,
        journal: Journal | None = None,
        journal_max_bytes: int = 0,
        reject_when_full: bool = True,
        concurrency: int = 2,
    ) -> None:
        self.stats = WriterStats()
        self._pool = pool
        self._queue: asyncio.Queue[UsageRecord] = asyncio.Queue(maxsize=queue_size)
        self._journal = journal
        self._journal_max = journal_max_bytes
        self._reject_when_full = reject_when_full
        self._arrived = asyncio.Event()
        # What a previous run left unshipped is replayed first.
        self._unshipped = journal.count_unshipped() if journal is not None else 0
        self._unread = self._unshipped  # journal records the writer has not picked up yet
        self._read_pos = journal.checkpoint_pos if journal is not None else 0
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._prices = prices or PriceBook()
        self._concurrency = max(concurrency, 1)
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._stopped = False  # a batch was given up (shutdown) or the writer failed
        # Reading the journal, pricing and encoding are CPU work: done off the event loop
        # (which also serves ext_proc), in one thread so that batches in flight do not fight
        # over the GIL.
        self._cpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-writer")

    @property
    def accepting(self) -> bool:
        """False when the journal is at its cap and the policy is to refuse new requests."""
        return not (self._reject_when_full and self._journal_full)

    @property
    def _journal_full(self) -> bool:
        journal = self._journal
        return journal is not None and 0 < self._journal_max <= journal.unshipped_bytes

    def submit(self, record: UsageRecord) -> bool:
        """Hand one record to the writer without waiting (with a journal: write it to disk
        first); False if it could not be kept (queue or journal full)."""
        if self._journal is not None:
            return self._append(self._journal, record)
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self.stats.dropped += 1
            log.error(
                "ledger queue full (%d records): record %s dropped",
                self._queue.maxsize,
                record.request_id,
            )
            return False
        self.stats.submitted += 1
        self.stats.outcomes[OUTCOME_NAMES[record.outcome]] += 1
        return True

    def _append(self, journal: Journal, record: UsageRecord) -> bool:
        if self._journal_full:
            self.stats.dropped += 1
            log.error(
                "ledger journal full (%d unshipped bytes, Postgres away?): record %s not kept",
                journal.unshipped_bytes,
                record.request_id,
            )
            return False
        try:
            journal.append(record)
        except OSError as exc:
            self.stats.dropped += 1
            log.error(
                "ledger journal write failed (%s): record %s not kept", exc, record.request_id
            )
            return False
        self.stats.submitted += 1
        self.stats.outcomes[OUTCOME_NAMES[record.outcome]] += 1
        self._unshipped += 1
        self._unread += 1
        if self._unread >= self._batch_size:
            self._arrived.set()  # a full batch is waiting; otherwise the flush timer ships it
        return True

    @property
    def pending(self) -> int:
        """Records accepted but not yet in Postgres."""
        return self._unshipped if self._journal is not None else self._queue.qsize()

    async def run_fsync(self, interval_s: float) -> None:
        """fsync the journal every ``interval_s`` (group commit to disk) until cancelled."""
        journal = self._journal
        if journal is None:
            return
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(journal.sync)
            except OSError as exc:
                log.error("journal fsync failed: %s", exc)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    async def _in_thread(self, fn: Callable[..., _T], *args: object) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._cpu, functools.partial(fn, *args))

    async def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (up to ``timeout_s``), then stop."""
        self._closing = True
        self._arrived.set()
        if self._task is None:
            self._cpu.shutdown(wait=False)
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            log.error(
                "ledger writer did not drain in %.1fs: %d records unwritten",
                timeout_s,
                self.pending,
            )
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._cpu.shutdown(wait=False)

    async def _next_journal_batch(self, journal: Journal) -> tuple[list[UsageRecord], int]:
        """Up to ``batch_size`` journal records from the read position, waiting up to the
        flush interval for a batch to fill, and the position after them."""
        deadline = time.monotonic() + self._flush_interval_s
        entries: list[JournalEntry] = []
        position = self._read_pos
        while True:
            self._arrived.clear()
            read = await self._in_thread(journal.read, position, self._batch_size - len(entries))
            if read:
                entries += read
                position = read[-1].end
                self._unread = max(self._unread - len(read), 0)
            remaining = deadline - time.monotonic()
            if len(entries) >= self._batch_size or self._closing or remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        self._read_pos = position
        return [e.record for e in entries], position

    async def _next_batch(self) -> list[UsageRecord]:
        """Up to ``batch_size`` records: those queued now and those arriving within the
        flush interval (none are waited for once closing). May be empty."""
        batch: list[UsageRecord] = []
        deadline = time.monotonic() + self._flush_interval_s
        while len(batch) < self._batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if self._closing or remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        """Read batches in order and ship up to ``concurrency`` of them at once; the journal's
        checkpoint only ever advances over a run of committed batches, in order."""
        await self._ensure_partitions()
        last_partition_check = time.monotonic()
        journal = self._journal
        if journal is not None and self._unshipped:
            self.stats.replayed = self._unshipped
            log.info("replaying %d journal records not yet in Postgres", self._unshipped)
        in_flight: collections.deque[_Batch] = collections.deque()
        slots = asyncio.Semaphore(self._concurrency)
        shipping: set[asyncio.Task[None]] = set()
        try:
            while not self._stopped:
                if journal is not None:
                    records, end = await self._next_journal_batch(journal)
                else:
                    records, end = await self._next_batch(), 0
                if not records:
                    if self._closing:
                        break
                    continue
                await slots.acquire()
                if self._stopped:
                    slots.release()
                    break
                batch = _Batch(records, end)
                in_flight.append(batch)
                task = asyncio.create_task(self._ship(batch, in_flight, slots))
                shipping.add(task)
                task.add_done_callback(shipping.discard)
                if time.monotonic() - last_partition_check > 3600:
                    await self._ensure_partitions()
                    last_partition_check = time.monotonic()
            await asyncio.gather(*shipping)
        finally:
            for task in shipping:  # cancelled (close timed out): stop the batches in flight
                task.cancel()

    async def _ship(
        self, batch: _Batch, in_flight: collections.deque[_Batch], slots: asyncio.Semaphore
    ) -> None:
        try:
            stored = await self._write_with_retry(batch.records)
        except Exception:
            log.exception("ledger writer failed; records stay in the journal")
            stored = False
        finally:
            slots.release()
        if not stored:
            self._stopped = True  # what follows this batch must not pass its checkpoint
            return
        batch.done = True
        shipped = 0
        end: int | None = None
        while in_flight and in_flight[0].done:
            first = in_flight.popleft()
            shipped += len(first.records)
            end = first.end
        if self._journal is not None and end is not None:
            self._journal.commit(end)
            self._unshipped = max(self._unshipped - shipped, 0)

    async def _ensure_partitions(self) -> None:
        try:
            async with self._pool.connection() as conn:
                await conn.execute(_PARTITIONS_AHEAD)
        except psycopg.Error as exc:
            log.warning("could not create ledger partitions ahead: %s", exc)

    async def _write_with_retry(self, batch: Sequence[UsageRecord]) -> bool:
        """Store ``batch``, retrying while Postgres is away; False when giving up at shutdown
        (the records stay in the journal, or are lost without one)."""
        # Priced and encoded while earlier batches are being stored.
        costs, data = await self._in_thread(self._encode, batch)
        delay = 0.05
        attempts = 0
        while True:
            try:
                await self._store(data, len(batch))
                return True
            except _DATA_ERRORS as exc:
                log.warning(
                    "a batch of %d records was refused (%s); writing one by one", len(batch), exc
                )
                await self._store_each(batch, costs)
                return True
            except (psycopg.Error, OSError) as exc:
                attempts += 1
                self.stats.failed_attempts += 1
                if self._closing and attempts > 3:
                    kept = "kept in the journal" if self._journal is not None else "lost"
                    log.error("giving up on %d records at shutdown (%s): %s", len(batch), kept, exc)
                    return False
                log.warning(
                    "ledger write of %d records failed (%s); retrying in %.2fs",
                    len(batch),
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _store_each(
        self, batch: Sequence[UsageRecord], costs: Sequence[Decimal | str | None]
    ) -> None:
        """Store records one by one; those Postgres refuses go to the dead-letter table."""
        for record, cost in zip(batch, costs, strict=True):
            try:
                await self._store(copy_rows([record], [cost]), 1)
            except _DATA_ERRORS as exc:
                async with self._pool.connection() as conn:
                    await conn.execute(
                        _DEAD_LETTER,
                        (record.request_id, str(exc).strip(), record.SerializeToString()),
                    )
                self.stats.dead_letters += 1
                log.error(
                    "record %s refused by Postgres, dead-lettered: %s", record.request_id, exc
                )

    async def write_batch(self, batch: Sequence[UsageRecord]) -> int:
        """Store ``batch`` idempotently; return how many rows were new."""
        _, data = self._encode(batch)
        return await self._store(data, len(batch))

    def _encode(self, batch: Sequence[UsageRecord]) -> tuple[list[Decimal | str | None], bytes]:
        costs = [self._cost(r) for r in batch]
        return costs, copy_rows(batch, costs)

    async def _store(self, data: bytes, count: int) -> int:
        """COPY ``count`` encoded rows into staging, move the new ones and roll them up, in one
        transaction; return how many were new."""
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(_PREPARE)
            async with conn.cursor() as cur:
                async with cur.copy(_COPY) as copy:
                    await copy.write(data)
                await cur.execute(_MOVE_AND_ROLL_UP)
                fetched = await cur.fetchone()
        inserted = int(fetched[0]) if fetched else 0  # type: ignore[index]
        self.stats.batches += 1
        self.stats.written += inserted
        self.stats.duplicates += count - inserted
        return inserted

    def _cost(self, record: UsageRecord) -> Decimal | str | None:
        cost = record_cost(self._prices, record)
        if cost is None and record.outcome != usage_pb2.OUTCOME_BLOCKED:
            self.stats.unpriced += 1
        return cost


def record_cost(prices: PriceBook, record: UsageRecord) -> Decimal | str | None:
    """The record's own cost if it carries one, else what ``prices`` says its usage costs."""
    if record.HasField("cost_usd"):
        return record.cost_usd
    return prices.cost(
        optional(record, "provider"),
        optional(record, "model"),
        input_tokens=optional(record, "input_tokens"),
        output_tokens=optional(record, "output_tokens"),
        cached_input_tokens=optional(record, "cached_input_tokens"),
        cache_write_tokens=optional(record, "cache_write_tokens"),
        reasoning_tokens=optional(record, "reasoning_tokens"),
        units=dict(record.units),
    )

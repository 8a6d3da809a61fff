"""The ledger writer: takes UsageRecords off the request path and stores them in batches.

The request path calls :meth:`LedgerWriter.submit`, which never blocks and never awaits
Postgres. With a :class:`~tollgate.ledger.journal.Journal` (always, in `serve`/`up`), submit
appends the record to the journal and the writer ships journal records in order, with up to
``concurrency`` batches in flight on separate connections, advancing the journal's checkpoint
over each run of batches committed in order; without a journal (tests, tools) records wait
in a bounded in-memory queue. Each batch is COPYed into a per-connection staging table and moved
with ``INSERT … ON CONFLICT DO NOTHING RETURNING``; ``tollgate.daily_usage`` and the limits'
spend (``tollgate.limit_spend``, see ``ledger.limits``) are updated only from the rows actually
inserted, in the same transaction, so writing a batch twice changes nothing.

The writer never stops while the process lives (only :meth:`LedgerWriter.close` ends it):

- pricing is per record: usage the price library refuses is stored with its counts as
  reported, ``cost_usd`` NULL and the reason in ``pricing_error`` (``tollgate reprice`` picks
  it up again); ``usage_flags`` are computed here too (``records.usage_flags``);
- a record that cannot be encoded, or that Postgres refuses for its data, goes to
  ``tollgate.dead_letters`` with the reason and the serialized record (once: a replayed
  journal does not dead-letter it twice); the rest of its batch commits;
- every other failure (Postgres away, a journal read error, anything unexpected) is retried
  with backoff (up to 5 s), forever, with the journal as the buffer.
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
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool

from tollgate.ledger.copy_text import copy_rows
from tollgate.ledger.journal import Journal, JournalEntry
from tollgate.ledger.limits import ALERT_CROSSED, CHARGE_INSERTED
from tollgate.ledger.records import COLUMNS, OUTCOME_NAMES, UsageRecord, optional, usage_flags
from tollgate.ledger.rollups import rollup_ctes
from tollgate.pricing import PriceBook
from tollgate.stats import BoundedCounter, Histogram
from tollgate.v1 import usage_pb2

__all__ = ["BatchObserver", "LedgerWriter", "WriterStats", "record_cost"]

# Called (in the writer's worker thread) with the records of each batch once it is in
# Postgres, and their costs: the request log, usage counters, OpenTelemetry. A replayed batch
# (after a crash) is observed again in the new process.
BatchObserver = Callable[[Sequence[UsageRecord], Sequence["Decimal | str | None"]], None]

# Seconds a batch takes to commit: from a few ms to the 5 s retry cap and beyond.
_BATCH_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

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
),
{rollup_ctes("inserted")},
charged AS ({CHARGE_INSERTED}
), alerted AS ({ALERT_CROSSED}
)
SELECT (SELECT count(*) FROM inserted),
       (SELECT coalesce(json_agg(alerted), '[]'::json) FROM alerted)
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
    pricing_errors: int = 0
    replayed: int = 0
    dead_letters: int = 0
    skipped: int = 0  # undecodable journal records passed over
    # Submitted requests by (outcome, provider, model, endpoint); model and endpoint come
    # from clients, so their number is capped.
    requests: BoundedCounter = field(default_factory=lambda: BoundedCounter(keep=(0, 1)))
    refusals: Counter[str] = field(default_factory=Counter)  # blocked requests by reason
    batch_seconds: Histogram = field(default_factory=lambda: Histogram(_BATCH_BUCKETS_S))
    observer_failures: int = 0

    def count_submitted(self, record: UsageRecord) -> None:
        self.submitted += 1
        outcome = OUTCOME_NAMES.get(record.outcome, "unknown")
        self.requests.add((outcome, record.provider, record.model, record.endpoint))
        if record.outcome == usage_pb2.OUTCOME_BLOCKED:
            self.refusals[record.block_reason or "unknown"] += 1


@dataclass
class _Batch:
    """Records shipped in one transaction; ``end`` is the journal position after them."""

    records: list[UsageRecord]
    end: int
    skipped: int = 0  # undecodable journal records within the batch's span
    done: bool = False


@dataclass
class _Prepared:
    """A batch priced and encoded: the COPY rows of the records that could be encoded, and
    the others with the reason."""

    records: list[UsageRecord]
    costs: list[Decimal | str | None]
    data: bytes
    unencodable: list[tuple[UsageRecord, str]]


class _Backoff:
    """Delays between attempts: 50 ms doubling up to 5 s."""

    __slots__ = ("attempts", "delay")

    def __init__(self) -> None:
        self.attempts = 0
        self.delay = 0.05

    def next(self) -> float:
        delay = self.delay
        self.attempts += 1
        self.delay = min(self.delay * 2, 5.0)
        return delay


_T = TypeVar("_T")

# Once per record: a journal replayed after a crash does not dead-letter a record again.
_DEAD_LETTER = """
INSERT INTO tollgate.dead_letters (request_id, error, record)
SELECT %(id)s, %(error)s, %(record)s
WHERE NOT EXISTS (SELECT 1 FROM tollgate.dead_letters WHERE request_id = %(id)s)
"""
# Postgres refused the data itself (not the connection): retrying the batch cannot help.
_DATA_ERRORS = (psycopg.DataError, psycopg.IntegrityError)
# SQLSTATE classes of a refusal for the data: 22 data exception, 23 integrity constraint,
# 54 program limit exceeded (e.g. a value too large for an index row).
_REFUSED_CLASSES = frozenset({"22", "23", "54"})
# cost_usd is numeric(20, 10).
_MAX_COST = Decimal(10) ** 10
_MAX_REASON = 200


def _refused(exc: BaseException) -> bool:
    """Whether Postgres (or psycopg before sending) refused the data, so that retrying the same
    data cannot succeed; everything else (connection, pool, server going away) is retried."""
    if isinstance(exc, _DATA_ERRORS):
        return True
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate
        return state is not None and state[:2] in _REFUSED_CLASSES
    return False


# What genai-prices raises for usage it will not price (cached above input, negative counts).
_PRICING_REFUSALS = (ValueError, TypeError, ArithmeticError)


def _reason(exc: BaseException, prefix: str | None = None) -> str:
    """``exc`` as one bounded line that Postgres can store, after ``prefix`` (default: the
    exception's type, except for Postgres' own messages)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if prefix is None and not isinstance(exc, psycopg.Error):
        prefix = type(exc).__name__
    if prefix:
        text = f"{prefix}: {text}"
    text = text.replace("\x00", "\\x00")
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 1] + "…"


class _Unpriceable(Exception):
    """A record's cost cannot be had; the message is its ``pricing_error``."""


def _created_s(record: UsageRecord) -> float:
    at = record.created_at
    return at.seconds + at.nanos / 1e9 if at.seconds or at.nanos else time.time()


def _storable_cost(cost: Decimal | str | None) -> Decimal | str | None:
    """``cost`` if the ledger's column can hold it; raises ValueError otherwise."""
    if cost is None:
        return None
    try:
        value = Decimal(cost)
    except ArithmeticError:
        raise ValueError(f"cost {str(cost)[:40]!r} is not a number") from None
    if not value.is_finite() or abs(value) >= _MAX_COST:
        raise ValueError(f"cost {value} is beyond what cost_usd numeric(20, 10) holds")
    return cost


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
        observers: Sequence[BatchObserver] = (),
        on_alerts: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        self.stats = WriterStats()
        self._observers = tuple(observers)
        # Limit thresholds crossed by a committed batch (each once per period: ledger.limits).
        self._on_alerts = on_alerts
        self._journal_failing = False
        self._pool = pool
        self._queue: asyncio.Queue[UsageRecord] = asyncio.Queue(maxsize=queue_size)
        self._journal = journal
        self._journal_max = journal_max_bytes
        self._reject_when_full = reject_when_full
        self._arrived = asyncio.Event()
        # What a previous run left unshipped is replayed first (counted by its frames, so
        # undecodable records are in the count and leave it when they are skipped).
        self._unshipped = journal.count_unshipped() if journal is not None else 0
        self._unread = self._unshipped  # journal records the writer has not picked up yet
        self.stats.replayed = self._unshipped
        self._read_pos = journal.checkpoint_pos if journal is not None else 0
        # created_at (Unix seconds) of the oldest record not yet taken into a batch.
        self._head_unread_at: float | None = None
        if journal is not None and self._unshipped:
            head = journal.read(self._read_pos, 1).entries
            self._head_unread_at = _created_s(head[0].record) if head else time.time()
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._prices = prices or PriceBook()
        self._concurrency = max(concurrency, 1)
        self._task: asyncio.Task[None] | None = None
        self._in_flight: collections.deque[_Batch] = collections.deque()
        self._closing = False
        self._stopped = False  # a batch was given up at shutdown
        # Reading the journal, pricing and encoding are CPU work: done off the event loop
        # (which also serves ext_proc), in one thread so that batches in flight do not fight
        # over the GIL.
        self._cpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-writer")

    @property
    def accepting(self) -> bool:
        """False when the journal is at its cap and the policy is to refuse new requests."""
        return not (self._reject_when_full and self._journal_full)

    @property
    def alive(self) -> bool:
        """Whether the writer loop is running (started and not ended)."""
        return self._task is not None and not self._task.done()

    @property
    def oldest_unshipped_age_s(self) -> float:
        """Seconds since the ``created_at`` of the oldest record not yet in Postgres; 0 when
        none is waiting."""
        if not self.pending:
            return 0.0
        oldest: float | None = None
        try:  # read from the metrics thread while the loop changes it
            if self._in_flight and self._in_flight[0].records:
                oldest = _created_s(self._in_flight[0].records[0])
        except IndexError:
            pass
        if oldest is None:
            oldest = self._head_unread_at
        return max(time.time() - oldest, 0.0) if oldest is not None else 0.0

    @property
    def journal_unshipped_bytes(self) -> int:
        return self._journal.unshipped_bytes if self._journal is not None else 0

    @property
    def journal_disk_bytes(self) -> int:
        return self._journal.disk_bytes if self._journal is not None else 0

    @property
    def journal_writable(self) -> bool:
        """False while the last journal append failed (disk full, read-only filesystem)."""
        return not self._journal_failing

    @property
    def _journal_full(self) -> bool:
        journal = self._journal
        return journal is not None and 0 < self._journal_max <= journal.unshipped_bytes

    def submit(self, record: UsageRecord) -> bool:
        """Hand one record to the writer without waiting (with a journal: write it to disk
        first); False if it could not be kept (queue or journal full)."""
        if self._journal is not None:
            return self._append(self._journal, record)
        was_empty = self._queue.empty()
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
        if was_empty:
            self._head_unread_at = _created_s(record)
        self.stats.count_submitted(record)
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
            self._journal_failing = True
            log.error(
                "ledger journal write failed (%s): record %s not kept", exc, record.request_id
            )
            return False
        self._journal_failing = False
        self.stats.count_submitted(record)
        if not self._unread:
            self._head_unread_at = _created_s(record)
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

    async def _pause(self, backoff: _Backoff, exc: BaseException, what: str) -> bool:
        """Wait before the next attempt at ``what`` after ``exc``; False when closing and a few
        attempts were made already (give up: the records stay in the journal)."""
        self.stats.failed_attempts += 1
        if self._closing and backoff.attempts >= 3:
            kept = "kept in the journal" if self._journal is not None else "lost"
            log.error("giving up on %s at shutdown (%s): %s", what, kept, _reason(exc))
            return False
        delay = backoff.next()
        log.warning("%s failed (%s); retrying in %.2fs", what, _reason(exc), delay)
        await asyncio.sleep(delay)
        return True

    async def _next_journal_batch(self, journal: Journal) -> tuple[list[UsageRecord], int, int]:
        """Up to ``batch_size`` journal records from the read position, waiting up to the
        flush interval for a batch to fill; how many undecodable ones were skipped; and the
        position after them."""
        deadline = time.monotonic() + self._flush_interval_s
        entries: list[JournalEntry] = []
        skipped = 0
        position = self._read_pos
        while True:
            self._arrived.clear()
            read = await self._in_thread(journal.read, position, self._batch_size - len(entries))
            if read.entries or read.skipped:
                entries += read.entries
                skipped += read.skipped
                position = read.end
                self._unread = max(self._unread - len(read.entries) - read.skipped, 0)
            remaining = deadline - time.monotonic()
            if len(entries) >= self._batch_size or self._closing or remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        self._read_pos = position
        if skipped:
            self.stats.skipped += skipped
        if not self._unread:
            self._head_unread_at = None
        elif entries:  # the next unread record is newer than the last one read
            self._head_unread_at = _created_s(entries[-1].record)
        return [e.record for e in entries], skipped, position

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
        if self._queue.empty():
            self._head_unread_at = None
        elif batch:
            self._head_unread_at = _created_s(batch[-1])
        return batch

    async def _run(self) -> None:
        """Read batches in order and ship up to ``concurrency`` of them at once; the journal's
        checkpoint only ever advances over a run of committed batches, in order. Any failure
        here is retried; only closing ends the loop."""
        await self._ensure_partitions()
        last_partition_check = time.monotonic()
        journal = self._journal
        if self.stats.replayed:
            log.info("replaying %d journal records not yet in Postgres", self.stats.replayed)
        in_flight = self._in_flight
        slots = asyncio.Semaphore(self._concurrency)
        shipping: set[asyncio.Task[None]] = set()
        backoff = _Backoff()
        try:
            while not self._stopped:
                try:
                    skipped = 0
                    if journal is not None:
                        records, skipped, end = await self._next_journal_batch(journal)
                    else:
                        records, end = await self._next_batch(), 0
                    if not records and not skipped:
                        if self._closing:
                            break
                        continue
                    await slots.acquire()
                    if self._stopped:
                        slots.release()
                        break
                    batch = _Batch(records, end, skipped)
                    in_flight.append(batch)
                    task = asyncio.create_task(self._ship(batch, in_flight, slots))
                    shipping.add(task)
                    task.add_done_callback(shipping.discard)
                    backoff = _Backoff()
                    if time.monotonic() - last_partition_check > 3600:
                        await self._ensure_partitions()
                        last_partition_check = time.monotonic()
                except Exception as exc:
                    if not await self._pause(backoff, exc, "the ledger writer loop"):
                        break
            await asyncio.gather(*shipping)
        finally:
            for task in shipping:  # cancelled (close timed out): stop the batches in flight
                task.cancel()

    async def _ship(
        self, batch: _Batch, in_flight: collections.deque[_Batch], slots: asyncio.Semaphore
    ) -> None:
        stored = False
        try:
            backoff = _Backoff()
            while True:
                try:
                    stored = await self._write_with_retry(batch.records)
                    break
                except Exception as exc:
                    log.exception("ledger write of %d records failed", len(batch.records))
                    if not await self._pause(backoff, exc, f"a batch of {len(batch.records)}"):
                        break
        finally:
            slots.release()
        if not stored:
            self._stopped = True  # shutdown: what follows this batch must not pass its checkpoint
            return
        batch.done = True
        shipped = 0
        end: int | None = None
        while in_flight and in_flight[0].done:
            first = in_flight.popleft()
            shipped += len(first.records) + first.skipped
            end = first.end
        if end is None:
            return
        self._unshipped = max(self._unshipped - shipped, 0)
        if self._journal is not None:
            try:
                self._journal.commit(end)
            except OSError as exc:  # the next commit covers it; a replay is harmless
                log.error("journal checkpoint at %d not written: %s", end, exc)

    async def _ensure_partitions(self) -> None:
        try:
            async with self._pool.connection() as conn:
                await conn.execute(_PARTITIONS_AHEAD)
        except Exception as exc:
            log.warning("could not create ledger partitions ahead: %s", _reason(exc))

    async def _write_with_retry(self, batch: Sequence[UsageRecord]) -> bool:
        """Store ``batch``, retrying while Postgres is away; False when giving up at shutdown
        (the records stay in the journal, or are lost without one)."""
        if not batch:
            return True
        # Priced and encoded while earlier batches are being stored.
        prepared = await self._in_thread(self._prepare, batch)
        for record, reason in prepared.unencodable:
            if not await self._dead_letter(record, reason):
                return False
        if not prepared.records:
            return True
        backoff = _Backoff()
        while True:
            try:
                await self._store(prepared.data, len(prepared.records))
                break
            except Exception as exc:
                if _refused(exc):
                    log.warning(
                        "a batch of %d records was refused (%s); writing one by one",
                        len(prepared.records),
                        _reason(exc),
                    )
                    if not await self._store_each(prepared):
                        return False
                    break
                if not await self._pause(backoff, exc, f"ledger write of {len(batch)} records"):
                    return False
        if self._observers:
            await self._in_thread(self._observe, prepared.records, prepared.costs)
        return True

    def _observe(
        self, records: Sequence[UsageRecord], costs: Sequence[Decimal | str | None]
    ) -> None:
        """Hand a stored batch to the observers (worker thread); one that raises is logged
        and counted, never allowed to stop the writer."""
        for observer in self._observers:
            try:
                observer(records, costs)
            except Exception:
                self.stats.observer_failures += 1
                log.exception("a ledger batch observer failed; going on")

    async def _store_each(self, prepared: _Prepared) -> bool:
        """Store records one by one; those Postgres refuses go to the dead-letter table.
        False when giving up at shutdown."""
        stored: list[tuple[UsageRecord, Decimal | str | None]] = []
        for record, cost in zip(prepared.records, prepared.costs, strict=True):
            backoff = _Backoff()
            while True:
                try:
                    await self._store(copy_rows([record], [cost]), 1)
                    stored.append((record, cost))
                    break
                except Exception as exc:
                    if _refused(exc):
                        if not await self._dead_letter(record, _reason(exc)):
                            return False
                        break
                    if not await self._pause(backoff, exc, f"storing record {record.request_id}"):
                        return False
        # What the observers see: the records now in the ledger, not the dead-lettered ones.
        prepared.records = [record for record, _ in stored]
        prepared.costs = [cost for _, cost in stored]
        return True

    async def _dead_letter(self, record: UsageRecord, reason: str) -> bool:
        """Keep ``record`` in ``tollgate.dead_letters`` with ``reason``, retrying while Postgres
        is away; False when giving up at shutdown."""
        try:
            raw = record.SerializeToString()
        except Exception:
            raw = b""
        params = {
            "id": record.request_id.replace("\x00", "\\x00")[:200],
            "error": reason.replace("\x00", "\\x00"),
            "record": raw,
        }
        backoff = _Backoff()
        while True:
            try:
                async with self._pool.connection() as conn:
                    cur = await conn.execute(_DEAD_LETTER, params)
                    new = cur.rowcount
                break
            except Exception as exc:
                if _refused(exc):  # cannot happen with the values made safe above
                    self.stats.dropped += 1
                    log.error(
                        "record %r could be neither stored nor dead-lettered (%s): %s",
                        params["id"],
                        reason,
                        _reason(exc),
                    )
                    return True
                if not await self._pause(backoff, exc, "a dead-letter insert"):
                    return False
        if new:
            self.stats.dead_letters += 1
        log.error("record %r dead-lettered: %s", params["id"], reason)
        return True

    async def write_batch(self, batch: Sequence[UsageRecord]) -> int:
        """Store ``batch`` idempotently (unencodable records are dead-lettered); return how many
        rows were new."""
        prepared = self._prepare(batch)
        for record, reason in prepared.unencodable:
            await self._dead_letter(record, reason)
        if not prepared.records:
            return 0
        return await self._store(prepared.data, len(prepared.records))

    def _prepare(self, batch: Sequence[UsageRecord]) -> _Prepared:
        """Flag, price and encode ``batch`` (worker thread); never raises for a record."""
        costs = [self._price(r) for r in batch]
        try:
            return _Prepared(list(batch), costs, copy_rows(batch, costs), [])
        except Exception:
            log.warning("a batch of %d records could not be encoded; one by one", len(batch))
        kept: list[UsageRecord] = []
        kept_costs: list[Decimal | str | None] = []
        rows: list[bytes] = []
        unencodable: list[tuple[UsageRecord, str]] = []
        for record, cost in zip(batch, costs, strict=True):
            try:
                rows.append(copy_rows([record], [cost]))
            except Exception as exc:
                unencodable.append((record, f"not encodable: {_reason(exc)}"))
            else:
                kept.append(record)
                kept_costs.append(cost)
        return _Prepared(kept, kept_costs, b"".join(rows), unencodable)

    def _price(self, record: UsageRecord) -> Decimal | str | None:
        """The record's cost, after setting its ``usage_flags``; a cost that cannot be had is
        None with the reason in ``pricing_error``."""
        try:
            flags = usage_flags(record)
            if flags != list(record.usage_flags):
                del record.usage_flags[:]
                record.usage_flags.extend(flags)
        except Exception:
            log.exception("usage flags of record %r not computed", record.request_id)
        cost: Decimal | str | None
        try:
            try:
                cost = record_cost(self._prices, record)
            except _PRICING_REFUSALS as exc:
                raise _Unpriceable(_reason(exc, "genai-prices")) from exc
            try:
                cost = _storable_cost(cost)
            except ValueError as exc:
                raise _Unpriceable(_reason(exc, "")) from exc
        except Exception as exc:
            cost = None
            record.pricing_error = str(exc) if isinstance(exc, _Unpriceable) else _reason(exc)
            self.stats.pricing_errors += 1
            log.warning("record %r stored unpriced: %s", record.request_id, record.pricing_error)
        if cost is None and record.outcome != usage_pb2.OUTCOME_BLOCKED:
            self.stats.unpriced += 1
        return cost

    async def _store(self, data: bytes, count: int) -> int:
        """COPY ``count`` encoded rows into staging, move the new ones and roll them up, in one
        transaction; return how many were new."""
        started = time.perf_counter()
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(_PREPARE)
            async with conn.cursor() as cur:
                async with cur.copy(_COPY) as copy:
                    await copy.write(data)
                await cur.execute(_MOVE_AND_ROLL_UP)
                fetched = await cur.fetchone()
        inserted = int(fetched[0]) if fetched else 0  # type: ignore[index]
        alerts = fetched[1] if fetched else None  # type: ignore[index]
        if alerts and self._on_alerts is not None:
            try:
                self._on_alerts(alerts)
            except Exception:
                log.exception("the limit alert sink failed; going on")
        self.stats.batch_seconds.observe(time.perf_counter() - started)
        self.stats.batches += 1
        self.stats.written += inserted
        self.stats.duplicates += count - inserted
        return inserted


def record_cost(prices: PriceBook, record: UsageRecord) -> Decimal | str | None:
    """The record's own cost if it carries one, else what ``prices`` says its usage costs
    (genai-prices raises ValueError for usage it refuses, e.g. cached above input tokens)."""
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

"""Start-up with a full journal: how long until Tollgate accepts new records again.

Builds, in a temporary directory (deleted afterwards), a journal holding ``--gib`` GiB of
unshipped records (~400-byte UsageRecords like real chat completions, 64 MiB segments), then
times, over ``--runs`` runs, what a restart does before the request path can take records:
``Journal(directory)`` (cutting a torn tail of the last segment), ``LedgerWriter(...)``
construction (counting the unshipped records, reading the oldest one's time) and the first
``submit`` of a new record. No Postgres is needed: the writer does not touch it before
``start()``. The page cache is warm after the first run (the file was just written); the first
run is reported apart from the others.

    python bench/journal_startup.py [--gib 1] [--runs 5] [--dir /path/on/the/journal/disk]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from psycopg_pool import AsyncConnectionPool

from tollgate.ledger.journal import Journal
from tollgate.ledger.records import UsageRecord, new_request_id
from tollgate.ledger.writer import LedgerWriter
from tollgate.v1 import usage_pb2


def sample_record(i: int) -> UsageRecord:
    r = UsageRecord(
        request_id=new_request_id(),
        key_id=f"key-{i % 50:04d}",
        end_user_id=f"user-{i % 5000:06d}@example.com",
        identity_source="header",
        provider="openai",
        model="gpt-4o-mini-2024-07-18",
        endpoint="/v1/chat/completions",
        streamed=bool(i % 2),
        status_code=200,
        outcome=usage_pb2.OUTCOME_OK,
        input_tokens=1200 + i % 300,
        cached_input_tokens=512,
        output_tokens=300 + i % 200,
        reasoning_tokens=0,
        total_tokens=1500 + i % 500,
        latency_ms=800 + i % 1000,
        ttft_ms=120,
        use_case_id="support-bot",
        use_case_name="Customer support assistant (tier 2 escalations)",
        use_case_version="2026.11",
        upstream_base_uri="https://api.openai.com",
    )
    r.created_at.GetCurrentTime()
    r.tags.extend(["team:support", "env:prod", f"region:eu-west-{i % 3}", "feature:summarise"])
    r.limit_ids.extend(["monthly-team", "daily-user"])
    return r


def build(directory: Path, size: int) -> tuple[int, int]:
    """Fill ``directory`` with a journal of about ``size`` bytes; (records, bytes)."""
    journal = Journal(directory)
    templates = [sample_record(i).SerializeToString() for i in range(64)]
    count = 0
    # Appending through Journal.append is what the request path does; here the same frames
    # are written faster by changing only the request id of a few templates.
    while journal.end_pos < size:
        record = UsageRecord.FromString(templates[count % 64])
        record.request_id = new_request_id()
        journal.append(record)
        count += 1
    written = journal.end_pos
    journal.close()
    return count, written


async def start_up(directory: Path) -> tuple[float, int, int]:
    """Seconds from opening the journal to a new record accepted; records pending; the
    journal's size before that record."""
    pool: AsyncConnectionPool = AsyncConnectionPool("postgresql://unused/", open=False)
    began = time.perf_counter()
    journal = Journal(directory)
    writer = LedgerWriter(
        pool,
        queue_size=10_000,
        batch_size=500,
        flush_interval_s=0.05,
        journal=journal,
        journal_max_bytes=4 << 30,
    )
    before = journal.end_pos
    accepted = writer.submit(sample_record(0))
    elapsed = time.perf_counter() - began
    assert accepted, "the new record was refused"
    pending = writer.pending
    await writer.close()  # never started: only releases its thread
    journal.close()
    return elapsed, pending, before


def restore(directory: Path, size: int) -> None:
    """Cut the journal back to ``size`` bytes: every run starts from the same journal."""
    for segment in sorted(directory.glob("*.journal")):
        start = int(segment.name.split(".")[0])
        if start >= size:
            segment.unlink()
        elif segment.stat().st_size > size - start:
            os.truncate(segment, size - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to build the journal")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="journal-startup-") as tmp:
        directory = Path(tmp) / "journal"
        t0 = time.perf_counter()
        records, size = build(directory, int(args.gib * (1 << 30)))
        print(
            f"built {records:,} records, {size / (1 << 30):.2f} GiB,"
            f" {size / records:.0f} bytes/record on average,"
            f" in {time.perf_counter() - t0:.1f}s"
        )
        times = []
        for run in range(args.runs):
            elapsed, pending, before = asyncio.run(start_up(directory))
            restore(directory, before)
            assert pending == records + 1, (pending, records)
            times.append(elapsed)
            print(f"run {run + 1}: {elapsed:.3f}s to accept a new record ({pending:,} pending)")
        print(
            f"start-up over {len(times)} runs: min {min(times):.3f}s,"
            f" median {statistics.median(times):.3f}s, max {max(times):.3f}s"
        )


if __name__ == "__main__":
    main()

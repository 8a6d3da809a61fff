"""The journal on disk, and the writer shipping it to a real Postgres: replay, idempotence,
dead letters, the cap."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from tests.unit.test_ledger_writer import pool, record  # noqa: F401 (fixture)
from tollgate.ledger.journal import Journal
from tollgate.ledger.records import UsageRecord
from tollgate.ledger.writer import LedgerWriter

Pool = AsyncConnectionPool[psycopg.AsyncConnection[Any]]


def writer_for(pool: Pool, journal: Journal, **kw: Any) -> LedgerWriter:  # noqa: F811
    options = {"queue_size": 10, "batch_size": 50, "flush_interval_s": 0.01, **kw}
    return LedgerWriter(pool, journal=journal, **options)


def ids(records: list[UsageRecord]) -> set[str]:
    return {r.request_id for r in records}


def test_append_read_commit_and_segments(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j", segment_bytes=1000)
    written = [record(f"u{i}", 10, 5) for i in range(80)]
    ends = [journal.append(r) for r in written]
    assert ends == sorted(ends)
    assert len(list((tmp_path / "j").glob("*.journal"))) > 3  # rotated
    got = journal.read(0, 1000).entries
    assert [e.record.request_id for e in got] == [r.request_id for r in written]
    assert got[-1].end == journal.end_pos
    # Reading resumes exactly where a previous read stopped.
    first, rest = journal.read(0, 7).entries, journal.read(got[6].end, 1000).entries
    assert [e.record for e in first + rest] == [e.record for e in got]
    journal.commit(got[29].end)
    assert journal.unshipped_bytes == journal.end_pos - got[29].end
    assert [e.record.request_id for e in journal.read(journal.checkpoint_pos, 100).entries] == [
        r.request_id for r in written[30:]
    ]
    segments = sorted((tmp_path / "j").glob("*.journal"))
    assert int(segments[0].name.split(".")[0]) <= got[29].end  # older segments deleted
    journal.close()
    reopened = Journal(tmp_path / "j", segment_bytes=1000)
    assert reopened.checkpoint_pos == got[29].end
    assert ids([e.record for e in reopened.read(reopened.checkpoint_pos, 100).entries]) == ids(
        written[30:]
    )
    reopened.close()


def test_torn_tail_is_dropped_and_overwritten(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    kept = [record("u", 1, 1) for _ in range(3)]
    for r in kept:
        journal.append(r)
    journal.close()
    (segment,) = (tmp_path / "j").glob("*.journal")
    with open(segment, "ab") as f:
        f.write(b"\x90\x03partial")  # a length of 400 and 7 bytes: a crash mid-write
    reopened = Journal(tmp_path / "j")
    assert [e.record for e in reopened.read(0, 10).entries] == kept
    later = record("after", 2, 2)
    reopened.append(later)
    assert [e.record for e in reopened.read(0, 10).entries] == [*kept, later]
    reopened.close()


async def test_writer_ships_the_journal_and_checkpoints(pool: Pool, tmp_path: Path) -> None:  # noqa: F811
    journal = Journal(tmp_path / "j")
    writer = writer_for(pool, journal)
    writer.start()
    sent = [record(f"user{i % 7}", 100 + i, 10) for i in range(230)]
    for r in sent:
        assert writer.submit(r)
    await writer.close(timeout_s=10)
    assert writer.pending == 0
    assert journal.checkpoint_pos == journal.end_pos
    async with pool.connection() as conn:
        rows = await (
            await conn.execute("SELECT request_id::text FROM tollgate.requests")
        ).fetchall()
    assert {r[0] for r in rows} == ids(sent)
    journal.close()


async def test_replaying_the_same_journal_twice_changes_nothing(
    pool: Pool,  # noqa: F811
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path / "j")
    sent = [record(f"user{i % 5}", 1000 + i, 20 + i) for i in range(120)]
    for r in sent:
        journal.append(r)  # written before any writer ran: a crash before shipping
    journal.close()
    for run in range(3):
        if run:
            # Lose the checkpoint: everything is shipped again.
            os.unlink(tmp_path / "j" / "checkpoint")
        journal = Journal(tmp_path / "j")
        writer = writer_for(pool, journal)
        assert writer.pending == 120
        writer.start()
        await writer.close(timeout_s=10)
        assert writer.stats.replayed == 120
        assert (writer.stats.written, writer.stats.duplicates) == (
            (120, 0) if run == 0 else (0, 120)
        )
        journal.close()
    async with pool.connection() as conn:
        counts = await (
            await conn.execute(
                "SELECT count(*), count(DISTINCT request_id),"
                " sum(input_tokens), sum(output_tokens), sum(cost_usd) FROM tollgate.requests"
            )
        ).fetchone()
        rollup = await (
            await conn.execute(
                "SELECT sum(requests), sum(input_tokens), sum(output_tokens), sum(cost_usd)"
                " FROM tollgate.daily_usage"
            )
        ).fetchone()
    assert counts is not None
    assert rollup is not None
    assert counts[0] == counts[1] == 120
    assert (rollup[0], rollup[1], rollup[2], rollup[3]) == (
        counts[0],
        counts[2],
        counts[3],
        counts[4],
    )


async def test_poison_record_is_dead_lettered_and_its_batch_commits(
    pool: Pool,  # noqa: F811
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path / "j")
    writer = writer_for(pool, journal, batch_size=100)
    good = [record(f"u{i}", 10, 1) for i in range(9)]
    poison = record("poison", 10, 1)
    poison.latency_ms = 2**40  # the column is an integer: Postgres refuses this row
    for r in [*good[:4], poison, *good[4:]]:
        writer.submit(r)
    writer.start()
    await writer.close(timeout_s=10)
    async with pool.connection() as conn:
        rows = await (
            await conn.execute("SELECT request_id::text FROM tollgate.requests")
        ).fetchall()
        dead = await (
            await conn.execute("SELECT request_id, error, record FROM tollgate.dead_letters")
        ).fetchall()
    assert {r[0] for r in rows} == ids(good)
    ((request_id, error, raw),) = dead
    assert request_id == poison.request_id
    assert "out of range" in error
    assert UsageRecord.FromString(raw) == poison
    assert writer.stats.dead_letters == 1
    assert journal.checkpoint_pos == journal.end_pos  # nothing left to retry
    journal.close()


def test_the_cap_rejects_or_counts(pool: Pool, tmp_path: Path) -> None:  # noqa: F811
    for reject in (True, False):
        journal = Journal(tmp_path / f"j{reject}")
        writer = writer_for(pool, journal, journal_max_bytes=2000, reject_when_full=reject)
        kept = 0
        while journal.unshipped_bytes < 2000:
            assert writer.submit(record("u", 1, 1))
            kept += 1
        assert journal.unshipped_bytes >= 2000
        assert writer.accepting is (not reject)
        assert writer.submit(record("late", 1, 1)) is False
        assert writer.stats.dropped == 1
        assert writer.pending == kept
        journal.close()

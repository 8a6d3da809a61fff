"""`tollgate prune`: drops the monthly partitions of ``tollgate.requests`` older than a date.

Retention works by whole partitions: detaching and dropping ``tollgate.requests_YYYY_MM``
frees its space at once, without the bloat and WAL of a ``DELETE`` over millions of rows.
A partition goes only when its whole range ends on or before the cut-off (``before`` at
00:00 UTC), so a cut-off in the middle of a month keeps that month. The range is read from
the catalog, not guessed from the name, and the default partition is never touched.

``tollgate.daily_usage`` is kept: the aggregates outlive the detail, so monthly totals,
per-user costs and trends still cover the pruned months; only per-request rows (and with
them queries such as "one user's calls on that day" and ``tollgate reprice``) are gone.

Each partition is detached and dropped in its own short transaction. Both steps lock the
parent table, which stalls the ledger writer for as long as they wait, so the lock wait is
capped by ``lock_timeout`` instead of queueing behind a long report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import class_row

__all__ = ["PruneRefused", "RequestsPartition", "partitions_ending_by", "prune_partitions"]

log = logging.getLogger(__name__)


class PruneRefused(RuntimeError):
    """The cut-off reaches into the current month, or a partition holds rows past it."""


@dataclass(frozen=True)
class RequestsPartition:
    """One monthly partition of ``tollgate.requests`` and the range the catalog gives it."""

    name: str
    lower: datetime
    upper: datetime


# The bounds are printed by pg_get_expr and read back in the same session (same TimeZone and
# DateStyle), so the round trip is exact. The default partition has no bounds and no match.
_MONTHLY_PARTITIONS = """
SELECT name, bounds[1]::timestamptz AS lower, bounds[2]::timestamptz AS upper
FROM (
    SELECT c.relname AS name,
           regexp_match(pg_get_expr(c.relpartbound, c.oid),
                        '^FOR VALUES FROM \\(''([^'']+)''\\) TO \\(''([^'']+)''\\)$') AS bounds
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE i.inhparent = 'tollgate.requests'::regclass
      AND n.nspname = 'tollgate'
      AND c.relkind = 'r'
      AND c.relname ~ '^requests_[0-9]{4}_[0-9]{2}$'
) AS p
WHERE bounds IS NOT NULL
ORDER BY lower
"""


def _cutoff(before: date) -> datetime:
    return datetime.combine(before, time.min, tzinfo=UTC)


async def partitions_ending_by(
    conn: psycopg.AsyncConnection[Any], before: date
) -> list[RequestsPartition]:
    """The monthly partitions whose whole range ends on or before ``before`` (00:00 UTC)."""
    cutoff = _cutoff(before)
    async with conn.transaction(), conn.cursor(row_factory=class_row(RequestsPartition)) as cur:
        await cur.execute(_MONTHLY_PARTITIONS)
        found = await cur.fetchall()
    return [p for p in found if p.upper <= cutoff]


async def prune_partitions(
    conn: psycopg.AsyncConnection[Any],
    before: date,
    *,
    dry_run: bool = False,
    lock_timeout_s: float = 5.0,
) -> list[str]:
    """Detach and drop the partitions that end on or before ``before``; return their names.

    With ``dry_run`` nothing changes and the names of the partitions that would go are
    returned. ``before`` may not be later than today (UTC), so the current month's partition
    is never dropped: rows for its range would land in the default partition, and
    ``ensure_partitions`` could not create it again. Raises :class:`PruneRefused` for such a
    date, and ``psycopg.errors.LockNotAvailable`` when the parent table stays locked for
    longer than ``lock_timeout_s`` (partitions dropped until then stay dropped).
    """
    today = datetime.now(UTC).date()
    if before > today:
        raise PruneRefused(
            f"{before.isoformat()} is after today ({today.isoformat()}, UTC): the current"
            " month's partition is still being written to"
        )
    cutoff = _cutoff(before)
    candidates = await partitions_ending_by(conn, before)
    if dry_run:
        return [p.name for p in candidates]
    dropped: list[str] = []
    for partition in candidates:
        table = sql.Identifier("tollgate", partition.name)
        async with conn.transaction():
            await conn.execute(
                "SELECT set_config('lock_timeout', %s, true)", (f"{int(lock_timeout_s * 1000)}ms",)
            )
            await conn.execute(
                sql.SQL("ALTER TABLE tollgate.requests DETACH PARTITION {}").format(table)
            )
            # The partition constraint already keeps newer rows out; checked anyway, because
            # what is dropped here cannot be brought back.
            newer = await (
                await conn.execute(
                    sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE created_at >= %s)").format(
                        table
                    ),
                    (cutoff,),
                )
            ).fetchone()
            if newer is not None and newer[0]:
                raise PruneRefused(f"tollgate.{partition.name} holds rows from {cutoff} on")
            await conn.execute(sql.SQL("DROP TABLE {}").format(table))
        log.info("dropped ledger partition tollgate.%s", partition.name)
        dropped.append(partition.name)
    return dropped

"""Applies the ledger's numbered SQL migrations (``migrations/NNN_name.sql``) exactly once each."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources

import psycopg

__all__ = ["Migration", "apply_migrations", "available_migrations", "pending_migrations"]

log = logging.getLogger(__name__)

# Any constant shared by every Tollgate process: serialises concurrent `migrate` runs.
_ADVISORY_LOCK_ID = 0x746F6C6C  # "toll"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("tollgate.ledger").joinpath("migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        number, _, rest = entry.name.partition("_")
        found.append(Migration(int(number), rest.removesuffix(".sql"), entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 1..N without gaps, found {versions}")
    return found


async def apply_migrations(conn: psycopg.AsyncConnection[object]) -> list[Migration]:
    """Apply every migration not yet recorded in ``tollgate.schema_migrations``; return them."""
    applied: list[Migration] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_ADVISORY_LOCK_ID,))
        await conn.execute("CREATE SCHEMA IF NOT EXISTS tollgate")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS tollgate.schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur = await conn.execute("SELECT version FROM tollgate.schema_migrations")
        done = {row[0] for row in await cur.fetchall()}  # type: ignore[index]
        for migration in available_migrations():
            if migration.version in done:
                continue
            log.info("applying migration %03d_%s", migration.version, migration.name)
            await conn.execute(migration.sql.encode())
            await conn.execute(
                "INSERT INTO tollgate.schema_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
            applied.append(migration)
    return applied


async def pending_migrations(conn: psycopg.AsyncConnection[object]) -> list[Migration]:
    """The migrations not applied yet, found with reads only (for a read-only role)."""
    cur = await conn.execute("SELECT to_regclass('tollgate.schema_migrations') IS NOT NULL")
    row = await cur.fetchone()
    done: set[int] = set()
    if row is not None and row[0]:  # type: ignore[index]
        cur = await conn.execute("SELECT version FROM tollgate.schema_migrations")
        done = {r[0] for r in await cur.fetchall()}  # type: ignore[index]
    return [m for m in available_migrations() if m.version not in done]

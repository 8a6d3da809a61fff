"""Read queries over the ledger, shared by `tollgate usage`, the dashboard and UsageService.

Rows come back as typed dataclasses whose field names are the ledger's column names, so the
JSON API and ``tollgate usage --format json`` speak the schema documented in docs/ledger.md.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import class_row

__all__ = [
    "RequestRow",
    "UsageFilter",
    "UserTotals",
    "fetch_requests",
    "fetch_user_totals",
    "row_conditions",
]


@dataclass(frozen=True)
class RequestRow:
    """One row of ``tollgate.requests``."""

    request_id: uuid.UUID
    created_at: datetime
    key_id: str | None
    end_user_id: str | None
    identity_source: str | None
    provider: str | None
    model: str | None
    endpoint: str | None
    streamed: bool
    status_code: int | None
    outcome: str
    block_reason: str | None
    input_tokens: int | None
    cached_input_tokens: int | None
    cache_write_tokens: int | None
    output_tokens: int | None
    reasoning_tokens: int | None
    total_tokens: int | None
    units: dict[str, Any] | None
    cost_usd: Decimal | None
    latency_ms: int | None
    ttft_ms: int | None
    tags: list[str]
    limit_ids: list[str]
    use_case_id: str | None
    use_case_name: str | None
    use_case_version: str | None
    logging_disabled: bool
    upstream_base_uri: str | None
    usage_flags: list[str]
    pricing_error: str | None


@dataclass(frozen=True)
class UserTotals:
    """Per-user totals over a time range."""

    end_user_id: str | None
    requests: int
    input_tokens: int
    output_tokens: int
    total_tokens: int
    cost_usd: Decimal | None


@dataclass(frozen=True)
class UsageFilter:
    """Which ledger rows a query covers; None means "any"."""

    user: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    model: str | None = None
    tag: str | None = None

    def where(self) -> tuple[sql.Composable, list[Any]]:
        return row_conditions(
            user=self.user, since=self.since, until=self.until, model=self.model, tag=self.tag
        )


def row_conditions(
    *,
    user: str | None = None,
    unattributed: bool = False,
    key: str | None = None,
    provider: str | None = None,
    model: str | None = None,
    endpoint: str | None = None,
    tag: str | None = None,
    outcome: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> tuple[sql.Composable, list[Any]]:
    """A WHERE over ``tollgate.requests``: every given value must match (None: any), and
    its parameters. Shared by `tollgate usage`, UsageService and the dashboard's log."""
    clauses: list[sql.Composable] = [sql.SQL("TRUE")]
    params: list[Any] = []
    for column, value in (
        ("end_user_id", user),
        ("key_id", key),
        ("provider", provider),
        ("model", model),
        ("endpoint", endpoint),
        ("outcome", outcome),
    ):
        if value is not None:
            clauses.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
            params.append(value)
    if unattributed:
        clauses.append(sql.SQL("end_user_id IS NULL"))
    if tag is not None:
        clauses.append(sql.SQL("%s = ANY(tags)"))
        params.append(tag)
    if since is not None:
        clauses.append(sql.SQL("created_at >= %s"))
        params.append(since)
    if until is not None:
        clauses.append(sql.SQL("created_at < %s"))
        params.append(until)
    return sql.SQL(" AND ").join(clauses), params


async def fetch_requests(
    conn: psycopg.AsyncConnection[Any], where: UsageFilter, *, limit: int = 10_000
) -> list[RequestRow]:
    """Requests matching ``where``, oldest first, at most ``limit``."""
    cond, params = where.where()
    query = sql.SQL(
        "SELECT * FROM tollgate.requests WHERE {} ORDER BY created_at, request_id LIMIT %s"
    ).format(cond)
    async with conn.cursor(row_factory=class_row(RequestRow)) as cur:
        await cur.execute(query, [*params, limit])
        return await cur.fetchall()


async def fetch_user_totals(
    conn: psycopg.AsyncConnection[Any], where: UsageFilter
) -> list[UserTotals]:
    """Totals per end user over ``where``, most tokens first."""
    cond, params = where.where()
    query = sql.SQL(
        "SELECT end_user_id, count(*) AS requests,"
        " coalesce(sum(input_tokens), 0)::bigint AS input_tokens,"
        " coalesce(sum(output_tokens), 0)::bigint AS output_tokens,"
        " coalesce(sum(total_tokens), 0)::bigint AS total_tokens,"
        " sum(cost_usd) AS cost_usd"
        " FROM tollgate.requests WHERE {}"
        " GROUP BY end_user_id ORDER BY total_tokens DESC, end_user_id"
    ).format(cond)
    async with conn.cursor(row_factory=class_row(UserTotals)) as cur:
        await cur.execute(query, params)
        return await cur.fetchall()

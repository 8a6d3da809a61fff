"""Formats `tollgate limits` output: one limit with its current spend, and the limit list."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from tollgate.ledger.limits import Limit, PeriodSpend

__all__ = ["format_limit", "format_limit_list", "limit_record"]


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def _number(value: Decimal) -> str:
    return format(value.normalize(), "f")


def _definition(limit: Limit) -> dict[str, Any]:
    return {
        "limit_id": limit.limit_id,
        "scope": limit.scope,
        "subject": limit.subject,
        "measure": limit.measure,
        "maximum": _number(limit.maximum),
        "period": limit.period,
        "time_zone": limit.time_zone,
        "mode": limit.mode,
        "thresholds": [_number(t) for t in limit.thresholds],
        "created_at": _iso(limit.created_at),
        "updated_at": _iso(limit.updated_at),
    }


def _spend(limit: Limit, spend: PeriodSpend) -> dict[str, Any]:
    spent = spend.of(limit.measure)
    return {
        "subject": spend.subject or None,
        "spent": _number(spent),
        "remaining": _number(max(limit.maximum - spent, Decimal(0))),
        "usd": _number(spend.usd),
        "tokens": spend.tokens,
        "requests": spend.requests,
        "unpriced_requests": spend.unpriced,
    }


def limit_record(
    limit: Limit,
    period_start: datetime | None,
    reset_at: datetime | None,
    spent: Sequence[PeriodSpend],
) -> dict[str, Any]:
    """A limit, its current period and each subject's spend, as JSON-ready fields (the
    JSON of ``tollgate limits show`` and of the dashboard's ``/api/v1/limits``)."""
    rows = list(spent)
    if not rows and not (limit.subject is None and limit.scope in ("user", "key")):
        rows = [PeriodSpend("", Decimal(0), 0, 0, 0)]
    return {
        **_definition(limit),
        "period_start": _iso(period_start),
        "reset_at": _iso(reset_at),
        "spend": [_spend(limit, s) for s in rows],
    }


def format_limit(
    limit: Limit,
    period_start: datetime | None,
    reset_at: datetime | None,
    spent: Sequence[PeriodSpend],
    fmt: str,
) -> str:
    """A limit, its current period and what each subject has spent in it.

    A limit that charges each user (key) separately lists them, largest first; one with a
    single spend shows it (zero when nothing was charged yet)."""
    record = limit_record(limit, period_start, reset_at, spent)
    if fmt == "json":
        return json.dumps(record, indent=2) + "\n"
    lines = [
        f"limit {limit.limit_id}: {limit.scope}"
        + (f" {limit.subject}" if limit.subject else "")
        + f", {_number(limit.maximum)} {limit.measure} per {limit.period}"
        + ("" if limit.period == "total" else f" ({limit.time_zone})")
        + f", {limit.mode}",
        f"period:  {record['period_start'] or 'all time'} to {record['reset_at'] or 'never'}",
    ]
    if not record["spend"]:
        lines.append("spend:   nothing charged in this period")
    for entry in record["spend"]:
        who = f"{entry['subject']}: " if entry["subject"] else ""
        lines.append(
            f"spend:   {who}{entry['spent']} {limit.measure} spent, {entry['remaining']} left"
            f" ({entry['requests']} requests, {entry['tokens']} tokens, ${entry['usd']}"
            + (f", {entry['unpriced_requests']} unpriced" if entry["unpriced_requests"] else "")
            + ")"
        )
    return "\n".join(lines) + "\n"


def format_limit_list(limits: Sequence[Limit], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([_definition(limit) for limit in limits], indent=2) + "\n"
    header = ("LIMIT", "SCOPE", "SUBJECT", "MAXIMUM", "MEASURE", "PERIOD", "TIME ZONE", "MODE")
    rows = [
        (
            limit.limit_id,
            limit.scope,
            limit.subject or "-",
            _number(limit.maximum),
            limit.measure,
            limit.period,
            limit.time_zone,
            limit.mode,
        )
        for limit in limits
    ]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "".join(
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n"
        for row in [header, *rows]
    )

"""Formats ledger rows and per-user totals as a table, JSON or CSV (field names = columns)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from tollgate.ledger.queries import RequestRow, UserTotals

__all__ = ["FORMATS", "format_requests", "format_user_totals"]

FORMATS = ("table", "json", "csv")


def _plain(value: Any) -> Any:
    """A JSON-safe value: exact decimals and ids as strings, times in ISO 8601."""
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _records(rows: Sequence[Any]) -> list[dict[str, Any]]:
    return [{k: _plain(v) for k, v in dataclasses.asdict(row).items()} for row in rows]


def _csv(rows: Sequence[Any], columns: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for record in _records(rows):
        writer.writerow(
            ";".join(v) if isinstance(v, list) else json.dumps(v) if isinstance(v, dict) else v
            for v in (record[c] for c in columns)
        )
    return out.getvalue()


def _table(header: Sequence[str], lines: Sequence[Sequence[str]], text_columns: int) -> str:
    """Aligned columns: the first ``text_columns`` to the left, numbers to the right."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < text_columns else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(line) for line in lines)]) + "\n"


def _num(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _usd(value: Decimal | None) -> str:
    return "-" if value is None else f"${value:.6f}"


def format_requests(rows: Sequence[RequestRow], fmt: str) -> str:
    columns = [f.name for f in dataclasses.fields(RequestRow)]
    if fmt == "json":
        return json.dumps(_records(rows), indent=2) + "\n"
    if fmt == "csv":
        return _csv(rows, columns)
    header = [
        "created_at",
        "end_user_id",
        "model",
        "outcome",
        "input",
        "output",
        "total",
        "cost_usd",
    ]
    lines = [
        [
            r.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            r.end_user_id or "(none)",
            r.model or "-",
            r.outcome,
            _num(r.input_tokens),
            _num(r.output_tokens),
            _num(r.total_tokens),
            _usd(r.cost_usd),
        ]
        for r in rows
    ]
    return _table(header, lines, 4) if lines else "no matching requests\n"


def format_user_totals(rows: Sequence[UserTotals], fmt: str) -> str:
    columns = [f.name for f in dataclasses.fields(UserTotals)]
    if fmt == "json":
        return json.dumps(_records(rows), indent=2) + "\n"
    if fmt == "csv":
        return _csv(rows, columns)
    header = [
        "end_user_id",
        "requests",
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "cost_usd",
    ]
    lines = [
        [
            t.end_user_id or "(none)",
            _num(t.requests),
            _num(t.input_tokens),
            _num(t.output_tokens),
            _num(t.total_tokens),
            _usd(t.cost_usd),
        ]
        for t in rows
    ]
    return _table(header, lines, 1) if lines else "no matching requests\n"

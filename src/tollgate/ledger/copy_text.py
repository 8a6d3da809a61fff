"""UsageRecords as rows of Postgres' COPY text format, in the order of ``COLUMNS``.

The ledger writer streams each batch into its staging table with ``COPY … FROM STDIN``.
Building a Python row per record and handing it to psycopg's ``write_row`` (one adapter call
per value, one ``await`` per row) cost ~45 µs a record on the reference machine; the
records' types are few and fixed, so this module writes the text format directly (~14 µs,
most of it reading the protobuf's fields), in the writer's worker thread.

Format (https://www.postgresql.org/docs/current/sql-copy.html, "Text Format"): columns
separated by a tab, rows ended by a newline, NULL as ``\\N``, and backslash, tab, newline
and carriage return escaped with a backslash. Arrays are written as array literals with
every element double-quoted, so commas, braces, spaces and the word NULL stay data.

Values Postgres refuses (a NUL character in a string, an integer out of its column's range)
are written as they are: Postgres rejects the batch with a data error and the writer then
stores record by record, dead-lettering the refused one, exactly as with any other refusal.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from decimal import Decimal

from tollgate.ledger.records import OUTCOME_NAMES, UsageRecord

__all__ = ["copy_rows", "copy_text"]

_NULL = "\\N"
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_ARRAY_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"'})


def copy_text(value: str) -> str:
    """``value`` as one COPY text field."""
    if "\\" in value or not value.isprintable():  # \t \n \r are not printable
        return value.translate(_ESCAPES)
    return value


def _array(values: Sequence[str], cache: dict[tuple[str, ...], str]) -> str:
    """A text[] literal, memoised: a deployment has few distinct tag sets."""
    if not values:
        return "{}"
    key = tuple(values)
    literal = cache.get(key)
    if literal is None:
        inner = ",".join('"' + v.translate(_ARRAY_ESCAPES) + '"' for v in key)
        literal = copy_text("{" + inner + "}")
        if len(cache) < 4096:
            cache[key] = literal
    return literal


class _Seconds:
    """``YYYY-MM-DD HH:MM:SS`` of the last Unix second formatted: a batch's records share
    seconds, and formatting a date is the costliest part of a row."""

    __slots__ = ("seconds", "text")

    def __init__(self) -> None:
        self.seconds: int | None = None
        self.text = ""

    def format(self, seconds: int) -> str:
        if seconds != self.seconds:
            self.text = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))
            self.seconds = seconds
        return self.text


def copy_rows(records: Sequence[UsageRecord], costs: Sequence[Decimal | str | None]) -> bytes:
    """The COPY text rows (each ending in a newline) of ``records``, with ``costs`` as their
    ``cost_usd``, UTF-8 encoded."""
    seconds = _Seconds()
    arrays: dict[tuple[str, ...], str] = {}
    # A batch repeats its users, keys, models and URIs: each distinct string is escaped once.
    texts: dict[str, str] = {}
    lines = [_row(r, c, seconds, arrays, texts) for r, c in zip(records, costs, strict=True)]
    lines.append("")
    return "\n".join(lines).encode()


def _row(
    r: UsageRecord,
    cost: Decimal | str | None,
    seconds: _Seconds,
    arrays: dict[tuple[str, ...], str],
    texts: dict[str, str],
) -> str:
    # Unrolled on purpose (this runs for every record the ledger stores), in the order of
    # records.COLUMNS: tests/unit/test_copy_text.py gives every column a distinct value and
    # compares what Postgres stores with psycopg's adaptation of records.record_to_row.
    has = r.HasField

    def text(value: str) -> str:
        escaped = texts.get(value)
        if escaped is None:
            escaped = texts[value] = copy_text(value)
        return escaped

    at = r.created_at
    return "\t".join(
        (
            text(r.request_id),
            f"{seconds.format(at.seconds)}.{at.nanos // 1000:06d}+00",
            text(r.key_id) if has("key_id") else _NULL,
            text(r.end_user_id) if has("end_user_id") else _NULL,
            text(r.identity_source) if has("identity_source") else _NULL,
            text(r.provider) if has("provider") else _NULL,
            text(r.model) if has("model") else _NULL,
            text(r.endpoint) if has("endpoint") else _NULL,
            "t" if r.streamed else "f",
            str(r.status_code) if has("status_code") else _NULL,
            OUTCOME_NAMES[r.outcome],
            text(r.block_reason) if has("block_reason") else _NULL,
            str(r.input_tokens) if has("input_tokens") else _NULL,
            str(r.cached_input_tokens) if has("cached_input_tokens") else _NULL,
            str(r.cache_write_tokens) if has("cache_write_tokens") else _NULL,
            str(r.output_tokens) if has("output_tokens") else _NULL,
            str(r.reasoning_tokens) if has("reasoning_tokens") else _NULL,
            str(r.total_tokens) if has("total_tokens") else _NULL,
            copy_text(json.dumps(dict(r.units), sort_keys=True)) if r.units else _NULL,
            _NULL if cost is None else str(cost),
            _array(r.usage_flags, arrays),
            text(r.pricing_error) if has("pricing_error") else _NULL,
            str(r.latency_ms) if has("latency_ms") else _NULL,
            str(r.ttft_ms) if has("ttft_ms") else _NULL,
            _array(r.tags, arrays),
            _array(r.limit_ids, arrays),
            text(r.use_case_id) if has("use_case_id") else _NULL,
            text(r.use_case_name) if has("use_case_name") else _NULL,
            text(r.use_case_version) if has("use_case_version") else _NULL,
            "t" if r.logging_disabled else "f",
            text(r.upstream_base_uri) if has("upstream_base_uri") else _NULL,
        )
    )

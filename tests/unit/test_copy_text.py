"""The writer's own COPY text encoder stores exactly what psycopg's adaptation of the same
record stores, for every column and for awkward values (against a real Postgres)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tollgate.app import run_migrations
from tollgate.ledger.copy_text import copy_rows, copy_text
from tollgate.ledger.records import COLUMNS, UsageRecord, new_request_id, record_to_row
from tollgate.v1 import usage_pb2

COLS = ", ".join(COLUMNS)
# Every optional text column (request_id and cost_usd have values of their own).
TEXT_COLUMNS = tuple(
    f.name
    for f in UsageRecord.DESCRIPTOR.fields
    if f.type == f.TYPE_STRING
    and f.has_presence
    and f.name in COLUMNS
    and f.name not in ("request_id", "cost_usd")
)
AWKWARD = [
    "",
    "plain",
    "tab\there",
    "new\nline",
    "carriage\rreturn",
    "back\\slash",
    "\\N",
    "NULL",
    'quote"d',
    "comma,brace{}",
    "  spaced  ",
    "ünïcødé ✓ 🚀",
    "\x7f\x1bcontrol",
    "trailing\\",
]


def awkward_record(i: int, text: str) -> UsageRecord:
    """Every column set, each to a value no other column has (so a column written in the
    wrong place cannot go unnoticed), the text ones around ``text``."""
    r = UsageRecord(
        request_id=new_request_id(),
        outcome=usage_pb2.OUTCOME_OK if i % 2 else usage_pb2.OUTCOME_BLOCKED,
        streamed=bool(i % 2),
        status_code=200 + i,
        input_tokens=1_000 + i,
        cached_input_tokens=2_000 + i,
        cache_write_tokens=3_000 + i,
        output_tokens=2**40 + i,
        reasoning_tokens=4_000 + i,
        total_tokens=5_000 + i,
        latency_ms=6_000 + i,
        ttft_ms=7_000 + i,
        logging_disabled=bool(i % 3),
    )
    for name in TEXT_COLUMNS:
        setattr(r, name, f"{name}:{text}")
    r.created_at.FromMicroseconds(1_700_000_000_000_000 + i * 1_234_567)
    r.tags.extend([text, "NULL", "a,b", f"t{i}"])
    r.limit_ids.append(f"limit:{text}")
    r.usage_flags.extend(["cached_exceeds_input", f"flag:{text}"])
    r.units["images"] = 1.5 + i
    r.units["audio_seconds"] = 0.1
    return r


@pytest.fixture
async def url(database_url: str) -> str:
    await run_migrations(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        for suffix in ("ours", "psycopg"):
            conn.execute(f"CREATE TABLE t_{suffix} (LIKE tollgate.requests)")
    return database_url


def store_both(url: str, records: list[UsageRecord], costs: list[Any]) -> list[tuple[Any, ...]]:
    """Rows where the two paths stored something different (empty: none)."""
    with psycopg.connect(url) as conn:
        conn.execute("TRUNCATE t_ours, t_psycopg")
        with conn.cursor() as cur, cur.copy(f"COPY t_ours ({COLS}) FROM STDIN") as copy:
            copy.write(copy_rows(records, costs))
        with conn.cursor() as cur, cur.copy(f"COPY t_psycopg ({COLS}) FROM STDIN") as copy:
            for r, c in zip(records, costs, strict=True):
                copy.write_row(record_to_row(r, c))
        (count,) = conn.execute("SELECT count(*) FROM t_ours").fetchone() or (0,)
        assert count == len(records)
        return conn.execute(
            "(TABLE t_ours EXCEPT ALL TABLE t_psycopg) UNION ALL"
            " (TABLE t_psycopg EXCEPT ALL TABLE t_ours)"
        ).fetchall()


async def test_awkward_values_are_stored_as_psycopg_stores_them(url: str) -> None:
    records = [awkward_record(i, text) for i, text in enumerate(AWKWARD)]
    costs: list[Any] = [None, Decimal("0.0001851"), "1.5E-7", Decimal("12.3456789012"), "0"]
    costs = (costs * len(records))[: len(records)]
    assert store_both(url, records, costs) == []
    with psycopg.connect(url) as conn:
        stored = conn.execute("SELECT end_user_id, tags FROM t_ours ORDER BY created_at").fetchall()
    assert [u for u, _ in stored] == [f"end_user_id:{text}" for text in AWKWARD]
    assert [t for _, t in stored][2] == ["tab\there", "NULL", "a,b", "t2"]


async def test_unset_fields_are_null_and_empty_arrays_are_empty(url: str) -> None:
    bare = UsageRecord(request_id=new_request_id(), outcome=usage_pb2.OUTCOME_USAGE_MISSING)
    bare.created_at.FromSeconds(0)
    assert store_both(url, [bare], [None]) == []
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT end_user_id, input_tokens, units, cost_usd, tags, limit_ids, created_at"
            " FROM t_ours"
        ).fetchone()
    assert row is not None
    assert row[:4] == (None, None, None, None)
    assert row[4:6] == ([], [])
    assert row[6].timestamp() == 0


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    texts=st.lists(
        st.text(st.characters(codec="utf-8", exclude_characters="\x00")), min_size=1, max_size=5
    ),
    micros=st.integers(min_value=0, max_value=4_102_444_800_000_000),  # 1970 .. 2100
    tokens=st.one_of(st.none(), st.integers(min_value=0, max_value=2**62)),
)
def test_any_text_round_trips(url: str, texts: list[str], micros: int, tokens: int | None) -> None:
    records = []
    for i, text in enumerate(texts):
        r = awkward_record(i, text)
        r.created_at.FromMicroseconds(micros)
        if tokens is None:
            r.ClearField("input_tokens")
        else:
            r.input_tokens = tokens
        records.append(r)
    assert store_both(url, records, [None] * len(records)) == []


def test_copy_text_escapes_only_what_copy_needs() -> None:
    assert copy_text("a\tb\nc\rd\\e") == "a\\tb\\nc\\rd\\\\e"
    assert copy_text("ünïcødé") == "ünïcødé"

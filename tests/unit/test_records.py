"""UUIDv7 request ids and record → row mapping."""

from __future__ import annotations

import uuid

from tollgate.ledger.records import COLUMNS, UsageRecord, new_request_id, record_to_row
from tollgate.v1 import usage_pb2


def test_request_id_is_uuid7_carrying_the_time() -> None:
    rid = uuid.UUID(new_request_id(1_700_000_000_123))
    assert rid.version == 7
    assert rid.variant == uuid.RFC_4122
    assert rid.int >> 80 == 1_700_000_000_123


def test_request_ids_sort_by_time_and_are_unique() -> None:
    ids = [new_request_id(1_000 + i) for i in range(500)]
    assert ids == sorted(ids)
    assert len(set(new_request_id(5) for _ in range(1000))) == 1000


def test_unset_fields_become_null_not_zero() -> None:
    record = UsageRecord(request_id=new_request_id(), outcome=usage_pb2.OUTCOME_USAGE_MISSING)
    record.created_at.FromMicroseconds(1_700_000_000_000_001)
    record.output_tokens = 0
    row = dict(zip(COLUMNS, record_to_row(record, None), strict=True))
    assert row["input_tokens"] is None
    assert row["output_tokens"] == 0
    assert row["outcome"] == "usage_missing"
    assert row["created_at"].microsecond == 1
    assert row["tags"] == []
    assert row["units"] is None

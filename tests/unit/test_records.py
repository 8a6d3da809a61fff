"""UUIDv7 request ids and record → row mapping."""

from __future__ import annotations

import uuid

import pytest

from tollgate.ledger.records import (
    COLUMNS,
    OPTIONAL_SCALARS,
    UsageRecord,
    new_request_id,
    record_to_row,
    usage_flags,
)
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


def test_new_columns_map_and_optional_scalars_are_right() -> None:
    assert "pricing_error" in OPTIONAL_SCALARS
    assert "usage_flags" not in OPTIONAL_SCALARS
    record = UsageRecord(request_id=new_request_id(), outcome=usage_pb2.OUTCOME_OK)
    row = dict(zip(COLUMNS, record_to_row(record, None), strict=True))
    assert (row["usage_flags"], row["pricing_error"]) == ([], None)
    record.usage_flags.extend(["b", "a"])
    record.pricing_error = "genai-prices: no"
    row = dict(zip(COLUMNS, record_to_row(record, None), strict=True))
    assert (row["usage_flags"], row["pricing_error"]) == (["b", "a"], "genai-prices: no")


def usage(endpoint: str, provider: str = "openai", **counts: int) -> UsageRecord:
    record = UsageRecord(request_id=new_request_id(), provider=provider, endpoint=endpoint)
    for name, value in counts.items():
        setattr(record, name, value)
    return record


CHAT = "/v1/chat/completions"
GEMINI = "/v1beta/models/gemini-2.0-flash:generateContent"
BEDROCK = "/model/anthropic.claude-3-haiku-20240307-v1:0/converse"
MESSAGES = "/v1/messages"


@pytest.mark.parametrize(
    ("record", "flags"),
    [
        (usage(CHAT, input_tokens=22, cached_input_tokens=72), ["cached_exceeds_input"]),
        (usage(CHAT, input_tokens=10, cache_write_tokens=11), ["cache_write_exceeds_input"]),
        (usage(CHAT, output_tokens=5, reasoning_tokens=6), ["reasoning_exceeds_output"]),
        (usage(CHAT, input_tokens=-1), ["negative_tokens"]),
        (usage(CHAT, output_tokens=10**9 + 1), ["huge_tokens"]),
        (usage(CHAT, input_tokens=3, output_tokens=4, total_tokens=8), ["total_mismatch"]),
        (usage(CHAT, input_tokens=3, output_tokens=4, total_tokens=7), []),
        (usage(CHAT, input_tokens=3, total_tokens=9), []),  # embeddings: no output, no check
        (usage(CHAT, input_tokens=22, cached_input_tokens=22, output_tokens=3), []),
        # Anthropic: input excludes the cache tokens, no total, no reasoning.
        (
            usage(MESSAGES, "anthropic", input_tokens=4, cached_input_tokens=4096, output_tokens=2),
            [],
        ),
        (usage(MESSAGES, "anthropic", cache_write_tokens=1536, input_tokens=1), []),
        # Gemini: output excludes thoughts; total adds them and unrecorded tool-use tokens.
        (
            usage(
                GEMINI,
                "gemini",
                input_tokens=10,
                output_tokens=5,
                reasoning_tokens=20,
                total_tokens=35,
            ),
            [],
        ),
        (usage(GEMINI, "gemini", input_tokens=10, output_tokens=5, total_tokens=40), []),
        (
            usage(
                GEMINI,
                "gemini",
                input_tokens=10,
                output_tokens=5,
                reasoning_tokens=20,
                total_tokens=15,
            ),
            ["total_mismatch"],
        ),
        (usage(GEMINI, "gemini", input_tokens=5, cached_input_tokens=6), ["cached_exceeds_input"]),
        # Bedrock: input excludes the cache; total counts it (tests/fixtures/bedrock).
        (
            usage(
                BEDROCK,
                "bedrock",
                input_tokens=37,
                output_tokens=115,
                total_tokens=2200,
                cached_input_tokens=1800,
                cache_write_tokens=248,
            ),
            [],
        ),
        (
            usage(
                BEDROCK,
                "bedrock",
                input_tokens=37,
                output_tokens=115,
                total_tokens=999,
                cached_input_tokens=1800,
            ),
            ["total_mismatch"],
        ),
        (
            usage(CHAT, input_tokens=-5, cached_input_tokens=2, output_tokens=2, total_tokens=0),
            ["cached_exceeds_input", "negative_tokens", "total_mismatch"],
        ),
    ],
)
def test_usage_flags(record: UsageRecord, flags: list[str]) -> None:
    assert usage_flags(record) == flags
    assert list(record.usage_flags) == []  # pure: the record is not changed


def test_usage_flags_merge_with_the_records_own_sorted_once() -> None:
    record = usage(CHAT, input_tokens=-1)
    record.usage_flags.extend(["out_of_range_tokens", "negative_tokens"])
    assert usage_flags(record) == ["negative_tokens", "out_of_range_tokens"]

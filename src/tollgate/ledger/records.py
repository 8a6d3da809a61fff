"""UsageRecord helpers: time-ordered request ids and the mapping onto ``tollgate.requests`` rows."""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import UTC
from decimal import Decimal
from typing import Any

from tollgate.v1 import usage_pb2

__all__ = [
    "COLUMNS",
    "OPTIONAL_SCALARS",
    "OUTCOME_NAMES",
    "UsageRecord",
    "new_request_id",
    "optional",
    "record_to_row",
]

UsageRecord = usage_pb2.UsageRecord

OUTCOME_NAMES: dict[int, str] = {
    usage_pb2.OUTCOME_OK: "ok",
    usage_pb2.OUTCOME_BLOCKED: "blocked",
    usage_pb2.OUTCOME_UPSTREAM_ERROR: "upstream_error",
    usage_pb2.OUTCOME_CLIENT_ABORTED: "client_aborted",
    usage_pb2.OUTCOME_USAGE_MISSING: "usage_missing",
    usage_pb2.OUTCOME_INTERNAL_ERROR: "internal_error",
}

# Column order of the COPY into the staging table; every ledger column but none computed.
COLUMNS: tuple[str, ...] = (
    "request_id",
    "created_at",
    "key_id",
    "end_user_id",
    "identity_source",
    "provider",
    "model",
    "endpoint",
    "streamed",
    "status_code",
    "outcome",
    "block_reason",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
    "units",
    "cost_usd",
    "latency_ms",
    "ttft_ms",
    "tags",
    "limit_ids",
    "use_case_id",
    "use_case_name",
    "use_case_version",
    "logging_disabled",
    "upstream_base_uri",
)

# Columns that map 1:1 onto a proto3 ``optional`` scalar of UsageRecord (unset → NULL).
OPTIONAL_SCALARS: tuple[str, ...] = tuple(
    c
    for c in COLUMNS
    if c
    not in {
        "request_id",
        "created_at",
        "streamed",
        "outcome",
        "units",
        "cost_usd",
        "tags",
        "limit_ids",
        "logging_disabled",
    }
)


def new_request_id(unix_ms: int | None = None) -> str:
    """A UUIDv7 (RFC 9562): 48-bit Unix milliseconds, then 74 random bits."""
    ms = int(time.time() * 1000) if unix_ms is None else unix_ms
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)  # rand_b, 62 bits
    return str(uuid.UUID(int=value))


def optional(record: usage_pb2.UsageRecord, name: str) -> Any:
    """The value of an ``optional`` field, or None when it was never set."""
    return getattr(record, name) if record.HasField(name) else None


def record_to_row(record: usage_pb2.UsageRecord, cost: Decimal | str | None) -> tuple[Any, ...]:
    """The values of ``COLUMNS`` for one record; unset optional fields become NULL."""
    values: dict[str, Any] = {name: optional(record, name) for name in OPTIONAL_SCALARS}
    values["request_id"] = record.request_id
    values["created_at"] = record.created_at.ToDatetime(tzinfo=UTC)
    values["streamed"] = record.streamed
    values["outcome"] = OUTCOME_NAMES[record.outcome]
    values["units"] = json.dumps(dict(record.units), sort_keys=True) if record.units else None
    values["cost_usd"] = cost
    values["tags"] = list(record.tags)
    values["limit_ids"] = list(record.limit_ids)
    values["logging_disabled"] = record.logging_disabled
    return tuple(values[name] for name in COLUMNS)

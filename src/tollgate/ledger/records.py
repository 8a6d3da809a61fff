"""UsageRecord helpers: time-ordered request ids and the mapping onto ``tollgate.requests`` rows."""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import UTC
from decimal import Decimal
from typing import Any

from tollgate.metering.usage import TOKEN_FIELDS
from tollgate.v1 import usage_pb2

__all__ = [
    "COLUMNS",
    "OPTIONAL_SCALARS",
    "OUTCOME_NAMES",
    "UsageRecord",
    "new_request_id",
    "optional",
    "record_to_row",
    "usage_flags",
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
    "usage_flags",
    "pricing_error",
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
        "usage_flags",
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
    values["usage_flags"] = list(record.usage_flags)
    values["tags"] = list(record.tags)
    values["limit_ids"] = list(record.limit_ids)
    values["logging_disabled"] = record.logging_disabled
    return tuple(values[name] for name in COLUMNS)


# --- Usage flags -------------------------------------------------------------------------------
#
# Usage is stored as the provider reported it; these flags say where it does not add up, so an
# operator can find such rows (docs/ledger.md lists every flag). What "input" and "total" mean
# differs per API family (docs/usage.md): OpenAI-style input includes cached and cache-write
# tokens and output includes reasoning; Anthropic and Bedrock report input without the cache
# tokens; Gemini's output excludes the thinking tokens and its total adds them (and tool-use
# prompt tokens, which are not recorded).

FLAG_NEGATIVE = "negative_tokens"
FLAG_HUGE = "huge_tokens"
FLAG_CACHED_EXCEEDS_INPUT = "cached_exceeds_input"
FLAG_CACHE_WRITE_EXCEEDS_INPUT = "cache_write_exceeds_input"
FLAG_REASONING_EXCEEDS_OUTPUT = "reasoning_exceeds_output"
FLAG_TOTAL_MISMATCH = "total_mismatch"
HUGE_TOKENS = 10**9  # more than any context window or answer a request can have


def api_family(record: usage_pb2.UsageRecord) -> str:
    """Which usage shape the record's numbers follow: the parser family of its endpoint."""
    endpoint = record.endpoint
    if endpoint.endswith((":generateContent", ":streamGenerateContent")):
        return "gemini"
    if endpoint.endswith("/converse"):
        return "bedrock"
    if endpoint.endswith("/messages") or record.provider == "anthropic":
        return "anthropic"
    return "openai"


def usage_flags(record: usage_pb2.UsageRecord) -> list[str]:
    """The record's flags (those it carries already and those its usage earns), sorted, once.

    Pure: the record is not changed. Unset counts are never flagged, nor compared.
    """
    flags = set(record.usage_flags)
    counts = {name: optional(record, name) for name in TOKEN_FIELDS}
    reported = [v for v in counts.values() if v is not None]
    if any(v < 0 for v in reported):
        flags.add(FLAG_NEGATIVE)
    if any(v > HUGE_TOKENS for v in reported):
        flags.add(FLAG_HUGE)
    family = api_family(record)
    inp, out, total = counts["input_tokens"], counts["output_tokens"], counts["total_tokens"]
    cached, written = counts["cached_input_tokens"], counts["cache_write_tokens"]
    reasoning = counts["reasoning_tokens"]
    if inp is not None and family in ("openai", "gemini"):  # input includes the cache tokens
        if cached is not None and cached > inp:
            flags.add(FLAG_CACHED_EXCEEDS_INPUT)
        if written is not None and written > inp:
            flags.add(FLAG_CACHE_WRITE_EXCEEDS_INPUT)
    # Gemini's OpenAI-compatible endpoint may count thoughts beside the completion tokens.
    gemini_compatible = family == "openai" and record.provider == "gemini"
    openai_output = family == "openai" and not gemini_compatible  # output includes reasoning
    if openai_output and out is not None and reasoning is not None and reasoning > out:
        flags.add(FLAG_REASONING_EXCEEDS_OUTPUT)
    if inp is not None and out is not None and total is not None:
        plain = inp + out
        if family == "gemini":
            # total = prompt + candidates + thoughts + tool-use prompt (not recorded): only a
            # total below the recorded parts is inconsistent.
            mismatch = total < plain + (reasoning or 0)
        elif family == "bedrock":
            # Bedrock's total counts the cache reads and writes beside input and output.
            mismatch = total not in (plain, plain + (cached or 0) + (written or 0))
        elif gemini_compatible:
            mismatch = total not in (plain, plain + (reasoning or 0))
        elif family == "anthropic":
            mismatch = False  # Anthropic reports no total; one from elsewhere is not judged
        else:
            mismatch = total != plain
        if mismatch:
            flags.add(FLAG_TOTAL_MISMATCH)
    return sorted(flags)

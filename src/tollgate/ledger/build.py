"""Building a request's UsageRecord from what the request path learnt (no I/O, no state).

The processor decides *when* a request is over; these functions decide *what* its record
says. Every string handed in is storable already (made so where it entered the request
path); a count or unit that cannot be stored is left unset and flagged in ``usage_flags``.
"""

from __future__ import annotations

import math
import re

from tollgate.metering.usage import TOKEN_FIELDS, ParsedResponse
from tollgate.policy.attribution import RequestAttribution
from tollgate.v1 import usage_pb2

__all__ = [
    "FLAG_OUT_OF_RANGE_TOKENS",
    "FLAG_OUT_OF_RANGE_UNITS",
    "fill_attribution",
    "fill_usage",
    "traceparent",
]

# What a UsageRecord's int64 token fields can hold.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# usage_flags set here: a reported value that cannot be stored was left unset.
FLAG_OUT_OF_RANGE_TOKENS = "out_of_range_tokens"
FLAG_OUT_OF_RANGE_UNITS = "out_of_range_units"

_TRACEPARENT = re.compile(rb"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def traceparent(value: bytes | None) -> str | None:
    """A W3C ``traceparent`` of the version-00 shape, else None (never stored as sent)."""
    if value is None or not _TRACEPARENT.fullmatch(value.strip()):
        return None
    return value.strip().decode("ascii")


def fill_attribution(record: usage_pb2.UsageRecord, att: RequestAttribution) -> None:
    """Tags, limit ids, use case and the logging switch the request's headers named."""
    record.tags.extend(att.tags)
    record.limit_ids.extend(att.limit_ids)
    record.logging_disabled = att.logging_disabled
    if att.use_case_id is not None:
        record.use_case_id = att.use_case_id
    if att.use_case_name is not None:
        record.use_case_name = att.use_case_name
    if att.use_case_version is not None:
        record.use_case_version = att.use_case_version


def fill_usage(record: usage_pb2.UsageRecord, parsed: ParsedResponse) -> None:
    """Token counts and units as the provider reported them; what cannot be stored is
    left unset and flagged."""
    units_dropped = False
    for unit, amount in parsed.units.items():
        try:
            number = float(amount)
        except OverflowError:
            number = math.inf
        if math.isfinite(number):
            record.units[unit] = number
        else:
            units_dropped = True
    usage = parsed.usage
    tokens_dropped = False
    for name in TOKEN_FIELDS:
        value = getattr(usage, name)
        if value is None:
            continue
        if _INT64_MIN <= value <= _INT64_MAX:
            setattr(record, name, value)
        else:
            tokens_dropped = True
    if tokens_dropped:
        record.usage_flags.append(FLAG_OUT_OF_RANGE_TOKENS)
    if units_dropped:
        record.usage_flags.append(FLAG_OUT_OF_RANGE_UNITS)

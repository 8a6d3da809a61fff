"""What the ledger writer tells the rest of the world about each stored batch.

Both observers run in the writer's worker thread after a batch is committed, so the request
path pays nothing for them and what they report agrees with the ledger:

- :class:`UsageCounters`: tokens and cost by provider and model, for Prometheus (never by
  user: that is what the ledger is for; a label per user would be unbounded).
- :class:`RequestLog`: one log line per request (``tollgate.requests`` at info) with the
  request id, end user, key id, provider, model, status, outcome, tokens, cost and latency.
  Never a key, a token or a body: none of those is in a :class:`UsageRecord`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from tollgate.ledger.records import OUTCOME_NAMES, UsageRecord
from tollgate.stats import BoundedCounter

__all__ = ["TOKEN_TYPES", "RequestLog", "UsageCounters", "request_fields"]

# Metric label ``type`` → UsageRecord field.
TOKEN_TYPES: tuple[tuple[str, str], ...] = (
    ("input", "input_tokens"),
    ("output", "output_tokens"),
    ("cached_input", "cached_input_tokens"),
    ("cache_write", "cache_write_tokens"),
    ("reasoning", "reasoning_tokens"),
)

request_log = logging.getLogger("tollgate.requests")


class UsageCounters:
    """Tokens by (provider, model, type) and USD by (provider, model), as stored."""

    def __init__(self, max_series: int = 2000) -> None:
        self.tokens = BoundedCounter(max_series, keep=(0, 2))
        self.cost_usd = BoundedCounter(max_series, keep=(0,))

    def __call__(
        self, records: Sequence[UsageRecord], costs: Sequence[Decimal | str | None]
    ) -> None:
        for record, cost in zip(records, costs, strict=True):
            provider, model = record.provider, record.model
            for kind, name in TOKEN_TYPES:
                if record.HasField(name):
                    self.tokens.add((provider, model, kind), getattr(record, name))
            if cost is not None:
                self.cost_usd.add((provider, model), float(cost))


def request_fields(record: UsageRecord, cost: Decimal | str | None) -> dict[str, Any]:
    """The log fields of one request; a value the provider did not report is left out."""
    fields: dict[str, Any] = {
        "request_id": record.request_id,
        "outcome": OUTCOME_NAMES.get(record.outcome, "unknown"),
    }
    for name in ("end_user_id", "key_id", "provider", "model", "endpoint", "block_reason"):
        if record.HasField(name):
            fields[name] = getattr(record, name)
    for name in ("status_code", "latency_ms", "ttft_ms"):
        if record.HasField(name):
            fields[name] = getattr(record, name)
    fields["streamed"] = record.streamed
    for _, name in TOKEN_TYPES:
        if record.HasField(name):
            fields[name] = getattr(record, name)
    if record.HasField("total_tokens"):
        fields["total_tokens"] = record.total_tokens
    if cost is not None:
        fields["cost_usd"] = str(cost)
    return fields


class RequestLog:
    """One ``tollgate.requests`` line per stored request, with its fields in ``extra``
    (the JSON formatter makes them keys; the text one appends them as ``key=value``)."""

    def __call__(
        self, records: Sequence[UsageRecord], costs: Sequence[Decimal | str | None]
    ) -> None:
        if not request_log.isEnabledFor(logging.INFO):
            return
        for record, cost in zip(records, costs, strict=True):
            request_log.info("request", extra={"fields": request_fields(record, cost)})

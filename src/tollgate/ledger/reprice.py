"""`tollgate reprice`: fills in the cost of requests recorded while their price was unknown.

Rows with ``cost_usd IS NULL`` (not blocked, with usage) in a time range are priced again with
the current price book (genai-prices plus operator overrides), including those whose usage the
price library refused (``pricing_error`` set by the writer): a row priced now has its
``pricing_error`` cleared, one that still cannot be priced keeps it. Each batch updates the
rows, the ``daily_usage`` rollup and the limits' spend (``ledger.limits``) in one
transaction, and only rows still NULL are touched, so a repeated or concurrent run never
counts a cost twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.rows import class_row

from tollgate.ledger.limits import RECHARGE_PRICED
from tollgate.ledger.rollups import reprice_ctes
from tollgate.pricing import PriceBook

__all__ = ["RepriceResult", "reprice"]

_BATCH = 1000
_MAX_COST = Decimal(10) ** 10


@dataclass
class _Unpriced:
    request_id: Any
    created_at: datetime
    provider: str | None
    model: str | None
    input_tokens: int | None
    cached_input_tokens: int | None
    cache_write_tokens: int | None
    output_tokens: int | None
    reasoning_tokens: int | None
    units: dict[str, float] | None


@dataclass
class RepriceResult:
    examined: int = 0
    priced: int = 0
    cost_added: Decimal = Decimal(0)


_SELECT = """
SELECT request_id, created_at, provider, model, input_tokens, cached_input_tokens,
       cache_write_tokens, output_tokens, reasoning_tokens, units
FROM tollgate.requests
WHERE cost_usd IS NULL AND outcome <> 'blocked' AND model IS NOT NULL
  AND created_at >= %(since)s AND created_at < %(until)s
  AND (created_at, request_id) > (%(after_at)s, %(after_id)s)
ORDER BY created_at, request_id
LIMIT %(limit)s
"""

# Only rows still unpriced are updated; the rollup gets exactly what the update set.
_APPLY = f"""
WITH priced AS (
    UPDATE tollgate.requests AS r SET cost_usd = v.cost, pricing_error = NULL
    FROM (SELECT unnest(%(ids)s::uuid[]) AS request_id,
                 unnest(%(ats)s::timestamptz[]) AS created_at,
                 unnest(%(costs)s::numeric[]) AS cost) AS v
    WHERE r.request_id = v.request_id AND r.created_at = v.created_at AND r.cost_usd IS NULL
    RETURNING r.created_at, r.end_user_id, r.key_id, r.provider, r.model, r.cost_usd,
              r.outcome, r.limit_ids, r.input_tokens, r.output_tokens
), recharged AS ({RECHARGE_PRICED}
),
{reprice_ctes("priced")}
SELECT count(*), coalesce(sum(cost_usd), 0) FROM priced
"""


async def reprice(
    conn: psycopg.AsyncConnection[Any],
    prices: PriceBook,
    *,
    since: datetime,
    until: datetime,
) -> RepriceResult:
    """Price the unpriced rows created in ``[since, until)``."""
    result = RepriceResult()
    after_at, after_id = since, "00000000-0000-0000-0000-000000000000"
    while True:
        async with conn.cursor(row_factory=class_row(_Unpriced)) as cur:
            await cur.execute(
                _SELECT,
                {
                    "since": since,
                    "until": until,
                    "after_at": after_at,
                    "after_id": after_id,
                    "limit": _BATCH,
                },
            )
            rows = await cur.fetchall()
        if not rows:
            return result
        result.examined += len(rows)
        after_at, after_id = rows[-1].created_at, rows[-1].request_id
        ids, ats, costs = [], [], []
        for row in rows:
            try:
                cost = prices.cost(
                    row.provider,
                    row.model,
                    input_tokens=row.input_tokens,
                    output_tokens=row.output_tokens,
                    cached_input_tokens=row.cached_input_tokens,
                    cache_write_tokens=row.cache_write_tokens,
                    reasoning_tokens=row.reasoning_tokens,
                    units=row.units or {},
                )
            except (ValueError, TypeError, ArithmeticError):  # genai-prices refuses the usage
                continue  # still refused: the row keeps its pricing_error
            if cost is not None and abs(cost) < _MAX_COST:  # cost_usd is numeric(20, 10)
                ids.append(row.request_id)
                ats.append(row.created_at)
                costs.append(cost)
        if not ids:
            continue
        async with conn.transaction():
            fetched = await (
                await conn.execute(_APPLY, {"ids": ids, "ats": ats, "costs": costs})
            ).fetchone()
        if fetched is not None:
            result.priced += int(fetched[0])
            result.cost_added += Decimal(fetched[1])

"""Limits in the ledger: their definitions, and the spend each period has charged to them.

Spend lives in ``tollgate.limit_spend`` and is only ever made of ledger rows:

* the writer charges each batch's *inserted* rows in the transaction that inserts them
  (:data:`CHARGE_INSERTED`, a CTE of the writer's statement), so a replayed journal, whose
  rows are already there, charges nothing twice;
* creating a limit (or changing what it charges: scope, subject, period, time zone) fills
  its current period from the rows already in the ledger, under a lock that waits for the
  writers' open transactions and holds new ones until it commits. Every row is then counted
  by exactly one of the two.

So for the current period, a limit's spend equals the sum of its ledger rows, always
(``tests/integration/test_limits_ledger.py``). Blocked rows are not charged: nothing reached
a provider.

Functions that change limits run their own transaction: give them a connection in autocommit
mode (or one with no transaction open), or the fill's lock is held until the caller commits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:  # the CLI reads the choices below without loading psycopg
    import psycopg

__all__ = [
    "ALERT_CROSSED",
    "CHARGE_INSERTED",
    "DEFAULT_USER_BUDGET_ID",
    "MEASURES",
    "MODES",
    "PERIODS",
    "RECHARGE_PRICED",
    "SCOPES",
    "Limit",
    "LimitError",
    "PeriodSpend",
    "create_limit",
    "current_period",
    "delete_limit",
    "get_limit",
    "limit_spend",
    "list_limits",
    "parse_budget",
    "sync_default_budget",
    "update_limit",
]

SCOPES: Final = ("user", "key", "global", "named")
MEASURES: Final = ("usd", "tokens", "requests")
PERIODS: Final = ("minute", "hour", "day", "week", "month", "total")
MODES: Final = ("block", "warn")
_LIMIT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_MAX_SUBJECT_CHARS = 256

_FIELDS = (
    "limit_id, scope, subject, measure, maximum, period, time_zone, mode, thresholds,"
    " created_at, updated_at"
)


class LimitError(ValueError):
    """A limit that cannot be stored as given (the message says why)."""


@dataclass(frozen=True)
class Limit:
    limit_id: str
    scope: str
    subject: str | None
    measure: str
    maximum: Decimal
    period: str
    time_zone: str
    mode: str
    thresholds: list[Decimal]
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class PeriodSpend:
    """What one subject has spent under a limit in its current period."""

    subject: str
    usd: Decimal
    tokens: int
    requests: int
    unpriced: int

    def of(self, measure: str) -> Decimal:
        if measure == "usd":
            return self.usd
        return Decimal(self.tokens if measure == "tokens" else self.requests)


def _charged_groups(source: str, where: str) -> str:
    """The spend the rows of ``source`` (a relation with the ledger's columns, aliased ``r``)
    add to each (limit, subject, period) they are charged to."""
    return f"""
    SELECT l.limit_id,
           CASE WHEN l.subject IS NULL AND l.scope = 'user' THEN r.end_user_id
                WHEN l.subject IS NULL AND l.scope = 'key' THEN r.key_id
                ELSE '' END AS subject,
           tollgate.limit_period_start(l.period, l.time_zone, r.created_at) AS period_start,
           coalesce(sum(r.cost_usd), 0) AS usd,
           coalesce(sum(coalesce(r.input_tokens, 0) + coalesce(r.output_tokens, 0)), 0)
               AS tokens,
           count(*) AS requests,
           count(*) FILTER (WHERE r.cost_usd IS NULL) AS unpriced
    FROM {source} r
    JOIN tollgate.limits l ON (
        l.scope = 'global'
        OR (l.scope = 'user' AND r.end_user_id = coalesce(l.subject, r.end_user_id))
        OR (l.scope = 'key' AND r.key_id = coalesce(l.subject, r.key_id))
        OR (l.scope = 'named' AND l.limit_id = ANY (r.limit_ids)))
    WHERE r.outcome <> 'blocked' AND {where}
    GROUP BY 1, 2, 3"""


def _charge_sql(source: str, where: str) -> str:
    """``INSERT … ON CONFLICT`` adding :func:`_charged_groups` to the spend."""
    return f"""
    INSERT INTO tollgate.limit_spend AS s
        (limit_id, subject, period_start, usd, tokens, requests, unpriced)
    {_charged_groups(source, where)}
    -- Concurrent batches lock spend rows in one order, so they cannot deadlock.
    ORDER BY 1, 2, 3
    ON CONFLICT (limit_id, subject, period_start) DO UPDATE SET
        usd = s.usd + EXCLUDED.usd,
        tokens = s.tokens + EXCLUDED.tokens,
        requests = s.requests + EXCLUDED.requests,
        unpriced = s.unpriced + EXCLUDED.unpriced"""


#: The writer's CTE body: charge the rows its statement inserted (CTE ``inserted``),
#: returning the spend rows as they are after it.
CHARGE_INSERTED: Final = (
    _charge_sql("inserted", "true")
    + "\n    RETURNING s.limit_id, s.subject, s.period_start, s.usd, s.tokens, s.requests"
)

#: The writer's CTE body after CHARGE_INSERTED (CTE ``charged``): the thresholds those spend
#: rows crossed for the first time this period, recorded once (the primary key) and returned.
ALERT_CROSSED: Final = """
    INSERT INTO tollgate.limit_alerts AS a
        (limit_id, subject, period_start, threshold, spent, maximum)
    SELECT c.limit_id, c.subject, c.period_start, t.threshold, x.spent, l.maximum
    FROM charged c
    JOIN tollgate.limits l USING (limit_id)
    CROSS JOIN LATERAL (SELECT CASE l.measure WHEN 'usd' THEN c.usd
                                              WHEN 'tokens' THEN c.tokens
                                              ELSE c.requests END AS spent) x
    CROSS JOIN LATERAL unnest(l.thresholds) AS t(threshold)
    WHERE x.spent >= t.threshold * l.maximum
    ORDER BY 1, 2, 3, 4
    ON CONFLICT DO NOTHING
    RETURNING a.limit_id, a.subject, a.period_start, a.threshold, a.spent, a.maximum,
              (SELECT l2.measure FROM tollgate.limits l2 WHERE l2.limit_id = a.limit_id)
                  AS measure"""

#: `tollgate reprice`'s CTE body: the rows it priced (CTE ``priced``, whose cost was NULL)
#: move from unpriced to their cost in every spend that counted them. A spend row holds all
#: its ledger rows (module docstring), so there is one wherever such a row was counted.
RECHARGE_PRICED: Final = f"""
    UPDATE tollgate.limit_spend AS s
    SET usd = s.usd + p.usd, unpriced = s.unpriced - p.requests
    FROM ({_charged_groups("priced", "true")}) AS p
    WHERE (s.limit_id, s.subject, s.period_start) = (p.limit_id, p.subject, p.period_start)
    RETURNING 1"""

# Fill one limit's current period from the ledger (see the module docstring).
_BACKFILL = _charge_sql(
    "tollgate.requests",
    "l.limit_id = %(limit_id)s"
    " AND r.created_at >= tollgate.limit_period_start(l.period, l.time_zone, now())",
)
# Waits for the writers' open transactions and holds new ones until the caller commits
# (SHARE conflicts with the ROW EXCLUSIVE lock an INSERT takes).
_HOLD_WRITERS = "LOCK TABLE tollgate.requests IN SHARE MODE"


def _checked_id(limit_id: str) -> str:
    if not _LIMIT_ID.fullmatch(limit_id):
        raise LimitError(
            "a limit id is 1 to 128 characters: letters, digits and . _ : - "
            "(starting with a letter or digit)"
        )
    return limit_id


def _checked_maximum(maximum: str | Decimal | float) -> Decimal:
    try:
        value = Decimal(str(maximum))
    except InvalidOperation:
        raise LimitError(f"not a number: {maximum!r}") from None
    if not value.is_finite() or value < 0:
        raise LimitError("a limit's maximum is a finite number of at least 0")
    return value


def _checked_thresholds(thresholds: list[str] | list[Decimal] | None) -> list[Decimal]:
    if thresholds is None:
        return [Decimal("0.8"), Decimal("1.0")]
    values = sorted({_checked_maximum(t) for t in thresholds})
    if not values or values[0] <= 0:
        raise LimitError("alert thresholds are fractions of the maximum above 0 (e.g. 0.8,1)")
    return values


def _checked(fields: dict[str, Any]) -> dict[str, Any]:
    scope, subject = fields["scope"], fields["subject"]
    if scope not in SCOPES:
        raise LimitError(f"scope must be one of {', '.join(SCOPES)}")
    if fields["measure"] not in MEASURES:
        raise LimitError(f"measure must be one of {', '.join(MEASURES)}")
    if fields["period"] not in PERIODS:
        raise LimitError(f"period must be one of {', '.join(PERIODS)}")
    if fields["mode"] not in MODES:
        raise LimitError(f"mode must be one of {', '.join(MODES)}")
    if subject is not None:
        if scope not in ("user", "key"):
            raise LimitError("only user and key limits have a subject")
        if not subject or len(subject) > _MAX_SUBJECT_CHARS:
            raise LimitError(f"a subject is 1 to {_MAX_SUBJECT_CHARS} characters")
    fields["maximum"] = _checked_maximum(fields["maximum"])
    fields["thresholds"] = _checked_thresholds(fields["thresholds"])
    return fields


async def _check_time_zone(conn: psycopg.AsyncConnection[Any], time_zone: str) -> None:
    cur = await conn.execute("SELECT count(*) FROM pg_timezone_names WHERE name = %s", (time_zone,))
    row = await cur.fetchone()
    if not row or not row[0]:
        raise LimitError(f"unknown time zone {time_zone!r} (an IANA name such as Europe/Paris)")


async def _refill(conn: psycopg.AsyncConnection[Any], limit_id: str) -> None:
    await conn.execute(_HOLD_WRITERS)
    await conn.execute("DELETE FROM tollgate.limit_spend WHERE limit_id = %s", (limit_id,))
    await conn.execute(_BACKFILL, {"limit_id": limit_id})


async def create_limit(
    conn: psycopg.AsyncConnection[Any],
    *,
    limit_id: str,
    scope: str,
    measure: str,
    maximum: str | Decimal | float,
    period: str,
    subject: str | None = None,
    time_zone: str = "UTC",
    mode: str = "block",
    thresholds: list[str] | list[Decimal] | None = None,
) -> Limit:
    """Store a new limit and charge it its current period's ledger rows."""
    fields = _checked(
        {
            "limit_id": _checked_id(limit_id),
            "scope": scope,
            "subject": subject,
            "measure": measure,
            "maximum": maximum,
            "period": period,
            "time_zone": time_zone,
            "mode": mode,
            "thresholds": thresholds,
        }
    )
    async with conn.transaction():
        await _check_time_zone(conn, time_zone)
        cur = await conn.execute(
            "INSERT INTO tollgate.limits (limit_id, scope, subject, measure, maximum, period,"
            " time_zone, mode, thresholds) VALUES (%(limit_id)s, %(scope)s, %(subject)s,"
            " %(measure)s, %(maximum)s, %(period)s, %(time_zone)s, %(mode)s, %(thresholds)s)"
            " ON CONFLICT DO NOTHING RETURNING limit_id",
            fields,
        )
        if await cur.fetchone() is None:
            raise LimitError(f"a limit {limit_id!r} exists already")
        await _refill(conn, limit_id)
    found = await get_limit(conn, limit_id)
    assert found is not None
    return found


async def update_limit(
    conn: psycopg.AsyncConnection[Any], limit_id: str, **changes: Any
) -> Limit | None:
    """Change some of a limit's fields (None values are left as they are); None when there
    is no such limit. Changing what it charges refills its current period from the ledger."""
    async with conn.transaction():
        current = await get_limit(conn, limit_id, for_update=True)
        if current is None:
            return None
        await _update(conn, current, changes)
    return await get_limit(conn, limit_id)


async def _update(
    conn: psycopg.AsyncConnection[Any], current: Limit, changes: dict[str, Any]
) -> None:
    limit_id = current.limit_id
    fields: dict[str, Any] = {
        "limit_id": limit_id,
        "scope": current.scope,
        "subject": current.subject,
        "measure": current.measure,
        "maximum": current.maximum,
        "period": current.period,
        "time_zone": current.time_zone,
        "mode": current.mode,
        "thresholds": current.thresholds,
    }
    clear_subject = changes.pop("clear_subject", False)
    fields.update({k: v for k, v in changes.items() if v is not None})
    if clear_subject:
        fields["subject"] = None
    _checked(fields)
    await _check_time_zone(conn, fields["time_zone"])
    recharge = any(
        fields[k] != getattr(current, k) for k in ("scope", "subject", "period", "time_zone")
    )
    await conn.execute(
        "UPDATE tollgate.limits SET scope = %(scope)s, subject = %(subject)s,"
        " measure = %(measure)s, maximum = %(maximum)s, period = %(period)s,"
        " time_zone = %(time_zone)s, mode = %(mode)s, thresholds = %(thresholds)s,"
        " updated_at = now() WHERE limit_id = %(limit_id)s",
        fields,
    )
    if recharge:
        await _refill(conn, limit_id)


async def delete_limit(conn: psycopg.AsyncConnection[Any], limit_id: str) -> bool:
    async with conn.transaction():
        # The writers first: one charging this limit holds its spend rows and a key-share lock
        # on it, which the delete (and its cascade) would wait for while it waits for ours.
        await conn.execute(_HOLD_WRITERS)
        cur = await conn.execute(
            "DELETE FROM tollgate.limits WHERE limit_id = %s RETURNING limit_id", (limit_id,)
        )
        return await cur.fetchone() is not None


#: The limit `default_user_budget` configures.
DEFAULT_USER_BUDGET_ID: Final = "config:default-user-budget"
_BUDGET = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s+(usd|tokens|requests)\s*/\s*([a-z]+)\s*")


def parse_budget(text: str) -> tuple[Decimal, str, str]:
    """``"5 usd/day"`` → (maximum, measure, period); LimitError when it is not one."""
    found = _BUDGET.fullmatch(text.lower())
    if found is None or found[3] not in PERIODS:
        raise LimitError(
            f"not a budget: {text!r} (AMOUNT MEASURE/PERIOD, e.g. '5 usd/day'; measures"
            f" {', '.join(MEASURES)}; periods {', '.join(PERIODS)})"
        )
    return Decimal(found[1]), found[2], found[3]


async def sync_default_budget(conn: psycopg.AsyncConnection[Any], budget: str) -> str:
    """Make :data:`DEFAULT_USER_BUDGET_ID` what ``budget`` says (delete it when empty);
    returns what was done: created, updated, deleted or unchanged."""
    current = await get_limit(conn, DEFAULT_USER_BUDGET_ID)
    if not budget.strip():
        if current is None:
            return "unchanged"
        await delete_limit(conn, DEFAULT_USER_BUDGET_ID)
        return "deleted"
    maximum, measure, period = parse_budget(budget)
    if current is None:
        await create_limit(
            conn,
            limit_id=DEFAULT_USER_BUDGET_ID,
            scope="user",
            measure=measure,
            maximum=maximum,
            period=period,
        )
        return "created"
    wanted = ("user", None, measure, maximum, period, "UTC", "block")
    have = (
        current.scope,
        current.subject,
        current.measure,
        current.maximum,
        current.period,
        current.time_zone,
        current.mode,
    )
    if have == wanted:
        return "unchanged"
    await update_limit(
        conn,
        DEFAULT_USER_BUDGET_ID,
        scope="user",
        clear_subject=True,
        measure=measure,
        maximum=maximum,
        period=period,
        time_zone="UTC",
        mode="block",
    )
    return "updated"


async def get_limit(
    conn: psycopg.AsyncConnection[Any], limit_id: str, *, for_update: bool = False
) -> Limit | None:
    from psycopg.rows import class_row

    # NO KEY UPDATE: the writers' foreign-key checks (KEY SHARE) on the row go on meanwhile.
    lock = " FOR NO KEY UPDATE" if for_update else ""
    async with conn.cursor(row_factory=class_row(Limit)) as cur:
        await cur.execute(
            f"SELECT {_FIELDS} FROM tollgate.limits WHERE limit_id = %s{lock}", (limit_id,)
        )
        return await cur.fetchone()


async def list_limits(conn: psycopg.AsyncConnection[Any]) -> list[Limit]:
    from psycopg.rows import class_row

    async with conn.cursor(row_factory=class_row(Limit)) as cur:
        await cur.execute(f"SELECT {_FIELDS} FROM tollgate.limits ORDER BY limit_id")
        return await cur.fetchall()


async def current_period(
    conn: psycopg.AsyncConnection[Any], limit: Limit
) -> tuple[datetime, datetime | None]:
    """(start of the limit's current period — the epoch for 'total' —, when it resets)."""
    cur = await conn.execute(
        "SELECT tollgate.limit_period_start(%(period)s, %(tz)s, now()),"
        " CASE WHEN %(period)s = 'total' THEN NULL ELSE"
        " (date_trunc(%(period)s, now() AT TIME ZONE %(tz)s)"
        "  + ('1 ' || %(period)s)::interval) AT TIME ZONE %(tz)s END",
        {"period": limit.period, "tz": limit.time_zone},
    )
    row = await cur.fetchone()
    assert row is not None
    return row[0], row[1]


async def limit_spend(
    conn: psycopg.AsyncConnection[Any], limit: Limit, subject: str | None = None
) -> tuple[datetime | None, datetime | None, list[PeriodSpend]]:
    """(start of the current period, when it resets, spend by subject in it — one entry ''
    for a limit with one spend, or one per user/key for a limit without a subject, the
    largest first; only ``subject``'s when given)."""
    from psycopg.rows import class_row

    start, reset = await current_period(conn, limit)
    async with conn.cursor(row_factory=class_row(PeriodSpend)) as cur:
        await cur.execute(
            "SELECT subject, usd, tokens, requests, unpriced FROM tollgate.limit_spend"
            " WHERE limit_id = %(limit_id)s AND period_start = %(start)s"
            " AND (%(subject)s::text IS NULL OR subject = %(subject)s)"
            " ORDER BY usd DESC, tokens DESC, requests DESC, subject",
            {"limit_id": limit.limit_id, "start": start, "subject": subject},
        )
        spent = await cur.fetchall()
    return (None if limit.period == "total" else start), reset, spent

"""The dashboard's queries: what each page and API call reads, and from where.

* The **log** reads ``tollgate.requests`` newest first through its time, user, key and
  not-ok indexes, a page at a time with a keyset cursor ``(created_at, request_id)`` (never
  OFFSET: page 1,000 costs what page 1 does). The CSV export is one ``COPY (SELECT …) TO
  STDOUT``: Postgres formats the rows and they are passed on as they arrive.
* **Aggregates** (users, a user's page, the overview) read the rollups: whole calendar
  months of a period from ``monthly_users``, plus or minus days from ``daily_users``, the
  time series and top models from ``daily_totals``. None of them scans ``requests``.

Every query takes a :class:`Scope`: a viewer's gateway key is added to every WHERE here, from
the principal, whatever the query string asked for.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import dataclasses
import uuid
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import class_row, dict_row

from tollgate.ledger.limits import Limit, PeriodSpend, current_period, list_limits
from tollgate.ledger.queries import RequestRow, row_conditions

__all__ = [
    "OUTCOMES",
    "USER_SORTS",
    "LogFilter",
    "LogPage",
    "ParamError",
    "Period",
    "Scope",
    "UserRow",
    "copy_csv",
    "fetch_log",
]

OUTCOMES = (
    "ok",
    "blocked",
    "upstream_error",
    "client_aborted",
    "usage_missing",
    "internal_error",
)
MAX_PAGE = 500
MAX_TEXT = 300  # longest filter value taken (ids are at most 255 characters)
REQUEST_COLUMNS = tuple(f.name for f in fields(RequestRow))


class ParamError(ValueError):
    """A query parameter that cannot be used; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class ScopeError(PermissionError):
    """A viewer asked for another key's rows."""


@dataclass(frozen=True)
class Scope:
    key_id: str | None = None  # None: every key (the admin)

    def key_clause(self) -> tuple[sql.Composable, list[Any]]:
        if self.key_id is None:
            return sql.SQL("TRUE"), []
        return sql.SQL("key_id = %s"), [self.key_id]

    def check_key(self, asked: str | None) -> None:
        if self.key_id is not None and asked is not None and asked != self.key_id:
            raise ScopeError(f"this viewer token sees gateway key {self.key_id} only")


def _text(query: Mapping[str, str], name: str) -> str | None:
    value = query.get(name)
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if len(value) > MAX_TEXT or "\x00" in value:
        raise ParamError(name, f"{name} must be at most {MAX_TEXT} characters, without NUL")
    return value


def _instant(query: Mapping[str, str], name: str) -> datetime | None:
    text = _text(query, name)
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ParamError(
            name, f"{name} must be an ISO 8601 date or date-time, got {text!r}"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _day(query: Mapping[str, str], name: str) -> date | None:
    text = _text(query, name)
    if text is None:
        return None
    try:
        return date.fromisoformat(text[:10]) if len(text) >= 10 else date.fromisoformat(text)
    except ValueError:
        raise ParamError(name, f"{name} must be a date (YYYY-MM-DD), got {text!r}") from None


def _flag(query: Mapping[str, str], name: str) -> bool:
    text = (query.get(name) or "").strip().lower()
    if text in ("", "0", "false", "no", "off"):
        return False
    if text in ("1", "true", "yes", "on"):
        return True
    raise ParamError(name, f"{name} must be true or false, got {text!r}")


def page_size(query: Mapping[str, str], default: int = 50) -> int:
    text = (query.get("limit") or "").strip()
    if not text:
        return default
    if not text.isdigit() or not 1 <= int(text) <= MAX_PAGE:
        raise ParamError("limit", f"limit must be a whole number from 1 to {MAX_PAGE}")
    return int(text)


# -- the log ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogFilter:
    """Which ledger rows the log (and its CSV) shows; None means "any"."""

    user: str | None = None
    unattributed: bool = False  # only rows without an end user
    key: str | None = None
    provider: str | None = None
    model: str | None = None
    endpoint: str | None = None
    tag: str | None = None
    outcome: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    PARAMS = (
        "user",
        "unattributed",
        "key",
        "provider",
        "model",
        "endpoint",
        "tag",
        "outcome",
        "since",
        "until",
    )

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> LogFilter:
        outcome = _text(query, "outcome")
        if outcome is not None and outcome not in OUTCOMES:
            raise ParamError("outcome", f"outcome must be one of {', '.join(OUTCOMES)}")
        found = cls(
            user=_text(query, "user"),
            unattributed=_flag(query, "unattributed"),
            key=_text(query, "key"),
            provider=_text(query, "provider"),
            model=_text(query, "model"),
            endpoint=_text(query, "endpoint"),
            tag=_text(query, "tag"),
            outcome=outcome,
            since=_instant(query, "since"),
            until=_instant(query, "until"),
        )
        if found.user is not None and found.unattributed:
            raise ParamError("unattributed", "give user or unattributed, not both")
        return found

    def query(self) -> dict[str, str]:
        """The filter as URL parameters (only the ones set)."""
        out: dict[str, str] = {}
        for name in self.PARAMS:
            value = getattr(self, name)
            if value is None or value is False:
                continue
            out[name] = (
                "true"
                if value is True
                else value.isoformat()
                if isinstance(value, datetime)
                else str(value)
            )
        return out

    def where(self, scope: Scope) -> tuple[sql.Composable, list[Any]]:
        scope.check_key(self.key)
        key_sql, key_params = scope.key_clause()
        cond, params = row_conditions(
            user=self.user,
            unattributed=self.unattributed,
            key=self.key,
            provider=self.provider,
            model=self.model,
            endpoint=self.endpoint,
            tag=self.tag,
            outcome=self.outcome,
            since=self.since,
            until=self.until,
        )
        return sql.SQL("{} AND {}").format(key_sql, cond), [*key_params, *params]


def encode_cursor(created_at: datetime, request_id: uuid.UUID) -> str:
    text = f"{created_at.astimezone(UTC).isoformat()}|{request_id}"
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def decode_cursor(text: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        at, _, rid = raw.partition("|")
        when = datetime.fromisoformat(at)
        if when.tzinfo is None:
            raise ValueError(at)
        return when, uuid.UUID(rid)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ParamError("cursor", "cursor is not one this API returned") from None


@dataclass(frozen=True)
class LogPage:
    rows: list[RequestRow]
    next_cursor: str | None


async def fetch_log(
    conn: psycopg.AsyncConnection[Any],
    where: LogFilter,
    scope: Scope,
    *,
    cursor: str | None = None,
    limit: int = 50,
) -> LogPage:
    """One page of the log, newest first, and the cursor of the next one (None: last)."""
    cond, params = where.where(scope)
    if cursor:
        at, rid = decode_cursor(cursor)
        # Spelled out rather than as a row comparison, so that created_at <= %s is an index
        # condition and a deep page starts where the last one ended.
        cond = sql.SQL("{} AND created_at <= %s AND (created_at < %s OR request_id < %s)").format(
            cond
        )
        params += [at, at, rid]
    query = sql.SQL(
        "SELECT * FROM tollgate.requests WHERE {}"
        " ORDER BY created_at DESC, request_id DESC LIMIT %s"
    ).format(cond)
    async with conn.cursor(row_factory=class_row(RequestRow)) as cur:
        await cur.execute(query, [*params, limit + 1])
        rows = await cur.fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    last = rows[-1] if rows else None
    return LogPage(rows, encode_cursor(last.created_at, last.request_id) if more and last else None)


# How each ledger column is written in the CSV export: times in ISO 8601 UTC, arrays joined
# by ';' (as `tollgate usage --format csv` does), units as JSON; everything else as Postgres
# prints it (numeric exactly, booleans as t/f → spelt true/false here for spreadsheets).
def _csv_expr(column: str) -> sql.Composable:
    ident = sql.Identifier(column)
    if column == "created_at":
        return sql.SQL(
            "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"')"
            " AS created_at"
        )
    if column in ("tags", "limit_ids", "usage_flags"):
        return sql.SQL("array_to_string({0}, ';') AS {0}").format(ident)
    if column in ("streamed", "logging_disabled"):
        return sql.SQL("CASE WHEN {0} THEN 'true' ELSE 'false' END AS {0}").format(ident)
    return ident


async def copy_csv(
    conn: psycopg.AsyncConnection[Any], where: LogFilter, scope: Scope
) -> AsyncGenerator[bytes, None]:
    """Every row of ``where`` as CSV with a header of the ledger's column names, newest
    first, in the chunks Postgres sends (constant memory, whatever the number of rows)."""
    cond, params = where.where(scope)
    select = sql.SQL(
        # Ordered by the table's columns, not the formatted created_at of the output (that
        # would sort every row before the first is sent instead of walking the time index).
        "SELECT {} FROM tollgate.requests WHERE {}"
        " ORDER BY requests.created_at DESC, requests.request_id DESC"
    ).format(sql.SQL(", ").join(_csv_expr(c) for c in REQUEST_COLUMNS), cond)
    statement = sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv, HEADER)").format(select)
    async with conn.cursor() as cur, cur.copy(statement, params) as copy:
        async for chunk in copy:
            yield bytes(chunk)


# -- periods and the rollups ----------------------------------------------------------------


def _month_start(day: date) -> date:
    return day.replace(day=1)


def _next_month(day: date) -> date:
    return (day.replace(day=28) + timedelta(days=4)).replace(day=1)


@dataclass(frozen=True)
class Piece:
    """Part of a period read from one rollup: whole months or days, added or taken away."""

    unit: str  # "month" or "day"
    since: date
    until: date
    sign: int  # +1, or -1 for days taken off a whole month


@dataclass(frozen=True)
class Period:
    """Whole UTC days ``[since, until)``."""

    since: date
    until: date
    today: date = dataclasses.field(default_factory=lambda: datetime.now(UTC).date())

    @classmethod
    def parse(cls, query: Mapping[str, str], today: date | None = None) -> Period:
        """``month=YYYY-MM``, or ``since``/``until`` dates (until exclusive; either may be
        left out), else the current month."""
        today = today or datetime.now(UTC).date()
        month = _text(query, "month")
        if month is not None:
            try:
                first = date.fromisoformat(f"{month}-01")
            except ValueError:
                raise ParamError("month", f"month must be YYYY-MM, got {month!r}") from None
            return cls(first, _next_month(first), today)
        since, until = _day(query, "since"), _day(query, "until")
        if since is None and until is None:
            return cls(_month_start(today), _next_month(today), today)
        until = until or today + timedelta(days=1)
        since = since or until - timedelta(days=30)
        if since >= until:
            raise ParamError("until", "until must be after since")
        if (until - since).days > 3700:
            raise ParamError("since", "a period is at most ten years")
        return cls(since, until, today)

    @property
    def is_month(self) -> bool:
        return self.since.day == 1 and self.until == _next_month(self.since)

    def label(self) -> str:
        if self.is_month:
            return f"{calendar.month_name[self.since.month]} {self.since.year}"
        last = self.until - timedelta(days=1)
        return f"{self.since.isoformat()} to {last.isoformat()}"

    def query(self) -> dict[str, str]:
        if self.is_month:
            return {"month": self.since.strftime("%Y-%m")}
        return {"since": self.since.isoformat(), "until": self.until.isoformat()}

    def log_query(self) -> dict[str, str]:
        """The same days as the log's since/until."""
        return {"since": self.since.isoformat(), "until": self.until.isoformat()}

    def pieces(self) -> list[Piece]:
        """The period as whole months plus or minus days, reading as few rollup rows as
        possible: a month the period covers for the most part is read whole, minus the days
        it leaves out (days after today hold nothing and cost nothing)."""
        out: list[Piece] = []
        horizon = self.today + timedelta(days=1)  # no row is newer than today
        month = _month_start(self.since)
        while month < self.until:
            end = _next_month(month)
            lo, hi = max(self.since, month), min(self.until, end)
            if (lo, hi) == (month, end):
                out.append(Piece("month", month, end, 1))
            else:
                left_out = [(month, lo), (hi, min(end, horizon))]
                left_out = [(a, b) for a, b in left_out if a < b]
                outside = sum((b - a).days for a, b in left_out)
                if outside < (min(hi, horizon) - lo).days:
                    out.append(Piece("month", month, end, 1))
                    out += [Piece("day", a, b, -1) for a, b in left_out]
                elif lo < min(hi, horizon):
                    out.append(Piece("day", lo, min(hi, horizon), 1))
            month = end
        return out


_SUMMED = (
    "requests",
    "blocked",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
    "cost_usd",
    "unpriced_requests",
)


def _users_source(
    period: Period, scope: Scope, user: str | None = None
) -> tuple[sql.Composable, list[Any]]:
    """The period's per-user rollup rows (monthly_users, daily_users) as one relation of
    ``end_user_id, key_id`` and the sums, signed (days taken off a month count negative)."""
    key_sql, key_params = scope.key_clause()
    user_sql: sql.Composable = sql.SQL("TRUE")
    user_params: list[Any] = []
    if user is not None:
        user_sql, user_params = sql.SQL("end_user_id = %s"), [user]
    parts: list[sql.Composable] = []
    params: list[Any] = []
    for piece in period.pieces():
        table, column = (
            ("monthly_users", "month") if piece.unit == "month" else ("daily_users", "day")
        )
        signed = sql.SQL(", ").join(
            sql.SQL("{} * {} AS {}").format(
                sql.Literal(piece.sign), sql.Identifier(c), sql.Identifier(c)
            )
            for c in _SUMMED
        )
        parts.append(
            sql.SQL(
                "SELECT end_user_id, key_id, {} FROM {} WHERE {} >= %s AND {} < %s AND {} AND {}"
            ).format(
                signed,
                sql.Identifier("tollgate", table),
                sql.Identifier(column),
                sql.Identifier(column),
                key_sql,
                user_sql,
            )
        )
        params += [piece.since, piece.until, *key_params, *user_params]
    if not parts:  # a period entirely in the future
        parts.append(
            sql.SQL("SELECT end_user_id, key_id, {} FROM tollgate.daily_users WHERE FALSE").format(
                sql.SQL(", ").join(sql.Identifier(c) for c in _SUMMED)
            )
        )
    return sql.SQL("({})").format(sql.SQL(" UNION ALL ").join(parts)), params


def _sums() -> sql.Composable:
    return sql.SQL(", ").join(
        sql.SQL("coalesce(sum({0}), 0)::{1} AS {0}").format(
            sql.Identifier(c), sql.SQL("numeric" if c == "cost_usd" else "bigint")
        )
        for c in _SUMMED
    )


@dataclass(frozen=True)
class UserRow:
    end_user_id: str | None  # None: requests without an end user
    requests: int
    blocked: int
    input_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    output_tokens: int
    reasoning_tokens: int
    total_tokens: int
    cost_usd: Decimal
    unpriced_requests: int


USER_SORTS = (
    "end_user_id",
    "requests",
    "blocked",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cost_usd",
)


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


async def fetch_users(
    conn: psycopg.AsyncConnection[Any],
    period: Period,
    scope: Scope,
    *,
    search: str | None = None,
    sort: str = "cost_usd",
    descending: bool = True,
    limit: int = 100,
) -> tuple[list[UserRow], int]:
    """Per-user totals over ``period`` (the requests without a user as one row) and how
    many users matched in all."""
    if sort not in USER_SORTS:
        raise ParamError("sort", f"sort must be one of {', '.join(USER_SORTS)}")
    source, params = _users_source(period, scope)
    cond: sql.Composable = sql.SQL("TRUE")
    if search:
        cond = sql.SQL("end_user_id ILIKE %s")
        params.append(_like(search))
    direction = sql.SQL("DESC" if descending else "ASC")
    order = sql.SQL("{} {} NULLS LAST, end_user_id").format(sql.Identifier(sort), direction)
    query = sql.SQL(
        "SELECT nullif(end_user_id, '') AS end_user_id, {}, count(*) OVER () AS matched"
        " FROM {} AS u WHERE {} GROUP BY u.end_user_id HAVING sum(requests) <> 0"
        " ORDER BY {} LIMIT %s"
    ).format(_sums(), source, cond, order)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, [*params, limit])
        found = await cur.fetchall()
    matched = int(found[0]["matched"]) if found else 0
    return [UserRow(**{k: v for k, v in r.items() if k != "matched"}) for r in found], matched


async def fetch_totals(
    conn: psycopg.AsyncConnection[Any], period: Period, scope: Scope, user: str | None = None
) -> UserRow:
    """The period's totals (one user's when ``user`` is given; '' for no user)."""
    source, params = _users_source(period, scope, user)
    query = sql.SQL("SELECT {} FROM {} AS u").format(_sums(), source)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, params)
        row = await cur.fetchone()
    assert row is not None
    return UserRow(end_user_id=user or None, **row)


def _day_source(
    table: str, period: Period, scope: Scope, user: str | None
) -> tuple[sql.Composable, list[Any]]:
    """Rows of a daily rollup in the period (and of one user), as ``WHERE`` and params."""
    key_sql, key_params = scope.key_clause()
    cond: list[sql.Composable] = [sql.SQL("day >= %s AND day < %s"), key_sql]
    params: list[Any] = [period.since, period.until, *key_params]
    if user is not None:
        cond.append(sql.SQL("end_user_id = %s"))
        params.append(user)
    where = sql.SQL("SELECT * FROM {} WHERE {}").format(
        sql.Identifier("tollgate", table), sql.SQL(" AND ").join(cond)
    )
    return where, params


async def fetch_top(
    conn: psycopg.AsyncConnection[Any],
    period: Period,
    scope: Scope,
    group: tuple[str, ...],
    *,
    user: str | None = None,
    limit: int = 10,
) -> list[dict[str, Any]]:
    """The period's totals grouped by ``group``, costliest first: users from the per-user
    rollups, models from daily_totals (one user's from daily_usage), keys per user from
    daily_users."""
    if group == ("end_user_id",):
        source, params = _users_source(period, scope, user)
    elif set(group) <= {"key_id", "provider", "model"} and group:
        table = "daily_totals" if user is None else "daily_usage"
        if user is not None and set(group) == {"key_id"}:
            table = "daily_users"
        select, params = _day_source(table, period, scope, user)
        source = sql.SQL("({})").format(select)
    else:
        raise ValueError(group)
    names = sql.SQL(", ").join(sql.Identifier(g) for g in group)
    shown = sql.SQL(", ").join(
        sql.SQL("nullif({0}, '') AS {0}").format(sql.Identifier(g)) for g in group
    )
    query = sql.SQL(
        "SELECT {}, {} FROM {} AS u GROUP BY {} HAVING sum(requests) <> 0"
        " ORDER BY cost_usd DESC, requests DESC, {} LIMIT %s"
    ).format(shown, _sums(), source, names, names)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, [*params, limit])
        return await cur.fetchall()


async def fetch_series(
    conn: psycopg.AsyncConnection[Any], period: Period, scope: Scope, user: str | None = None
) -> list[dict[str, Any]]:
    """Per day of ``period``: requests, blocked, unattributed, tokens and cost (every day,
    zeros included). All users from daily_totals; one user from daily_users."""
    if user is None:
        select, params = _day_source("daily_totals", period, scope, None)
        unattributed = sql.SQL("s.unattributed")
    else:
        select, params = _day_source("daily_users", period, scope, user)
        unattributed = sql.SQL("0")
    query = sql.SQL(
        "SELECT d::date AS day, coalesce(sum(s.requests), 0)::bigint AS requests,"
        " coalesce(sum(s.blocked), 0)::bigint AS blocked,"
        " coalesce(sum({}), 0)::bigint AS unattributed,"
        " coalesce(sum(s.total_tokens), 0)::bigint AS total_tokens,"
        " coalesce(sum(s.cost_usd), 0)::numeric AS cost_usd"
        " FROM generate_series(%s::date, %s::date - 1, interval '1 day') AS d"
        " LEFT JOIN ({}) AS s ON s.day = d::date"
        " GROUP BY 1 ORDER BY 1"
    ).format(unattributed, select)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, [period.since, period.until, *params])
        return await cur.fetchall()


DAILY_GROUPS = ("end_user_id", "key_id", "provider", "model")


async def fetch_daily(
    conn: psycopg.AsyncConnection[Any],
    period: Period,
    scope: Scope,
    *,
    group: tuple[str, ...] = (),
    user: str | None = None,
    key: str | None = None,
    provider: str | None = None,
    model: str | None = None,
    limit: int = 10_000,
) -> tuple[list[dict[str, Any]], bool]:
    """Sums per day (and per ``group`` columns), filtered, from the smallest rollup that has
    the columns asked for: daily_totals without users, daily_users without models, else
    daily_usage. At most ``limit`` rows, and whether there were more."""
    scope.check_key(key)
    by_user = user is not None or "end_user_id" in group
    by_model = provider is not None or model is not None or {"provider", "model"} & set(group)
    table = "daily_usage" if by_user and by_model else "daily_users" if by_user else "daily_totals"
    key_sql, key_params = scope.key_clause()
    clauses: list[sql.Composable] = [sql.SQL("day >= %s AND day < %s"), key_sql]
    params: list[Any] = [period.since, period.until, *key_params]
    for column, value in (
        ("end_user_id", user),
        ("key_id", key),
        ("provider", provider),
        ("model", model),
    ):
        if value is not None:
            clauses.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
            params.append(value)
    # Grouped and ordered by the table's columns (r.…), not the nullif() outputs of the same
    # name, so the rollup's key order serves the ORDER BY.
    keys = [sql.Identifier("r", "day"), *(sql.Identifier("r", g) for g in group)]
    shown = [
        sql.Identifier("r", "day"),
        *(sql.SQL("nullif(r.{0}, '') AS {0}").format(sql.Identifier(g)) for g in group),
    ]
    query = sql.SQL("SELECT {}, {} FROM {} AS r WHERE {} GROUP BY {} ORDER BY {} LIMIT %s").format(
        sql.SQL(", ").join(shown),
        _sums(),
        sql.Identifier("tollgate", table),
        sql.SQL(" AND ").join(clauses),
        sql.SQL(", ").join(keys),
        sql.SQL(", ").join(keys),
    )
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, [*params, limit + 1])
        rows = await cur.fetchall()
    return rows[:limit], len(rows) > limit  # (rows, whether more were left out)


# -- limits -------------------------------------------------------------------------------

MAX_LIMIT_SUBJECTS = 50


def visible_limit(limit: Limit, scope: Scope) -> bool:
    """A viewer sees the limits on its own key only: one whose spend is that key's."""
    if scope.key_id is None:
        return True
    return limit.scope == "key" and limit.subject in (None, scope.key_id)


@dataclass(frozen=True)
class LimitView:
    limit: Limit
    period_start: datetime | None
    reset_at: datetime | None
    spent: list[PeriodSpend]
    subjects: int  # subjects charged this period (more than ``spent`` when capped)


async def fetch_limits(conn: psycopg.AsyncConnection[Any], scope: Scope) -> list[LimitView]:
    """Every limit the scope may see with its current period and the largest spenders."""
    out: list[LimitView] = []
    for limit in await list_limits(conn):
        if not visible_limit(limit, scope):
            continue
        subject = scope.key_id if scope.key_id is not None and limit.subject is None else None
        period_start, reset = await current_period(conn, limit)
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                "SELECT count(*) AS n FROM tollgate.limit_spend"
                " WHERE limit_id = %(id)s AND period_start = %(start)s"
                " AND (%(subject)s::text IS NULL OR subject = %(subject)s)",
                {"id": limit.limit_id, "start": period_start, "subject": subject},
            )
            counted = await cur.fetchone()
        async with conn.cursor(row_factory=class_row(PeriodSpend)) as spend_cur:
            await spend_cur.execute(
                "SELECT subject, usd, tokens, requests, unpriced FROM tollgate.limit_spend"
                " WHERE limit_id = %(id)s AND period_start = %(start)s"
                " AND (%(subject)s::text IS NULL OR subject = %(subject)s)"
                " ORDER BY usd DESC, tokens DESC, requests DESC, subject LIMIT %(n)s",
                {
                    "id": limit.limit_id,
                    "start": period_start,
                    "subject": subject,
                    "n": MAX_LIMIT_SUBJECTS,
                },
            )
            spent = await spend_cur.fetchall()
        start = None if limit.period == "total" else period_start
        out.append(LimitView(limit, start, reset, spent, int(counted["n"]) if counted else 0))
    return out

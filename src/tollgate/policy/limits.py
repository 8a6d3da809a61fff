"""Limits on the request path: which limits a request is charged to, and whether one is spent.

:class:`LimitBook` holds every limit and its current-period spend as Postgres had them at the
last refresh (``tollgate.limit_spend``, written by the ledger writer: ADR 012), plus this
replica's own charges that the snapshot may not include yet. The request path never awaits
Postgres: :meth:`LimitBook.verdict` reads memory only.

What a replica counts on top of the snapshot, per (limit, subject, period):

* every request it admitted and has not finished: one request each (the ``requests``
  measure's reservation);
* every request it finished whose row Postgres had not committed when the last refresh
  began (the writer's batch observer says when a row committed: :meth:`committed`), with
  its requests, tokens and — for ``usd`` — its cost as the price book says.

A refresh drops the charges committed before it began (the snapshot has them); those
committed during it stay counted until the next (a brief overcount, never an undercount).

Other replicas' spend arrives with the refresh. Between two refreshes each replica may use
only its share of what the snapshot says is left: the remainder divided by the replicas that
refreshed within :data:`ALIVE_REFRESHES` intervals (``tollgate.limit_replicas``), so replicas
together admit at most the remainder per window (rounded up to whole requests for a
``requests`` limit): see docs/limits.md for the bound.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from tollgate.ledger.limits import Limit, list_limits

__all__ = ["ALIVE_REFRESHES", "Charge", "LimitBook", "LimitState", "Verdict", "period_bounds"]

#: A replica that refreshed within this many of its intervals counts as alive.
ALIVE_REFRESHES = 3

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def period_bounds(period: str, tz: ZoneInfo, now: datetime) -> tuple[datetime, datetime | None]:
    """(start, end) of the calendar period holding ``now`` in ``tz``, as the SQL function
    ``tollgate.limit_period_start`` computes the start; ``total`` never ends."""
    if period == "total":
        return _EPOCH, None
    local = now.astimezone(tz).replace(tzinfo=None)
    if period == "minute":
        start, step = local.replace(second=0, microsecond=0), timedelta(minutes=1)
    elif period == "hour":
        start, step = local.replace(minute=0, second=0, microsecond=0), timedelta(hours=1)
    else:
        day = local.replace(hour=0, minute=0, second=0, microsecond=0)
        if period == "day":
            start, step = day, timedelta(days=1)
        elif period == "week":
            start, step = day - timedelta(days=day.weekday()), timedelta(weeks=1)
        elif period == "month":
            start = day.replace(day=1)
            following = (start + timedelta(days=32)).replace(day=1)
            return _aware(start, tz), _aware(following, tz)
        else:
            raise ValueError(f"unknown period {period!r}")
    return _aware(start, tz), _aware(start + step, tz)


def _aware(local: datetime, tz: ZoneInfo) -> datetime:
    # Wall time in tz to an instant, as Postgres's `timestamp AT TIME ZONE tz` reads it.
    return local.replace(tzinfo=tz).astimezone(UTC)


@dataclass(frozen=True, slots=True)
class LimitState:
    limit_id: str
    scope: str
    subject: str | None
    measure: str
    maximum: Decimal
    period: str
    tz: ZoneInfo
    mode: str

    @classmethod
    def of(cls, limit: Limit) -> LimitState:
        """The request path's view of a stored limit (its time zone loaded)."""
        return cls(
            limit.limit_id,
            limit.scope,
            limit.subject,
            limit.measure,
            limit.maximum,
            limit.period,
            ZoneInfo(limit.time_zone),
            limit.mode,
        )

    def subject_of(self, user: str | None, key: str | None) -> str | None:
        """Whose spend under this limit the request adds to ('' for a single spend), or None
        when the limit does not charge it."""
        if self.scope == "global" or self.scope == "named":
            return ""
        who = user if self.scope == "user" else key
        if who is None or (self.subject is not None and self.subject != who):
            return None
        return "" if self.subject is not None else who


@dataclass(frozen=True, slots=True)
class Verdict:
    """A request's limits: the block limit that refuses it (if any), else what is left of the
    tightest one (the least remaining) and its reset, for the client's x-tollgate-limit-*
    headers."""

    refused: LimitState | None = None
    remaining: Decimal | None = None
    reset_at: datetime | None = None


def _need(measure: str, tokens: int, usd: Decimal) -> Decimal:
    if measure == "requests":
        return Decimal(1)
    return Decimal(tokens) if measure == "tokens" else usd


@dataclass
class Charge:
    """What one admitted request adds to its limits; filled in when it finishes."""

    keys: list[tuple[str, str, datetime]]
    requests: int = 1
    tokens: int = 0
    usd: Decimal = Decimal(0)
    committed_at: float | None = None  # monotonic seconds, from the writer's observer


@dataclass
class LimitBook:
    """Limits and their spend (see the module docstring). ``clock`` is injectable."""

    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    _limits: dict[str, LimitState] = field(default_factory=dict)
    _by_scope: dict[str, list[LimitState]] = field(default_factory=dict)
    # (limit_id, subject, period_start) → (usd, tokens, requests) in the last snapshot.
    _spend: dict[tuple[str, str, datetime], tuple[Decimal, int, int]] = field(default_factory=dict)
    _charges: dict[str, Charge] = field(default_factory=dict)  # request id → charge
    # The sum of the charges by (limit_id, subject, period_start): usd, tokens, requests.
    _own: dict[tuple[str, str, datetime], list[Any]] = field(default_factory=dict)
    # The current period of each (period, time zone), until it ends.
    _periods: dict[tuple[str, str], tuple[datetime, datetime | None]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    replica_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    replicas: int = 1  # alive at the last refresh, this one included
    refresh_failures: int = 0

    @property
    def empty(self) -> bool:
        return not self._limits

    def known(self, limit_id: str) -> bool:
        state = self._limits.get(limit_id)
        return state is not None and state.scope == "named"

    def limits_of(
        self, user: str | None, key: str | None, named: Iterable[str]
    ) -> list[tuple[LimitState, str]]:
        """The limits a request is charged to, each with the subject it is charged as."""
        out = []
        for scope in ("global", "user", "key"):
            for state in self._by_scope.get(scope, ()):
                subject = state.subject_of(user, key)
                if subject is not None:
                    out.append((state, subject))
        for limit_id in dict.fromkeys(named):
            found = self._limits.get(limit_id)
            if found is not None and found.scope == "named":
                out.append((found, ""))
        return out

    def _spent(self, key: tuple[str, str, datetime], measure: str) -> tuple[Decimal, Decimal]:
        """(spend in the snapshot, this replica's own spend since) under one key."""
        usd, tokens, requests = self._spend.get(key, (Decimal(0), 0, 0))
        shared = usd if measure == "usd" else Decimal(tokens if measure == "tokens" else requests)
        mine = self._own.get(key)
        if mine is None:
            return shared, Decimal(0)
        own = mine[0] if measure == "usd" else Decimal(mine[1] if measure == "tokens" else mine[2])
        return shared, own

    def _period(self, state: LimitState, now: datetime) -> tuple[datetime, datetime | None]:
        """``period_bounds`` for the limit at ``now``, computed once per period."""
        key = (state.period, state.tz.key)
        found = self._periods.get(key)
        if found is not None and found[0] <= now and (found[1] is None or now < found[1]):
            return found
        found = self._periods[key] = period_bounds(state.period, state.tz, now)
        return found

    def _count(self, charge: Charge, sign: int) -> None:
        """Add (``sign`` 1) or take away (-1) a charge in the sums (under the lock)."""
        for key in charge.keys:
            mine = self._own.setdefault(key, [Decimal(0), 0, 0])
            mine[0] += sign * charge.usd
            mine[1] += sign * charge.tokens
            mine[2] += sign * charge.requests
            if sign < 0 and not mine[0] and not mine[1] and not mine[2]:
                del self._own[key]

    def _share(self, state: LimitState, left: Decimal) -> Decimal:
        """What this replica may use of ``left`` until its next refresh."""
        if self.replicas <= 1 or left <= 0:
            return left
        share = left / self.replicas
        return Decimal(math.ceil(share)) if state.measure == "requests" else share

    def verdict(
        self,
        charged: Sequence[tuple[LimitState, str]],
        *,
        tokens: int = 0,
        usd: Decimal = Decimal(0),
    ) -> Verdict:
        """Whether a block limit refuses the request: spent, or too little left for what the
        request reserves (one request; ``tokens`` and ``usd`` at most)."""
        now = self.clock()
        least: Decimal | None = None
        least_reset: datetime | None = None
        with self._lock:
            for state, subject in charged:
                start, end = self._period(state, now)
                shared, own = self._spent((state.limit_id, subject, start), state.measure)
                share = self._share(state, state.maximum - shared)
                need = _need(state.measure, tokens, usd)
                spent = own + need > share if need > 0 else own >= share
                if spent and state.mode == "block":
                    # The first block limit that refuses it: the client is told its reset.
                    return Verdict(state, Decimal(0), end)
                left = state.maximum - shared - own
                if least is None or left < least:
                    least, least_reset = left, end
        return Verdict(None, None if least is None else max(least, Decimal(0)), least_reset)

    def admit(
        self,
        request_id: str,
        charged: Sequence[tuple[LimitState, str]],
        *,
        tokens: int = 0,
        usd: Decimal = Decimal(0),
    ) -> None:
        """Count an admitted request in its limits until it is finished and shipped: what
        it reserves until it is finished, then what it spent."""
        if not charged:
            return
        now = self.clock()
        keys = [
            (state.limit_id, subject, self._period(state, now)[0]) for state, subject in charged
        ]
        charge = Charge(keys, tokens=tokens, usd=usd)
        with self._lock:
            self._charges[request_id] = charge
            self._count(charge, 1)

    def finish(self, request_id: str, *, tokens: int, usd: Decimal | None, charged: bool) -> None:
        """The request's record was submitted: its spend as recorded (``charged`` False for a
        blocked one, which no limit is charged)."""
        with self._lock:
            charge = self._charges.get(request_id)
            if charge is None:
                return
            self._count(charge, -1)
            if not charged:
                del self._charges[request_id]
                return
            charge.tokens, charge.usd = tokens, usd or Decimal(0)
            self._count(charge, 1)

    def committed(self, request_ids: Iterable[str]) -> None:
        """The writer committed these rows (its batch observer; any thread)."""
        now = time.monotonic()
        with self._lock:
            for request_id in request_ids:
                charge = self._charges.get(request_id)
                if charge is not None:
                    charge.committed_at = now

    async def refresh(self, conn: Any, interval_s: float = 2.0) -> int:
        """Reload every limit and its current-period spend; this replica's charges that were
        committed before the reload began are dropped (the snapshot holds them). Marks this
        replica alive and counts those alive (refreshed within ALIVE_REFRESHES intervals)."""
        began = time.monotonic()
        await conn.execute(
            "INSERT INTO tollgate.limit_replicas (replica_id) VALUES (%s)"
            " ON CONFLICT (replica_id) DO UPDATE SET seen_at = now()",
            (self.replica_id,),
        )
        cur = await conn.execute(
            "SELECT count(*) FROM tollgate.limit_replicas"
            " WHERE seen_at > now() - make_interval(secs => %s)",
            (ALIVE_REFRESHES * interval_s,),
        )
        alive = await cur.fetchone()
        await conn.execute(
            "DELETE FROM tollgate.limit_replicas WHERE seen_at < now() - interval '1 day'"
        )
        limits = [LimitState.of(limit) for limit in await list_limits(conn)]
        cur = await conn.execute(
            "SELECT s.limit_id, s.subject, s.period_start, s.usd, s.tokens, s.requests"
            " FROM tollgate.limit_spend s JOIN tollgate.limits l USING (limit_id)"
            " WHERE s.period_start = tollgate.limit_period_start(l.period, l.time_zone, now())"
        )
        spend = {(r[0], r[1], r[2]): (r[3], r[4], r[5]) for r in await cur.fetchall()}
        self.load(limits, spend, began)
        self.replicas = max(1, int(alive[0]) if alive else 1)
        return len(limits)

    def load(
        self,
        limits: Sequence[LimitState],
        spend: dict[tuple[str, str, datetime], tuple[Decimal, int, int]],
        began: float,
    ) -> None:
        """Take a snapshot: ``limits``, their ``spend`` by (limit, subject, period start), as
        read after the monotonic time ``began``."""
        by_scope: dict[str, list[LimitState]] = defaultdict(list)
        for state in limits:
            by_scope[state.scope].append(state)
        with self._lock:
            self._limits = {state.limit_id: state for state in limits}
            self._by_scope, self._spend = dict(by_scope), spend
            for request_id in [
                rid
                for rid, c in self._charges.items()
                if c.committed_at is not None and c.committed_at < began
            ]:
                self._count(self._charges.pop(request_id), -1)

    async def run(self, pool: Any, interval_s: float) -> None:
        """Refresh every ``interval_s`` seconds until cancelled; keep the last view on failure
        (local charges keep counting)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                async with pool.connection() as conn:
                    await self.refresh(conn, interval_s)
            except Exception as exc:
                self.refresh_failures += 1
                log.warning(
                    "limit refresh failed (%d so far), keeping the last view: %s: %s",
                    self.refresh_failures,
                    type(exc).__name__,
                    exc,
                )

    def observer(self, records: Sequence[Any], costs: Sequence[Any]) -> None:
        """The ledger writer's batch observer: these rows are committed."""
        if self._charges:
            self.committed(r.request_id for r in records)

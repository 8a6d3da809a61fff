#!/usr/bin/env python3
"""Benchmark of the dashboard: every page and API call, and the CSV export, on 10M rows.

The ledger is the one of ``ledger_bench.py``'s summary part (``fill_summary_ledger``: 10M
rows in ``tollgate.requests`` by SQL over the current month and the two before it, 10,000
users with a skewed distribution, 50 gateway keys, six models; ``daily_usage`` built from
them), in an embedded Postgres started for the run with default settings. The rollups that
migration 009 adds (``daily_users``, ``monthly_users`` and ``daily_totals``) are then
built from ``daily_usage`` with the migration's own ``INSERT … SELECT … FROM
tollgate.daily_usage`` statements (the writer keeps them all in one transaction), the rollups
are checked against ``requests`` with ``rollups.mismatch_query()`` (given 2 minutes), three
limits are created (their backfill from the ledger is timed) and a viewer token scoped to the
busiest gateway key.

Then the real dashboard, ``python -m tollgate dashboard``, runs as a separate process on a
free port, and this process times HTTP GETs with a bearer token over one keep-alive
connection: one untimed warm-up pass over every page and API call, then ``--rounds`` rounds
(default 30) that take the calls in turn, round-robin, so a noisy moment of the machine is
shared by all of them. Goal: p95 under 200 ms for every call. Afterwards each call runs
again in this process, through the dashboard's own handler on one recording connection, to
split its time into SQL statements and the rest (rendering, JSON); for a call over the goal
every statement's ``EXPLAIN (ANALYZE, BUFFERS)`` goes to the results file.

The CSV export (``/api/v1/requests.csv``) is timed on a window of about 1M rows (the count
checked with SQL and against the lines received), streamed to /dev/null, three times, with
the dashboard's RSS sampled every 50 ms. Goal: ≥ 50,000 rows/s with flat memory.

Prints a Markdown report and writes ``bench/results/dashboard-<UTC timestamp>.json``. Every
wait is bounded; the dashboard is stopped and Postgres and its directory removed at the end,
also on failure, Ctrl-C or SIGTERM (``--keep-data`` keeps the directory).

Usage: ``python bench/dashboard_bench.py [--rows N] [--rounds N] [--quick] [--keep-data]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import platform
import random
import re
import secrets
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Final, cast
from urllib.parse import quote, urlencode

import aiohttp
import ledger_bench as lb
import psutil
import psycopg
import run as bench_run
from aiohttp.test_utils import make_mocked_request

from tollgate.ledger.limits import create_limit
from tollgate.ledger.migrate import available_migrations
from tollgate.ledger.rollups import mismatch_query
from tollgate.ledger.viewers import create_viewer
from tollgate.localstack import free_port
from tollgate.web import data, server
from tollgate.web.auth import ADMIN, VIEWER, Principal

BENCH_DIR: Final = Path(__file__).resolve().parent
REPO: Final = BENCH_DIR.parent

GOAL_MS: Final = 200.0
EXPORT_GOAL_ROWS_PER_S: Final = 50_000
RSS_FLAT_MB: Final = 64.0  # "flat": the peak stays within this of the RSS before the export
ROUNDS: Final = 30
QUICK_ROUNDS: Final = 10
EXPORT_ROWS: Final = 1_000_000
QUICK_EXPORT_ROWS: Final = 200_000
EXPORT_RUNS: Final = 3
RSS_SAMPLE_S: Final = 0.05
DEEP_PAGE: Final = 20  # the log page reached by following next_cursor
PAGE_ROWS: Final = 50  # rows per page of /usage (the API's default limit too)
BREAKDOWN_RUNS: Final = 5
SEED: Final = lb.SEED
DATABASE: Final = "bench_dashboard"

# Bounds on every wait, so that the run stops by itself.
READY_TIMEOUT_S: Final = 60.0
HTTP_TIMEOUT_S: Final = 120.0
EXPORT_TIMEOUT_S: Final = 600.0
MISMATCH_TIMEOUT: Final = "2min"
SETUP_STATEMENT_TIMEOUT: Final = "20min"
QUERY_STATEMENT_TIMEOUT: Final = "120s"
# The dashboard's own session settings (server.running_dashboard), for the in-process runs.
DASHBOARD_OPTIONS: Final = "-c default_transaction_read_only=on -c statement_timeout=30000"

# Created before the dashboard starts; each create_limit charges the current period's rows.
LIMITS: Final = (
    {
        "limit_id": "bench-user-monthly-usd",
        "scope": "user",
        "measure": "usd",
        "maximum": "50",
        "period": "month",
    },
    {
        "limit_id": "bench-key-daily-requests",
        "scope": "key",
        "measure": "requests",
        "maximum": "100000",
        "period": "day",
    },
    {
        "limit_id": "bench-global-monthly-tokens",
        "scope": "global",
        "measure": "tokens",
        "maximum": "100000000000",
        "period": "month",
    },
)


# The benchmark could not set up, run or verify a measurement (the one error of bench/).
BenchError = bench_run.BenchError


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- the ledger -------------------------------------------------------------------------------


def _rollup_builds() -> list[tuple[str, str]]:
    """(table, statement) of each ``INSERT INTO tollgate.<rollup> … FROM tollgate.daily_usage``
    of migration 009: its rollups built from daily_usage exactly as the migration does."""
    (migration,) = [m for m in available_migrations() if m.name == "dashboard"]
    found = re.findall(
        r"^(INSERT INTO tollgate\.(\w+)\b[^;]*?FROM tollgate\.daily_usage\b[^;]*);",
        migration.sql,
        re.M,
    )
    if not found:
        raise BenchError("migration 009 builds no rollup from daily_usage")
    return [(table, statement) for statement, table in found]


def _sizes_mb(conn: psycopg.Connection[Any], tables: Sequence[str]) -> dict[str, float]:
    cur = conn.execute(
        """
        SELECT 'requests (all partitions, with indexes)',
               sum(pg_total_relation_size(i.inhrelid)) / 1048576.0
        FROM pg_inherits i WHERE i.inhparent = 'tollgate.requests'::regclass
        UNION ALL
        SELECT t || ' (with indexes)', pg_total_relation_size(('tollgate.' || t)::regclass)
            / 1048576.0
        FROM unnest(%s::text[]) AS t
        """,
        (["daily_usage", *tables],),
    )
    return {name: round(float(mb), 1) for name, mb in cur.fetchall()}


def build_ledger(cluster: lb.Cluster, rows: int) -> tuple[str, dict[str, Any]]:
    """The summary ledger of ledger_bench plus the rollups of migration 009."""
    url, fill = lb.fill_summary_ledger(cluster, rows, DATABASE)
    built: dict[str, dict[str, Any]] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"SET statement_timeout = '{SETUP_STATEMENT_TIMEOUT}'")
        conn.execute("SET synchronous_commit = off")
        conn.execute("SET work_mem = '256MB'")
        conn.execute("SET maintenance_work_mem = '1GB'")
        for table, statement in _rollup_builds():
            t = time.perf_counter()
            conn.execute(statement)
            built[table] = {"build_s": round(time.perf_counter() - t, 1)}
            _progress(f"ledger: {table} built from daily_usage in {built[table]['build_s']}s")
        t = time.perf_counter()
        conn.execute("VACUUM (ANALYZE) " + ", ".join(f"tollgate.{t}" for t in built))
        fill["vacuum_analyze_new_rollups_s"] = round(time.perf_counter() - t, 1)
        for table, entry in built.items():
            counted = conn.execute(f"SELECT count(*) FROM tollgate.{table}").fetchone()
            assert counted is not None
            entry["rows"] = int(counted[0])
        fill["rollups_of_009"] = built
        fill["size_mb"] = _sizes_mb(conn, list(built))
    with psycopg.connect(cluster.admin_url(), autocommit=True) as admin:
        admin.execute("ALTER SYSTEM RESET max_wal_size")  # raised for the bulk load only
        admin.execute("SELECT pg_reload_conf()")
    return url, fill


def check_rollups(url: str) -> dict[str, Any]:
    """``rollups.mismatch_query()`` on the whole ledger, given MISMATCH_TIMEOUT to finish."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"SET statement_timeout = '{MISMATCH_TIMEOUT}'")
        conn.execute("SET work_mem = '256MB'")
        t = time.perf_counter()
        try:
            cur = conn.execute(mismatch_query())
        except psycopg.errors.QueryCanceled:
            return {"finished": False, "timeout": MISMATCH_TIMEOUT}
        row = cur.fetchone()
        assert row is not None
        assert cur.description is not None
        seconds = round(time.perf_counter() - t, 1)
        names = [c.name for c in cur.description]
    return {
        "finished": True,
        "seconds": seconds,
        "mismatches": dict(zip(names, (int(v) for v in row), strict=True)),
    }


@dataclass
class Subjects:
    """Who and what the calls ask about."""

    heaviest_user: str
    random_user: str
    key: str  # the busiest gateway key: the viewer's, and the log's key filter
    model: str
    this_month: str
    previous_month: str
    today: date


def pick_subjects(url: str) -> Subjects:
    today = datetime.now(UTC).date()
    this_month = today.replace(day=1)
    previous = (this_month - timedelta(days=1)).replace(day=1)
    rng = random.Random(SEED)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"SET statement_timeout = '{QUERY_STATEMENT_TIMEOUT}'")
        heaviest = conn.execute(
            "SELECT end_user_id FROM tollgate.daily_usage WHERE day >= %s"
            " AND end_user_id <> '' GROUP BY 1 ORDER BY sum(requests) DESC LIMIT 1",
            (this_month,),
        ).fetchone()
        key = conn.execute(
            "SELECT key_id FROM tollgate.daily_usage WHERE key_id <> ''"
            " GROUP BY 1 ORDER BY sum(requests) DESC LIMIT 1"
        ).fetchone()
        if heaviest is None or key is None:
            raise BenchError("the ledger has no users or keys this month")
        for _ in range(100):  # a random user with rows this month (nearly all have some)
            candidate = f"user_{rng.randrange(lb.SUMMARY_USERS):05d}"
            if conn.execute(
                "SELECT 1 FROM tollgate.daily_usage WHERE end_user_id = %s AND day >= %s LIMIT 1",
                (candidate, this_month),
            ).fetchone():
                break
        else:
            raise BenchError("no random user with rows this month")
    return Subjects(
        heaviest_user=str(heaviest[0]),
        random_user=candidate,
        key=str(key[0]),
        model=lb.MODELS[-1].name,  # the least used model (10 % of the rows)
        this_month=this_month.strftime("%Y-%m"),
        previous_month=previous.strftime("%Y-%m"),
        today=today,
    )


async def _create_limits_and_viewer(url: str, key_id: str) -> tuple[list[dict[str, Any]], str]:
    """The LIMITS (each create_limit timed: it backfills its current period from the
    ledger) and a viewer token for ``key_id`` (after its gateway_keys row)."""
    created: list[dict[str, Any]] = []
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(f"SET statement_timeout = '{SETUP_STATEMENT_TIMEOUT}'")
        for spec in LIMITS:
            t = time.perf_counter()
            await create_limit(conn, **spec)
            seconds = round(time.perf_counter() - t, 2)
            cur = await conn.execute(
                "SELECT count(*), coalesce(sum(requests), 0) FROM tollgate.limit_spend"
                " WHERE limit_id = %s",
                (spec["limit_id"],),
            )
            row = await cur.fetchone()
            assert row is not None
            created.append({**spec, "create_s": seconds, "subjects": row[0], "requests": row[1]})
            _progress(f"setup: limit {spec['limit_id']} created in {seconds}s")
        await conn.execute(
            "INSERT INTO tollgate.gateway_keys (key_id, key_hash, key_prefix, name)"
            " VALUES (%s, %s, %s, %s)",
            (key_id, hashlib.sha256(key_id.encode()).digest(), "tg_bnch", "bench key"),
        )
        token, _ = await create_viewer(conn, key_id=key_id, name="dashboard bench viewer")
    return created, token


# -- the dashboard process ----------------------------------------------------------------------


class Dashboard(bench_run.TollgateChild):
    """``python -m tollgate dashboard`` as a child process; ready when it prints its URL."""

    command = "dashboard"
    ready = "dashboard: "

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> str:
        """The dashboard's URL."""
        return super().start(timeout_s).split()[1]


@contextlib.contextmanager
def running_dashboard(url: str, work_dir: Path, admin: str) -> Iterator[tuple[Dashboard, int]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    env.update(
        TOLLGATE_DATABASE_URL=url,
        TOLLGATE_DASHBOARD_ADDRESS=f"127.0.0.1:{port}",
        TOLLGATE_DASHBOARD_ADMIN_TOKEN=admin,
        TOLLGATE_STATE_DIR=str(work_dir / "state"),
    )
    dashboard = Dashboard(env, work_dir / "dashboard.log")
    try:
        shown = dashboard.start()
        _progress(f"dashboard: {shown} (pid {dashboard.pid})")
        yield dashboard, port
    finally:
        dashboard.stop()


class CpuShare:
    """CPU seconds over a block: the whole machine's, ours (this process, the dashboard,
    Postgres) and the rest, which is what other processes took from the measurement."""

    def __init__(self, cluster: lb.Cluster, pid: int) -> None:
        self.cluster = cluster
        self.dashboard = psutil.Process(pid)
        self.result: dict[str, float] = {}

    def _sample(self) -> tuple[float, float, float]:
        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + t.irq + t.softirq + t.steal
        d = self.dashboard.cpu_times()
        ours = time.process_time() + d.user + d.system + self.cluster.cpu_s()
        return time.monotonic(), busy, ours

    def __enter__(self) -> CpuShare:
        self._start = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._sample()
        wall, busy, ours = (b - a for a, b in zip(self._start, end, strict=True))
        self.result = {
            "wall_s": round(wall, 1),
            "machine_busy_s": round(busy, 1),
            "ours_s": round(ours, 1),
            "others_s": round(max(busy - ours, 0.0), 1),
            "cores": os.cpu_count() or 0,
        }


class Client:
    """GETs over one keep-alive connection (reopened only if the server closes it)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: http.client.HTTPConnection | None = None
        self.connects = 0

    def get(self, path: str, token: str) -> tuple[int, bytes, float]:
        """Status, body and milliseconds from sending the request to the body's last byte."""
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(
                    "127.0.0.1", self.port, timeout=HTTP_TIMEOUT_S
                )
                self.connects += 1
            try:
                t = time.perf_counter()
                self.conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
                response = self.conn.getresponse()
                body = response.read()
                ms = (time.perf_counter() - t) * 1000
            except (http.client.RemoteDisconnected, ConnectionError):
                self.close()
                if attempt:
                    raise
                continue
            if response.will_close:
                self.close()
            return response.status, body, ms
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# -- the calls --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    label: str  # the path with <placeholders>, as reported
    path: str
    role: str  # ADMIN or VIEWER


def _q(path: str, **params: Any) -> str:
    return path + "?" + urlencode(params)


def deep_cursor(client: Client, admin: str) -> str:
    """The cursor of log page DEEP_PAGE, by following next_cursor from the first page."""
    cursor: str | None = None
    for _ in range(DEEP_PAGE - 1):
        params: dict[str, Any] = {"limit": PAGE_ROWS}
        if cursor:
            params["cursor"] = cursor
        status, body, _ = client.get(_q("/api/v1/requests", **params), admin)
        if status != 200:
            raise BenchError(f"/api/v1/requests answered {status}: {body[:300]!r}")
        cursor = json.loads(body)["next_cursor"]
        if not cursor:
            raise BenchError("the log ended before the deep page")
    assert cursor is not None
    return cursor


def user_page(client: Client, admin: str, user: str) -> str:
    """The user page's route in the tree measured: ``/user?id=`` (the id in the query) or the
    older ``/users/<id>``, as the prefix a quoted id is appended to."""
    for prefix in ("/user?id=", "/users/"):
        status, _, _ = client.get(prefix + quote(user, safe=""), admin)
        if status == 200:
            return prefix
    raise BenchError(f"neither /user?id= nor /users/<id> answers for {user}")


def make_calls(s: Subjects, cursor: str, user_route: str) -> list[Call]:
    heavy = quote(s.heaviest_user)
    since_30 = (s.today - timedelta(days=30)).isoformat()
    tomorrow = (s.today + timedelta(days=1)).isoformat()
    since_90 = (s.today - timedelta(days=90)).isoformat()
    admin = [
        ("/", "/"),
        ("/?month=<previous month>", _q("/", month=s.previous_month)),
        ("/usage", "/usage"),
        (f"/usage?cursor=<page {DEEP_PAGE}>", _q("/usage", cursor=cursor)),
        ("/usage?user=<heaviest>", _q("/usage", user=s.heaviest_user)),
        ("/usage?user=<random>", _q("/usage", user=s.random_user)),
        ("/usage?key=<busiest key>", _q("/usage", key=s.key)),
        ("/usage?outcome=blocked", _q("/usage", outcome="blocked")),
        ("/usage?model=<model>", _q("/usage", model=s.model)),
        ("/usage?tag=prod", _q("/usage", tag="prod")),
        ("/users", "/users"),
        ("/users?sort=requests&order=asc", _q("/users", sort="requests", order="asc")),
        ("/users?q=user_01", _q("/users", q="user_01")),
        ("/users?since=<today-30d>&until=<tomorrow>", _q("/users", since=since_30, until=tomorrow)),
        (f"{user_route}<heaviest>", user_route + quote(s.heaviest_user, safe="")),
        (f"{user_route}<random>", user_route + quote(s.random_user, safe="")),
        ("/limits", "/limits"),
        ("/api/v1/requests", "/api/v1/requests"),
        (
            "/api/v1/requests?user=<heaviest>&limit=100",
            _q("/api/v1/requests", user=s.heaviest_user, limit=100),
        ),
        ("/api/v1/users", "/api/v1/users"),
        ("/api/v1/users/<heaviest>", f"/api/v1/users/{heavy}"),
        ("/api/v1/usage/daily?group_by=model", _q("/api/v1/usage/daily", group_by="model")),
        (
            "/api/v1/usage/daily?since=<today-90d>&group_by=end_user_id",
            _q("/api/v1/usage/daily", since=since_90, group_by="end_user_id"),
        ),
        ("/api/v1/limits", "/api/v1/limits"),
    ]
    viewer = [
        ("/", "/"),
        ("/usage", "/usage"),
        ("/users", "/users"),
        ("/api/v1/requests", "/api/v1/requests"),
        ("/limits", "/limits"),
    ]
    return [Call(label, path, ADMIN) for label, path in admin] + [
        Call(label, path, VIEWER) for label, path in viewer
    ]


@dataclass
class CallTiming:
    label: str
    path: str
    role: str
    runs: int
    p50_ms: float
    p95_ms: float
    max_ms: float
    bytes: int
    under_goal: bool
    # In this process, through the dashboard's handler (median of BREAKDOWN_RUNS):
    handler_ms: float = 0.0
    sql_ms: float = 0.0
    statements: list[dict[str, Any]] = field(default_factory=list)
    plans: list[dict[str, Any]] = field(default_factory=list)


def warm_up(client: Client, calls: Sequence[Call], tokens: Mapping[str, str]) -> dict[Call, int]:
    sizes: dict[Call, int] = {}
    for call in calls:
        status, body, ms = client.get(call.path, tokens[call.role])
        if status != 200:
            raise BenchError(f"{call.role} GET {call.path} answered {status}: {body[:300]!r}")
        sizes[call] = len(body)
        _progress(f"warm-up: {call.role:6} {call.label}: {ms:.0f} ms, {len(body):,} bytes")
    return sizes


def time_calls(
    client: Client, calls: Sequence[Call], tokens: Mapping[str, str], rounds: int
) -> list[CallTiming]:
    samples: dict[Call, list[float]] = {c: [] for c in calls}
    sizes = warm_up(client, calls, tokens)
    for n in range(rounds):
        for call in calls:
            status, body, ms = client.get(call.path, tokens[call.role])
            if status != 200:
                raise BenchError(f"{call.role} GET {call.path} answered {status}: {body[:300]!r}")
            samples[call].append(ms)
            sizes[call] = max(sizes[call], len(body))
        if (n + 1) % 5 == 0 or n + 1 == rounds:
            _progress(f"timed: round {n + 1} of {rounds}")
    out = []
    for call in calls:
        times = sorted(samples[call])
        p95 = lb._nearest_rank(times, 95)
        out.append(
            CallTiming(
                label=call.label,
                path=call.path,
                role=call.role,
                runs=len(times),
                p50_ms=round(statistics.median(times), 1),
                p95_ms=round(p95, 1),
                max_ms=round(times[-1], 1),
                bytes=sizes[call],
                under_goal=p95 < GOAL_MS,
            )
        )
    return out


# -- where the time goes: the handlers in this process, statement by statement -------------------


@dataclass
class Statement:
    sql: str
    params: Any
    ms: float


class CopyCaptured(Exception):
    """Raised by the recording cursor instead of starting a COPY."""


def _recording_cursor(sink: list[Statement]) -> type[psycopg.AsyncCursor[Any]]:
    """A cursor class that appends every statement it executes, with its parameters and
    time (execute + fetch), to ``sink``; a COPY is recorded and not run (CopyCaptured)."""

    class Recording(psycopg.AsyncCursor[Any]):
        async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
            kept = list(params) if isinstance(params, list | tuple) else params
            t = time.perf_counter()
            try:
                return await super().execute(query, params, **kwargs)
            finally:
                ms = (time.perf_counter() - t) * 1000
                sink.append(Statement(_sql_text(query, self.connection), kept, ms))

        def copy(self, statement: Any, params: Any = None, **kwargs: Any) -> Any:
            sink.append(Statement(_sql_text(statement, self.connection), params, 0.0))
            raise CopyCaptured

    return Recording


def _sql_text(query: Any, conn: psycopg.AsyncConnection[Any]) -> str:
    if isinstance(query, bytes):
        return query.decode()
    return query if isinstance(query, str) else str(query.as_string(conn))


class _OnePool:
    """Stands in for the dashboard's pool: every request gets the one recording connection,
    committed afterwards as the pool does."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        try:
            yield self.conn
        except BaseException:
            await self.conn.rollback()
            raise
        await self.conn.commit()


def _plain_params(params: Any) -> Any:
    if isinstance(params, Mapping):
        return {k: str(v) for k, v in params.items()}
    if isinstance(params, list):
        return [str(v) for v in params]
    return params


async def _breakdown(
    url: str, timings: Sequence[CallTiming], principals: Mapping[str, Principal], admin: str
) -> None:
    """Each call through its handler in this process: the time of every SQL statement it
    runs and of the whole handler (SQL, rendering or JSON); EXPLAIN (ANALYZE, BUFFERS) of
    every statement of a call over the goal."""
    sink: list[Statement] = []
    conn = await psycopg.AsyncConnection.connect(
        url,
        cursor_factory=_recording_cursor(sink),
        options=DASHBOARD_OPTIONS,
        application_name="tollgate-dashboard-bench",
    )
    try:
        app = server.build_app(server.DashboardApp(cast(Any, _OnePool(conn)), admin))
        for timing in timings:
            runs: list[tuple[float, list[Statement]]] = []
            for _ in range(BREAKDOWN_RUNS):
                probe = make_mocked_request("GET", timing.path, app=app)
                match = await app.router.resolve(probe)
                request = make_mocked_request("GET", timing.path, match_info=dict(match), app=app)
                request[server.PRINCIPAL] = principals[timing.role]
                sink.clear()
                t = time.perf_counter()
                response = await match.handler(request)
                total = (time.perf_counter() - t) * 1000
                if response.status != 200:
                    raise BenchError(f"in-process {timing.path} answered {response.status}")
                runs.append((total, list(sink)))
            runs.sort(key=lambda r: r[0])
            total, statements = runs[len(runs) // 2]
            timing.handler_ms = round(total, 1)
            timing.sql_ms = round(sum(s.ms for s in statements), 1)
            timing.statements = [
                {"ms": round(s.ms, 2), "sql": s.sql, "params": _plain_params(s.params)}
                for s in statements
            ]
            if not timing.under_goal:
                timing.plans = await _explain_all(url, statements)
    finally:
        await conn.close()


async def _explain_all(url: str, statements: Sequence[Statement]) -> list[dict[str, Any]]:
    plans: list[dict[str, Any]] = []
    async with await psycopg.AsyncConnection.connect(url, options=DASHBOARD_OPTIONS) as conn:
        for s in sorted(statements, key=lambda s: -s.ms):
            cur = await conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + s.sql, s.params)
            plan = "\n".join(str(r[0]) for r in await cur.fetchall())
            await conn.rollback()
            plans.append({"ms": round(s.ms, 2), "sql": s.sql, "plan": plan})
    return plans


# -- the CSV export -----------------------------------------------------------------------------


@dataclass
class ExportRun:
    run: int
    rows: int
    expected_rows: int
    bytes: int
    seconds: float
    first_byte_ms: float
    rows_per_s: int
    mb_per_s: float
    rss_before_mb: float
    rss_peak_mb: float
    rss_after_mb: float
    dashboard_cpu_s: float
    postgres_cpu_s: float
    client_cpu_s: float
    goal_met: bool


class PeakRss:
    """Samples a process's resident memory every RSS_SAMPLE_S from a thread until stopped."""

    def __init__(self, pid: int) -> None:
        self._proc = psutil.Process(pid)
        self.before = self.peak = self._proc.memory_info().rss
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self._proc.memory_info().rss)
                self.samples += 1

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def export_window(url: str, rows: int) -> tuple[datetime, datetime, int]:
    """[since, until) holding the newest ``rows`` rows, and their count by SQL."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"SET statement_timeout = '{QUERY_STATEMENT_TIMEOUT}'")
        newest = conn.execute("SELECT max(created_at) FROM tollgate.requests").fetchone()
        nth = conn.execute(
            "SELECT created_at FROM tollgate.requests ORDER BY created_at DESC OFFSET %s LIMIT 1",
            (rows - 1,),
        ).fetchone()
        if newest is None or nth is None:
            raise BenchError(f"the ledger has fewer than {rows:,} rows for the export")
        since, until = nth[0], newest[0] + timedelta(seconds=1)
        counted = conn.execute(
            "SELECT count(*) FROM tollgate.requests WHERE created_at >= %s AND created_at < %s",
            (since, until),
        ).fetchone()
    assert counted is not None
    return since, until, int(counted[0])


async def _download(
    port: int, path: str, token: str, sink: IO[bytes]
) -> tuple[int, int, bytes, float, float]:
    """GET ``path`` into ``sink`` in chunks: bytes, lines, the first line, seconds to the
    response headers and to the last byte. aiohttp's C parser takes the chunked encoding
    (one HTTP chunk per CSV row), so the client takes little of the cores it shares."""
    timeout = aiohttp.ClientTimeout(total=EXPORT_TIMEOUT_S)
    size = lines = 0
    head = b""
    async with aiohttp.ClientSession(timeout=timeout) as session:
        t = time.perf_counter()
        async with session.get(
            f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {token}"}
        ) as response:
            first = time.perf_counter() - t
            if response.status != 200:
                raise BenchError(f"{path} answered {response.status}: {await response.text()}")
            async for chunk in response.content.iter_chunked(1 << 16):
                if len(head) < 4096:
                    head += chunk[:4096]
                size += len(chunk)
                lines += chunk.count(b"\n")
                sink.write(chunk)
        seconds = time.perf_counter() - t
    return size, lines, head.split(b"\n", 1)[0], first, seconds


async def _explain_export(url: str, since: datetime, until: datetime) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) of the SELECT inside the export's COPY, as data.copy_csv
    builds it for this window (the COPY itself is only recorded, not run)."""
    sink: list[Statement] = []
    async with await psycopg.AsyncConnection.connect(
        url, cursor_factory=_recording_cursor(sink), options=DASHBOARD_OPTIONS
    ) as conn:
        with contextlib.suppress(CopyCaptured):
            async for _ in data.copy_csv(
                conn, data.LogFilter(since=since, until=until), data.Scope()
            ):
                break
        if len(sink) != 1:
            raise BenchError(f"copy_csv ran {len(sink)} statements, expected one COPY")
        copy = sink[0]
        inner = re.fullmatch(r"COPY \((.*)\) TO STDOUT.*", copy.sql, re.S)
        if inner is None:
            raise BenchError(f"not a COPY (SELECT …) TO STDOUT: {copy.sql[:200]}")
        await conn.execute(f"SET statement_timeout = '{QUERY_STATEMENT_TIMEOUT}'")
        cur = await conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + inner.group(1), copy.params)
        plan = "\n".join(str(r[0]) for r in await cur.fetchall())
    return {"copy": copy.sql, "params": _plain_params(copy.params), "plan": plan}


def run_export(
    cluster: lb.Cluster, url: str, port: int, pid: int, admin: str, rows: int
) -> dict[str, Any]:
    since, until, expected = export_window(url, rows)
    path = _q("/api/v1/requests.csv", since=since.isoformat(), until=until.isoformat())
    _progress(f"export: {expected:,} rows from {since.isoformat()} to {until.isoformat()}")
    dashboard = psutil.Process(pid)
    runs: list[ExportRun] = []
    for n in range(1, EXPORT_RUNS + 1):
        cpu0 = dashboard.cpu_times()
        pg0, client0 = cluster.cpu_s(), time.process_time()
        with PeakRss(pid) as rss, open(os.devnull, "wb") as sink:
            size, lines, header, first, seconds = asyncio.run(_download(port, path, admin, sink))
        cpu1 = dashboard.cpu_times()
        after = dashboard.memory_info().rss
        if header.decode() != ",".join(data.REQUEST_COLUMNS):
            raise BenchError(f"unexpected CSV header: {header[:200]!r}")
        got = lines - 1
        if got != expected:
            raise BenchError(f"export {n}: {got:,} rows, the SQL count is {expected:,}")
        rate = got / seconds
        growth = (rss.peak - rss.before) / 2**20
        run = ExportRun(
            run=n,
            rows=got,
            expected_rows=expected,
            bytes=size,
            seconds=round(seconds, 2),
            first_byte_ms=round(first * 1000, 1),
            rows_per_s=round(rate),
            mb_per_s=round(size / 1e6 / seconds, 1),
            rss_before_mb=round(rss.before / 2**20, 1),
            rss_peak_mb=round(rss.peak / 2**20, 1),
            rss_after_mb=round(after / 2**20, 1),
            dashboard_cpu_s=round(cpu1.user + cpu1.system - cpu0.user - cpu0.system, 1),
            postgres_cpu_s=round(cluster.cpu_s() - pg0, 1),
            client_cpu_s=round(time.process_time() - client0, 1),
            goal_met=rate >= EXPORT_GOAL_ROWS_PER_S and growth <= RSS_FLAT_MB,
        )
        _progress(
            f"export {n}: {run.rows_per_s:,} rows/s, {run.mb_per_s} MB/s, RSS "
            f"{run.rss_before_mb} → peak {run.rss_peak_mb} MiB"
        )
        runs.append(run)
    _progress("export: EXPLAIN ANALYZE of its SELECT")
    return {
        "since": since.isoformat(),
        "until": until.isoformat(),
        "path": path,
        "sql_count": expected,
        "runs": [r.__dict__ for r in runs],
        "explain": asyncio.run(_explain_export(url, since, until)),
    }


# -- report -----------------------------------------------------------------------------------


def _short_sql(text: str, width: int = 110) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def markdown(report: dict[str, Any]) -> str:
    f = report["ledger"]
    s = report["subjects"]
    sizes = ", ".join(f"{k} {v:,} MB" for k, v in f["size_mb"].items())
    rollups = ", ".join(
        f"{table} {r['rows']:,} rows in {r['build_s']}s" for table, r in f["rollups_of_009"].items()
    )
    lines: list[str] = [
        f"## Dashboard benchmark, {report['started_at'][:16].replace('T', ' ')} UTC",
        "",
        f"- Machine: {report['host']['cores']} cores shared by Postgres "
        f"({report['postgres']}, default settings: shared_buffers 128 MB), the dashboard "
        "process and this client; load average at the start of the timed part "
        f"{report['load_average_timed']}; during the timed rounds other processes used "
        f"{report['cpu_timed']['others_s']} CPU s of the {report['cpu_timed']['wall_s']} s on "
        f"{report['cpu_timed']['cores']} cores (Postgres, the dashboard and this client "
        f"{report['cpu_timed']['ours_s']} s).",
        f"- Ledger: {f['rows_in_requests']:,} rows in requests ({f['from'][:10]} to "
        f"{f['to'][:16]}), filled in {f['insert_s']}s; daily_usage {f['daily_usage_rows']:,} "
        f"rows built in {f['rollup_build_s']}s; from daily_usage with migration 009's "
        f"statements: {rollups}; VACUUM ANALYZE {f['vacuum_analyze_s']}s"
        f" + {f['vacuum_analyze_new_rollups_s']}s.",
        f"- {f['users']:,} users, {f['rows_this_month']:,} rows this month. Sizes: {sizes}.",
    ]
    check = report["rollup_check"]
    if check["finished"]:
        counts = ", ".join(f"{k} {v}" for k, v in check["mismatches"].items())
        lines.append(
            f"- rollups.mismatch_query() on all {f['rows_in_requests']:,} rows: "
            f"{check['seconds']}s; groups differing from the rows: {counts}."
        )
    else:
        lines.append(
            f"- rollups.mismatch_query() did not finish within {check['timeout']} on "
            f"{f['rows_in_requests']:,} rows (cancelled; see a --quick run)."
        )
    limits = ", ".join(
        f"{x['limit_id']} ({x['scope']}/{x['measure']}/{x['period']}) {x['create_s']}s"
        f" ({x['subjects']:,} subjects)"
        for x in report["limits"]
    )
    lines += [
        f"- Limits created (each backfills its current period from requests): {limits}.",
        f"- Subjects: heaviest user {s['heaviest_user']}, random user {s['random_user']}, "
        f"busiest key {s['key']} (the viewer token's), model {s['model']}, previous month "
        f"{s['previous_month']}, today {s['today']}.",
        "",
        f"### Pages and API calls (goal: p95 under {GOAL_MS:.0f} ms)",
        "",
        f"{report['config']['rounds']} rounds after one warm-up pass, calls taken in turn "
        "(round-robin), one keep-alive connection "
        f"({report['http_connects']} connect(s) in all); time from sending the GET to the "
        "last byte. *handler* and *SQL*: the same call through the dashboard's handler in "
        f"this process, median of {BREAKDOWN_RUNS} (SQL: its statements' execute + fetch), on "
        "a fresh connection whose statements are not prepared yet (the dashboard's pooled "
        "connections prepare a statement after 5 executions; a generic plan can then be "
        "faster or slower than these).",
        "",
        "| call | as | p50 ms | p95 ms | max ms | size | handler ms | SQL ms (statements) | goal |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in report["calls"]:
        lines.append(
            f"| `{c['label']}` | {c['role']} | {c['p50_ms']} | {c['p95_ms']} | {c['max_ms']} "
            f"| {_size(c['bytes'])} | {c['handler_ms']} | {c['sql_ms']} ({len(c['statements'])})"
            f" | {'met' if c['under_goal'] else 'MISSED'} |"
        )
    missed = [c for c in report["calls"] if not c["under_goal"]]
    if missed:
        lines += ["", "### Over the goal: where the time goes", ""]
        for c in missed:
            lines += [
                f"**{c['role']} `{c['label']}`**: p95 {c['p95_ms']} ms; in-process handler "
                f"{c['handler_ms']} ms, of which SQL {c['sql_ms']} ms:",
                "",
                "| ms | statement |",
                "|---:|---|",
            ]
            lines += [
                f"| {st['ms']} | `{_short_sql(st['sql'])}` |"
                for st in sorted(c["statements"], key=lambda st: -st["ms"])
            ]
            if c["plans"]:
                lines += [
                    "",
                    "EXPLAIN (ANALYZE, BUFFERS) of the slowest statement (all of them are in "
                    "the results file):",
                    "",
                    "```",
                    c["plans"][0]["plan"],
                    "```",
                    "",
                ]
    e = report["export"]
    lines += [
        "",
        f"### CSV export (goal: ≥ {EXPORT_GOAL_ROWS_PER_S:,} rows/s, RSS peak within "
        f"{RSS_FLAT_MB:.0f} MiB of before)",
        "",
        f"`/api/v1/requests.csv?since={e['since']}&until={e['until']}`: {e['sql_count']:,} rows "
        "by SQL count; streamed to /dev/null in 64 KiB reads (aiohttp client); RSS of the "
        f"dashboard process sampled every {RSS_SAMPLE_S * 1000:.0f} ms. MB = 10^6 bytes.",
        "",
        "| run | rows | size MB | s | first byte ms | rows/s | MB/s | RSS before MiB "
        "| peak MiB | after MiB | dashboard CPU s | Postgres CPU s | client CPU s | goal |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in e["runs"]:
        lines.append(
            f"| {r['run']} | {r['rows']:,} | {r['bytes'] / 1e6:.1f} | {r['seconds']} "
            f"| {r['first_byte_ms']} | {r['rows_per_s']:,} | {r['mb_per_s']} "
            f"| {r['rss_before_mb']} | {r['rss_peak_mb']} | {r['rss_after_mb']} "
            f"| {r['dashboard_cpu_s']} | {r['postgres_cpu_s']} | {r['client_cpu_s']} "
            f"| {'met' if r['goal_met'] else 'MISSED'} |"
        )
    lines += [
        "",
        "EXPLAIN (ANALYZE, BUFFERS) of the SELECT inside the export's COPY (as data.copy_csv "
        "builds it):",
        "",
        "```",
        e["explain"]["plan"],
        "```",
    ]
    return "\n".join(lines)


# -- the run ------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rows", type=int, help="rows in the ledger (default 10,000,000)")
    p.add_argument("--rounds", type=int, help=f"timed rounds of every call (default {ROUNDS})")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: 1,000,000 rows, {QUICK_ROUNDS} rounds, {QUICK_EXPORT_ROWS:,}-row export",
    )
    p.add_argument(
        "--keep-data", action="store_true", help="keep the Postgres data directory afterwards"
    )
    return p


def run(args: argparse.Namespace, rows: int, rounds: int, report: dict[str, Any]) -> None:
    admin = "bench-admin-" + secrets.token_hex(16)
    with lb.running_cluster(args.keep_data, "tollgate-dashboard-bench-") as cluster:
        with psycopg.connect(cluster.admin_url()) as conn:
            version = conn.execute("SHOW server_version").fetchone()
        report["postgres"] = version[0] if version else "unknown"
        url, report["ledger"] = build_ledger(cluster, rows)
        _progress(f"ledger: checking the rollups (at most {MISMATCH_TIMEOUT})")
        report["rollup_check"] = check_rollups(url)
        _progress(f"ledger: rollup check {report['rollup_check']}")
        subjects = pick_subjects(url)
        report["subjects"] = {**subjects.__dict__, "today": subjects.today.isoformat()}
        report["limits"], viewer_token = asyncio.run(_create_limits_and_viewer(url, subjects.key))
        tokens = {ADMIN: admin, VIEWER: viewer_token}
        principals = {
            ADMIN: Principal(ADMIN),
            VIEWER: Principal(VIEWER, key_id=subjects.key, viewer_id="vwr_bench", name="bench"),
        }
        with running_dashboard(url, cluster.work_dir, admin) as (dashboard, port):
            client = Client(port)
            try:
                route = user_page(client, admin, subjects.heaviest_user)
                calls = make_calls(subjects, deep_cursor(client, admin), route)
                report["load_average_timed"] = [round(x, 2) for x in os.getloadavg()]
                with CpuShare(cluster, dashboard.pid) as share:
                    timings = time_calls(client, calls, tokens, rounds)
                report["cpu_timed"] = share.result
            finally:
                client.close()
            report["http_connects"] = client.connects
            _progress("breakdown: each call through its handler in this process")
            asyncio.run(_breakdown(url, timings, principals, admin))
            report["calls"] = [t.__dict__ for t in timings]
            export_rows = QUICK_EXPORT_ROWS if args.quick else EXPORT_ROWS
            report["export"] = run_export(
                cluster, url, port, dashboard.pid, admin, min(export_rows, rows)
            )


def _git_state() -> dict[str, Any]:
    """The commit measured and the files changed on top of it (the dashboard runs from the
    work tree)."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=False
        )
        return done.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "changed": git("status", "--short").splitlines()}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rows = args.rows or (1_000_000 if args.quick else 10_000_000)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    if rows < 1 or rounds < 1:
        raise SystemExit("--rows and --rounds must be positive")
    lb._stop_on_sigterm()
    started = datetime.now(UTC)
    t0 = time.monotonic()
    report: dict[str, Any] = {
        "started_at": started.isoformat(),
        "host": {
            "cores": os.cpu_count() or 0,
            "machine": platform.machine(),
            "system": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_start": os.getloadavg(),
            "note": "Postgres, the dashboard and the client share these cores",
        },
        "git": _git_state(),
        "config": {
            "rows": rows,
            "rounds": rounds,
            "goal_ms": GOAL_MS,
            "export_goal_rows_per_s": EXPORT_GOAL_ROWS_PER_S,
            "export_runs": EXPORT_RUNS,
            "limits": LIMITS,
        },
    }
    try:
        run(args, rows, rounds, report)
    except KeyboardInterrupt:
        _progress("\ninterrupted; the dashboard and Postgres stopped, their directory removed")
        return 130
    except (BenchError, psycopg.Error, OSError, aiohttp.ClientError, psutil.Error) as exc:
        _progress(f"dashboard bench failed: {exc}")
        return 1
    lb.finish_report(report, markdown, "dashboard", started, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

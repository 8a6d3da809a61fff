"""The dashboard's pages and /api/v1/ against a real Postgres ledger written by the real writer.

Who may see what (admin, a viewer scoped to one key, nobody), that the API and the CSV agree
with the ledger row for row, that pagination walks every row once, that aggregates over a
period crossing a month boundary (monthly + daily rollups) equal the sums over the rows.
"""

from __future__ import annotations

import asyncio
import csv
import html
import io
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from tollgate.app import run_migrations
from tollgate.config import load_settings
from tollgate.ledger import limits as limit_store
from tollgate.ledger.records import UsageRecord, new_request_id
from tollgate.ledger.viewers import create_viewer, revoke_viewer
from tollgate.ledger.writer import LedgerWriter
from tollgate.policy.keys import create_key
from tollgate.v1 import usage_pb2
from tollgate.web.server import PUBLIC_PATHS, build_app, running_dashboard

pytestmark = pytest.mark.integration

ADMIN = "admin-token-for-the-dashboard-tests"
B_ONLY_USER = "only-on-key-b"


@dataclass
class Ledger:
    url: str
    key_a: str
    key_b: str
    viewer_a: str
    viewer_a_id: str
    ids_a: set[str]
    ids_b: set[str]


def _record(
    at: datetime,
    user: str | None,
    key: str | None,
    *,
    model: str = "gpt-4o-mini",
    provider: str = "openai",
    blocked: str | None = None,
    tags: tuple[str, ...] = (),
    tokens: tuple[int, int] = (100, 20),
) -> UsageRecord:
    r = UsageRecord(
        request_id=new_request_id(),
        outcome=usage_pb2.OUTCOME_BLOCKED if blocked else usage_pb2.OUTCOME_OK,
        provider=provider,
        model=model,
        endpoint="/v1/chat/completions",
        status_code=422 if blocked else 200,
    )
    r.created_at.FromDatetime(at)
    if user is not None:
        r.end_user_id = user
    if key is not None:
        r.key_id = key
    if blocked:
        r.block_reason = blocked
    else:
        r.input_tokens, r.output_tokens = tokens
        r.total_tokens = sum(tokens)
        r.latency_ms = 42
    r.tags.extend(tags)
    return r


@pytest.fixture
async def ledger(database_url: str) -> AsyncIterator[Ledger]:
    await run_migrations(database_url)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        _, key_a = await create_key(conn, name="app a")
        _, key_b = await create_key(conn, name="app b")
        viewer_a, viewer = await create_viewer(conn, key_id=key_a.key_id, name="team a")
        for limit_id, scope, subject in (
            ("a-monthly", "key", key_a.key_id),
            ("b-monthly", "key", key_b.key_id),
            ("each-key", "key", None),
            ("everyone", "global", None),
        ):
            await limit_store.create_limit(
                conn,
                limit_id=limit_id,
                scope=scope,
                subject=subject,
                measure="requests",
                maximum="1000",
                period="month",
            )
    now = datetime.now(UTC).replace(microsecond=0)
    a, b = key_a.key_id, key_b.key_id
    records: list[UsageRecord] = []
    # Spread over 70 days, so periods cross month boundaries; both keys, several users, some
    # without a user id, some blocked, tagged, two models.
    for i in range(60):
        at = now - timedelta(days=i * 70 / 60, minutes=i)
        user = ("alice", "bob", None, "carol")[i % 4]
        records.append(
            _record(
                at,
                user,
                a,
                model=("gpt-4o-mini", "gpt-4o")[i % 2],
                blocked="user_id_required" if i % 7 == 3 else None,
                tags=("prod",) if i % 3 == 0 else ("prod", "search") if i % 3 == 1 else (),
                tokens=(100 + i, 10 + i),
            )
        )
    for i in range(40):
        at = now - timedelta(days=i * 70 / 40, minutes=2 * i)
        user = (B_ONLY_USER, "alice", None)[i % 3]  # alice uses both keys
        records.append(_record(at, user, b, model="claude-x", provider="anthropic"))
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
        database_url, open=False
    )
    await pool.open()
    try:
        writer = LedgerWriter(pool, queue_size=1000, batch_size=100, flush_interval_s=0.01)
        assert await writer.write_batch(records) == len(records)
    finally:
        await pool.close()
    return Ledger(
        database_url,
        a,
        b,
        viewer_a,
        viewer.viewer_id,
        {r.request_id for r in records if r.key_id == a},
        {r.request_id for r in records if r.key_id == b},
    )


@dataclass
class Dash:
    url: str
    session: aiohttp.ClientSession
    running: Any

    async def get(
        self, path: str, token: str | None = ADMIN, **kw: Any
    ) -> tuple[int, dict[str, str], str]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        headers.update(kw.pop("headers", {}))
        async with self.session.get(
            self.url + path.lstrip("/"), headers=headers, allow_redirects=False, **kw
        ) as resp:
            return resp.status, dict(resp.headers), await resp.text()

    async def json(self, path: str, token: str | None = ADMIN) -> Any:
        status, _, body = await self.get(path, token)
        assert status == 200, (path, status, body)
        return json.loads(body)


@pytest.fixture
async def dash(ledger: Ledger, tmp_path: Path) -> AsyncIterator[Dash]:
    settings = load_settings(
        environ={},
        state_dir=str(tmp_path / "state"),
        database_url=ledger.url,
        dashboard_address="127.0.0.1:0",
        dashboard_admin_token=ADMIN,
    )
    async with (
        running_dashboard(settings, ledger.url) as running,
        aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session,
    ):
        yield Dash(running.url, session, running)


def _rows(url: str, where: str = "TRUE", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    with psycopg.connect(url, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute(
            f"SELECT * FROM tollgate.requests WHERE {where}"
            " ORDER BY created_at DESC, request_id DESC",
            params,
        ).fetchall()


def _routes(dashboard: Any) -> list[tuple[str, str]]:
    """Every (method, path) the dashboard serves, from its router: a new route is covered."""
    out = []
    for route in build_app(dashboard).router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter") or info.get("prefix")
        assert path, info
        path = path.replace("{user_id}", "alice").replace("{name}", "x.css")
        out.append((route.method, path + ("?id=alice" if path == "/user" else "")))
    return out


async def test_every_route_needs_a_credential(dash: Dash) -> None:
    routes = _routes(dash.running.app)
    assert len(routes) >= 15
    checked = 0
    for method, path in routes:
        if method == "HEAD" or path in PUBLIC_PATHS or path.startswith("/static/"):
            continue
        for headers in (
            {},
            {"Authorization": "Bearer not-a-token"},
            {"Authorization": "Basic YWRtaW46YWRtaW4="},
            {"Cookie": "tollgate_session=eyJyIjoiYWRtaW4ifQ.forged"},
        ):
            async with dash.session.request(
                method, dash.url + path.lstrip("/"), headers=headers, allow_redirects=False
            ) as resp:
                body = await resp.text()
                path = path.partition("?")[0]
                if path.startswith("/api/") or "Authorization" in headers:
                    assert resp.status == 401, (method, path, headers, resp.status)
                    assert '"code": "unauthorized"' in body
                    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                else:
                    assert resp.status == 303, (method, path, headers, resp.status)
                    assert resp.headers["Location"].startswith("/login?next=")
                assert "alice" not in body
                assert "gpt-4o" not in body
            checked += 1
    assert checked >= 4 * 14
    # The public ones give nothing away.
    for path in ("/login", "/healthz"):
        status, _, body = await dash.get(path, token=None)
        assert status == 200
        assert "alice" not in body


async def test_admin_api_and_csv_equal_the_ledger(dash: Dash, ledger: Ledger) -> None:
    got = await dash.json("/api/v1/requests?user=alice&limit=500")
    want = _rows(ledger.url, "end_user_id = %s", ("alice",))
    assert [r["request_id"] for r in got["data"]] == [str(r["request_id"]) for r in want]
    assert got["next_cursor"] is None
    first = got["data"][0]
    assert first["input_tokens"] == want[0]["input_tokens"]
    assert Decimal(first["cost_usd"]) == want[0]["cost_usd"]
    # The CSV of a filter: exactly its rows, under the ledger's own column names.
    status, headers, body = await dash.get("/api/v1/requests.csv?model=gpt-4o&tag=prod")
    assert status == 200
    assert headers["Content-Type"].startswith("text/csv")
    assert "attachment" in headers["Content-Disposition"]
    table = list(csv.DictReader(io.StringIO(body)))
    want = _rows(ledger.url, "model = %s AND 'prod' = ANY(tags)", ("gpt-4o",))
    assert want
    assert [r["request_id"] for r in table] == [str(r["request_id"]) for r in want]
    with psycopg.connect(ledger.url) as conn:
        columns = [
            c
            for (c,) in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema ="
                " 'tollgate' AND table_name = 'requests' ORDER BY ordinal_position"
            )
        ]
    assert list(table[0]) == columns
    for row, expect in zip(table, want, strict=True):
        assert row["end_user_id"] == (expect["end_user_id"] or "")
        assert row["tags"] == ";".join(expect["tags"])
        assert row["outcome"] == expect["outcome"]
        assert Decimal(row["cost_usd"] or "0") == (expect["cost_usd"] or 0)
        assert datetime.fromisoformat(row["created_at"]) == expect["created_at"]
    # Blocked rows keep their reason; unattributed is its own filter.
    blocked = await dash.json("/api/v1/requests?outcome=blocked&limit=500")
    assert blocked["data"]
    assert all(r["block_reason"] for r in blocked["data"])
    nobody = await dash.json("/api/v1/requests?unattributed=true&limit=500")
    assert len(nobody["data"]) == len(_rows(ledger.url, "end_user_id IS NULL"))


async def test_keyset_pagination_walks_every_row_once(dash: Dash, ledger: Ledger) -> None:
    seen: list[str] = []
    cursor = ""
    pages = 0
    while True:
        got = await dash.json(f"/api/v1/requests?limit=7&cursor={cursor}")
        seen += [r["request_id"] for r in got["data"]]
        pages += 1
        if got["next_cursor"] is None:
            break
        cursor = got["next_cursor"]
    assert seen == [str(r["request_id"]) for r in _rows(ledger.url)]
    assert pages == -(-len(seen) // 7)
    # The HTML log pages the same way: its "Older" link carries the cursor.
    status, _, html = await dash.get("/usage")
    assert status == 200
    older = re.search(r'id="older" href="([^"]+)"', html)
    assert older is not None
    status, _, page2 = await dash.get(older.group(1).replace("&amp;", "&"))
    assert status == 200
    first_page = set(re.findall(r'data-request-id="([^"]+)"', html))
    second_page = set(re.findall(r'data-request-id="([^"]+)"', page2))
    assert len(first_page) == 50
    assert second_page
    assert not first_page & second_page


async def test_aggregates_across_a_month_boundary_equal_the_rows(
    dash: Dash, ledger: Ledger
) -> None:
    today = datetime.now(UTC).date()
    since, until = today - timedelta(days=45), today + timedelta(days=1)
    got = await dash.json(f"/api/v1/users?since={since}&until={until}&sort=end_user_id&order=asc")
    with psycopg.connect(ledger.url) as conn:
        want = conn.execute(
            "SELECT coalesce(end_user_id, ''), count(*), count(*) FILTER (WHERE outcome ="
            " 'blocked'), coalesce(sum(total_tokens), 0)"
            " FROM tollgate.requests WHERE created_at >= %s AND created_at < %s"
            " GROUP BY 1 ORDER BY 1",
            (since, until),
        ).fetchall()
    assert got["matched"] == len(want)
    have = sorted(
        (u["end_user_id"] or "", u["requests"], u["blocked"], u["total_tokens"])
        for u in got["data"]
    )
    assert have == sorted(tuple(w) for w in want)
    # The overview's series (daily_totals) adds up to the same period's requests.
    detail = await dash.json(f"/api/v1/users/alice?since={since}&until={until}")
    assert detail["totals"]["requests"] == sum(w[1] for w in want if w[0] == "alice")
    assert sum(d["requests"] for d in detail["daily"]) == detail["totals"]["requests"]
    assert len(detail["daily"]) == (until - since).days
    daily = await dash.json(f"/api/v1/usage/daily?since={since}&until={until}&group_by=model")
    assert sum(d["requests"] for d in daily["data"]) == sum(w[1] for w in want)


async def test_a_viewer_sees_only_its_key(dash: Dash, ledger: Ledger) -> None:
    v = ledger.viewer_a
    me = await dash.json("/api/v1/me", v)
    assert me["role"] == "viewer"
    assert me["key_id"] == ledger.key_a
    b = ledger.key_b
    # Asking for key B is refused outright, on the API and on pages.
    for path in (
        f"/api/v1/requests?key={b}",
        f"/api/v1/requests.csv?key={b}",
        f"/api/v1/usage/daily?key={b}",
        f"/usage?key={b}",
    ):
        status, _, body = await dash.get(path, v)
        assert status == 403, path
        assert B_ONLY_USER not in body
    # Everything else answers, with key A's rows only.
    since = (datetime.now(UTC) - timedelta(days=80)).date()
    period = f"since={since}"
    paths = [
        "/",
        f"/?{period}",
        "/usage",
        "/usage?user=alice",
        "/users",
        f"/users?{period}",
        f"/user?id=alice&{period}",
        "/limits",
        "/api/v1/requests?limit=500",
        f"/api/v1/requests?user={B_ONLY_USER}",
        "/api/v1/requests.csv",
        f"/api/v1/requests.csv?user={B_ONLY_USER}",
        f"/api/v1/users?{period}&limit=500",
        f"/api/v1/users/alice?{period}",
        f"/api/v1/users/{B_ONLY_USER}?{period}",
        f"/api/v1/usage/daily?{period}&group_by=key_id,end_user_id",
        "/api/v1/limits",
    ]
    for path in paths:
        status, _, body = await dash.get(path, v)
        assert status == 200, (path, status, body[:300])
        assert not any(rid in body for rid in ledger.ids_b), path
        assert b not in body, path
        if B_ONLY_USER not in path:
            assert B_ONLY_USER not in body, path
        assert "claude-x" not in body, path
    rows = await dash.json("/api/v1/requests?limit=500", v)
    assert {r["request_id"] for r in rows["data"]} == ledger.ids_a
    status, _, body = await dash.get("/api/v1/requests.csv", v)
    assert {r["request_id"] for r in csv.DictReader(io.StringIO(body))} == ledger.ids_a
    nobody = await dash.json(f"/api/v1/users/{B_ONLY_USER}?{period}", v)
    assert nobody["totals"]["requests"] == 0
    assert nobody["daily"]
    assert not nobody["models"]
    alice = await dash.json(f"/api/v1/users/alice?{period}", v)
    alice_a = _rows(ledger.url, "end_user_id = 'alice' AND key_id = %s", (ledger.key_a,))
    assert alice["totals"]["requests"] == len(alice_a)
    limits = await dash.json("/api/v1/limits", v)
    assert {entry["limit_id"] for entry in limits["data"]} == {"a-monthly", "each-key"}
    each_key = next(e for e in limits["data"] if e["limit_id"] == "each-key")
    assert [s["subject"] for s in each_key["spend"]] in ([ledger.key_a], [])
    # The admin sees both keys' limits and rows.
    admin_limits = await dash.json("/api/v1/limits")
    assert {e["limit_id"] for e in admin_limits["data"]} == {
        "a-monthly",
        "b-monthly",
        "each-key",
        "everyone",
    }


async def _login(dash: Dash, token: str, next_path: str = "/usage") -> tuple[int, dict[str, str]]:
    async with dash.session.get(dash.url + f"login?next={next_path}") as resp:
        html = await resp.text()
    csrf = re.search(r'name="csrf" value="([^"]+)"', html)
    assert csrf is not None
    async with dash.session.post(
        dash.url + "login",
        data={"csrf": csrf.group(1), "token": token, "next": next_path},
        allow_redirects=False,
    ) as resp:
        return resp.status, dict(resp.headers)


async def test_login_session_csrf_and_logout(dash: Dash, ledger: Ledger) -> None:
    # A post without the form's token (a cross-site form) is refused, even with the token.
    async with dash.session.post(
        dash.url + "login", data={"token": ADMIN}, allow_redirects=False
    ) as resp:
        assert resp.status == 403
        assert "tollgate_session" not in resp.headers.get("Set-Cookie", "")
    status, headers = await _login(dash, "wrong-token")
    assert status == 401
    status, headers = await _login(dash, ADMIN, "//evil.example/x")
    assert status == 303
    assert headers["Location"] == "/"
    status, headers = await _login(dash, ADMIN)
    assert status == 303
    assert headers["Location"] == "/usage"
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    status, _, html = await dash.get("/usage", token=None)
    assert status == 200
    assert "data-request-id" in html
    # Logout needs the session's CSRF token.
    async with dash.session.post(dash.url + "logout", data={}, allow_redirects=False) as resp:
        assert resp.status == 403
    token = re.search(r'name="csrf" value="([^"]+)"', html)
    assert token is not None
    async with dash.session.post(
        dash.url + "logout", data={"csrf": token.group(1)}, allow_redirects=False
    ) as resp:
        assert resp.status == 303
    status, headers, _ = await dash.get("/usage", token=None)
    assert status == 303
    assert headers["Location"].startswith("/login")


async def test_a_revoked_viewer_loses_its_session(dash: Dash, ledger: Ledger) -> None:
    status, _ = await _login(dash, ledger.viewer_a)
    assert status == 303
    status, _, _ = await dash.get("/api/v1/me", token=None)
    assert status == 200
    async with await psycopg.AsyncConnection.connect(ledger.url, autocommit=True) as conn:
        assert await revoke_viewer(conn, ledger.viewer_a_id)
        await dash.running.app.viewers.refresh(conn)
    status, _, _ = await dash.get("/api/v1/me", token=None)
    assert status == 401
    status, _, _ = await dash.get("/api/v1/me", token=ledger.viewer_a)
    assert status == 401


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/api/v1/requests?since=yesterday", "since"),
        ("/api/v1/requests?cursor=bm90LWEtY3Vyc29y", "cursor"),
        ("/api/v1/requests?limit=0", "limit"),
        ("/api/v1/requests?limit=100000", "limit"),
        ("/api/v1/requests?outcome=maybe", "outcome"),
        ("/api/v1/requests?user=a&unattributed=true", "unattributed"),
        ("/api/v1/requests?user=" + "x" * 400, "user"),
        ("/api/v1/requests?model=a%00b", "model"),
        ("/api/v1/users?sort=password", "sort"),
        ("/api/v1/users?order=sideways", "order"),
        ("/api/v1/users?month=2026-13", "month"),
        ("/api/v1/users?since=2026-05-01&until=2026-04-01", "until"),
        ("/api/v1/usage/daily?group_by=request_id", "group_by"),
    ],
)
async def test_bad_parameters_get_a_clear_400(dash: Dash, path: str, param: str) -> None:
    status, _, body = await dash.get(path)
    assert status == 400, body
    assert f'"param": "{param}"' in body
    assert '"code": "invalid_parameter"' in body


async def test_pages_carry_security_headers_and_escape_ids(dash: Dash, ledger: Ledger) -> None:
    # An end-user id is client input: it must come back escaped, never as markup.
    evil = '<script>alert("x")</script>'
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
        ledger.url, open=False
    )
    await pool.open()
    try:
        writer = LedgerWriter(pool, queue_size=10, batch_size=10, flush_interval_s=0.01)
        await writer.write_batch([_record(datetime.now(UTC), evil, ledger.key_a)])
    finally:
        await pool.close()
    for path in ("/usage", "/users", "/"):
        status, headers, html = await dash.get(path)
        assert status == 200
        assert "<script>alert" not in html
        assert "&lt;script&gt;" in html
        assert "default-src 'self'" in headers["Content-Security-Policy"]
        assert headers["Cache-Control"] == "no-store"
        assert headers["X-Frame-Options"] == "DENY"
    status, _, html = await dash.get("/static/tollgate.css", token=None)
    assert status == 200
    assert "--blue" in html
    for name in ("..%2Fserver.py", "server.py", "nothing.css"):  # only our own assets
        status, _, _ = await dash.get(f"/static/{name}", token=None)
        assert status == 404, name
    await asyncio.sleep(0)


async def test_a_lost_database_is_a_clear_503(dash: Dash, ledger: Ledger) -> None:
    name = psycopg.conninfo.conninfo_to_dict(ledger.url)["dbname"]
    admin = psycopg.conninfo.make_conninfo(ledger.url, dbname="postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    for path in ("/api/v1/requests.csv",):  # each waits out the pool (5 s) once
        status, _, body = await dash.get(path)
        assert status == 503, (path, body)
        assert '"code": "ledger_unavailable"' in body
    status, _, html = await dash.get("/usage")
    assert status == 503
    assert "unavailable" in html


async def test_any_user_id_has_a_page_even_dots_and_slashes(dash: Dash, ledger: Ledger) -> None:
    odd = ["..", ".", "a/b", "x/../alice", "50% off", "ü ser"]
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
        ledger.url, open=False
    )
    await pool.open()
    try:
        writer = LedgerWriter(pool, queue_size=10, batch_size=10, flush_interval_s=0.01)
        now = datetime.now(UTC)
        await writer.write_batch([_record(now, user, ledger.key_a) for user in odd])
    finally:
        await pool.close()
    status, _, users_html = await dash.get("/users")
    assert status == 200
    linked = {
        parse_qs(urlsplit(html.unescape(href)).query)["id"][0]
        for href in re.findall(r'class="user-link" href="([^"]+)"', users_html)
    }
    assert set(odd) <= linked
    for user in odd:
        got = await dash.json(f"/api/v1/user?end_user_id={quote(user, safe='')}")
        assert got["end_user_id"] == user
        assert got["totals"]["requests"] == 1, user
        status, _, page = await dash.get(f"/user?id={quote(user, safe='')}")
        assert status == 200, user
        card = re.search(r'class="label">Requests</span><span class="value">([^<]+)<', page)
        assert card is not None
        assert card.group(1) == "1", user
    status, _, body = await dash.get("/user")
    assert status == 400
    assert "id must name an end user" in body


@pytest.mark.parametrize(
    ("since_days", "until_days"),
    [(-75, -40), (-60, -1), (-35, 1), (-10, 1), (-45, -20), (-3, 1), (-70, 1), (-31, -29)],
)
async def test_any_period_equals_the_sums_over_its_rows(
    dash: Dash, ledger: Ledger, since_days: int, until_days: int
) -> None:
    today = datetime.now(UTC).date()
    since, until = today + timedelta(days=since_days), today + timedelta(days=until_days)
    got = await dash.json(f"/api/v1/users?since={since}&until={until}&limit=500")
    with psycopg.connect(ledger.url) as conn:
        want = conn.execute(
            "SELECT coalesce(end_user_id, ''), count(*), coalesce(sum(input_tokens), 0),"
            " coalesce(sum(cost_usd), 0) FROM tollgate.requests"
            " WHERE created_at >= %s AND created_at < %s GROUP BY 1",
            (since, until),
        ).fetchall()
    have = {
        (u["end_user_id"] or "", u["requests"], u["input_tokens"], Decimal(u["cost_usd"]))
        for u in got["data"]
    }
    assert have == {(w[0], w[1], w[2], Decimal(w[3])) for w in want}
    models = await dash.json(f"/api/v1/usage/daily?since={since}&until={until}&group_by=model")
    assert sum(m["requests"] for m in models["data"]) == sum(w[1] for w in want)

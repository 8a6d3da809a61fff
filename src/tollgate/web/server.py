"""The dashboard: server-rendered pages and the ``/api/v1/`` JSON and CSV API (aiohttp).

Every route but ``/login``, ``/static/…`` and ``/healthz`` needs a principal (ADR 013): a
bearer token (admin or viewer) or the signed session cookie the login form sets. Without
one, the API answers 401 and a page redirects to the login form. Pages and the API read the
ledger through :mod:`tollgate.web.data` with the principal's scope, so a viewer token sees
its gateway key's rows only, whatever the URL asks for.

The dashboard runs in its own process (``tollgate dashboard``; ``up`` and ``demo`` start it
as a child), with read-only database sessions: its queries and exports never share an event
loop or a connection with the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import jinja2
import psycopg
from aiohttp import web
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from tollgate.config import Settings
from tollgate.ledger.viewers import ViewerDirectory
from tollgate.limits_report import limit_record
from tollgate.web import data
from tollgate.web.auth import Principal, SessionSigner, TokenCheck, admin_token, same_token
from tollgate.web.charts import bar_chart
from tollgate.web.openapi import openapi_document

__all__ = ["DashboardApp", "RunningDashboard", "build_app", "running_dashboard", "serve_dashboard"]

log = logging.getLogger(__name__)

SESSION_COOKIE = "tollgate_session"
LOGIN_CSRF_COOKIE = "tollgate_login_csrf"
PUBLIC_PREFIXES = ("/static/",)
PUBLIC_PATHS = frozenset({"/login", "/healthz", "/favicon.ico"})
# Pages and the API are private and never cached; the CSP allows nothing from elsewhere.
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
_STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
_VIEWER_REFRESH_S = 5.0
_LOGIN_CSRF = re.compile(r"[A-Za-z0-9_-]{32}")
_PAGE_TIMEOUT_MS = 30_000
_CONNECTION_WAIT_S = 5.0

# The request's Principal, set by the middleware (a typed key where aiohttp has them).
_REQUEST_KEY: Any = getattr(web, "RequestKey", None)
PRINCIPAL: Any = _REQUEST_KEY("principal", Principal) if _REQUEST_KEY else "tollgate.principal"


# -- presentation ---------------------------------------------------------------------------


def _tokens(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def _usd(value: Decimal | float | int | None) -> str:
    if value is None:
        return "—"
    amount = Decimal(str(value))
    if amount == 0:
        return "$0"
    if abs(amount) >= 100:
        return f"${amount:,.2f}"
    if abs(amount) >= 1:
        return f"${amount:,.4f}".rstrip("0").rstrip(".")
    return f"${amount:.6f}".rstrip("0").rstrip(".")


def _when(value: datetime | None) -> str:
    return "—" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _percent(part: int, whole: int) -> str:
    return "—" if not whole else f"{100 * part / whole:.1f}%"


def _url(path: str, params: Mapping[str, Any] | None = None, **more: Any) -> str:
    merged = {**(params or {}), **more}
    query = {k: str(v) for k, v in merged.items() if v not in (None, "", False)}
    return path + ("?" + urlencode(query) if query else "")


def _without(params: Mapping[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in names}


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("tollgate.web", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(tokens=_tokens, usd=_usd, when=_when, dict_without=_without)
    env.globals.update(url=_url, percent=_percent, outcomes=data.OUTCOMES)
    return env


# -- errors ---------------------------------------------------------------------------------


def _error(status: int, code: str, message: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    body["error"]["param"] = param  # type: ignore[assignment]
    headers = {"WWW-Authenticate": 'Bearer realm="tollgate"'} if status == 401 else None
    return web.json_response(body, status=status, headers=headers)


def _is_api(request: web.Request) -> bool:
    return request.path.startswith("/api/")


class DashboardApp:
    """The dashboard's state: the pool, the credentials and the templates."""

    def __init__(
        self,
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
        token: str,
        *,
        session_hours: int = 12,
        viewers: ViewerDirectory | None = None,
        token_hint: str = "",
    ) -> None:
        self.pool = pool
        self.viewers = viewers or ViewerDirectory()
        self.tokens = TokenCheck(token, self.viewers)
        self.sessions = SessionSigner(token, self.viewers, session_hours * 3600.0)
        self.templates = _templates()
        self.token_hint = token_hint

    # -- auth --------------------------------------------------------------------------------

    def _principal(self, request: web.Request) -> Principal | bool | None:
        """The principal; None when no credential came; False for a bad bearer token."""
        header = request.headers.get("Authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer":
                return False
            return self.tokens.principal(token) or False
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            return self.sessions.verify(cookie)
        return None

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            response = await self._guarded(request, handler)
        except web.HTTPException as exc:
            _secure(request, exc.headers)
            raise
        if not response.prepared:  # a streamed export sets its own before the first byte
            _secure(request, response.headers)
        return response

    async def _guarded(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS or request.path.startswith(PUBLIC_PREFIXES):
            return await handler(request)
        who = self._principal(request)
        if not isinstance(who, Principal):
            if _is_api(request) or who is False:
                return _error(401, "unauthorized", "send Authorization: Bearer <token>")
            return _see_other(_url("/login", next=request.rel_url.path_qs))
        request[PRINCIPAL] = who
        try:
            return await handler(request)
        except data.ParamError as exc:
            if _is_api(request):
                return _error(400, "invalid_parameter", str(exc), exc.param)
            return self._page(request, "error.html", 400, message=str(exc))
        except data.ScopeError as exc:
            if _is_api(request):
                return _error(403, "forbidden_key", str(exc), "key")
            return self._page(request, "error.html", 403, message=str(exc))
        except (psycopg.OperationalError, PoolTimeout) as exc:
            # Postgres away or too slow: say so (the request path keeps recording meanwhile).
            log.warning("dashboard: ledger unavailable: %s", type(exc).__name__)
            message = "the ledger database is unavailable; try again shortly"
            if _is_api(request):
                return _error(503, "ledger_unavailable", message)
            return self._page(request, "error.html", 503, message=message)

    def _page(
        self, request: web.Request, template: str, status: int = 200, **context: Any
    ) -> web.Response:
        who: Principal | None = request.get(PRINCIPAL)
        text = self.templates.get_template(template).render(
            who=who, path=request.path, query=dict(request.query), **context
        )
        return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")

    @staticmethod
    def _scope(request: web.Request) -> data.Scope:
        who: Principal = request[PRINCIPAL]
        return data.Scope(who.key_id)

    # -- public routes -------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        suffix = Path(name).suffix
        if "/" in name or suffix not in _STATIC_TYPES:
            raise web.HTTPNotFound()
        asset = resources.files("tollgate.web").joinpath("static", name)
        if not asset.is_file():
            raise web.HTTPNotFound()
        return web.Response(
            body=asset.read_bytes(),
            content_type=_STATIC_TYPES[suffix],
            headers={"Cache-Control": "public, max-age=3600"},
        )

    async def favicon(self, request: web.Request) -> web.Response:
        raise web.HTTPMovedPermanently("/static/favicon.svg")

    def _login_form(
        self, request: web.Request, status: int = 200, error: str = "", next_path: str = ""
    ) -> web.Response:
        # Kept while it lasts: a second tab (or a browser's own request for a favicon) that
        # shows the form again must not invalidate the first one.
        csrf = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not _LOGIN_CSRF.fullmatch(csrf):
            csrf = secrets.token_urlsafe(24)
        response = self._page(
            request,
            "login.html",
            status,
            csrf=csrf,
            error=error,
            next=_safe_next(next_path or request.query.get("next", "")),
            hint=self.token_hint,
        )
        response.set_cookie(
            LOGIN_CSRF_COOKIE,
            csrf,
            httponly=True,
            samesite="Strict",
            path="/login",
            secure=_is_https(request),
            max_age=3600,
        )
        return response

    async def login_page(self, request: web.Request) -> web.Response:
        return self._login_form(request)

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        csrf = str(form.get("csrf", ""))
        next_path = str(form.get("next", ""))  # kept when the form is shown again
        if not _same_origin(request) or not same_token(
            csrf, request.cookies.get(LOGIN_CSRF_COOKIE, "")
        ):
            return self._login_form(
                request, 403, "The form expired; please sign in again.", next_path
            )
        who = self.tokens.principal(str(form.get("token", "")))
        if who is None:
            await asyncio.sleep(0.25)  # a guess costs time; tokens are long and random anyway
            return self._login_form(request, 401, "That token is not valid.", next_path)
        cookie, _ = self.sessions.issue(who)
        response = _see_other(_safe_next(str(form.get("next", ""))) or "/")
        response.set_cookie(
            SESSION_COOKIE,
            cookie,
            httponly=True,
            samesite="Strict",
            path="/",
            secure=_is_https(request),
            max_age=int(self.sessions.ttl_s),
        )
        response.del_cookie(LOGIN_CSRF_COOKIE, path="/login")
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        who: Principal = request[PRINCIPAL]
        form = await request.post()
        if not _same_origin(request) or not same_token(str(form.get("csrf", "")), who.csrf):
            return self._page(request, "error.html", 403, message="Missing or stale form token.")
        response = _see_other("/login")
        response.del_cookie(SESSION_COOKIE, path="/")
        return response

    # -- pages ---------------------------------------------------------------------------------

    async def overview(self, request: web.Request) -> web.Response:
        period = data.Period.parse(request.query)
        scope = self._scope(request)
        async with self.pool.connection() as conn:
            series = await data.fetch_series(conn, period, scope)
            users = await data.fetch_top(conn, period, scope, ("end_user_id",))
            models = await data.fetch_top(conn, period, scope, ("provider", "model"))
        requests = sum(p["requests"] for p in series)
        unattributed = sum(p["unattributed"] for p in series)
        return self._page(
            request,
            "overview.html",
            period=period,
            presets=_presets(),
            requests=requests,
            blocked=sum(p["blocked"] for p in series),
            unattributed=unattributed,
            tokens=sum(p["total_tokens"] for p in series),
            cost=sum((p["cost_usd"] for p in series), Decimal(0)),
            cost_chart=bar_chart(series, "cost_usd", label="cost per day", fmt=_usd),
            requests_chart=bar_chart(series, "requests", label="requests per day", fmt=_tokens),
            users=users,
            models=models,
        )

    async def usage_page(self, request: web.Request) -> web.Response:
        where = data.LogFilter.parse(request.query)
        cursor = request.query.get("cursor") or None
        scope = self._scope(request)
        async with self.pool.connection() as conn:
            page = await data.fetch_log(conn, where, scope, cursor=cursor, limit=50)
        return self._page(
            request,
            "usage.html",
            filter=where,
            filters=where.query(),
            page=page,
            cursor=cursor,
        )

    async def users_page(self, request: web.Request) -> web.Response:
        period = data.Period.parse(request.query)
        sort, descending = _sort(request.query)
        search = (request.query.get("q") or "").strip()[: data.MAX_TEXT] or None
        async with self.pool.connection() as conn:
            users, matched = await data.fetch_users(
                conn,
                period,
                self._scope(request),
                search=search,
                sort=sort,
                descending=descending,
                limit=data.page_size(request.query, 100),
            )
        return self._page(
            request,
            "users.html",
            period=period,
            presets=_presets(),
            users=users,
            matched=matched,
            sort=sort,
            descending=descending,
            search=search or "",
        )

    async def user_page(self, request: web.Request) -> web.Response:
        user = _user_param(request, "id")
        period = data.Period.parse(request.query)
        scope = self._scope(request)
        async with self.pool.connection() as conn:
            detail = await self._user_detail(conn, user, period, scope)
        return self._page(
            request,
            "user.html",
            user=user,
            period=period,
            presets=_presets(),
            chart=bar_chart(detail["daily"], "cost_usd", label="cost per day", fmt=_usd),
            **detail,
        )

    async def limits_page(self, request: web.Request) -> web.Response:
        async with self.pool.connection() as conn:
            views = await data.fetch_limits(conn, self._scope(request))
        rows = [limit_record(v.limit, v.period_start, v.reset_at, v.spent) for v in views]
        for row, view in zip(rows, views, strict=True):
            row["subjects_charged"] = view.subjects
        return self._page(request, "limits.html", limits=rows)

    @staticmethod
    async def _user_detail(
        conn: psycopg.AsyncConnection[Any], user: str, period: data.Period, scope: data.Scope
    ) -> dict[str, Any]:
        return {
            "totals": await data.fetch_totals(conn, period, scope, user),
            "daily": await data.fetch_series(conn, period, scope, user),
            "models": await data.fetch_top(conn, period, scope, ("provider", "model"), user=user),
            "keys": await data.fetch_top(conn, period, scope, ("key_id",), user=user),
        }

    # -- API -----------------------------------------------------------------------------------

    async def api_requests(self, request: web.Request) -> web.Response:
        where = data.LogFilter.parse(request.query)
        limit = data.page_size(request.query)
        async with self.pool.connection() as conn:
            page = await data.fetch_log(
                conn,
                where,
                self._scope(request),
                cursor=request.query.get("cursor") or None,
                limit=limit,
            )
        return _json({"data": page.rows, "next_cursor": page.next_cursor})

    async def api_requests_csv(self, request: web.Request) -> web.StreamResponse:
        where = data.LogFilter.parse(request.query)
        scope = self._scope(request)
        scope.check_key(where.key)  # before any byte is sent: a refusal is still a 403
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/csv; charset=utf-8",
                "Content-Disposition": f'attachment; filename="tollgate-requests-{stamp}.csv"',
                "Cache-Control": "no-store",
                **_SECURITY_HEADERS,
            }
        )
        async with self.pool.connection() as conn:
            await conn.execute("SET LOCAL statement_timeout = 0")  # the export takes its time
            async with contextlib.aclosing(data.copy_csv(conn, where, scope)) as chunks:
                # The first chunk (the header) before the status line: a query that fails
                # at once is still an error response, not a cut-off file.
                first = await anext(chunks, b"")
                await response.prepare(request)
                await response.write(first)
                async for chunk in chunks:
                    await response.write(chunk)
        await response.write_eof()
        return response

    async def api_users(self, request: web.Request) -> web.Response:
        period = data.Period.parse(request.query)
        sort, descending = _sort(request.query)
        async with self.pool.connection() as conn:
            users, matched = await data.fetch_users(
                conn,
                period,
                self._scope(request),
                search=(request.query.get("q") or "").strip()[: data.MAX_TEXT] or None,
                sort=sort,
                descending=descending,
                limit=data.page_size(request.query, 100),
            )
        return _json(
            {
                "since": period.since,
                "until": period.until,
                "matched": matched,
                "data": users,
            }
        )

    async def api_user(self, request: web.Request) -> web.Response:
        user = request.match_info.get("user_id") or _user_param(request, "end_user_id")
        period = data.Period.parse(request.query)
        async with self.pool.connection() as conn:
            detail = await self._user_detail(conn, user, period, self._scope(request))
        return _json({"end_user_id": user, "since": period.since, "until": period.until, **detail})

    async def api_daily(self, request: web.Request) -> web.Response:
        q = request.query
        period = data.Period.parse(q)
        group = tuple(g for g in (q.get("group_by") or "").split(",") if g.strip())
        unknown = [g for g in group if g not in data.DAILY_GROUPS]
        if unknown or len(set(group)) != len(group):
            raise data.ParamError(
                "group_by", f"group_by is a comma list of {', '.join(data.DAILY_GROUPS)}"
            )
        async with self.pool.connection() as conn:
            rows, truncated = await data.fetch_daily(
                conn,
                period,
                self._scope(request),
                group=group,
                user=q.get("user") or None,
                key=q.get("key") or None,
                provider=q.get("provider") or None,
                model=q.get("model") or None,
            )
        return _json(
            {"since": period.since, "until": period.until, "truncated": truncated, "data": rows}
        )

    async def api_limits(self, request: web.Request) -> web.Response:
        async with self.pool.connection() as conn:
            views = await data.fetch_limits(conn, self._scope(request))
        out = []
        for view in views:
            record = limit_record(view.limit, view.period_start, view.reset_at, view.spent)
            record["subjects_charged"] = view.subjects
            out.append(record)
        return _json({"data": out})

    async def api_me(self, request: web.Request) -> web.Response:
        who: Principal = request[PRINCIPAL]
        return _json(
            {"role": who.role, "key_id": who.key_id, "viewer_id": who.viewer_id, "name": who.name}
        )

    async def api_openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document())


def _secure(request: web.Request, headers: Any) -> None:
    for name, value in _SECURITY_HEADERS.items():
        headers.setdefault(name, value)
    if not request.path.startswith("/static/"):
        headers.setdefault("Cache-Control", "no-store")


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _json_default(value: Any) -> Any:
    """What json cannot encode itself: exact decimals and ids as strings, ISO times, rows."""
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return vars(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def _json(body: Mapping[str, Any]) -> web.Response:
    return web.Response(
        text=json.dumps(body, separators=(",", ":"), default=_json_default),
        content_type="application/json",
    )


def _user_param(request: web.Request, name: str) -> str:
    user = request.query.get(name, "")
    if not user or len(user) > data.MAX_TEXT or "\x00" in user:
        raise data.ParamError(
            name, f"{name} must name an end user (1 to {data.MAX_TEXT} characters)"
        )
    return user


def _sort(query: Mapping[str, str]) -> tuple[str, bool]:
    sort = (query.get("sort") or "cost_usd").strip()
    order = (query.get("order") or ("asc" if sort == "end_user_id" else "desc")).strip()
    if order not in ("asc", "desc"):
        raise data.ParamError("order", "order must be asc or desc")
    if sort not in data.USER_SORTS:
        raise data.ParamError("sort", f"sort must be one of {', '.join(data.USER_SORTS)}")
    return sort, order == "desc"


def _presets(today: date | None = None) -> list[tuple[str, dict[str, str]]]:
    today = today or datetime.now(UTC).date()
    this_month = today.replace(day=1)
    last_month = (this_month - timedelta(days=1)).replace(day=1)
    tomorrow = today + timedelta(days=1)
    return [
        ("This month", {"month": this_month.strftime("%Y-%m")}),
        ("Last month", {"month": last_month.strftime("%Y-%m")}),
        (
            "Last 7 days",
            {"since": (tomorrow - timedelta(days=7)).isoformat(), "until": tomorrow.isoformat()},
        ),
        (
            "Last 30 days",
            {"since": (tomorrow - timedelta(days=30)).isoformat(), "until": tomorrow.isoformat()},
        ),
    ]


def _safe_next(target: str) -> str:
    """A local path to go to after login; anything else (another site, //host) is dropped."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return ""
    if "\\" in target or any(ord(c) < 32 for c in target):
        return ""
    return target


def _is_https(request: web.Request) -> bool:
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"


def _same_origin(request: web.Request) -> bool:
    """A form post from this dashboard: an Origin header, when sent, names this host."""
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.host


def build_app(dashboard: DashboardApp) -> web.Application:
    app = web.Application(middlewares=[dashboard.middleware], client_max_size=64 * 1024)
    add = app.router.add_route
    add("GET", "/healthz", dashboard.healthz)
    add("GET", "/static/{name}", dashboard.static)
    add("GET", "/favicon.ico", dashboard.favicon)
    add("GET", "/login", dashboard.login_page)
    add("POST", "/login", dashboard.login)
    add("POST", "/logout", dashboard.logout)
    add("GET", "/", dashboard.overview)
    add("GET", "/usage", dashboard.usage_page)
    add("GET", "/users", dashboard.users_page)
    # The id travels in the query: an id such as ".." or "a/b" is no path segment (browsers
    # and HTTP clients resolve dot segments, even percent-encoded ones).
    add("GET", "/user", dashboard.user_page)
    add("GET", "/limits", dashboard.limits_page)
    add("GET", "/api/v1/requests", dashboard.api_requests)
    add("GET", "/api/v1/requests.csv", dashboard.api_requests_csv)
    add("GET", "/api/v1/users", dashboard.api_users)
    add("GET", "/api/v1/users/{user_id:.+}", dashboard.api_user)
    add("GET", "/api/v1/user", dashboard.api_user)  # ?end_user_id=: any id, "." and ".." too
    add("GET", "/api/v1/usage/daily", dashboard.api_daily)
    add("GET", "/api/v1/limits", dashboard.api_limits)
    add("GET", "/api/v1/me", dashboard.api_me)
    add("GET", "/api/v1/openapi.json", dashboard.api_openapi)
    return app


@dataclasses.dataclass(frozen=True)
class RunningDashboard:
    url: str
    token_file: Path | None  # where the admin token is (None: from dashboard_admin_token)
    app: DashboardApp


@contextlib.asynccontextmanager
async def running_dashboard(
    settings: Settings, database_url: str
) -> AsyncIterator[RunningDashboard]:
    """The dashboard served on ``dashboard_address`` until the block ends."""
    token, token_file = admin_token(settings)
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
        database_url,
        min_size=1,
        max_size=4,
        open=False,
        timeout=_CONNECTION_WAIT_S,  # Postgres away: a 503 after this, not a hung page
        # Read-only sessions: whatever goes wrong in here, the dashboard cannot change the
        # ledger. Page queries stop after 30 s; the CSV export lifts that for itself.
        kwargs={
            # work_mem: a month's per-user aggregate sorts in memory instead of on disk.
            "options": "-c default_transaction_read_only=on -c work_mem=32MB"
            f" -c statement_timeout={_PAGE_TIMEOUT_MS}",
            "application_name": "tollgate-dashboard",
        },
    )
    await pool.open(wait=True, timeout=30)
    try:
        viewers = ViewerDirectory()
        async with pool.connection() as conn:
            await viewers.refresh(conn)
        hint = f"the admin token is in {token_file}" if token_file else ""
        dashboard = DashboardApp(
            pool,
            token,
            session_hours=settings.dashboard_session_hours,
            viewers=viewers,
            token_hint=hint,
        )
        refresher = asyncio.create_task(viewers.run(pool.connection, _VIEWER_REFRESH_S))
        runner = web.AppRunner(
            build_app(dashboard), access_log=None, handle_signals=False, shutdown_timeout=5
        )
        await runner.setup()
        try:
            host, _, port = settings.dashboard_address.rpartition(":")
            site = web.TCPSite(runner, host.strip("[]"), int(port))
            await site.start()
            bound = runner.addresses[0][1] if runner.addresses else int(port)
            shown = f"[{host.strip('[]')}]" if ":" in host.strip("[]") else host
            yield RunningDashboard(f"http://{shown}:{bound}/", token_file, dashboard)
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
            await runner.cleanup()
    finally:
        await pool.close()


async def serve_dashboard(settings: Settings, database_url: str, stop: asyncio.Event) -> None:
    """``tollgate dashboard``: serve until ``stop`` is set; the URL goes to stdout."""
    async with running_dashboard(settings, database_url) as running:
        where = f" (admin token in {running.token_file})" if running.token_file else ""
        print(f"dashboard: {running.url}{where}", flush=True)
        await stop.wait()

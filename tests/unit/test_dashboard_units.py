"""The dashboard's pieces that need no database: sessions, tokens, periods, filters, cursors,
charts, the OpenAPI document and the admin token file."""

from __future__ import annotations

import stat
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from tollgate.config import ConfigError, load_settings
from tollgate.ledger.viewers import Viewer, ViewerDirectory
from tollgate.policy.keys import hash_key
from tollgate.web import data
from tollgate.web.auth import ADMIN, Principal, SessionSigner, TokenCheck, admin_token
from tollgate.web.charts import bar_chart
from tollgate.web.openapi import openapi_document
from tollgate.web.server import DashboardApp, _safe_next, _usd, build_app

TOKEN = "an-admin-token-long-enough"


def _directory(*viewers: tuple[str, Viewer]) -> ViewerDirectory:
    directory = ViewerDirectory()
    by_hash = {hash_key(token): viewer for token, viewer in viewers}
    directory._by_hash = by_hash
    directory._by_id = {v.viewer_id: v for v in by_hash.values()}
    return directory


VIEWER = Viewer("vwr_0123456789ab", "team a", "key_aaaaaaaaaaaa")
VIEWER_TOKEN = "tgv_" + "x" * 43


def test_a_session_round_trips_and_any_change_breaks_it() -> None:
    signer = SessionSigner(TOKEN, _directory(), ttl_s=60)
    cookie, who = signer.issue(Principal(ADMIN), now=1000)
    assert who.csrf
    back = signer.verify(cookie, now=1010)
    assert back is not None
    assert back.is_admin
    assert back.csrf == who.csrf
    payload, _, signature = cookie.partition(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    for forged in (
        f"{payload}.{flipped}",
        f"{payload[:-2]}xx.{signature}",
        payload,
        "",
        "....",
        "e30.e30",
        "%%%.###",
    ):
        assert signer.verify(forged, now=1010) is None, forged
    assert signer.verify(cookie, now=1061) is None  # expired
    other = SessionSigner(TOKEN + "-rotated", _directory(), ttl_s=60)
    assert other.verify(cookie, now=1010) is None  # a new admin token ends every session


def test_a_viewer_session_ends_when_its_token_is_revoked() -> None:
    directory = _directory((VIEWER_TOKEN, VIEWER))
    signer = SessionSigner(TOKEN, directory, ttl_s=60)
    check = TokenCheck(TOKEN, directory)
    who = check.principal(VIEWER_TOKEN)
    assert who is not None
    assert who.key_id == VIEWER.key_id
    cookie, _ = signer.issue(who, now=0)
    session = signer.verify(cookie, now=1)
    assert session is not None
    assert session.key_id == VIEWER.key_id
    directory._by_id = {}
    directory._by_hash = {}
    assert signer.verify(cookie, now=1) is None
    assert check.principal(VIEWER_TOKEN) is None


@pytest.mark.parametrize(
    "token", ["", "   ", "wrong", TOKEN + "x", TOKEN[:-1], "tgv_nope", "\udcff", "ü" * 40]
)
def test_only_the_right_tokens_pass(token: str) -> None:
    check = TokenCheck(TOKEN, _directory((VIEWER_TOKEN, VIEWER)))
    assert check.principal(token) is None
    assert check.principal(TOKEN) == Principal(ADMIN)
    assert check.principal(f"  {TOKEN}\n") == Principal(ADMIN)


@pytest.mark.parametrize(
    ("target", "safe"),
    [
        ("/usage?user=a", "/usage?user=a"),
        ("/", "/"),
        ("//evil.example/x", ""),
        ("https://evil.example/", ""),
        ("/\\evil.example", ""),
        ("javascript:alert(1)", ""),
        ("usage", ""),
        ("/usage\r\nSet-Cookie: x", ""),
        ("", ""),
    ],
)
def test_login_only_redirects_to_local_paths(target: str, safe: str) -> None:
    assert _safe_next(target) == safe


def test_periods_read_whole_months_plus_or_minus_the_fewest_days() -> None:
    today = date(2026, 12, 3)

    def pieces(query: dict[str, str]) -> list[tuple[str, date, date, int]]:
        return [
            (p.unit, p.since, p.until, p.sign) for p in data.Period.parse(query, today).pieces()
        ]

    default = data.Period.parse({}, today)
    assert (default.since, default.until) == (date(2026, 12, 1), date(2027, 1, 1))
    assert default.is_month
    assert pieces({}) == [("month", date(2026, 12, 1), date(2027, 1, 1), 1)]
    feb = data.Period.parse({"month": "2026-02"}, today)
    assert (feb.since, feb.until, feb.label()) == (
        date(2026, 2, 1),
        date(2026, 3, 1),
        "February 2026",
    )
    # Mid-January to early April: January whole minus its first 14 days, February and March
    # whole, April's 9 days as days.
    assert pieces({"since": "2026-01-15", "until": "2026-04-10"}) == [
        ("month", date(2026, 1, 1), date(2026, 2, 1), 1),
        ("day", date(2026, 1, 1), date(2026, 1, 15), -1),
        ("month", date(2026, 2, 1), date(2026, 3, 1), 1),
        ("month", date(2026, 3, 1), date(2026, 4, 1), 1),
        ("day", date(2026, 4, 1), date(2026, 4, 10), 1),
    ]
    # "Last 7 days" on 3 December: four November days, and December whole (its days after
    # today hold nothing, so taking them off would cost a read for nothing).
    assert pieces({"since": "2026-11-27", "until": "2026-12-04"}) == [
        ("day", date(2026, 11, 27), date(2026, 12, 1), 1),
        ("month", date(2026, 12, 1), date(2027, 1, 1), 1),
    ]
    assert pieces({"since": "2026-03-02", "until": "2026-03-20"}) == [
        ("month", date(2026, 3, 1), date(2026, 4, 1), 1),  # 18 days in, 13 out
        ("day", date(2026, 3, 1), date(2026, 3, 2), -1),
        ("day", date(2026, 3, 20), date(2026, 4, 1), -1),
    ]
    assert pieces({"since": "2026-03-02", "until": "2026-03-10"}) == [
        ("day", date(2026, 3, 2), date(2026, 3, 10), 1)  # 8 days in, 23 out
    ]
    assert pieces({"since": "2026-12-10", "until": "2026-12-20"}) == []  # all in the future
    inside = data.Period.parse({"since": "2026-03-02", "until": "2026-03-20"}, today)
    assert inside.query() == {"since": "2026-03-02", "until": "2026-03-20"}
    open_end = data.Period.parse({"since": "2026-11-20"}, today)
    assert open_end.until == date(2026, 12, 4)
    for bad in (
        {"month": "2026-13"},
        {"month": "soon"},
        {"since": "2026-05-01", "until": "2026-04-01"},
        {"since": "1900-01-01", "until": "2026-01-01"},
        {"since": "tomorrow"},
    ):
        with pytest.raises(data.ParamError):
            data.Period.parse(bad, today)


def test_log_filters_parse_round_trip_and_respect_the_scope() -> None:
    found = data.LogFilter.parse(
        {"user": " alice ", "model": "gpt-4o", "since": "2026-12-01", "outcome": "blocked"}
    )
    assert found.user == "alice"
    assert found.since == datetime(2026, 12, 1, tzinfo=UTC)
    assert data.LogFilter.parse(found.query()) == found
    assert data.LogFilter.parse({"user": "", "model": "  "}) == data.LogFilter()
    viewer = data.Scope("key_aaaaaaaaaaaa")
    data.LogFilter(key="key_aaaaaaaaaaaa").where(viewer)
    with pytest.raises(data.ScopeError):
        data.LogFilter(key="key_bbbbbbbbbbbb").where(viewer)
    cond, params = data.LogFilter().where(viewer)
    assert params == ["key_aaaaaaaaaaaa"]
    assert "key_id" in cond.as_string(None)
    for bad in (
        {"outcome": "fine"},
        {"since": "last week"},
        {"unattributed": "maybe"},
        {"user": "a", "unattributed": "1"},
        {"tag": "x" * 301},
        {"model": "a\x00b"},
    ):
        with pytest.raises(data.ParamError):
            data.LogFilter.parse(bad)


def test_cursors_round_trip_and_garbage_is_a_parameter_error() -> None:
    at = datetime(2026, 12, 3, 10, 0, 0, 123456, tzinfo=UTC)
    rid = uuid.uuid4()
    assert data.decode_cursor(data.encode_cursor(at, rid)) == (at, rid)
    for bad in ("", "!!!", "bm90IGEgY3Vyc29y", data.encode_cursor(at, rid)[:-3]):
        with pytest.raises(data.ParamError):
            data.decode_cursor(bad)


def test_the_chart_escapes_and_scales() -> None:
    points = [
        {"day": date(2026, 12, 1), "cost_usd": Decimal("0.5")},
        {"day": date(2026, 12, 2), "cost_usd": Decimal("1.0")},
        {"day": date(2026, 12, 3), "cost_usd": Decimal(0)},
    ]
    svg = str(bar_chart(points, "cost_usd", label='<b>"x"</b>', fmt=_usd))
    assert svg.count("<rect") == 3
    assert "&lt;b&gt;" in svg
    assert "<b>" not in svg
    assert 'height="0.0"' in svg  # the zero day
    assert "$1" in svg
    assert str(bar_chart([], "cost_usd", label="empty", fmt=_usd)).startswith("<svg")


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (None, "—"),
        (Decimal(0), "$0"),
        (Decimal("0.0000123"), "$0.000012"),
        (Decimal("2.5"), "$2.5"),
        (Decimal("1234.5678"), "$1,234.57"),
    ],
)
def test_money_is_shown_readably(value: Decimal | None, shown: str) -> None:
    assert _usd(value) == shown


def test_the_openapi_document_covers_every_api_route() -> None:
    app = DashboardApp.__new__(DashboardApp)  # only the route table is built
    served = set()
    for route in build_app(app).router.routes():
        path = route.resource.canonical if route.resource else ""
        if path.startswith("/api/v1/") and route.method == "GET":
            served.add(path.removeprefix("/api/v1").replace("{user_id}", "{end_user_id}"))
    documented = set(openapi_document()["paths"])
    assert served == documented


def test_the_admin_token_file_is_made_once_and_owner_only(tmp_path: Path) -> None:
    settings = load_settings(environ={}, state_dir=str(tmp_path))
    token, path = admin_token(settings)
    assert path == tmp_path / "dashboard-admin-token"
    assert len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert admin_token(settings) == (token, path)
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(ConfigError, match="at least 16"):
        admin_token(load_settings(environ={}, dashboard_admin_token_file=str(short)))
    with pytest.raises(ConfigError, match="at least 16"):
        load_settings(environ={}, dashboard_admin_token="short")
    with pytest.raises(ConfigError, match="not both"):
        load_settings(
            environ={}, dashboard_admin_token=TOKEN, dashboard_admin_token_file=str(short)
        )
    with pytest.raises(ConfigError, match="dashboard_address"):
        load_settings(environ={}, dashboard_address="unix:/tmp/x.sock")

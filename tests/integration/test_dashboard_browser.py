"""The dashboard in a real browser (Debian's Chromium, headless, driven by Playwright) against a
real `tollgate up`: ledger rows written by real traffic through Envoy, pages read back and
compared with the ledger.

One stack and one browser for the whole module: several users (one with an id that strict
user ids refuse, so blocked rows exist), requests without a user id, streamed and tagged
requests. Each test opens its own page in a signed-in browser context and checks what a user
sees and does: the User ID column, filtering by clicking a badge or typing an id (and the Back
button), the CSV export of the filtered rows, sorting the Users page by cost, the flag of a
blocked row, the redirect to the login form and back. A full-page screenshot of every page
goes to ``$TOLLGATE_ARTIFACTS_DIR/browser`` (default ``artifacts/browser`` in the repository).
"""

from __future__ import annotations

import csv
import io
import os
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import openai
import psycopg
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright
from psycopg.rows import dict_row

from tests.integration.conftest import (
    RunningTollgate,
    running_tollgate,
    started_fake_upstream,
    tollgate_command,
    wait_for_rows,
)
from tollgate.localstack import EmbeddedPostgres, free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
MODEL = "gpt-4o-mini"
USER_HEADER = "x-tollgate-user-id"
TAGS_HEADER = "x-tollgate-tags"
WORDS_HEADER = "x-fake-words"  # the fake provider's reply length: distinct costs per user
BAD_ID = "bad id"  # refused with strict_user_ids: a blocked row
LIMIT_ID = "per-user-monthly"
TIMEOUT_MS = 15_000
# (user id or None, reply words, streamed, tags) per request, in the order sent.
TRAFFIC: tuple[tuple[str | None, int, bool, str | None], ...] = (
    ("alice", 30, False, "prod"),
    ("alice", 40, True, None),
    ("alice", 50, False, "prod"),
    ("bob", 200, False, None),
    ("bob", 300, True, "prod"),
    ("carol", 5, False, None),
    (None, 7, False, None),
    (None, 8, True, None),
    (None, 9, False, "prod"),
)
BLOCKED_CALLS = 2
DASH = "\u2014"  # what the log shows for a row without a user id

ROWS_JS = """rows => rows.map(r => {
  const badge = r.querySelector("td.user a.badge");
  const none = r.querySelector("td.user span.nouser");
  const flag = r.querySelector("td.outcome span.flag.blocked");
  return {
    id: r.dataset.requestId,
    cls: r.className,
    user: badge ? badge.dataset.user : null,
    badge_text: badge ? badge.textContent.trim() : null,
    badge_href: badge ? badge.getAttribute("href") : null,
    nouser: none ? none.textContent.trim() : null,
    flag: flag ? flag.textContent.trim() : null,
  };
})"""

USERS_JS = """rows => rows.map(r => {
  const link = r.querySelector("a.user-link");
  const none = r.querySelector("a.nouser");
  return {
    user: link ? link.textContent.trim() : null,
    nouser: none !== null,
    requests: r.querySelector("td:nth-child(2)").textContent.trim(),
    cost: r.querySelector("td.cost").dataset.cost,
  };
})"""


@dataclass
class Stack:
    running: RunningTollgate
    database_url: str
    dashboard_url: str  # ends with "/"
    token: str

    def rows(self, where: str = "TRUE", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Ledger rows, in the log's order (newest first)."""
        with psycopg.connect(self.database_url, row_factory=dict_row) as conn:
            return conn.execute(
                f"SELECT * FROM tollgate.requests WHERE {where}"
                " ORDER BY created_at DESC, request_id DESC",
                params,
            ).fetchall()

    def ids(self, where: str = "TRUE", params: tuple[Any, ...] = ()) -> list[str]:
        return [str(r["request_id"]) for r in self.rows(where, params)]

    def columns(self) -> list[str]:
        with psycopg.connect(self.database_url) as conn:
            found = conn.execute(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_schema = 'tollgate' AND table_name = 'requests'"
                " ORDER BY ordinal_position"
            ).fetchall()
        return [name for (name,) in found]

    def per_user(self, where: str = "TRUE") -> dict[str | None, tuple[int, Decimal]]:
        """(requests, summed cost) per end user, None for the rows without one."""
        with psycopg.connect(self.database_url) as conn:
            found = conn.execute(
                "SELECT end_user_id, count(*), coalesce(sum(cost_usd), 0)"
                f" FROM tollgate.requests WHERE {where} GROUP BY end_user_id"
            ).fetchall()
        return {user: (int(n), Decimal(cost)) for user, n, cost in found}


def _artifacts() -> Path:
    root = Path(os.environ.get("TOLLGATE_ARTIFACTS_DIR", REPO / "artifacts"))
    out = root / "browser"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _send_traffic(running: RunningTollgate) -> None:
    client = openai.OpenAI(base_url=running.envoy_url, api_key="sk-test", max_retries=0)
    try:
        for n, (user, words, streamed, tags) in enumerate(TRAFFIC):
            headers = {WORDS_HEADER: str(words)}
            if user is not None:
                headers[USER_HEADER] = user
            if tags is not None:
                headers[TAGS_HEADER] = tags
            messages: Any = [{"role": "user", "content": f"request {n} " + "x" * (4 * n)}]
            if streamed:
                stream = client.chat.completions.create(
                    model=MODEL,
                    messages=messages,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_headers=headers,
                )
                chunks = list(stream)
                assert chunks[-1].usage is not None
            else:
                reply = client.chat.completions.create(
                    model=MODEL, messages=messages, extra_headers=headers
                )
                assert reply.usage is not None
        for _ in range(BLOCKED_CALLS):
            with pytest.raises(openai.UnprocessableEntityError) as refused:
                client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": "refused"}],
                    extra_headers={USER_HEADER: BAD_ID},
                )
            assert refused.value.code == "invalid_user_id"
    finally:
        client.close()


@pytest.fixture(scope="module")
def stack(pg_server: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`tollgate up` with its dashboard, a fresh ledger database and the traffic above."""
    root = tmp_path_factory.mktemp("browser")
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = pg_server.url_for("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    database_url = pg_server.url_for(name)
    try:
        with (
            started_fake_upstream(root / "fake.log") as upstream,
            running_tollgate(
                root / "state",
                database_url,
                upstream,
                dashboard_address=f"127.0.0.1:{free_port()}",
                strict_user_ids="true",
            ) as running,
        ):
            shown = [line for line in running.process.output if line.startswith("dashboard: ")]
            assert len(shown) == 1, running.process.output
            found = re.fullmatch(r"dashboard: (http://\S+/) \(admin token in (.+)\)\n?", shown[0])
            assert found is not None, shown
            token_file = Path(found.group(2))
            assert token_file == running.state_dir / "dashboard-admin-token"
            token = token_file.read_text(encoding="utf-8").strip()
            assert token
            _send_traffic(running)
            expected = len(TRAFFIC) + BLOCKED_CALLS
            rows = wait_for_rows(database_url, "TRUE", (), expected, timeout_s=30)
            assert len(rows) == expected
            # A limit, so that the Limits page has something to show: made after the traffic,
            # it is charged the rows of its current period when created.
            tollgate_command(
                running.env, "limits", "create", LIMIT_ID, "--scope", "user",
                "--measure", "requests", "--max", "1000", "--period", "month",
            )  # fmt: skip
            yield Stack(running, database_url, found.group(1), token)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield launched
        finally:
            launched.close()


def _new_context(browser: Browser, stack: Stack) -> BrowserContext:
    context = browser.new_context(
        base_url=stack.dashboard_url.rstrip("/"),
        accept_downloads=True,
        viewport={"width": 1400, "height": 900},
    )
    context.set_default_timeout(TIMEOUT_MS)
    return context


def _has_session(context: BrowserContext) -> bool:
    return any(c["name"] == "tollgate_session" for c in context.cookies())


def _sign_in(page: Page, token: str) -> None:
    page.locator("input[name=token]").fill(token)
    page.get_by_role("button", name="Sign in").click()


@pytest.fixture(scope="module")
def signed_in(browser: Browser, stack: Stack) -> Iterator[BrowserContext]:
    """A browser context with the admin's session cookie, set by the login form."""
    context = _new_context(browser, stack)
    page = context.new_page()
    page.goto("/login")
    _sign_in(page, stack.token)
    page.wait_for_url(lambda url: urlsplit(url).path == "/")
    assert _has_session(context)
    page.close()
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def page(signed_in: BrowserContext) -> Iterator[Page]:
    opened = signed_in.new_page()
    try:
        yield opened
    finally:
        opened.close()


def _query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query, keep_blank_values=True)


def _at(path: str, query: dict[str, list[str]] | None = None) -> Callable[[str], bool]:
    """A wait_for_url predicate: this path with exactly this query."""
    return lambda url: urlsplit(url).path == path and _query(url) == (query or {})


def _log_rows(page: Page) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = page.locator("table#log tbody tr[data-request-id]").evaluate_all(
        ROWS_JS
    )
    return found


def _screenshot(page: Page, name: str) -> Path:
    path = _artifacts() / f"{name}.png"
    path.unlink(missing_ok=True)
    page.screenshot(path=str(path), full_page=True)
    assert path.is_file(), path
    assert path.stat().st_size > 0, path
    return path


def test_user_id_column_shows_a_badge_per_user_and_a_dash_without_one(
    page: Page, stack: Stack
) -> None:
    page.goto("/usage")
    expect(page.locator("table#log")).to_be_visible()
    shown = _log_rows(page)
    ledger = stack.rows()
    assert [r["id"] for r in shown] == [str(r["request_id"]) for r in ledger]
    for row, want in zip(shown, ledger, strict=True):
        if want["end_user_id"] is None:
            assert row["user"] is None, row
            assert row["nouser"] == DASH, row
        else:
            assert row["nouser"] is None, row
            assert row["user"] == want["end_user_id"], row
            assert row["badge_text"] == want["end_user_id"], row
            href = urlsplit(row["badge_href"])
            assert href.path == "/usage", row
            assert parse_qs(href.query) == {"user": [want["end_user_id"]]}, row
    assert {r["user"] for r in shown} == {"alice", "bob", "carol", BAD_ID, None}
    assert sum(r["nouser"] == DASH for r in shown) == sum(u is None for u, *_ in TRAFFIC)


def test_clicking_a_badge_filters_to_that_user_and_back_returns(page: Page, stack: Stack) -> None:
    page.goto("/usage")
    everyone = stack.ids()
    expect(page.locator("table#log tbody tr[data-request-id]")).to_have_count(len(everyone))
    page.locator('td.user a.badge[data-user="alice"]').first.click()
    page.wait_for_url(_at("/usage", {"user": ["alice"]}))
    alice = stack.ids("end_user_id = %s", ("alice",))
    assert len(alice) == sum(u == "alice" for u, *_ in TRAFFIC)
    rows = page.locator("table#log tbody tr[data-request-id]")
    expect(rows).to_have_count(len(alice))
    shown = _log_rows(page)
    assert [r["user"] for r in shown] == ["alice"] * len(alice)
    assert [r["id"] for r in shown] == alice
    expect(page.locator("#filter-user")).to_have_value("alice")
    expect(page.locator("p.active-filters .chip")).to_have_text(["user = alice \u00d7"])

    page.go_back()
    page.wait_for_url(_at("/usage"))
    expect(rows).to_have_count(len(everyone))
    assert [r["id"] for r in _log_rows(page)] == everyone


def test_typing_an_id_into_the_filter_keeps_only_that_field_in_the_url(
    page: Page, stack: Stack
) -> None:
    page.goto("/usage")
    page.locator("#filter-user").fill("bob")
    page.locator("form#filters").get_by_role("button", name="Filter").click()
    page.wait_for_url(lambda url: urlsplit(url).path == "/usage" and "user=" in url)
    assert _query(page.url) == {"user": ["bob"]}, page.url
    assert urlsplit(page.url).query == "user=bob"
    bob = stack.ids("end_user_id = %s", ("bob",))
    expect(page.locator("table#log tbody tr[data-request-id]")).to_have_count(len(bob))
    shown = _log_rows(page)
    assert [r["id"] for r in shown] == bob
    assert {r["user"] for r in shown} == {"bob"}

    # A tag link on a row adds to the filter in use; the remove link on its chip drops it.
    page.locator("table#log a.tag", has_text="prod").first.click()
    page.wait_for_url(_at("/usage", {"user": ["bob"], "tag": ["prod"]}))
    both = stack.ids("end_user_id = %s AND 'prod' = ANY(tags)", ("bob",))
    assert 0 < len(both) < len(bob)
    expect(page.locator("table#log tbody tr[data-request-id]")).to_have_count(len(both))
    assert [r["id"] for r in _log_rows(page)] == both
    page.get_by_label("remove tag").click()
    page.wait_for_url(_at("/usage", {"user": ["bob"]}))
    expect(page.locator("table#log tbody tr[data-request-id]")).to_have_count(len(bob))

    # Back, step by step, to the unfiltered log; there the form (whose empty fields the script
    # disabled while submitting) filters again, by another id.
    for query in ({"user": ["bob"], "tag": ["prod"]}, {"user": ["bob"]}, {}):
        page.go_back()
        page.wait_for_url(_at("/usage", query))
    expect(page.locator("table#log tbody tr[data-request-id]")).to_have_count(len(stack.ids()))
    expect(page.locator("form#filters input:disabled, form#filters select:disabled")).to_have_count(
        0
    )
    page.locator("#filter-user").fill("carol")
    page.locator("#filter-user").press("Enter")
    page.wait_for_url(_at("/usage", {"user": ["carol"]}))
    carol = stack.ids("end_user_id = %s", ("carol",))
    assert [r["id"] for r in _log_rows(page)] == carol


def _download_csv(page: Page) -> tuple[list[str], list[dict[str, str]], str]:
    with page.expect_download() as info:
        page.locator("a#export-csv").click()
    download = info.value
    assert download.failure() is None
    text = Path(download.path()).read_text(encoding="utf-8")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = list(reader)
    return list(reader.fieldnames or []), rows, download.suggested_filename


@pytest.mark.parametrize("user", ["alice", None], ids=["filtered", "unfiltered"])
def test_export_csv_downloads_exactly_the_rows_of_the_log(
    page: Page, stack: Stack, user: str | None
) -> None:
    page.goto("/usage" if user is None else f"/usage?user={user}")
    link = page.locator("a#export-csv")
    expect(link).to_have_attribute("download", "")
    href = urlsplit(link.get_attribute("href") or "")
    assert href.path == "/api/v1/requests.csv"
    assert parse_qs(href.query) == ({} if user is None else {"user": [user]})

    header, rows, filename = _download_csv(page)
    assert re.fullmatch(r"tollgate-requests-\d{8}T\d{6}Z\.csv", filename), filename
    assert header == stack.columns()
    want = stack.ids() if user is None else stack.ids("end_user_id = %s", (user,))
    assert [r["request_id"] for r in rows] == want
    by_id = {str(r["request_id"]): r for r in stack.rows()}
    for row in rows:
        ledger = by_id[row["request_id"]]
        assert row["end_user_id"] == (ledger["end_user_id"] or ""), row
        assert row["outcome"] == ledger["outcome"], row
        assert row["tags"] == ";".join(ledger["tags"]), row
        if ledger["cost_usd"] is None:
            assert row["cost_usd"] == "", row
        else:
            assert Decimal(row["cost_usd"]) == ledger["cost_usd"], row


def _users_table(page: Page) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = page.locator("table#users tbody tr").evaluate_all(USERS_JS)
    return found


def test_users_page_sorts_by_cost_both_ways(page: Page, stack: Stack) -> None:
    ledger = stack.per_user()
    costs = [cost for _, cost in ledger.values()]
    assert len(set(costs)) == len(costs), ledger  # distinct, so the order is meaningful

    page.goto("/users")
    cost_header = page.locator("table#users a.sort[data-sort=cost_usd]")
    expect(cost_header).to_have_text("Cost ▼")  # the default: costliest first
    default = _users_table(page)
    assert len(default) == len(ledger)
    shown = {r["user"]: (int(r["requests"]), Decimal(r["cost"])) for r in default}
    assert shown == ledger
    assert [r["nouser"] for r in default] == [r["user"] is None for r in default]
    assert [Decimal(r["cost"]) for r in default] == sorted(costs, reverse=True)

    cost_header.click()
    page.wait_for_url(lambda url: _query(url).get("order") == ["asc"])
    assert _query(page.url)["sort"] == ["cost_usd"]
    expect(cost_header).to_have_text("Cost ▲")
    ascending = [Decimal(r["cost"]) for r in _users_table(page)]
    assert ascending == sorted(costs)

    cost_header.click()
    page.wait_for_url(lambda url: _query(url).get("order") == ["desc"])
    assert _query(page.url)["sort"] == ["cost_usd"]
    expect(cost_header).to_have_text("Cost ▼")
    descending = _users_table(page)
    assert [Decimal(r["cost"]) for r in descending] == sorted(costs, reverse=True)
    assert [r["user"] for r in descending] == [r["user"] for r in default]

    # The row of the requests without a user id leads to exactly those in the log.
    page.locator("table#users a.nouser").click()
    page.wait_for_url(lambda url: _query(url).get("unattributed") == ["true"])
    assert urlsplit(page.url).path == "/usage"
    nobody = stack.ids("end_user_id IS NULL")
    expect(page.locator("table#log tbody tr[data-request-id]")).to_have_count(len(nobody))
    logged = _log_rows(page)
    assert [r["id"] for r in logged] == nobody
    assert {r["nouser"] for r in logged} == {DASH}


def test_a_blocked_row_is_flagged_with_its_reason(page: Page, stack: Stack) -> None:
    blocked = stack.ids("outcome = 'blocked'")
    assert len(blocked) == BLOCKED_CALLS
    reasons = {r["block_reason"] for r in stack.rows("outcome = 'blocked'")}
    assert reasons == {"invalid_user_id"}

    page.goto("/usage")
    flagged = page.locator("table#log tr.outcome-blocked")
    expect(flagged).to_have_count(BLOCKED_CALLS)
    expect(flagged.locator("span.flag.blocked")).to_have_text(
        ["blocked: invalid_user_id"] * BLOCKED_CALLS
    )
    shown = _log_rows(page)
    assert [r["id"] for r in shown if "outcome-blocked" in r["cls"].split()] == blocked
    for row in shown:
        is_blocked = row["id"] in blocked
        assert ("outcome-blocked" in row["cls"].split()) == is_blocked, row
        assert (row["flag"] == "blocked: invalid_user_id") == is_blocked, row
        if is_blocked:
            assert row["user"] == BAD_ID, row

    # The refused id is a user like any other: its badge (an id with a space) filters.
    flagged.first.locator("td.user a.badge").click()
    page.wait_for_url(_at("/usage", {"user": [BAD_ID]}))
    expect(page.locator("table#log tbody tr[data-request-id]")).to_have_count(BLOCKED_CALLS)
    assert [r["id"] for r in _log_rows(page)] == blocked


@pytest.mark.parametrize("target", ["/users", "/usage?user=alice"], ids=["users", "usage-query"])
def test_unauthenticated_visit_redirects_to_login_and_back(
    browser: Browser, stack: Stack, target: str
) -> None:
    context = _new_context(browser, stack)
    try:
        page = context.new_page()
        page.goto(target)
        page.wait_for_url(_at("/login", {"next": [target]}))
        expect(page.locator("input[name=next]")).to_have_value(target)
        expect(page.locator("table")).to_have_count(0)
        assert not _has_session(context)
        if target == "/users":
            _screenshot(page, "login")

        _sign_in(page, stack.token)
        wanted = urlsplit(target)
        page.wait_for_url(_at(wanted.path, parse_qs(wanted.query)))
        assert _has_session(context)
        heading = "Users" if wanted.path == "/users" else "Usage"
        expect(page.get_by_role("heading", level=1)).to_have_text(heading)
    finally:
        context.close()


def test_a_wrong_token_first_still_lands_on_the_page_asked_for(
    browser: Browser, stack: Stack
) -> None:
    context = _new_context(browser, stack)
    try:
        page = context.new_page()
        page.goto("/users")
        page.wait_for_url(_at("/login", {"next": ["/users"]}))
        _sign_in(page, "not-the-token")
        expect(page.get_by_role("alert")).to_have_text("That token is not valid.")
        assert not _has_session(context)
        expect(page.locator("input[name=next]")).to_have_value("/users", timeout=1_000)

        _sign_in(page, stack.token)
        page.wait_for_url(lambda url: urlsplit(url).path != "/login")
        assert _has_session(context)
        assert urlsplit(page.url).path == "/users", page.url
    finally:
        context.close()


def test_every_page_renders_without_errors_and_is_screenshotted(page: Page, stack: Stack) -> None:
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.on(
        "console",
        lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None,
    )
    page.on(
        "response",
        lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None,
    )
    shots: list[Path] = []
    ledger = stack.per_user()
    total = sum(n for n, _ in ledger.values())

    page.goto("/")
    expect(page.locator("#total-requests")).to_have_text(f"{total:,}")
    expect(page.locator("#unattributed-share")).to_have_text(
        f"{100 * ledger[None][0] / total:.1f}%"
    )
    shots.append(_screenshot(page, "overview"))

    page.get_by_role("navigation").get_by_role("link", name="Usage").click()
    page.wait_for_url(_at("/usage"))
    expect(page.locator("table#log tbody tr[data-request-id]")).to_have_count(total)
    shots.append(_screenshot(page, "usage"))

    page.goto("/usage?user=alice")
    expect(page.locator("table#log tbody tr[data-request-id]")).to_have_count(ledger["alice"][0])
    shots.append(_screenshot(page, "usage-alice"))

    page.get_by_role("navigation").get_by_role("link", name="Users").click()
    page.wait_for_url(_at("/users"))
    expect(page.locator("table#users tbody tr")).to_have_count(len(ledger))
    shots.append(_screenshot(page, "users"))

    page.locator("table#users a.user-link", has_text="alice").click()
    page.wait_for_url(lambda url: urlsplit(url).path == "/user" and _query(url)["id"] == ["alice"])
    expect(page.locator("h1 .badge")).to_have_text("alice")
    requests_card = page.locator(".card", has=page.locator(".label", has_text="Requests"))
    expect(requests_card.locator(".value")).to_have_text(str(ledger["alice"][0]))
    shots.append(_screenshot(page, "user-alice"))

    page.get_by_role("link", name="This user's log").click()
    page.wait_for_url(lambda url: urlsplit(url).path == "/usage")
    assert _query(page.url)["user"] == ["alice"]
    expect(page.locator("table#log tbody tr[data-request-id]")).to_have_count(ledger["alice"][0])

    page.get_by_role("navigation").get_by_role("link", name="Limits").click()
    page.wait_for_url(_at("/limits"))
    limit = page.locator(f"section#limit-{LIMIT_ID}")
    expect(limit.locator("h2")).to_have_text(LIMIT_ID)
    # Created after the traffic, the limit was charged its period's rows: each user's ok ones.
    charged = {u: n for u, (n, _) in stack.per_user("outcome = 'ok'").items() if u is not None}
    spend = limit.locator("tbody tr").evaluate_all(
        "rows => rows.map(r => [r.cells[0].textContent.trim(), r.cells[4].textContent.trim()])"
    )
    assert {user: int(n) for user, n in spend} == charged
    shots.append(_screenshot(page, "limits"))

    for shot in shots:
        assert shot.is_file(), shot
        assert shot.stat().st_size > 0, shot
    assert errors == []

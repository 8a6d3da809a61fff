"""Limits through the real stack (`tollgate up`: Envoy, ext_proc, Postgres, the fake
provider), made with the real `tollgate limits` command: a spent budget refuses before the
upstream, for every identity source; named limits; concurrent requests against a nearly
spent limit; what `tollgate limits show` reports against the ledger."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import psycopg
import pytest

from tests.integration.conftest import (
    FakeUpstream,
    RunningTollgate,
    create_key,
    running_tollgate,
    tollgate_command,
    wait_for_rows,
)

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Spend my budget, please."}]
REFRESH_S = 1


@pytest.fixture
def running(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream
) -> Iterator[RunningTollgate]:
    with running_tollgate(
        tmp_path / "state",
        database_url,
        fake_upstream,
        identity_sources="key,header,body_user",
        limit_cache_refresh_s=str(REFRESH_S),
        key_cache_refresh_s=str(REFRESH_S),
    ) as up:
        yield up


def limits(running: RunningTollgate, *args: str) -> Any:
    out = tollgate_command(running.env, "limits", *args, "--format", "json")
    return json.loads(out)


def create(running: RunningTollgate, limit_id: str, *args: str) -> None:
    limits(running, "create", limit_id, *args)
    time.sleep(REFRESH_S + 0.5)  # every replica's view is at most one refresh old


_CLIENTS: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Each test's SDK clients are closed with it (no pooled socket left for the GC)."""
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


def client(running: RunningTollgate, **headers: str) -> openai.OpenAI:
    made = openai.OpenAI(
        base_url=running.envoy_url, api_key="sk-app", default_headers=headers, max_retries=0
    )
    _CLIENTS.append(made)
    return made


def chat(c: openai.OpenAI, **kwargs: Any) -> Any:
    return c.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES, **kwargs)


def row(database_url: str, request_id: str) -> dict[str, Any]:
    (found,) = wait_for_rows(database_url, "request_id = %s", (request_id,), 1, timeout_s=10)
    return found


def burst(apps: list[openai.OpenAI]) -> list[str]:
    """One chat call per app, all at once: "ok" or "refused" (429) for each."""
    outcomes: list[str] = []
    lock = threading.Lock()

    def one(app: openai.OpenAI) -> None:
        try:
            chat(app).parse()
            result = "ok"
        except openai.RateLimitError:
            result = "refused"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=one, args=(app,)) for app in apps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(outcomes) == len(apps)
    return outcomes


# x-fake-words: 2000 makes the answer 2,000 output tokens: $0.02 at gpt-4o's $10/M.
EXPENSIVE = {"x-fake-words": "2000"}


@pytest.mark.parametrize("source", ["header", "body", "key"])
def test_a_spent_daily_budget_refuses_before_the_upstream(
    running: RunningTollgate, database_url: str, fake_upstream: FakeUpstream, source: str
) -> None:
    name = f"u1-{source}"
    plaintext = (
        create_key(running.env, "budgeted", "--user", name, "--credentials", "passthrough")[0]
        if source == "key"
        else ""
    )
    create(
        running,
        name,
        "--scope",
        "user",
        "--subject",
        name,
        "--measure",
        "usd",
        "--max",
        "0.01",
        "--period",
        "day",
    )  # fmt: skip (also waits for the key cache)
    if source == "key":
        app = client(running, **{"x-tollgate-key": plaintext, **EXPENSIVE})
        extra: dict[str, Any] = {}
    elif source == "header":
        app = client(running, **{"x-tollgate-user-id": name, **EXPENSIVE})
        extra = {}
    else:
        app = client(running, **EXPENSIVE)
        extra = {"user": name}

    first = chat(app, **extra)
    first.parse()
    # What was left when it was admitted (its own cost is known only after the headers).
    assert first.headers["x-tollgate-limit-remaining"] == "0.01"
    assert first.headers["x-tollgate-limit-reset"].endswith("T00:00:00Z")
    fake_upstream.clear()
    with pytest.raises(openai.RateLimitError) as caught:
        chat(app, **extra)
    response = caught.value.response
    assert response.json()["error"]["code"] == "budget_exceeded"
    assert name in response.json()["error"]["message"]
    assert int(response.headers["retry-after"]) > 0
    assert fake_upstream.recorded() == {"requests": [], "connections": 0}
    blocked = row(database_url, response.headers["x-tollgate-request-id"])
    assert (blocked["outcome"], blocked["block_reason"], blocked["end_user_id"]) == (
        "blocked",
        "budget_exceeded",
        name,
    )
    assert name in blocked["limit_ids"]
    # Another user is not affected.
    other = client(running, **{"x-tollgate-user-id": "u2"})
    assert chat(other).parse().usage.completion_tokens > 0


def test_named_limits_are_charged_when_named_and_show_equals_the_ledger(
    running: RunningTollgate, database_url: str
) -> None:
    create(running, "team-a", "--scope", "named", "--measure", "tokens", "--max", "1000000",
           "--period", "month")  # fmt: skip
    app = client(running, **{"x-tollgate-user-id": "u3"})
    for header in ("x-tollgate-limit-ids", "xproxy-limit-ids"):
        raw = app.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers={header: "team-a"}
        )
        raw.parse()
        row(database_url, raw.headers["x-tollgate-request-id"])
    chat(app).parse()  # not named: not charged
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        app.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers={"xproxy-limit-ids": "team-b"}
        )
    assert caught.value.response.json()["error"]["code"] == "unknown_limit_id"
    deadline = time.monotonic() + 10
    while True:
        shown = limits(running, "show", "team-a")
        with psycopg.connect(database_url) as conn:
            tokens, requests = conn.execute(
                "SELECT sum(input_tokens + output_tokens), count(*) FROM tollgate.requests"
                " WHERE 'team-a' = ANY(limit_ids) AND outcome <> 'blocked'"
            ).fetchone()  # type: ignore[misc]
        (spend,) = shown["spend"]
        if spend["requests"] == requests == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (spend["requests"], spend["tokens"]) == (2, tokens)
    assert Decimal(spend["remaining"]) == 1_000_000 - tokens


def test_concurrent_requests_against_a_nearly_spent_limit_stay_within_it(
    running: RunningTollgate, database_url: str, fake_upstream: FakeUpstream
) -> None:
    # A requests limit counts a request when it is admitted, so one replica admits exactly
    # what is left (docs/limits.md: the bound for requests is 0 on one replica).
    create(running, "burst", "--scope", "user", "--subject", "u4", "--measure", "requests",
           "--max", "5", "--period", "hour")  # fmt: skip
    app = client(running, **{"x-tollgate-user-id": "u4"})
    chat(app).parse()  # 1 of 5 spent
    outcomes = burst([app] * 32)
    # In-flight requests count: exactly the 4 left are admitted, whatever the interleaving.
    assert outcomes.count("ok") == 4
    assert outcomes.count("ok") + 1 == len(
        wait_for_rows(database_url, "end_user_id = 'u4' AND outcome = 'ok'", (), 5, timeout_s=10)
    )


def test_two_tollgates_on_one_postgres_enforce_one_budget(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream
) -> None:
    """Each admits its share of what is left (the remainder / the replicas alive) per refresh,
    so two do not admit twice the budget. The bound (docs/limits.md), for a requests limit of
    M with R replicas whose requests finish and ship within a refresh: M + (R-1) * ceil(M/R)."""
    maximum, replicas = 10, 2
    settings = {"limit_cache_refresh_s": "1", "identity_sources": "header"}
    with (
        running_tollgate(tmp_path / "a", database_url, fake_upstream, **settings) as a,
        running_tollgate(tmp_path / "b", database_url, fake_upstream, **settings) as b,
    ):
        limits(a, "create", "shared", "--scope", "global", "--measure", "requests",
               "--max", str(maximum), "--period", "hour")  # fmt: skip
        time.sleep(2.5)  # both have refreshed since: each knows the limit and the other
        apps = [client(r, **{"x-tollgate-user-id": "u5"}) for r in (a, b)]
        admitted = 0
        for _wave in range(3):
            outcomes = burst([apps[i % 2] for i in range(20)])
            admitted += outcomes.count("ok")
            time.sleep(2.5)  # shipped, and both refreshed
        bound = maximum + (replicas - 1) * -(-maximum // replicas)
        assert maximum <= admitted <= bound, admitted
        rows = wait_for_rows(
            database_url, "end_user_id = 'u5' AND outcome = 'ok'", (), admitted, timeout_s=10
        )
        assert len(rows) == admitted
        shown = limits(a, "show", "shared")
        assert shown["spend"][0]["requests"] == admitted


def test_a_request_whose_max_tokens_alone_exceeds_the_remainder_is_refused(
    running: RunningTollgate, fake_upstream: FakeUpstream
) -> None:
    # Envoy reads max_tokens from the body (json_to_metadata); 2,000 output tokens of gpt-4o
    # may cost $0.02, more than the $0.01 left.
    create(running, "u6-daily", "--scope", "user", "--subject", "u6", "--measure", "usd",
           "--max", "0.01", "--period", "day")  # fmt: skip
    app = client(running, **{"x-tollgate-user-id": "u6"})
    fake_upstream.clear()
    with pytest.raises(openai.RateLimitError) as caught:
        chat(app, max_tokens=2000)
    assert caught.value.response.json()["error"]["code"] == "budget_exceeded"
    assert fake_upstream.recorded()["requests"] == []
    fits = chat(app, max_tokens=100)
    assert fits.parse().usage.completion_tokens <= 100


class _Hooks(http.server.BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_a_webhook_gets_one_signed_alert_per_threshold_per_period(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream
) -> None:
    _Hooks.received = []
    hooks = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hooks)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    secret = tmp_path / "webhook-secret"
    secret.write_text("whsec-test\n")
    settings = {
        "limit_cache_refresh_s": "1",
        "alert_webhook_url": f"http://127.0.0.1:{hooks.server_address[1]}/alerts",
        "alert_webhook_secret_file": str(secret),
    }
    try:
        with running_tollgate(tmp_path / "s", database_url, fake_upstream, **settings) as up:
            limits(up, "create", "u7-hourly", "--scope", "user", "--subject", "u7", "--measure",
                   "requests", "--max", "4", "--period", "hour", "--thresholds", "0.5,1",
                   "--mode", "warn")  # fmt: skip
            time.sleep(REFRESH_S + 0.5)
            app = client(up, **{"x-tollgate-user-id": "u7"})
            for _ in range(7):  # warn: all let through; 2 of 4 crosses 0.5, 4 of 4 crosses 1
                chat(app).parse()
            deadline = time.monotonic() + 15
            while len(_Hooks.received) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.5)  # anything more would have arrived by now
    finally:
        hooks.shutdown()
        hooks.server_close()
    assert len(_Hooks.received) == 2
    documents = []
    for headers, body in _Hooks.received:
        expected = "sha256=" + hmac.new(b"whsec-test", body, hashlib.sha256).hexdigest()
        assert headers["x-tollgate-signature"] == expected
        documents.append(json.loads(body))
    assert sorted((d["limit_id"], d["threshold"], d["subject"]) for d in documents) == [
        ("u7-hourly", "0.5", None),
        ("u7-hourly", "1", None),
    ]


def test_a_configured_default_budget_limits_every_user(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream
) -> None:
    with running_tollgate(
        tmp_path / "s", database_url, fake_upstream, default_user_budget="2 requests/day"
    ) as up:
        u8 = client(up, **{"x-tollgate-user-id": "u8"})
        chat(u8).parse()
        chat(u8).parse()
        with pytest.raises(openai.RateLimitError) as caught:
            chat(u8)
        assert "config:default-user-budget" in caught.value.response.json()["error"]["message"]
        assert chat(client(up, **{"x-tollgate-user-id": "u9"})).parse().usage is not None
    bad = tollgate_command_result(tmp_path, database_url, fake_upstream, "2 requests/fortnight")
    assert bad.returncode != 0
    assert "default_user_budget" in bad.stderr


def tollgate_command_result(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream, budget: str
) -> Any:
    """`tollgate up` with a budget it cannot read: it must refuse to start."""
    import subprocess
    import sys

    from tests.integration.conftest import tollgate_env

    env = tollgate_env(
        tmp_path / "bad",
        database_url=database_url,
        upstream_url=fake_upstream.url,
        default_user_budget=budget,
    )
    return subprocess.run(
        [sys.executable, "-m", "tollgate", "up"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

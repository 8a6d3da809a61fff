"""Upstream routing through real Envoy (dynamic forward proxy), Tollgate and Postgres (issue 4).

Two recording upstreams on different ports stand in for providers and custom base URIs.
Whether a refused request reached anything is checked by both upstreams' records and by
Envoy's own upstream connection counters.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import psycopg
import pytest
from genai_prices import Usage, calc_price

from tests.integration.conftest import (
    FakeUpstream,
    RunningTollgate,
    create_key,
    row_for,
    running_tollgate,
    started_fake_upstream,
)
from tollgate.localstack import free_port

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Route me."}]
PROVIDER_KEY = "sk-provider-held-by-gateway-7d1e"


@pytest.fixture
def second_upstream(tmp_path: Path) -> Iterator[FakeUpstream]:
    with started_fake_upstream(tmp_path / "fake2.log") as upstream:
        yield upstream


def envoy_upstream_connections(running: RunningTollgate) -> int:
    """Connections Envoy has opened to any upstream so far."""
    admin = (running.state_dir / "envoy-admin-address").read_text().strip()
    url = f"http://{admin}/stats?format=json&filter=^cluster\\.upstream_https?\\.upstream_cx_total$"
    with urllib.request.urlopen(url, timeout=5) as r:
        stats = json.loads(r.read())["stats"]
    assert stats, "no upstream cluster counters: the cluster names changed?"
    return sum(int(s.get("value", 0)) for s in stats)


def raw_post(running: RunningTollgate, headers: dict[str, str]) -> tuple[int, dict[str, Any], str]:
    """POST a chat completion with exact header bytes; (status, JSON body, request id)."""
    port = int(running.envoy_url.split(":")[2].split("/")[0])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES})
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=body,
        headers={"Content-Type": "application/json", **headers},
    )
    response = conn.getresponse()
    payload = json.loads(response.read() or b"{}")
    conn.close()
    return response.status, payload, response.getheader("x-tollgate-request-id") or ""


def test_base_uri_header_routes_to_allow_listed_upstreams(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream, second_upstream: FakeUpstream
) -> None:
    first_base = fake_upstream.url + "/team-a"
    second_base = second_upstream.url
    allow = f"{first_base},{second_base}"
    with running_tollgate(
        tmp_path / "state", database_url, fake_upstream, base_uri_allow_list=allow
    ) as running:
        for base, upstream, other, prefix in (
            (first_base, fake_upstream, second_upstream, "/team-a"),
            (second_base, second_upstream, fake_upstream, ""),
        ):
            fake_upstream.clear()
            second_upstream.clear()
            client = openai.OpenAI(
                base_url=running.envoy_url,
                api_key="sk-app-own-key",
                default_headers={"x-tollgate-base-uri": base, "x-tollgate-user-id": "router"},
                max_retries=0,
            )
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=MESSAGES
            )
            raw.parse()
            (seen,) = upstream.recorded()["requests"]
            assert seen["path"] == prefix + "/v1/chat/completions"
            assert other.recorded()["requests"] == []
            names = {name.lower() for name, _ in seen["headers"]}
            assert not any(n.startswith(("x-tollgate-", "xproxy-")) for n in names), names
            row = row_for(database_url, raw.headers["x-tollgate-request-id"])
            assert row["upstream_base_uri"] == base
            assert row["outcome"] == "ok"


REFUSED = [
    "http://169.254.169.254",
    "http://[::ffff:169.254.169.254]",
    "http://2852039166",
    "file:///etc/passwd",
    "gopher://x",
    "https://allowed.example@evil.example/",
    "not a url at all",
]


def test_base_uris_off_the_allow_list_are_refused_without_a_connection(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream, second_upstream: FakeUpstream
) -> None:
    allowed = second_upstream.url + "/team-b"
    host_port = second_upstream.url.removeprefix("http://")
    with running_tollgate(
        tmp_path / "state", database_url, fake_upstream, base_uri_allow_list=allowed
    ) as running:
        refused = [
            *REFUSED,
            f"http://localhost:{free_port()}/team-b",  # a port that is not allowed
            f"http://{host_port}/team-c",  # another path prefix
            f"http://{host_port}",  # the allowed origin without its prefix
            f"https://{host_port}/team-b",  # another scheme
        ]
        before = envoy_upstream_connections(running)
        for value in refused:
            status, payload, request_id = raw_post(running, {"x-tollgate-base-uri": value})
            assert status == 403, (value, payload)
            assert payload["error"]["code"] == "base_uri_not_allowed", value
            row = row_for(database_url, request_id)
            assert (row["outcome"], row["block_reason"]) == ("blocked", "base_uri_not_allowed")
        assert envoy_upstream_connections(running) == before
        for upstream in (fake_upstream, second_upstream):
            assert upstream.recorded() == {"requests": [], "connections": 0}
        # The alias header is held to the same list.
        status, payload, _ = raw_post(
            running, {"xproxy-provider-baseuri": "http://169.254.169.254"}
        )
        assert (status, payload["error"]["code"]) == (403, "base_uri_not_allowed")
        # And the allowed one works, so the refusals above are the list's doing.
        status, payload, _ = raw_post(running, {"xproxy-provider-baseuri": allowed})
        assert status == 200, payload


def test_model_prefix_selects_the_provider_and_is_removed(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream
) -> None:
    with running_tollgate(tmp_path / "state", database_url, fake_upstream) as running:
        client = openai.OpenAI(base_url=running.envoy_url, api_key="sk-app-own", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="openai/gpt-4o-mini", messages=MESSAGES
        )
        completion = raw.parse()
        # The fake upstream answers with the model it was sent.
        assert completion.model == "gpt-4o-mini"
        (seen,) = fake_upstream.recorded()["requests"]
        assert seen["model"] == "gpt-4o-mini"
        row = row_for(database_url, raw.headers["x-tollgate-request-id"])
        assert (row["provider"], row["model"]) == ("openai", "gpt-4o-mini")
        assert row["cost_usd"] is not None


def test_gateway_key_gets_the_provider_key_injected_and_never_leaks(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream
) -> None:
    state = tmp_path / "state"
    config = tmp_path / "tollgate.toml"
    config.write_text('[providers.openai]\napi_key_env = "TEST_OPENAI_KEY"\n', encoding="utf-8")
    with running_tollgate(
        state,
        database_url,
        fake_upstream,
        extra_env={"TEST_OPENAI_KEY": PROVIDER_KEY},
        config=str(config),
        key_cache_refresh_s="1",
        log_level="debug",
    ) as running:
        gateway_key, key_id = create_key(running.env, "injected")
        # The app holds only its gateway key, sent the way the SDK sends any API key.
        client = openai.OpenAI(base_url=running.envoy_url, api_key=gateway_key, max_retries=0)
        deadline = time.monotonic() + 10
        while True:  # the new key is known at the next cache refresh
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=MESSAGES, user="inj-user"
                )
                break
            except openai.AuthenticationError:
                assert time.monotonic() < deadline, "new key never accepted"
                time.sleep(0.1)
        raw.parse()
        seen = fake_upstream.recorded()["requests"][-1]
        auth = [v for n, v in seen["headers"] if n.lower() == "authorization"]
        assert auth == [f"Bearer {PROVIDER_KEY}"]
        assert gateway_key not in json.dumps(seen)
        row = row_for(database_url, raw.headers["x-tollgate-request-id"])
        assert row["key_id"] == key_id
        logs = "".join(running.process.output)
    logs += "".join(p.read_text(errors="replace") for p in state.glob("*.log"))
    with psycopg.connect(database_url) as conn:
        ledger = conn.execute(
            "SELECT string_agg(t::text, '\n') FROM tollgate.requests t"
        ).fetchone()
    assert ledger is not None
    assert ledger[0]
    for secret in (PROVIDER_KEY, gateway_key):
        assert secret not in logs
        assert secret not in ledger[0]


def test_azure_deployment_is_routed_and_priced_as_the_named_model(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream
) -> None:
    config = tmp_path / "tollgate.toml"
    config.write_text(
        f"""
[providers.azure]
base_uri = "{fake_upstream.url}"
auth = "api-key"
api = "azure"
api_key_env = "TEST_AZURE_KEY"
""",
        encoding="utf-8",
    )
    with running_tollgate(
        tmp_path / "state", database_url, fake_upstream, config=str(config)
    ) as running:
        client = openai.AzureOpenAI(
            azure_endpoint=running.envoy_url.removesuffix("/v1"),
            api_key="azure-app-key",
            api_version="2024-10-21",
            default_headers={"x-tollgate-route-as-resource": "gpt-4o"},
            max_retries=0,
        )
        raw = client.chat.completions.with_raw_response.create(
            model="prod-4o-deployment", messages=MESSAGES
        )
        completion = raw.parse()
        (seen,) = fake_upstream.recorded()["requests"]
        assert seen["path"] == (
            "/openai/deployments/prod-4o-deployment/chat/completions?api-version=2024-10-21"
        )
        assert ("api-key", "azure-app-key") in [tuple(h) for h in seen["headers"]]
        row = row_for(database_url, raw.headers["x-tollgate-request-id"])
        assert (row["provider"], row["model"]) == ("azure", "gpt-4o")
        assert completion.usage is not None
        expected = calc_price(
            Usage(
                input_tokens=completion.usage.prompt_tokens,
                output_tokens=completion.usage.completion_tokens,
            ),
            model_ref="gpt-4o",
            provider_id="azure",
        ).total_price
        assert row["cost_usd"] == Decimal(expected).quantize(row["cost_usd"])

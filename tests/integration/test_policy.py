"""Identity and policy through real Envoy, real Tollgate and real Postgres (issue 3).

Clients are the official `openai` SDK and, where exact control over header bytes is needed
(mixed case, repeated headers), `http.client`. Whether a refused request reached the provider
is checked twice: by the recording upstream and by Envoy's own upstream connection counter.
"""

from __future__ import annotations

import http.client
import itertools
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import openai
import psycopg
import pytest

from tests.integration.conftest import (
    FakeUpstream,
    RunningTollgate,
    create_key,
    row_for,
    running_tollgate,
    tollgate_command,
)
from tests.jwt_support import make_signing_key, sign
from tollgate.policy.headers import ATTRIBUTION_HEADERS

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Who am I?"}]


def envoy_upstream_stats(running: RunningTollgate) -> tuple[int, int]:
    """(connections, requests) Envoy has opened/sent to any upstream cluster so far."""
    admin = (running.state_dir / "envoy-admin-address").read_text().strip()
    pattern = "^cluster\\.upstream_https?\\.upstream_(cx|rq)_total$"
    with urllib.request.urlopen(
        f"http://{admin}/stats?format=json&filter={pattern}", timeout=5
    ) as r:
        stats = json.loads(r.read())["stats"]
    assert stats, "no upstream cluster counters: the cluster names changed?"
    cx = sum(int(s.get("value", 0)) for s in stats if s["name"].endswith("upstream_cx_total"))
    rq = sum(int(s.get("value", 0)) for s in stats if s["name"].endswith("upstream_rq_total"))
    return cx, rq


def metric(running: RunningTollgate, name: str) -> float:
    """One sample of Tollgate's Prometheus /metrics, by its full name with labels."""
    address = running.env["TOLLGATE_METRICS_ADDRESS"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    raise AssertionError(f"metric {name} not exported")


def client(running: RunningTollgate, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=running.envoy_url,
        api_key="sk-app-own-key",
        default_headers=headers,
        max_retries=0,
    )


def chat(c: openai.OpenAI, **kwargs: Any) -> str:
    """One chat completion; returns its x-tollgate-request-id."""
    raw = c.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, **kwargs
    )
    raw.parse()
    return raw.headers["x-tollgate-request-id"]


# -- 1. nothing of the attribution headers reaches the upstream ---------------------------------


def test_attribution_headers_never_reach_the_upstream(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream
) -> None:
    with running_tollgate(tmp_path / "state", database_url, fake_upstream) as running:
        token, key_id = create_key(running.env, "strip-test", "--credentials", "passthrough")
        # Named limits must exist: the limit-id headers below name these.
        for limit_id in ("value-1", "value-2"):
            tollgate_command(
                running.env, "limits", "create", limit_id, "--scope", "named",
                "--measure", "requests", "--max", "1000000", "--period", "total",
            )  # fmt: skip
        # The caches reload every 5 s (keys) and 2 s (limits) by default: wait for both.
        deadline = time.monotonic() + 15
        sent: list[tuple[str, str]] = []
        for name in sorted(ATTRIBUTION_HEADERS):
            value = {
                "x-tollgate-key": token,
                "x-tollgate-enforce-user-id": "true",
                "x-usagepanda-enforce-user-ids": "true",
                "x-tollgate-logging-disable": "false",
                "xproxy-logging-disable": "false",
                "x-tollgate-base-uri": fake_upstream.url,
                "xproxy-provider-baseuri": fake_upstream.url,
            }.get(name, "value-1")
            # Mixed case on the wire, and every header repeated once.
            mixed = "-".join(part.capitalize() for part in name.split("-"))
            sent += [(mixed, value), (name.upper(), value if "key" in name else "value-2")]
        sent += [
            ("X-Tollgate-Forward-X-Trace-Id", "trace-123"),
            ("X-Tollgate-Jwt", "not-a-jwt-and-never-forwarded"),
            ("XPROXY-FORWARD-OpenAI-Organization", "org-42"),
        ]
        port = int(running.envoy_url.split(":")[2].split("/")[0])
        body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode()
        while True:
            fake_upstream.clear()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.putrequest("POST", "/v1/chat/completions", skip_accept_encoding=True)
            for name, value in [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Authorization", "Bearer sk-app-own-key"),
                *sent,
            ]:
                conn.putheader(name, value)
            conn.endheaders(body)
            try:
                response = conn.getresponse()
                answer = response.read()
            finally:
                conn.close()
            if response.status not in (401, 422) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert response.status == 200, answer
        request_id = response.getheader("x-tollgate-request-id")

        (seen,) = fake_upstream.recorded()["requests"]
        received = [(n.lower(), v) for n, v in seen["headers"]]
        names = {n for n, _ in received}
        leaked = {
            n for n in names if n in ATTRIBUTION_HEADERS or n.startswith(("x-tollgate-", "xproxy-"))
        }
        assert leaked == set(), f"attribution headers reached the upstream: {leaked}"
        assert ("x-trace-id", "trace-123") in received
        assert ("openai-organization", "org-42") in received
        assert ("authorization", "Bearer sk-app-own-key") in received
        assert token not in json.dumps(seen)

        row = row_for(database_url, request_id)
        assert row["key_id"] == key_id
        assert row["end_user_id"] == "value-1"
        # Repeated list headers are combined; for any other header the first value counts.
        assert row["tags"] == ["value-1", "value-2"]
        assert row["limit_ids"] == ["value-1", "value-2"]
        assert (row["use_case_id"], row["use_case_name"], row["use_case_version"]) == (
            "value-1",
            "value-1",
            "value-1",
        )
        assert row["logging_disabled"] is False


# -- 2. every identity source, and the configured order --------------------------------------------


@pytest.fixture
def jwt_settings(tmp_path: Path) -> tuple[dict[str, str], Any]:
    private_key, jwks = make_signing_key("test-kid")
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(jwks))
    settings = {
        "jwt_issuer": "https://idp.test",
        "jwt_audiences": "tollgate",
        "jwt_jwks_file": str(jwks_file),
    }
    return settings, private_key


def test_identity_sources_in_order(
    tmp_path: Path,
    database_url: str,
    fake_upstream: FakeUpstream,
    jwt_settings: tuple[dict[str, str], Any],
) -> None:
    settings, private_key = jwt_settings
    now = int(time.time())
    token = sign(
        private_key,
        "test-kid",
        {
            "iss": "https://idp.test",
            "aud": "tollgate",
            "sub": "jwt-user",
            "iat": now,
            "exp": now + 600,
        },
    )
    with running_tollgate(
        tmp_path / "state", database_url, fake_upstream, key_cache_refresh_s="1", **settings
    ) as running:
        key, _ = create_key(
            running.env, "bound", "--user", "key-user", "--credentials", "passthrough"
        )
        time.sleep(2)  # one cache refresh
        header = {"x-tollgate-user-id": "header-user"}
        body_all = {
            "user": "body-user",
            "extra_body": {
                "safety_identifier": "safety-user",
                "metadata": {"user_id": "meta-user"},
            },
        }
        cases: list[tuple[str, dict[str, str], dict[str, Any], str, str]] = [
            (
                "jwt beats all",
                {"x-tollgate-jwt": f"Bearer {token}", "x-tollgate-key": key, **header},
                body_all,
                "jwt-user",
                "jwt",
            ),
            ("key beats client", {"x-tollgate-key": key, **header}, body_all, "key-user", "key"),
            ("header", header, body_all, "header-user", "header"),
            ("alias header", {"xproxy-user-id": "alias-user"}, body_all, "alias-user", "header"),
            ("body user", {}, body_all, "body-user", "body_user"),
            (
                "safety_identifier",
                {},
                {
                    "extra_body": {
                        "safety_identifier": "safety-user",
                        "metadata": {"user_id": "meta-user"},
                    }
                },
                "safety-user",
                "body_safety_identifier",
            ),
            (
                "metadata.user_id",
                {},
                {"extra_body": {"metadata": {"user_id": "meta-user"}}},
                "meta-user",
                "body_metadata_user_id",
            ),
            ("300 characters", {"x-tollgate-user-id": "u" * 300}, {}, "u" * 255, "header"),
            (
                "empty is absent",
                {"x-tollgate-user-id": ""},
                {"user": "body-user"},
                "body-user",
                "body_user",
            ),
        ]
        for label, headers, kwargs, user, source in cases:
            request_id = chat(client(running, **headers), **kwargs)
            row = row_for(database_url, request_id)
            assert (row["end_user_id"], row["identity_source"]) == (user, source), label
        request_id = chat(client(running))
        row = row_for(database_url, request_id)
        assert (row["end_user_id"], row["identity_source"]) == (None, None)

    # Another order, strict ids: the body's user comes before the header; "a b" is refused.
    with running_tollgate(
        tmp_path / "state2",
        database_url,
        fake_upstream,
        identity_sources="body_user,header",
        strict_user_ids="true",
    ) as running:
        c = client(running, **{"x-tollgate-user-id": "header-user"})
        row = row_for(database_url, chat(c, user="body-user"))
        assert (row["end_user_id"], row["identity_source"]) == ("body-user", "body_user")
        row = row_for(database_url, chat(c))
        assert (row["end_user_id"], row["identity_source"]) == ("header-user", "header")

        fake_upstream.clear()
        before = envoy_upstream_stats(running)
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            chat(client(running, **{"x-tollgate-user-id": "a b"}))
        assert caught.value.code == "invalid_user_id"
        assert envoy_upstream_stats(running) == before
        assert fake_upstream.recorded()["requests"] == []
        row = row_for(database_url, caught.value.response.headers["x-tollgate-request-id"])
        assert (row["outcome"], row["block_reason"], row["end_user_id"]) == (
            "blocked",
            "invalid_user_id",
            "a b",
        )


# -- 3. the enforcement matrix ----------------------------------------------------------------


@pytest.mark.parametrize("global_on", [False, True], ids=["global-off", "global-on"])
def test_enforcement_matrix_through_envoy(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream, global_on: bool
) -> None:
    env_for_keys = {}
    with running_tollgate(
        tmp_path / "state",
        database_url,
        fake_upstream,
        enforce_user_id=str(global_on).lower(),
        key_cache_refresh_s="1",
    ) as running:
        env_for_keys = running.env
        key_on, _ = create_key(
            env_for_keys, "enforcing", "--enforce-user-id", "--credentials", "passthrough"
        )
        key_off, _ = create_key(
            env_for_keys, "lenient", "--no-enforce-user-id", "--credentials", "passthrough"
        )
        time.sleep(2)  # one cache refresh
        cases = itertools.product(
            [("on", key_on), ("off", key_off)],
            ["true", "false", None],
            [True, False],
        )
        for (key_name, key), override, has_identity in cases:
            label = f"global={global_on} key={key_name} override={override} identity={has_identity}"
            headers = {"x-tollgate-key": key}
            if override is not None:
                headers["x-tollgate-enforce-user-id"] = override
            kwargs: dict[str, Any] = {"user": "matrix-user"} if has_identity else {}
            # Default policy: a request may switch enforcement on, never off.
            enforced = key_name == "on" or override == "true"
            should_refuse = enforced and not has_identity

            fake_upstream.clear()
            before = envoy_upstream_stats(running)
            if should_refuse:
                with pytest.raises(openai.UnprocessableEntityError) as caught:
                    chat(client(running, **headers), **kwargs)
                assert caught.value.code == "user_id_required", label
                assert caught.value.body is not None
                assert caught.value.body["code"] == "user_id_required", label
                assert envoy_upstream_stats(running) == before, label
                assert fake_upstream.recorded() == {"requests": [], "connections": 0}, label
                request_id = caught.value.response.headers["x-tollgate-request-id"]
                row = row_for(database_url, request_id)
                assert (row["outcome"], row["block_reason"], row["status_code"]) == (
                    "blocked",
                    "user_id_required",
                    422,
                ), label
            else:
                request_id = chat(client(running, **headers), **kwargs)
                assert len(fake_upstream.recorded()["requests"]) == 1, label
                row = row_for(database_url, request_id)
                assert row["outcome"] == "ok", label
                assert row["end_user_id"] == ("matrix-user" if has_identity else None), label


def test_requests_without_a_key_follow_the_global_setting(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream
) -> None:
    with running_tollgate(
        tmp_path / "state", database_url, fake_upstream, enforce_user_id="true"
    ) as running:
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            chat(client(running))
        assert caught.value.code == "user_id_required"
        # The Usage Panda header cannot switch enforcement off by default...
        with pytest.raises(openai.UnprocessableEntityError):
            chat(client(running, **{"x-usagepanda-enforce-user-ids": "false"}))
        # ...and a user id satisfies it, from the header or the body.
        chat(client(running, **{"x-proxyify-user-id": "p-user"}))
        chat(client(running), user="b-user")
        with pytest.raises(openai.BadRequestError) as bad:
            chat(client(running, **{"x-tollgate-enforce-user-id": "maybe"}), user="b-user")
        assert bad.value.code == "invalid_header_value"


def test_malformed_json_body_gets_invalid_json(
    tollgate_up: RunningTollgate, fake_upstream: FakeUpstream, database_url: str
) -> None:
    port = int(tollgate_up.envoy_url.split(":")[2].split("/")[0])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=b'{"model": "gpt-4o-mini", "messages": [',
        headers={"Content-Type": "application/json"},
    )
    response = conn.getresponse()
    error = json.loads(response.read())["error"]
    conn.close()
    assert response.status == 400
    assert error["code"] == "invalid_json"
    assert error["type"] == "invalid_request_error"
    assert fake_upstream.recorded()["requests"] == []
    row = row_for(database_url, response.getheader("x-tollgate-request-id") or "")
    assert (row["outcome"], row["block_reason"]) == ("blocked", "invalid_json")


# -- 6. gateway keys: work, revoke, never leak; logging-disable ---------------------------------


def test_gateway_key_lifecycle_and_secrecy(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream
) -> None:
    state = tmp_path / "state"
    with running_tollgate(
        state,
        database_url,
        fake_upstream,
        key_cache_refresh_s="1",
        log_level="debug",
        log_bodies="true",
    ) as running:
        key, key_id = create_key(running.env, "app-1", "--credentials", "passthrough")
        deadline = time.monotonic() + 10
        while True:  # the new key becomes known at the next refresh
            try:
                request_id = chat(client(running, **{"x-tollgate-key": key}), user="alice")
                break
            except openai.AuthenticationError:
                assert time.monotonic() < deadline, "new key never accepted"
                time.sleep(0.2)
        assert row_for(database_url, request_id)["key_id"] == key_id
        # As a bearer token too (pass-through of a provider key is then not possible).
        bearer = openai.OpenAI(base_url=running.envoy_url, api_key=key, max_retries=0)
        row = row_for(database_url, chat(bearer, user="alice"))
        assert row["key_id"] == key_id
        seen = fake_upstream.recorded()["requests"]
        assert key not in json.dumps(seen)

        # Logging: bodies are logged (log_bodies) unless the request disables it.
        chat(
            client(running, **{"x-tollgate-key": key}),
            user="alice",
            metadata={"m": "visible-marker-1"},
        )
        chat(
            client(running, **{"x-tollgate-key": key, "x-tollgate-logging-disable": "true"}),
            user="alice",
            metadata={"m": "hidden-marker-2"},
        )

        assert metric(running, "tollgate_gateway_keys") == 1
        tollgate_command(running.env, "keys", "revoke", key_id)
        revoked_at = time.monotonic()
        refused: openai.AuthenticationError | None = None
        # Refresh interval 1 s; allow one more interval of scheduling slack.
        while refused is None and time.monotonic() - revoked_at < 2.5:
            try:
                chat(client(running, **{"x-tollgate-key": key}), user="alice")
                time.sleep(0.1)
            except openai.AuthenticationError as exc:
                refused = exc
        assert refused is not None, "revoked key still accepted after 2.5 s"
        assert refused.code == "invalid_gateway_key"
        row = row_for(database_url, refused.response.headers["x-tollgate-request-id"])
        assert (row["outcome"], row["block_reason"], row["status_code"]) == (
            "blocked",
            "invalid_gateway_key",
            401,
        )
        assert metric(running, "tollgate_gateway_keys") == 0
        assert metric(running, 'tollgate_refusals_total{reason="invalid_gateway_key"}') >= 1
        assert metric(running, "tollgate_gateway_key_refresh_failures_total") == 0
        log_text = "".join(running.process.output)

    log_text += "".join(p.read_text(errors="replace") for p in state.glob("*.log"))
    assert "visible-marker-1" in log_text  # the check below can fail
    assert "hidden-marker-2" not in log_text
    assert key not in log_text
    with psycopg.connect(database_url) as conn:
        for table in ("tollgate.requests", "tollgate.gateway_keys"):
            dump = conn.execute(f"SELECT string_agg(t::text, '\n') FROM {table} t").fetchone()
            assert dump is not None
            assert dump[0]
            assert key not in dump[0], table
            assert key[3:] not in dump[0], table

"""`tollgate up` end to end: the official openai SDK → real Envoy → Tollgate → fake upstream,
with the usage row in real Postgres (issue 2, acceptance 3, 5 and 6)."""

from __future__ import annotations

import json
import subprocess
import sys

import openai
import psycopg
import pytest

from tests.integration.conftest import FakeUpstream, RunningTollgate, wait_for_rows

pytestmark = pytest.mark.integration

ATTRIBUTION = {"x-tollgate-user-id", "x-proxyify-user-id", "xproxy-user-id"}


def test_sdk_call_is_attributed_and_header_never_reaches_upstream(
    tollgate_up: RunningTollgate, fake_upstream: FakeUpstream, database_url: str
) -> None:
    client = openai.OpenAI(
        base_url=tollgate_up.envoy_url,
        api_key="sk-app-own-key",
        default_headers={"x-tollgate-user-id": "user_7a3f"},
        max_retries=0,
    )
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello to the ledger."}]
    )
    completion = raw.parse()
    request_id = raw.headers["x-tollgate-request-id"]
    assert completion.choices[0].message.content

    # The contract: the row is in Postgres within 2 s of the answer.
    rows = wait_for_rows(database_url, "end_user_id = %s", ("user_7a3f",), 1, timeout_s=2.0)
    assert len(rows) == 1
    row = rows[0]
    assert str(row["request_id"]) == request_id
    assert row["model"] == completion.model == "gpt-4o-mini"
    assert completion.usage is not None
    assert row["input_tokens"] == completion.usage.prompt_tokens
    assert row["output_tokens"] == completion.usage.completion_tokens
    assert row["total_tokens"] == completion.usage.total_tokens
    assert row["outcome"] == "ok"
    assert row["status_code"] == 200
    assert row["identity_source"] == "header"
    assert row["cost_usd"] is not None
    assert row["cost_usd"] > 0

    (seen,) = fake_upstream.recorded()["requests"]
    names = {name for name, _value in seen["headers"]}
    assert seen["path"] == "/v1/chat/completions"
    assert not names & ATTRIBUTION, (
        f"attribution header reached the upstream: {names & ATTRIBUTION}"
    )
    assert ("authorization", "Bearer sk-app-own-key") in [tuple(h) for h in seen["headers"]]
    assert ("accept-encoding", "identity") in [tuple(h) for h in seen["headers"]]


def test_streamed_call_and_aliases(
    tollgate_up: RunningTollgate, fake_upstream: FakeUpstream, database_url: str
) -> None:
    client = openai.OpenAI(base_url=tollgate_up.envoy_url, api_key="sk-x", max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Stream me something."}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={
            "X-Proxyify-User-Id": "proxyify-app-user",
            "XProxy-User-Id": "ignored-second",
        },
    )
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usage) == 1
    (row,) = wait_for_rows(database_url, "end_user_id = %s", ("proxyify-app-user",), 1, timeout_s=5)
    assert row["streamed"] is True
    assert (row["input_tokens"], row["output_tokens"]) == (
        usage[0].prompt_tokens,
        usage[0].completion_tokens,
    )
    assert row["ttft_ms"] is not None
    (seen,) = fake_upstream.recorded()["requests"]
    assert not {name for name, _ in seen["headers"]} & ATTRIBUTION


def test_usage_command_prints_rows_with_ledger_field_names(
    tollgate_up: RunningTollgate, database_url: str
) -> None:
    client = openai.OpenAI(
        base_url=tollgate_up.envoy_url,
        api_key="sk-x",
        default_headers={"x-tollgate-user-id": "user_7a3f"},
        max_retries=0,
    )
    answers = [
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"q{i}"}]
        )
        for i in range(2)
    ]
    client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "someone else"}],
        extra_headers={"x-tollgate-user-id": "other-user"},
    )
    wait_for_rows(database_url, "TRUE", (), 3, timeout_s=5)
    out = subprocess.run(
        [sys.executable, "-m", "tollgate", "usage", "--user", "user_7a3f", "--format", "json"],
        env=tollgate_up.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = json.loads(out.stdout)
    with psycopg.connect(database_url) as conn:
        columns = [
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema ="
                " 'tollgate' AND table_name = 'requests' ORDER BY ordinal_position"
            )
        ]
    assert len(rows) == 2
    assert all(list(row) == columns for row in rows)
    assert {row["end_user_id"] for row in rows} == {"user_7a3f"}
    assert sorted(row["output_tokens"] for row in rows) == sorted(
        a.usage.completion_tokens for a in answers if a.usage
    )

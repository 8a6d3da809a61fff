"""Operating Tollgate: /metrics agrees with the ledger, /healthz and /readyz answer as
specified (through a Postgres outage and at a full journal), and no log of a full run holds a
provider key, a gateway key, a JWT or request body text — while the per-request log line is
there with its fields."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.rows import dict_row

from tests.integration.conftest import (
    FakeUpstream,
    RunningTollgate,
    TollgateProcess,
    create_key,
    running_tollgate,
    tollgate_env,
)
from tests.jwt_support import make_signing_key, sign
from tests.otlp_receiver import OtlpReceiver, attributes
from tollgate.localstack import EmbeddedPostgres

pytestmark = pytest.mark.integration

PROVIDER_KEY = "sk-provider-SECRET-4b1d6c0ffee"
BODY_MARKER = "zebra-quartz-body-marker"
ISSUER = "https://idp.ops.test"
KID = "ops-key"


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(env: dict[str, str]) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample of /metrics: name → {sorted labels → value}."""
    _, text = http_get(f"http://{env['TOLLGATE_METRICS_ADDRESS']}/metrics")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def total(samples: dict[tuple[tuple[str, str], ...], float], **match: str) -> float:
    return sum(
        value
        for labels, value in samples.items()
        if all(dict(labels).get(k) == v for k, v in match.items())
    )


def ledger(database_url: str, sql: str) -> list[dict[str, Any]]:
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        return conn.execute(sql).fetchall()


def wait_shipped(env: dict[str, str], expected: int, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        metrics = scrape(env)
        written = total(metrics["tollgate_ledger_rows_written_total"])
        if written >= expected and total(metrics["tollgate_ledger_unshipped_records"]) == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"ledger never reached {expected} rows")


def traffic(running: RunningTollgate, gateway_key: str, token: str) -> int:
    """A mix of calls: users by header, key and JWT; streamed and not; embeddings; refusals.
    Returns how many requests were sent."""
    url = running.envoy_url
    sent = 0
    for user in ("alice", "bob", "carol"):
        app = openai.OpenAI(base_url=url, api_key=PROVIDER_KEY, max_retries=0)
        app.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": f"{BODY_MARKER} hello from {user}"}],
            extra_headers={"x-tollgate-user-id": user},
        )
        sent += 1
    streaming = openai.OpenAI(base_url=url, api_key=PROVIDER_KEY, max_retries=0)
    for _ in range(2):
        stream = streaming.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": f"{BODY_MARKER} stream please"}],
            stream=True,
            extra_headers={"x-tollgate-user-id": "dave"},
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        sent += 1
    keyed = openai.OpenAI(base_url=url, api_key=gateway_key, max_retries=0)
    keyed.embeddings.create(model="text-embedding-3-small", input=f"{BODY_MARKER} embed me")
    sent += 1
    jwt_client = openai.OpenAI(
        base_url=url,
        api_key=PROVIDER_KEY,
        max_retries=0,
        default_headers={"x-tollgate-jwt": f"Bearer {token}"},
    )
    jwt_client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": f"{BODY_MARKER} jwt"}]
    )
    sent += 1
    refusals = [
        {"x-tollgate-enforce-user-id": "true"},  # 422 user_id_required
        {"x-tollgate-key": "tg_" + "0" * 43},  # 401 invalid_gateway_key
        {"x-tollgate-user-id": "eve", "x-tollgate-base-uri": "http://169.254.169.254"},  # 403
    ]
    for headers in refusals:
        with pytest.raises(openai.APIStatusError):
            openai.OpenAI(
                base_url=url, api_key=PROVIDER_KEY, max_retries=0
            ).chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": f"{BODY_MARKER} refused"}],
                extra_headers=headers,
            )
        sent += 1
    return sent


def test_metrics_agree_with_the_ledger_and_logs_hold_no_secret(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream
) -> None:
    private_key, jwks = make_signing_key(KID)
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(jwks))
    with running_tollgate(
        tmp_path / "state",
        database_url,
        fake_upstream,
        extra_env={"OPENAI_API_KEY": PROVIDER_KEY},
        jwt_issuer=ISSUER,
        jwt_audiences="tollgate",
        jwt_jwks_file=str(jwks_file),
        jwt_header="x-tollgate-jwt",
        log_format="json",
        key_cache_refresh_s="1",
    ) as running:
        env = running.env
        gateway_key, key_id = create_key(env, "ops", "--user", "keyed-user")
        time.sleep(1.5)  # the key cache reloads every second
        now = int(time.time())
        token = sign(
            private_key,
            KID,
            {"iss": ISSUER, "aud": "tollgate", "sub": "jwt-user", "iat": now, "exp": now + 600},
        )
        sent = traffic(running, gateway_key, token)
        wait_shipped(env, sent)
        metrics = scrape(env)
        code, body = http_get(f"http://{env['TOLLGATE_METRICS_ADDRESS']}/healthz")
        assert code == 200, body
        code, body = http_get(f"http://{env['TOLLGATE_METRICS_ADDRESS']}/readyz")
        assert (code, json.loads(body)["status"]) == (200, "ready")

    # The process's own memory, for the grpc.aio growth (docs/operations.md, known issue).
    (rss,) = metrics["process_resident_memory_bytes"].values()
    assert rss > 10 * 2**20
    # Requests by outcome, provider, model and endpoint.
    rows = ledger(
        database_url,
        "SELECT outcome, coalesce(provider, '') AS provider, coalesce(model, '') AS model,"
        " coalesce(endpoint, '') AS endpoint, count(*) AS n FROM tollgate.requests"
        " GROUP BY 1, 2, 3, 4",
    )
    assert sum(r["n"] for r in rows) == sent
    requests = metrics["tollgate_requests_total"]
    assert sum(requests.values()) == sent
    for r in rows:
        labels = {k: r[k] for k in ("outcome", "provider", "model", "endpoint")}
        assert total(requests, **labels) == r["n"], labels
    # Refusals by reason.
    for r in ledger(
        database_url,
        "SELECT block_reason, count(*) AS n FROM tollgate.requests WHERE outcome = 'blocked'"
        " GROUP BY 1",
    ):
        assert total(metrics["tollgate_refusals_total"], reason=r["block_reason"]) == r["n"]
    assert {dict(k)["reason"] for k in metrics["tollgate_refusals_total"]} >= {
        "user_id_required",
        "invalid_gateway_key",
        "base_uri_not_allowed",
    }
    # Tokens and cost by provider and model.
    sums = ledger(
        database_url,
        "SELECT provider, model, sum(input_tokens) AS input, sum(output_tokens) AS output,"
        " sum(cached_input_tokens) AS cached_input, sum(reasoning_tokens) AS reasoning,"
        " sum(cost_usd) AS cost FROM tollgate.requests WHERE provider IS NOT NULL"
        " AND model IS NOT NULL GROUP BY 1, 2",
    )
    assert any(s["input"] for s in sums)
    tokens = metrics["tollgate_tokens_total"]
    for s in sums:
        where = {"provider": s["provider"], "model": s["model"]}
        for kind in ("input", "output", "cached_input", "reasoning"):
            assert total(tokens, type=kind, **where) == (s[kind] or 0), (kind, where)
        cost = total(metrics["tollgate_cost_usd_total"], **where)
        assert abs(Decimal(str(cost)) - (s["cost"] or Decimal(0))) < Decimal("1e-9"), where
    # The writer, journal and ext_proc series.
    assert total(metrics["tollgate_ledger_rows_written_total"]) == sent
    assert total(metrics["tollgate_ledger_batch_duration_seconds_count"]) >= 1
    assert total(metrics["tollgate_ledger_dead_letters_total"]) == 0
    assert total(metrics["tollgate_ledger_write_failures_total"]) == 0
    for gauge in (
        "tollgate_journal_unshipped_bytes",
        "tollgate_journal_bytes",
        "tollgate_ledger_unshipped_records",
        "tollgate_ledger_oldest_unshipped_age_seconds",
    ):
        assert gauge in metrics, gauge
    assert total(metrics["tollgate_journal_bytes"]) > 0
    phases = metrics["tollgate_extproc_phase_duration_seconds_count"]
    assert total(phases, phase="request_headers") >= sent
    assert total(phases, phase="response_body") >= 1
    # No user id on any metric.
    everything = json.dumps({name: list(s) for name, s in metrics.items()})
    for user in ("alice", "bob", "carol", "dave", "keyed-user", "jwt-user"):
        assert user not in everything, user

    # The logs: one JSON line per request with its fields; no secret, no body text.
    output = "".join(running.process.output)
    logs = output + "".join(p.read_text(errors="replace") for p in running.state_dir.rglob("*.log"))
    request_lines = [
        json.loads(line)
        for line in output.splitlines()
        if line.startswith("{") and '"logger": "tollgate.requests"' in line
    ]
    ids = {
        str(r["request_id"])
        for r in ledger(database_url, "SELECT request_id FROM tollgate.requests")
    }
    assert {line["request_id"] for line in request_lines} == ids
    alice = next(line for line in request_lines if line.get("end_user_id") == "alice")
    assert (alice["outcome"], alice["model"]) == ("ok", "gpt-4o-mini")
    assert alice["input_tokens"] > 0
    assert {"cost_usd", "latency_ms", "status_code", "provider"} <= alice.keys()
    keyed = next(line for line in request_lines if line.get("key_id") == key_id)
    assert keyed["end_user_id"] == "keyed-user"
    for secret in (PROVIDER_KEY, gateway_key, gateway_key[3:], token, BODY_MARKER):
        assert secret not in logs, f"{secret[:12]}… found in the logs"
    assert token.split(".")[1] not in logs  # not even the JWT's payload part


def test_health_through_a_postgres_outage_and_a_full_journal(
    tmp_path: Path, own_postgres: EmbeddedPostgres, fake_upstream: FakeUpstream
) -> None:
    env = tollgate_env(
        tmp_path / "state",
        database_url=own_postgres.url,
        upstream_url=fake_upstream.url,
        journal_max_bytes="4096",
        journal_full_policy="reject",
    )
    base = f"http://{env['TOLLGATE_METRICS_ADDRESS']}"
    process = TollgateProcess(["up"], env)
    try:
        process.wait_for_line("tollgate is ready", timeout_s=90)
        assert http_get(base + "/readyz")[0] == 200
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{env['TOLLGATE_ENVOY_LISTEN_PORT']}/v1",
            api_key="sk-test",
            max_retries=0,
        )

        def chat() -> int:
            try:
                client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": "hi"}],
                    extra_headers={"x-tollgate-user-id": "u1"},
                )
            except openai.APIStatusError as exc:
                return exc.status_code
            return 200

        own_postgres.stop()
        # Postgres away: still ready and serving (the journal holds the records).
        assert chat() == 200
        code, body = http_get(base + "/readyz")
        assert code == 200, body
        assert http_get(base + "/healthz")[0] == 200
        # Fill the journal: then requests are refused and readiness says why.
        statuses = [chat() for _ in range(40)]
        assert 503 in statuses, statuses
        code, body = http_get(base + "/readyz")
        assert code == 503, body
        assert "journal full" in json.loads(body)["status"], body
        assert http_get(base + "/healthz")[0] == 200  # alive: no restart for this
        own_postgres.start()
        deadline = time.monotonic() + 30
        while http_get(base + "/readyz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert http_get(base + "/readyz")[0] == 200, "not ready again after Postgres came back"
        assert chat() == 200
    finally:
        process.terminate()


def test_opentelemetry_spans_join_the_callers_trace_and_metrics_carry_no_user(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream
) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent_id = "00f067aa0ba902b7"
    with (
        OtlpReceiver() as receiver,
        running_tollgate(
            tmp_path / "state", database_url, fake_upstream, otel_endpoint=receiver.endpoint
        ) as running,
    ):
        client = openai.OpenAI(base_url=running.envoy_url, api_key="sk-test", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={
                "x-tollgate-user-id": "otel-user",
                "traceparent": f"00-{trace_id}-{parent_id}-01",
            },
        )
        request_id = raw.headers["x-tollgate-request-id"]
        client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-tollgate-user-id": "otel-user-2"},
        )
        wait_shipped(running.env, 2)
    # Stopping `up` flushed the exporter: everything has arrived.
    spans = {attributes(s.attributes)["tollgate.request_id"]: s for s in receiver.spans()}
    assert len(spans) == 2
    joined = spans[request_id]
    assert joined.trace_id.hex() == trace_id
    assert joined.parent_span_id.hex() == parent_id
    attrs = attributes(joined.attributes)
    assert attrs["user.id"] == "otel-user"
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.usage.input_tokens"] > 0
    assert attrs["tollgate.cost_usd"] > 0
    other = next(s for rid, s in spans.items() if rid != request_id)
    assert other.trace_id.hex() != trace_id
    assert other.parent_span_id == b""
    usage = receiver.last_metric("gen_ai.client.token.usage")
    duration = receiver.last_metric("gen_ai.client.operation.duration")
    assert usage is not None
    assert duration is not None
    points = list(usage.histogram.data_points)
    assert {attributes(p.attributes)["gen_ai.token.type"] for p in points} == {"input", "output"}
    assert sum(p.count for p in duration.histogram.data_points) == 2
    raw_metrics = b"".join(receiver.raw["/v1/metrics"])
    assert b"otel-user" not in raw_metrics

"""OpenTelemetry export: GenAI metrics and spans sent over OTLP/HTTP to a real receiver."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any, cast

import pytest

pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("opentelemetry.exporter.otlp.proto.http")

from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from tests.otlp_receiver import OtlpReceiver, attributes
from tollgate.ledger.records import UsageRecord, new_request_id
from tollgate.otel import (
    DURATION_BUCKETS,
    DURATION_METRIC,
    METRIC_ATTRIBUTE_KEYS,
    TOKEN_ATTRIBUTE_KEYS,
    TOKEN_BUCKETS,
    TOKEN_USAGE_METRIC,
    OtelExporter,
    error_type,
    metric_attributes,
    operation_name,
    provider_name,
    semconv_tokens,
    span_attributes,
)
from tollgate.v1 import usage_pb2

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
CREATED_US = 1_780_000_000_123_456  # 2026-05-28, microseconds


def record(
    *,
    user: str | None = "alice",
    provider: str | None = "openai",
    model: str | None = "gpt-4o-mini",
    endpoint: str | None = "/v1/chat/completions",
    outcome: int = usage_pb2.OUTCOME_OK,
    status: int | None = 200,
    latency_ms: int | None = 1500,
    **tokens: int,
) -> UsageRecord:
    r = UsageRecord(request_id=new_request_id(), outcome=outcome)  # type: ignore[arg-type]
    r.created_at.FromMicroseconds(CREATED_US)
    for name, value in (
        ("end_user_id", user),
        ("provider", provider),
        ("model", model),
        ("endpoint", endpoint),
        ("status_code", status),
        ("latency_ms", latency_ms),
    ):
        if value is not None:
            setattr(r, name, value)
    for name, value in tokens.items():
        setattr(r, name, value)
    return r


# -- mapping (pure) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "operation"),
    [
        ("/v1/chat/completions", "chat"),
        ("/openai/deployments/gpt4/chat/completions", "chat"),
        ("/v1beta/openai/chat/completions", "chat"),
        ("/v1/responses", "chat"),
        ("/v1/messages", "chat"),
        ("/model/anthropic.claude-3/converse", "chat"),
        ("/v1/completions", "text_completion"),
        ("/v1/embeddings", "embeddings"),
        ("/v1beta/models/gemini-2.5-flash:generateContent", "generate_content"),
        ("/v1beta/models/gemini-2.5-flash:streamGenerateContent", "generate_content"),
        ("/v1/images/generations", "image_generation"),
        ("/v1/audio/speech", "speech_generation"),
        ("/v1/audio/transcriptions", "transcription"),
        ("/v1/models", None),
        (None, None),
    ],
)
def test_operation_name_from_the_endpoint(endpoint: str | None, operation: str | None) -> None:
    assert operation_name(record(endpoint=endpoint)) == operation


@pytest.mark.parametrize(
    ("provider", "name"),
    [
        ("openai", "openai"),
        ("anthropic", "anthropic"),
        ("gemini", "gcp.gemini"),
        ("bedrock", "aws.bedrock"),
        ("Azure", "azure.ai.openai"),
        ("vertex_ai", "gcp.vertex_ai"),
        ("vllm", "vllm"),
        (None, "_OTHER"),
    ],
)
def test_provider_name_uses_the_conventions_values(provider: str | None, name: str) -> None:
    assert provider_name(record(provider=provider)) == name


def test_error_type_per_outcome() -> None:
    assert error_type(record()) is None
    assert error_type(record(outcome=usage_pb2.OUTCOME_USAGE_MISSING)) is None
    assert error_type(record(outcome=usage_pb2.OUTCOME_UPSTREAM_ERROR, status=429)) == "429"
    assert (
        error_type(record(outcome=usage_pb2.OUTCOME_UPSTREAM_ERROR, status=None))
        == "upstream_error"
    )
    assert error_type(record(outcome=usage_pb2.OUTCOME_BLOCKED, status=401)) == "blocked"
    assert error_type(record(outcome=usage_pb2.OUTCOME_CLIENT_ABORTED)) == "client_aborted"
    assert error_type(record(outcome=usage_pb2.OUTCOME_INTERNAL_ERROR)) == "internal_error"


def test_tokens_counted_as_the_conventions_ask() -> None:
    # OpenAI: input already includes cached, output already includes reasoning.
    openai = record(input_tokens=100, cached_input_tokens=40, output_tokens=20, reasoning_tokens=5)
    assert semconv_tokens(openai) == (100, 20)
    # Anthropic reports input without its cache reads and writes.
    anthropic = record(
        provider="anthropic",
        endpoint="/v1/messages",
        input_tokens=10,
        cached_input_tokens=1000,
        cache_write_tokens=50,
        output_tokens=300,
    )
    assert semconv_tokens(anthropic) == (1060, 300)
    # Gemini reports output without its thoughts.
    gemini = record(
        provider="gemini",
        endpoint="/v1beta/models/g:generateContent",
        input_tokens=5,
        output_tokens=7,
        reasoning_tokens=13,
    )
    assert semconv_tokens(gemini) == (5, 20)
    # Unreported stays unreported, cache tokens alone make no input.
    assert semconv_tokens(record(cached_input_tokens=3)) == (None, None)


def test_metric_attributes_never_carry_ids() -> None:
    r = record(outcome=usage_pb2.OUTCOME_UPSTREAM_ERROR, status=500, input_tokens=1)
    r.key_id = "key-1"
    attrs = metric_attributes(r)
    assert attrs == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "error.type": "500",
    }
    assert metric_attributes(record(endpoint="/v1/models")) is None


def test_span_attributes_report_no_made_up_zero() -> None:
    attrs = span_attributes(record(output_tokens=0), None)
    assert attrs["gen_ai.usage.output_tokens"] == 0  # reported 0 stays
    assert "gen_ai.usage.input_tokens" not in attrs
    assert "gen_ai.usage.cache_read.input_tokens" not in attrs
    assert "tollgate.cost_usd" not in attrs
    assert span_attributes(record(), Decimal("0.5"))["tollgate.cost_usd"] == 0.5
    assert "tollgate.cost_usd" not in span_attributes(record(), "not a number")


# -- end to end through a real OTLP/HTTP receiver ---------------------------------------------


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


def _points(metric: metrics_pb2.Metric) -> dict[frozenset[tuple[str, Any]], Any]:
    return {frozenset(attributes(p.attributes).items()): p for p in metric.histogram.data_points}


def _key(**attrs: str) -> frozenset[tuple[str, Any]]:
    return frozenset(attrs.items())


def _span_by_request(spans: list[trace_pb2.Span]) -> dict[str, trace_pb2.Span]:
    return {str(attributes(s.attributes)["tollgate.request_id"]): s for s in spans}


def test_metrics_and_spans_reach_the_collector(receiver: OtlpReceiver) -> None:
    chat = record(
        user="alice",
        input_tokens=100,
        cached_input_tokens=40,
        output_tokens=20,
        reasoning_tokens=5,
        total_tokens=120,
        latency_ms=1500,
    )
    chat.upstream_base_uri = "https://api.openai.com"
    chat.ttft_ms = 300
    chat.streamed = True
    chat2 = record(user="bob", input_tokens=50, output_tokens=2, latency_ms=500)
    claude = record(
        user="carol",
        provider="anthropic",
        model="claude-sonnet-4",
        endpoint="/v1/messages",
        input_tokens=10,
        cached_input_tokens=1000,
        cache_write_tokens=50,
        output_tokens=300,
        latency_ms=3000,
    )
    gemini = record(
        user="dave",
        provider="gemini",
        model="gemini-2.5-flash",
        endpoint="/v1beta/models/gemini-2.5-flash:generateContent",
        input_tokens=5,
        output_tokens=7,
        reasoning_tokens=13,
        latency_ms=250,
    )
    failed = record(
        user="erin", outcome=usage_pb2.OUTCOME_UPSTREAM_ERROR, status=429, latency_ms=80
    )
    aborted = record(
        user="ivan",
        model="gpt-4o",
        outcome=usage_pb2.OUTCOME_CLIENT_ABORTED,
        status=200,
        input_tokens=30,
        output_tokens=4,
        latency_ms=700,
    )
    embed = record(
        user="frank", model="text-embedding-3-small", endpoint="/v1/embeddings", input_tokens=8
    )
    missing = record(
        user="grace",
        model="whisper-1",
        endpoint="/v1/audio/transcriptions",
        outcome=usage_pb2.OUTCOME_USAGE_MISSING,
    )
    unmetered = record(user="heidi", model=None, endpoint="/v1/models", latency_ms=3)

    exporter = OtelExporter(receiver.endpoint, service_name="tollgate-test", export_interval_s=60)
    exporter.observe(chat, Decimal("0.000123"), TRACEPARENT)
    exporter.observe(chat2, "0.5")
    exporter.observe(claude, None, "")
    exporter.observe(gemini, None, "00-not-a-valid-traceparent-01")
    exporter.observe(failed, None)
    exporter.observe(aborted, None)
    exporter.observe(embed, None)
    exporter.observe(missing, None)
    exporter.observe(unmetered, None)
    started = time.monotonic()
    exporter.shutdown(timeout_s=10)
    assert time.monotonic() - started < 10
    assert exporter.failures == 0
    assert exporter.export_failures == 0
    assert receiver.rejected == []
    assert receiver.headers
    assert all(h.get("content-type") == "application/x-protobuf" for h in receiver.headers)
    assert {h.get("content-encoding") for h in receiver.headers} == {"gzip"}

    # Resource
    for resource in receiver.resources():
        assert resource["service.name"] == "tollgate-test"

    # -- gen_ai.client.token.usage
    tokens = receiver.last_metric(TOKEN_USAGE_METRIC)
    assert tokens is not None
    assert tokens.unit == "{token}"
    assert tokens.WhichOneof("data") == "histogram"
    points = _points(tokens)
    gpt = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
    }
    ant = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "anthropic",
        "gen_ai.request.model": "claude-sonnet-4",
    }
    gem = {
        "gen_ai.operation.name": "generate_content",
        "gen_ai.provider.name": "gcp.gemini",
        "gen_ai.request.model": "gemini-2.5-flash",
    }
    emb = {
        "gen_ai.operation.name": "embeddings",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "text-embedding-3-small",
    }
    gpt4o = {**gpt, "gen_ai.request.model": "gpt-4o"}
    expected_tokens = {
        _key(**gpt, **{"gen_ai.token.type": "input"}): (2, 150),
        _key(**gpt, **{"gen_ai.token.type": "output"}): (2, 22),
        _key(**ant, **{"gen_ai.token.type": "input"}): (1, 1060),
        _key(**ant, **{"gen_ai.token.type": "output"}): (1, 300),
        _key(**gem, **{"gen_ai.token.type": "input"}): (1, 5),
        _key(**gem, **{"gen_ai.token.type": "output"}): (1, 20),
        _key(**emb, **{"gen_ai.token.type": "input"}): (1, 8),
        # A failed request's tokens: no error.type on token usage (the conventions give none).
        _key(**gpt4o, **{"gen_ai.token.type": "input"}): (1, 30),
        _key(**gpt4o, **{"gen_ai.token.type": "output"}): (1, 4),
    }
    assert {k: (p.count, p.sum) for k, p in points.items()} == expected_tokens
    for point in points.values():
        assert list(point.explicit_bounds) == list(TOKEN_BUCKETS)
        assert sum(point.bucket_counts) == point.count

    # -- gen_ai.client.operation.duration
    duration = receiver.last_metric(DURATION_METRIC)
    assert duration is not None
    assert duration.unit == "s"
    points = _points(duration)
    failed_key = _key(**gpt, **{"error.type": "429"})
    expected_duration = {
        _key(**gpt): (2, 2.0),
        _key(**ant): (1, 3.0),
        _key(**gem): (1, 0.25),
        failed_key: (1, 0.08),
        _key(**gpt4o, **{"error.type": "client_aborted"}): (1, 0.7),
        _key(**emb): (1, 1.5),
        _key(
            **{
                "gen_ai.operation.name": "transcription",
                "gen_ai.provider.name": "openai",
                "gen_ai.request.model": "whisper-1",
            }
        ): (1, 1.5),
    }
    assert set(points) == set(expected_duration)
    for key, (count, total) in expected_duration.items():
        assert points[key].count == count
        assert points[key].sum == pytest.approx(total)
        assert list(points[key].explicit_bounds) == list(DURATION_BUCKETS)

    # Only the allowed attribute keys, and no user or request id anywhere in the payload.
    for metric in receiver.metrics():
        for point in metric.histogram.data_points:
            keys = set(attributes(point.attributes))
            if metric.name == TOKEN_USAGE_METRIC:
                assert keys <= TOKEN_ATTRIBUTE_KEYS
                assert "gen_ai.token.type" in keys
            else:
                assert keys <= METRIC_ATTRIBUTE_KEYS
            assert not point.exemplars
    names = {m.name for m in receiver.metrics()}
    assert names == {TOKEN_USAGE_METRIC, DURATION_METRIC}
    payload = b"".join(receiver.raw["/v1/metrics"])
    assert b"user.id" not in payload
    for r in (chat, chat2, claude, gemini, failed, aborted, embed, missing, unmetered):
        assert r.end_user_id.encode() not in payload
        assert r.request_id.encode() not in payload

    # -- spans
    spans = receiver.spans()
    assert len(spans) == 9
    by_id = _span_by_request(spans)
    s = by_id[chat.request_id]
    assert s.name == "chat gpt-4o-mini"
    assert s.kind == trace_pb2.Span.SPAN_KIND_CLIENT
    assert s.trace_id.hex() == TRACE_ID
    assert s.parent_span_id.hex() == PARENT_ID
    assert s.start_time_unix_nano == CREATED_US * 1000
    assert s.end_time_unix_nano == CREATED_US * 1000 + 1_500_000_000
    assert s.status.code == trace_pb2.Status.STATUS_CODE_UNSET
    assert attributes(s.attributes) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.usage.input_tokens": 100,
        "gen_ai.usage.output_tokens": 20,
        "gen_ai.usage.cache_read.input_tokens": 40,
        "gen_ai.usage.reasoning.output_tokens": 5,
        "gen_ai.request.stream": True,
        "gen_ai.response.time_to_first_chunk": 0.3,
        "user.id": "alice",
        "tollgate.cost_usd": 0.000123,
        "tollgate.request_id": chat.request_id,
        "tollgate.outcome": "ok",
        "http.response.status_code": 200,
        "url.path": "/v1/chat/completions",
        "server.address": "api.openai.com",
    }

    s = by_id[claude.request_id]
    assert s.name == "chat claude-sonnet-4"
    assert s.parent_span_id == b""  # no traceparent: a root span
    assert s.trace_id.hex() != TRACE_ID
    attrs = attributes(s.attributes)
    assert attrs["gen_ai.usage.input_tokens"] == 1060
    assert attrs["gen_ai.usage.cache_read.input_tokens"] == 1000
    assert attrs["gen_ai.usage.cache_creation.input_tokens"] == 50
    assert attrs["gen_ai.provider.name"] == "anthropic"
    assert attrs["user.id"] == "carol"
    assert "tollgate.cost_usd" not in attrs

    s = by_id[gemini.request_id]
    assert s.name == "generate_content gemini-2.5-flash"
    assert s.parent_span_id == b""  # invalid traceparent: a root span
    assert s.trace_id.hex() not in (TRACE_ID, by_id[claude.request_id].trace_id.hex())
    assert attributes(s.attributes)["gen_ai.usage.output_tokens"] == 20

    s = by_id[failed.request_id]
    assert s.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    attrs = attributes(s.attributes)
    assert attrs["error.type"] == "429"
    assert attrs["tollgate.outcome"] == "upstream_error"
    assert attrs["http.response.status_code"] == 429
    assert not any(k.startswith("gen_ai.usage.") for k in attrs)  # no usage: no made-up 0
    assert s.end_time_unix_nano - s.start_time_unix_nano == 80_000_000

    s = by_id[aborted.request_id]
    assert s.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    assert s.status.message == "client_aborted"
    assert attributes(s.attributes)["error.type"] == "client_aborted"
    assert attributes(s.attributes)["gen_ai.usage.output_tokens"] == 4

    assert attributes(by_id[chat2.request_id].attributes)["tollgate.cost_usd"] == 0.5
    s = by_id[missing.request_id]
    assert s.status.code == trace_pb2.Status.STATUS_CODE_UNSET
    assert attributes(s.attributes)["tollgate.outcome"] == "usage_missing"
    s = by_id[unmetered.request_id]
    assert s.name == "tollgate.request"
    assert "gen_ai.operation.name" not in attributes(s.attributes)


def test_unsampled_parent_is_respected(receiver: OtlpReceiver) -> None:
    exporter = OtelExporter(receiver.endpoint, export_interval_s=60)
    exporter.observe(record(input_tokens=1), None, f"00-{TRACE_ID}-{PARENT_ID}-00")
    exporter.shutdown()
    assert receiver.spans() == []  # the caller chose not to sample this trace
    tokens = receiver.last_metric(TOKEN_USAGE_METRIC)
    assert tokens is not None  # metrics do not depend on sampling


def test_headers_are_sent(receiver: OtlpReceiver) -> None:
    exporter = OtelExporter(
        receiver.endpoint, export_interval_s=60, headers={"x-collector-token": "s3cret"}
    )
    exporter.observe(record(input_tokens=1), None)
    exporter.shutdown()
    assert receiver.headers
    assert all(h.get("x-collector-token") == "s3cret" for h in receiver.headers)


def test_observe_never_raises_and_counts(
    receiver: OtlpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = OtelExporter(receiver.endpoint, export_interval_s=60)
    with caplog.at_level(logging.WARNING, logger="tollgate.otel"):
        exporter.observe(cast(Any, object()), None)
        exporter.observe(cast(Any, None), None)
    assert exporter.failures == 2
    assert "could not record" in caplog.text
    exporter.shutdown()
    exporter.observe(record(input_tokens=1), None)  # after shutdown: ignored
    exporter.shutdown()  # twice: nothing
    assert exporter.failures == 2


def test_dead_collector_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The port is closed now: every export is refused.
    exporter = OtelExporter(f"http://127.0.0.1:{port}", export_interval_s=60, timeout_s=0.5)
    started = time.monotonic()
    for i in range(20):
        exporter.observe(record(user=f"u{i}", input_tokens=i, output_tokens=1), "0.01", TRACEPARENT)
    assert time.monotonic() - started < 1
    exporter.shutdown(timeout_s=5)
    assert time.monotonic() - started < 6
    assert exporter.failures == 0
    assert exporter.export_failures >= 2  # the spans' export and the metrics' export


@pytest.mark.parametrize("endpoint", ["", "127.0.0.1:4318", "ftp://x"])
def test_bad_endpoint_is_a_config_error(endpoint: str) -> None:
    with pytest.raises(ValueError, match="OTLP endpoint"):
        OtelExporter(endpoint)


def test_importing_the_module_needs_no_opentelemetry() -> None:
    """The base install has no OpenTelemetry: only building an exporter imports it."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'opentelemetry':\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import tollgate.otel as otel\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')]\n"
        "try:\n"
        "    otel.OtelExporter('http://127.0.0.1:4318')\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert "tollgate[otel]" in out.stdout


def test_hanging_collector_bounds_shutdown() -> None:
    """A collector that accepts connections and never answers: shutdown still returns."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)  # connections queue up in the backlog, nothing is ever read
        port = hole.getsockname()[1]
        exporter = OtelExporter(f"http://127.0.0.1:{port}", export_interval_s=60, timeout_s=2)
        exporter.observe(record(input_tokens=3, output_tokens=1), None, TRACEPARENT)
        started = time.monotonic()
        exporter.shutdown(timeout_s=0.5)
        assert time.monotonic() - started < 1.5
        # The exports give up on their own timeout, in the background.
        deadline = time.monotonic() + 10
        while exporter.export_failures < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert exporter.export_failures >= 2

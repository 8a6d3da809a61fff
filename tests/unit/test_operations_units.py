"""The pure parts of operating Tollgate: histograms and capped counters, log formats, the
per-request log fields and usage counters, where Envoy finds ext_proc per target, and the
traceparent a record keeps."""

from __future__ import annotations

import io
import json
import logging
from decimal import Decimal

import pytest

from tollgate.config import load_settings
from tollgate.envoyconf import CONTAINER_EXTPROC_SOCKET, extproc_address
from tollgate.ledger.build import traceparent as _traceparent
from tollgate.logs import JsonFormatter, TextFormatter, configure_logging
from tollgate.observe import RequestLog, UsageCounters, request_fields
from tollgate.stats import OTHER, BoundedCounter, Histogram, HistogramFamily
from tollgate.v1 import usage_pb2


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    h = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(value)
    assert h.cumulative() == [("0.1", 2.0), ("1.0", 4.0), ("+Inf", 5.0)]
    assert h.count == 5
    assert h.total == pytest.approx(8.65)


def test_histogram_family_keeps_one_histogram_per_label() -> None:
    family = HistogramFamily((1.0,))
    family.observe("request_headers", 0.5)
    family.observe("response_body", 2.0)
    family.observe("request_headers", 0.25)
    counts = {label: h.count for label, h in family.items()}
    assert counts == {"request_headers": 2, "response_body": 1}


def test_bounded_counter_folds_new_label_sets_into_other_past_the_cap() -> None:
    counter = BoundedCounter(2, keep=(0,))
    counter.add(("ok", "model-a"))
    counter.add(("ok", "model-b"))
    counter.add(("ok", "model-a"), 2)
    for i in range(100):  # a client inventing model names
        counter.add(("ok", f"invented-{i}"))
    counter.add(("blocked", "invented-x"))
    values = dict(counter.items())
    assert values == {
        ("ok", "model-a"): 3,
        ("ok", "model-b"): 1,
        ("ok", OTHER): 100,
        ("blocked", OTHER): 1,
    }


def _record(**fields: object) -> usage_pb2.UsageRecord:
    record = usage_pb2.UsageRecord(request_id="r1", outcome=usage_pb2.OUTCOME_OK, **fields)  # type: ignore[arg-type]
    return record


def test_usage_counters_count_only_reported_tokens_and_priced_cost() -> None:
    counters = UsageCounters()
    a = _record(provider="openai", model="gpt-4o", input_tokens=10, output_tokens=5)
    b = _record(provider="openai", model="gpt-4o", input_tokens=3, cached_input_tokens=2)
    c = _record(provider="openai", model="mystery")  # nothing reported, no price
    counters([a, b, c], [Decimal("0.001"), "0.0005", None])
    tokens = dict(counters.tokens.items())
    assert tokens == {
        ("openai", "gpt-4o", "input"): 13,
        ("openai", "gpt-4o", "output"): 5,
        ("openai", "gpt-4o", "cached_input"): 2,
    }
    assert dict(counters.cost_usd.items()) == {("openai", "gpt-4o"): pytest.approx(0.0015)}


def test_request_fields_leave_out_what_was_not_reported() -> None:
    record = _record(
        end_user_id="alice",
        key_id="k1",
        provider="openai",
        model="gpt-4o",
        status_code=200,
        latency_ms=12,
        input_tokens=7,
    )
    fields = request_fields(record, Decimal("0.25"))
    assert fields == {
        "request_id": "r1",
        "outcome": "ok",
        "end_user_id": "alice",
        "key_id": "k1",
        "provider": "openai",
        "model": "gpt-4o",
        "status_code": 200,
        "latency_ms": 12,
        "streamed": False,
        "input_tokens": 7,
        "cost_usd": "0.25",
    }
    assert "output_tokens" not in request_fields(record, None)
    assert "cost_usd" not in request_fields(record, None)


def _log_line(formatter: logging.Formatter, msg: str, **fields: object) -> str:
    record = logging.LogRecord("tollgate.requests", logging.INFO, __file__, 1, msg, (), None)
    record.fields = fields
    return formatter.format(record)


def test_json_lines_carry_the_fields_and_stay_one_line() -> None:
    line = _log_line(JsonFormatter(), "request", end_user_id="evil\nuser", input_tokens=3)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["msg"] == "request"
    assert parsed["logger"] == "tollgate.requests"
    assert parsed["level"] == "info"
    assert parsed["end_user_id"] == "evil\nuser"
    assert parsed["input_tokens"] == 3


def test_text_lines_quote_odd_values_and_cannot_be_forged() -> None:
    line = _log_line(TextFormatter(), "request", user="a b", model="gpt-4o", forged="x\n2026 INFO")
    assert "\n" not in line
    assert ' user="a b"' in line
    assert " model=gpt-4o" in line
    assert "forged=" in line


def test_configure_logging_writes_json_request_lines() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("info", "json", stream)
        RequestLog()([_record(end_user_id="bob", provider="openai")], [None])
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line)["end_user_id"] == "bob"


@pytest.mark.parametrize(
    ("target", "settings", "expected"),
    [
        ("local", {}, "127.0.0.1:9002"),
        ("compose", {}, f"unix:{CONTAINER_EXTPROC_SOCKET}"),
        ("kubernetes", {}, f"unix:{CONTAINER_EXTPROC_SOCKET}"),
        ("local", {"grpc_address": "unix:/tmp/t.sock"}, "unix:/tmp/t.sock"),
        ("kubernetes", {"grpc_address": "unix:/x/y.sock"}, "unix:/x/y.sock"),
    ],
)
def test_where_envoy_finds_extproc(target: str, settings: dict[str, str], expected: str) -> None:
    assert extproc_address(load_settings(environ={}, **settings), target) == expected


def test_container_targets_use_tcp_only_with_mutual_tls() -> None:
    tls = {
        "grpc_address": "0.0.0.0:9002",
        "grpc_tls_cert_file": "/certs/tollgate.pem",
        "grpc_tls_key_file": "/certs/tollgate.key",
        "grpc_tls_client_ca_file": "/certs/ca.pem",
        "envoy_grpc_client_cert_file": "/certs/envoy.pem",
        "envoy_grpc_client_key_file": "/certs/envoy.key",
        "envoy_grpc_ca_file": "/certs/ca.pem",
    }
    settings = load_settings(environ={}, **tls)
    assert extproc_address(settings, "compose") == "tollgate:9002"
    assert extproc_address(settings, "kubernetes") == "127.0.0.1:9002"
    assert extproc_address(settings, "local") == "0.0.0.0:9002"


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        (b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", True),
        (b" 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00 ", True),
        (b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", False),
        (b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", False),
        (b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n-x", False),
        (b"\xff" * 55, False),
        (None, False),
    ],
)
def test_only_a_well_formed_traceparent_is_kept(value: bytes | None, kept: bool) -> None:
    result = _traceparent(value)
    assert (result is not None) == kept
    if kept:
        assert value is not None
        assert result == value.strip().decode()

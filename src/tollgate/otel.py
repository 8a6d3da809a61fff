"""Opt-in OpenTelemetry export of every request: GenAI metrics and one span, over OTLP/HTTP.

Off by default. The OpenTelemetry packages (``pip install tollgate[otel]``) are imported only
when an :class:`OtelExporter` is built, so importing this module costs nothing without them.

What is sent (the GenAI semantic conventions, ``gen_ai.*``, development status):

* ``gen_ai.client.token.usage`` (histogram, ``{token}``): one measurement per reported token
  type, ``gen_ai.token.type`` = ``input`` or ``output`` (the two values the conventions define).
  Input counts cached and cache-write tokens and output counts reasoning tokens, as the
  conventions ask, whatever the provider's own split (Anthropic and Bedrock report input
  without their cache tokens, Gemini output without its thoughts). A count the provider did
  not report is not recorded (never a made-up 0).
* ``gen_ai.client.operation.duration`` (histogram, ``s``): the request's latency, when known.

Both carry ``gen_ai.operation.name``, ``gen_ai.provider.name`` and ``gen_ai.request.model``
(when known); the duration also ``error.type`` (failed requests only; the conventions define
it for the duration, not for token usage). Nothing else: never a user, key or request id
(cardinality and privacy); Views keep only those keys and set the bucket boundaries the
conventions recommend. Requests to an endpoint that is not a GenAI operation (``/v1/models``,
an unknown path, a request Envoy refused before Tollgate saw its path) get a span but no metric.

One span per request (``CLIENT``, ``"{operation} {model}"``), from ``created_at`` to
``created_at + latency_ms``, with the same attributes plus the token breakdown
(``gen_ai.usage.*``), ``user.id``, ``tollgate.cost_usd``, ``tollgate.request_id``,
``tollgate.outcome`` and ``http.response.status_code``. When the request carried a valid W3C
``traceparent`` the span joins that trace (and follows its sampled flag); otherwise it starts
a new one.

Nothing here raises into Tollgate: a record that cannot be turned into telemetry is logged and
counted (:attr:`OtelExporter.failures`), and an export that fails (collector down) is logged by
the exporter and counted (:attr:`OtelExporter.export_failures`). Export runs on the SDK's own
threads; :meth:`OtelExporter.observe` only records into memory.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from tollgate import __version__
from tollgate.ledger.records import OUTCOME_NAMES, api_family
from tollgate.v1 import usage_pb2

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.metrics import Histogram
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "DURATION_BUCKETS",
    "DURATION_METRIC",
    "METRIC_ATTRIBUTE_KEYS",
    "TOKEN_ATTRIBUTE_KEYS",
    "TOKEN_BUCKETS",
    "TOKEN_USAGE_METRIC",
    "OtelExporter",
    "error_type",
    "metric_attributes",
    "operation_name",
    "provider_name",
    "semconv_tokens",
    "span_attributes",
    "span_name",
]

_log = logging.getLogger(__name__)

TOKEN_USAGE_METRIC: Final = "gen_ai.client.token.usage"  # noqa: S105
DURATION_METRIC: Final = "gen_ai.client.operation.duration"
# The explicit bucket boundaries the GenAI conventions recommend for each histogram.
TOKEN_BUCKETS: Final[tuple[float, ...]] = (
    1,
    4,
    16,
    64,
    256,
    1024,
    4096,
    16384,
    65536,
    262144,
    1048576,
    4194304,
    16777216,
    67108864,
)
DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
)

OPERATION: Final = "gen_ai.operation.name"
PROVIDER: Final = "gen_ai.provider.name"
REQUEST_MODEL: Final = "gen_ai.request.model"
ERROR_TYPE: Final = "error.type"
TOKEN_TYPE: Final = "gen_ai.token.type"  # noqa: S105
# Every key a point of each metric may carry (the Views drop any other).
METRIC_ATTRIBUTE_KEYS: Final[frozenset[str]] = frozenset(
    {OPERATION, PROVIDER, REQUEST_MODEL, ERROR_TYPE}
)
TOKEN_ATTRIBUTE_KEYS: Final[frozenset[str]] = frozenset(
    {OPERATION, PROVIDER, REQUEST_MODEL, TOKEN_TYPE}
)

# Longest model name put on telemetry: models come from requests too, so a client could send
# anything; the SDK's cardinality limit (2000 points per metric) bounds the rest.
_MAX_MODEL = 256
_MAX_TRACEPARENT = 256

# Tollgate provider names → the conventions' gen_ai.provider.name. Built-in and common
# operator names; any other configured name is passed on lowercased (the set is bounded by
# the configuration, not by clients).
_PROVIDERS: Final[Mapping[str, str]] = {
    "openai": "openai",
    "anthropic": "anthropic",
    "gemini": "gcp.gemini",
    "google": "gcp.gemini",
    "vertex": "gcp.vertex_ai",
    "vertex_ai": "gcp.vertex_ai",
    "vertexai": "gcp.vertex_ai",
    "bedrock": "aws.bedrock",
    "aws": "aws.bedrock",
    "aws_bedrock": "aws.bedrock",
    "aws-bedrock": "aws.bedrock",
    "azure": "azure.ai.openai",
    "azure_openai": "azure.ai.openai",
    "azure-openai": "azure.ai.openai",
    "azure_ai_inference": "azure.ai.inference",
    "cohere": "cohere",
    "deepseek": "deepseek",
    "groq": "groq",
    "mistral": "mistral_ai",
    "mistral_ai": "mistral_ai",
    "perplexity": "perplexity",
    "xai": "x_ai",
    "x_ai": "x_ai",
    "watsonx": "ibm.watsonx.ai",
}

# Endpoint suffix → gen_ai.operation.name. The first five values are the conventions' own;
# images and audio have none there, so they get Tollgate's names (the list is open).
_OPERATIONS: Final[tuple[tuple[tuple[str, ...], str], ...]] = (
    ((":generateContent", ":streamGenerateContent"), "generate_content"),
    (("/chat/completions", "/responses", "/messages", "/converse", "/converse-stream"), "chat"),
    (("/completions",), "text_completion"),
    (("/embeddings",), "embeddings"),
    (("/images/generations", "/images/edits", "/images/variations"), "image_generation"),
    (("/audio/speech",), "speech_generation"),
    (("/audio/transcriptions", "/audio/translations"), "transcription"),
)

_OK = usage_pb2.OUTCOME_OK
_USAGE_MISSING = usage_pb2.OUTCOME_USAGE_MISSING
_UPSTREAM_ERROR = usage_pb2.OUTCOME_UPSTREAM_ERROR


def operation_name(record: usage_pb2.UsageRecord) -> str | None:
    """The record's ``gen_ai.operation.name``, or None when its endpoint is no GenAI call."""
    if not record.HasField("endpoint"):
        return None
    endpoint = record.endpoint
    for suffixes, name in _OPERATIONS:
        if endpoint.endswith(suffixes):
            return name
    return None


def provider_name(record: usage_pb2.UsageRecord) -> str:
    """The record's ``gen_ai.provider.name`` (``_OTHER`` when it has no provider)."""
    if not record.HasField("provider") or not record.provider:
        return "_OTHER"
    name = record.provider.lower()
    return _PROVIDERS.get(name, name[:64])


def error_type(record: usage_pb2.UsageRecord) -> str | None:
    """``error.type`` for a failed request, None when it succeeded.

    An upstream error is named by its HTTP status code (as the HTTP conventions do), a
    failure on Tollgate's side by its outcome (``blocked``, ``client_aborted``,
    ``internal_error``). ``usage_missing`` is no failure: the provider answered, only
    without usage.
    """
    outcome = record.outcome
    if outcome in (_OK, _USAGE_MISSING):
        return None
    if outcome == _UPSTREAM_ERROR and record.HasField("status_code"):
        return str(record.status_code)
    return OUTCOME_NAMES.get(outcome, "_OTHER")


def _model(record: usage_pb2.UsageRecord) -> str | None:
    if not record.HasField("model") or not record.model:
        return None
    return record.model[:_MAX_MODEL]


def metric_attributes(record: usage_pb2.UsageRecord) -> dict[str, str] | None:
    """The attributes of the record's metric points, or None when it gets no metric."""
    if operation_name(record) is None:
        return None
    return _operation_attributes(record)


def _operation_attributes(record: usage_pb2.UsageRecord) -> dict[str, str]:
    """Operation (when it is one), provider, model and error type: what metrics and spans
    share."""
    attrs: dict[str, str] = {}
    operation = operation_name(record)
    if operation is not None:
        attrs[OPERATION] = operation
    attrs[PROVIDER] = provider_name(record)
    model = _model(record)
    if model is not None:
        attrs[REQUEST_MODEL] = model
    error = error_type(record)
    if error is not None:
        attrs[ERROR_TYPE] = error
    return attrs


def _count(record: usage_pb2.UsageRecord, name: str) -> int | None:
    value: int | None = getattr(record, name) if record.HasField(name) else None
    return value


def semconv_tokens(record: usage_pb2.UsageRecord) -> tuple[int | None, int | None]:
    """``(input, output)`` as the conventions count them (input with cached and cache-write
    tokens, output with reasoning), None for a count the provider did not report."""
    inp = _count(record, "input_tokens")
    out = _count(record, "output_tokens")
    family = api_family(record)
    if inp is not None and family in ("anthropic", "bedrock"):
        inp += (_count(record, "cached_input_tokens") or 0) + (
            _count(record, "cache_write_tokens") or 0
        )
    if out is not None and family == "gemini":
        out += _count(record, "reasoning_tokens") or 0
    return inp, out


def span_name(record: usage_pb2.UsageRecord) -> str:
    operation = operation_name(record)
    if operation is None:
        return "tollgate.request"
    model = _model(record)
    return f"{operation} {model}" if model else operation


def _otel_protos_intact() -> bool:
    """Whether ``opentelemetry.proto`` is opentelemetry-proto's own, not xds-protos' older
    copy (both wheels carry that directory, so the one installed last wins)."""
    try:
        from opentelemetry.proto.common.v1 import common_pb2
    except ImportError:
        return True  # not installed at all: the extra is missing, not overwritten
    return hasattr(common_pb2, "InstrumentationScope")


def _cost(cost_usd: Decimal | str | None) -> float | None:
    if cost_usd is None or cost_usd == "":
        return None
    try:
        value = float(Decimal(cost_usd))
    except (InvalidOperation, ValueError, TypeError):
        return None
    return value if math.isfinite(value) else None


def span_attributes(
    record: usage_pb2.UsageRecord, cost_usd: Decimal | str | None
) -> dict[str, str | int | float | bool | Sequence[str]]:
    """The span's attributes: the metric ones, the token breakdown, user and Tollgate ids."""
    attrs: dict[str, str | int | float | bool | Sequence[str]] = dict(_operation_attributes(record))
    inp, out = semconv_tokens(record)
    if inp is not None:
        attrs["gen_ai.usage.input_tokens"] = inp
    if out is not None:
        attrs["gen_ai.usage.output_tokens"] = out
    for field, key in (
        ("cached_input_tokens", "gen_ai.usage.cache_read.input_tokens"),
        ("cache_write_tokens", "gen_ai.usage.cache_creation.input_tokens"),
        ("reasoning_tokens", "gen_ai.usage.reasoning.output_tokens"),
    ):
        value = _count(record, field)
        if value is not None:
            attrs[key] = value
    attrs["gen_ai.request.stream"] = record.streamed
    if record.HasField("ttft_ms"):
        attrs["gen_ai.response.time_to_first_chunk"] = record.ttft_ms / 1000
    if record.HasField("end_user_id") and record.end_user_id:
        attrs["user.id"] = record.end_user_id
    cost = _cost(cost_usd)
    if cost is not None:
        attrs["tollgate.cost_usd"] = cost
    attrs["tollgate.request_id"] = record.request_id
    attrs["tollgate.outcome"] = OUTCOME_NAMES.get(record.outcome, "unspecified")
    if record.HasField("block_reason"):
        attrs["tollgate.block_reason"] = record.block_reason
    if record.usage_flags:
        attrs["tollgate.usage_flags"] = list(record.usage_flags)
    if record.HasField("status_code"):
        attrs["http.response.status_code"] = record.status_code
    if record.HasField("endpoint"):
        attrs["url.path"] = record.endpoint
    if record.HasField("upstream_base_uri"):
        host = urlsplit(record.upstream_base_uri).hostname
        if host:
            attrs["server.address"] = host
    return attrs


def _times_ns(record: usage_pb2.UsageRecord) -> tuple[int, int]:
    """Start and end of the request in Unix nanoseconds (a record without ``created_at`` is
    taken to have ended now; one without latency has no duration)."""
    latency_ns = max(record.latency_ms, 0) * 1_000_000 if record.HasField("latency_ms") else 0
    if record.HasField("created_at"):
        start = record.created_at.seconds * 1_000_000_000 + record.created_at.nanos
    else:
        start = time.time_ns() - latency_ns
    return start, start + latency_ns


class OtelExporter:
    """GenAI metrics and spans for every record, exported over OTLP/HTTP (protobuf, gzip).

    ``endpoint`` is the collector's OTLP/HTTP base (``http://127.0.0.1:4318``); metrics go to
    ``/v1/metrics`` and spans to ``/v1/traces``, every ``export_interval_s``. ``timeout_s``
    bounds one export, retries included. The providers are this object's own; the global
    OpenTelemetry providers are never set. ``OTEL_EXPORTER_OTLP_*`` variables still apply to
    what is not passed here (TLS files, headers when ``headers`` is None).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        service_name: str = "tollgate",
        export_interval_s: float = 10.0,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        try:
            from opentelemetry.context import Context
            from opentelemetry.exporter.otlp.proto.http import Compression
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
            from opentelemetry.sdk.metrics.export import (
                MetricExportResult,
                MetricsData,
                PeriodicExportingMetricReader,
            )
            from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult
            from opentelemetry.trace import SpanKind, Status, StatusCode
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError as exc:
            if not _otel_protos_intact():
                raise ImportError(
                    "opentelemetry/proto was overwritten by the older copy xds-protos ships "
                    "(both packages install that directory; the last installed wins): run "
                    "pip install --force-reinstall --no-deps opentelemetry-proto"
                ) from exc
            raise ImportError(
                "OpenTelemetry export needs the otel extra: pip install 'tollgate[otel]'"
            ) from exc

        base = endpoint.strip().rstrip("/")
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"OTLP endpoint must be an http(s) URL, got {endpoint!r}")
        if not (export_interval_s > 0 and timeout_s > 0):
            raise ValueError("export_interval_s and timeout_s must be positive")

        self._lock = threading.Lock()
        self._failures = 0
        self._export_failures = 0
        self._closed = False
        owner = self

        class _SpanExporter(OTLPSpanExporter):
            def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
                result = super().export(spans)
                if result is not SpanExportResult.SUCCESS:
                    owner._export_failed()
                return result

        class _MetricExporter(OTLPMetricExporter):
            def export(
                self,
                metrics_data: MetricsData,
                timeout_millis: float | None = 10_000,
                **kwargs: Any,
            ) -> MetricExportResult:
                result = super().export(metrics_data, timeout_millis, **kwargs)
                if result is not MetricExportResult.SUCCESS:
                    owner._export_failed()
                return result

        resource = Resource.create({"service.name": service_name, "service.version": __version__})
        extra = dict(headers) if headers is not None else None
        span_exporter = _SpanExporter(
            endpoint=f"{base}/v1/traces",
            headers=extra,
            timeout=timeout_s,
            compression=Compression.Gzip,
        )
        metric_exporter = _MetricExporter(
            endpoint=f"{base}/v1/metrics",
            headers=extra,
            timeout=timeout_s,
            compression=Compression.Gzip,
        )
        interval_ms = export_interval_s * 1000
        self._tracer_provider: TracerProvider = TracerProvider(
            resource=resource, shutdown_on_exit=False
        )
        self._tracer_provider.add_span_processor(
            BatchSpanProcessor(
                span_exporter,
                schedule_delay_millis=interval_ms,
                # Room for a burst of writer batches between exports; beyond it spans are
                # dropped (the SDK logs it), never waited for.
                max_queue_size=8192,
                export_timeout_millis=timeout_s * 1000,
            )
        )
        reader = PeriodicExportingMetricReader(
            metric_exporter,
            export_interval_millis=interval_ms,
            export_timeout_millis=timeout_s * 1000,
        )
        token_keys = set(TOKEN_ATTRIBUTE_KEYS)
        self._meter_provider: MeterProvider = MeterProvider(
            resource=resource,
            metric_readers=[reader],
            shutdown_on_exit=False,
            # Exemplars would carry trace ids and the attributes a View drops: none.
            exemplar_filter=AlwaysOffExemplarFilter(),
            views=[
                View(
                    instrument_name=TOKEN_USAGE_METRIC,
                    attribute_keys=token_keys,
                    aggregation=ExplicitBucketHistogramAggregation(boundaries=TOKEN_BUCKETS),
                ),
                View(
                    instrument_name=DURATION_METRIC,
                    attribute_keys=set(METRIC_ATTRIBUTE_KEYS),
                    aggregation=ExplicitBucketHistogramAggregation(boundaries=DURATION_BUCKETS),
                ),
            ],
        )
        meter = self._meter_provider.get_meter("tollgate", __version__)
        self._tokens: Histogram = meter.create_histogram(
            TOKEN_USAGE_METRIC,
            unit="{token}",
            description="Number of input and output tokens used.",
        )
        self._duration: Histogram = meter.create_histogram(
            DURATION_METRIC, unit="s", description="GenAI operation duration."
        )
        self._tracer: Tracer = self._tracer_provider.get_tracer("tollgate", __version__)
        self._propagator: TraceContextTextMapPropagator = TraceContextTextMapPropagator()
        self._empty_context: type[Context] = Context
        self._client: SpanKind = SpanKind.CLIENT
        self._status: type[Status] = Status
        self._error: StatusCode = StatusCode.ERROR

    # -- counters --------------------------------------------------------------------------

    @property
    def failures(self) -> int:
        """Records that could not be turned into telemetry (each logged)."""
        return self._failures

    @property
    def export_failures(self) -> int:
        """Exports (metrics or spans) that failed, e.g. with the collector down."""
        return self._export_failures

    def _export_failed(self) -> None:
        with self._lock:
            self._export_failures += 1

    # -- per record ------------------------------------------------------------------------

    def observe(
        self, record: usage_pb2.UsageRecord, cost_usd: Decimal | str | None, traceparent: str = ""
    ) -> None:
        """Record one request's metrics and span. Never raises; cheap (memory only)."""
        if self._closed:
            return
        try:
            self._observe(record, cost_usd, traceparent)
        except Exception:
            with self._lock:
                self._failures += 1
                count = self._failures
            # The first failure with its traceback, then one line per thousand.
            if count == 1 or count % 1000 == 0:
                _log.warning(
                    "otel: could not record request %s (%d failures so far)",
                    getattr(record, "request_id", "?"),
                    count,
                    exc_info=count == 1,
                )

    def _observe(
        self, record: usage_pb2.UsageRecord, cost_usd: Decimal | str | None, traceparent: str
    ) -> None:
        attrs = metric_attributes(record)
        if attrs is not None:
            # The conventions give token usage no error.type (only the duration has it).
            token_attrs = {k: v for k, v in attrs.items() if k != ERROR_TYPE}
            inp, out = semconv_tokens(record)
            if inp is not None:
                self._tokens.record(inp, {**token_attrs, TOKEN_TYPE: "input"})
            if out is not None:
                self._tokens.record(out, {**token_attrs, TOKEN_TYPE: "output"})
            if record.HasField("latency_ms"):
                self._duration.record(max(record.latency_ms, 0) / 1000, attrs)

        parent = self._parent(traceparent)
        start_ns, end_ns = _times_ns(record)
        span = self._tracer.start_span(
            span_name(record),
            context=parent,
            kind=self._client,
            attributes=span_attributes(record, cost_usd),
            start_time=start_ns,
        )
        if error_type(record) is not None:
            reason = record.block_reason if record.HasField("block_reason") else ""
            outcome = OUTCOME_NAMES.get(record.outcome, "unspecified")
            span.set_status(self._status(self._error, reason or outcome))
        span.end(end_time=end_ns)

    def _parent(self, traceparent: str) -> Context:
        """The caller's trace from a W3C ``traceparent``; an empty context (new trace) when
        there is none or it is invalid."""
        empty = self._empty_context()
        if not traceparent or len(traceparent) > _MAX_TRACEPARENT:
            return empty
        return self._propagator.extract({"traceparent": traceparent}, context=empty)

    # -- end -------------------------------------------------------------------------------

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Flush what is buffered and stop both exporters, within about ``timeout_s``.

        Never raises; a second call does nothing. Export keeps being retried only until the
        exporter's own timeout; what has not gone out by ``timeout_s`` is dropped.
        """
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout_s

        def stop_spans() -> None:
            self._tracer_provider.shutdown()

        def stop_metrics() -> None:
            remaining_ms = max(deadline - time.monotonic(), 0.1) * 1000
            self._meter_provider.shutdown(timeout_millis=remaining_ms)

        # Both at once, each in its own thread: a collector that hangs on one signal does not
        # hold up the other, and the caller waits ``timeout_s`` at most.
        threads = []
        for name, stop in (("spans", stop_spans), ("metrics", stop_metrics)):
            thread = threading.Thread(
                target=self._guarded, args=(name, stop), name=f"tollgate-otel-{name}", daemon=True
            )
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0))
        if any(thread.is_alive() for thread in threads):
            _log.warning(
                "otel: shutdown did not finish within %.1fs; the rest is dropped", timeout_s
            )

    @staticmethod
    def _guarded(name: str, stop: Callable[[], None]) -> None:
        try:
            stop()
        except Exception:
            _log.warning("otel: %s shutdown failed", name, exc_info=True)

"""A small real OTLP/HTTP receiver for tests: POST /v1/metrics and /v1/traces, protobuf.

Runs ``http.server`` in a thread on 127.0.0.1 (port 0), decodes each body (gzip or deflate
when ``Content-Encoding`` says so) into the collector's ``Export*ServiceRequest`` and keeps
it, answering an empty ``Export*ServiceResponse`` as the OTLP/HTTP spec asks.
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

PROTOBUF = "application/x-protobuf"


class OtlpReceiver:
    """Collects what an OTLP/HTTP exporter sends; ``endpoint`` is its base URL."""

    def __init__(self) -> None:
        self.metric_requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.trace_requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        # Decompressed bodies as received, per path (for "this never appears" checks).
        self.raw: dict[str, list[bytes]] = {"/v1/metrics": [], "/v1/traces": []}
        self.headers: list[dict[str, str]] = []
        self.rejected: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="otlp-receiver", daemon=True
        )

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what arrived --------------------------------------------------------------------

    def spans(self) -> list[trace_pb2.Span]:
        with self._lock:
            requests = list(self.trace_requests)
        return [
            span
            for request in requests
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    def metrics(self) -> Iterator[metrics_pb2.Metric]:
        """Every metric of every request, in arrival order (cumulative ones repeat)."""
        with self._lock:
            requests = list(self.metric_requests)
        for request in requests:
            for resource_metrics in request.resource_metrics:
                for scope_metrics in resource_metrics.scope_metrics:
                    yield from scope_metrics.metrics

    def last_metric(self, name: str) -> metrics_pb2.Metric | None:
        """The newest export of metric ``name`` (for cumulative metrics: the totals)."""
        found = None
        for metric in self.metrics():
            if metric.name == name:
                found = metric
        return found

    def resources(self) -> list[dict[str, object]]:
        with self._lock:
            metric_requests = list(self.metric_requests)
            trace_requests = list(self.trace_requests)
        out = [
            attributes(rm.resource.attributes) for r in metric_requests for rm in r.resource_metrics
        ]
        out += [
            attributes(rs.resource.attributes) for r in trace_requests for rs in r.resource_spans
        ]
        return out

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return predicate()

    # -- the HTTP side -------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _answer(self, status: int, body: bytes = b"", ctype: str = PROTOBUF) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                path = self.path.split("?", 1)[0]
                if path not in receiver.raw:
                    receiver._reject(path, 404)
                    self._answer(404, b"not found", "text/plain")
                    return
                if (self.headers.get("Content-Type") or "").split(";")[0].strip() != PROTOBUF:
                    receiver._reject(path, 415)
                    self._answer(415, b"protobuf only", "text/plain")
                    return
                encoding = (self.headers.get("Content-Encoding") or "").strip().lower()
                try:
                    if encoding == "gzip":
                        body = gzip.decompress(body)
                    elif encoding == "deflate":
                        body = zlib.decompress(body)
                    elif encoding not in ("", "identity"):
                        raise ValueError(encoding)
                    if path == "/v1/metrics":
                        metrics_request = metrics_service_pb2.ExportMetricsServiceRequest()
                        metrics_request.ParseFromString(body)
                        answer = metrics_service_pb2.ExportMetricsServiceResponse()
                    else:
                        trace_request = trace_service_pb2.ExportTraceServiceRequest()
                        trace_request.ParseFromString(body)
                        answer = trace_service_pb2.ExportTraceServiceResponse()
                except Exception:
                    receiver._reject(path, 400)
                    self._answer(400, b"bad body", "text/plain")
                    return
                with receiver._lock:
                    receiver.raw[path].append(body)
                    receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                    if path == "/v1/metrics":
                        receiver.metric_requests.append(metrics_request)
                    else:
                        receiver.trace_requests.append(trace_request)
                self._answer(200, answer.SerializeToString())

        return Handler

    def _reject(self, path: str, status: int) -> None:
        with self._lock:
            self.rejected.append((path, status))


def any_value(value: common_pb2.AnyValue) -> object:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, kind)


def attributes(kvs: Iterable[common_pb2.KeyValue]) -> dict[str, object]:
    """OTLP ``KeyValue`` list → dict of plain Python values."""
    return {kv.key: any_value(kv.value) for kv in kvs}

"""The ext_proc gRPC servicer: moves stream messages to a per-request processor.

It picks a :class:`RequestProcessor` for each stream, hands every ProcessingRequest to the
handler of its phase and writes back the answer. It does no I/O of its own.

It is also the error boundary of the request path: a handler that raises is logged with the
request id (the exception's type and where it was raised, never its message, which may quote
a header or a body), counted in :attr:`ExternalProcessorServicer.internal_errors`, recorded
as ``internal_error`` by the processor, and failed closed: an immediate 500 while the client
has no response yet, else the stream is aborted with INTERNAL and Envoy resets the response.
The servicer goes on serving other streams.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import Counter
from collections.abc import Callable

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from tollgate.extproc.processor import RequestProcessor
from tollgate.stats import LATENCY_BUCKETS_S, HistogramFamily

__all__ = ["ExternalProcessorServicer"]

log = logging.getLogger(__name__)


class ExternalProcessorServicer(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Envoy's ``envoy.service.ext_proc.v3.ExternalProcessor``."""

    def __init__(self, new_processor: Callable[[], RequestProcessor]) -> None:
        self._new_processor = new_processor
        self.active_streams = 0
        # Phase → handlers that raised there (``close`` counts as phase "close").
        self.internal_errors: Counter[str] = Counter()
        # ext_proc messages received, by phase: what each request's plan costs.
        self.messages: Counter[str] = Counter()
        # Seconds Tollgate spent on each message, by phase (Tollgate's own share of latency).
        self.phase_seconds = HistogramFamily(LATENCY_BUCKETS_S)

    async def Process(
        self,
        request_iterator: object,
        context: grpc.aio.ServicerContext[ep.ProcessingRequest, ep.ProcessingResponse],
    ) -> None:
        processor = self._new_processor()
        self.active_streams += 1
        try:
            while True:
                request = await context.read()
                if request is grpc.aio.EOF:
                    return
                assert isinstance(request, ep.ProcessingRequest)
                phase = request.WhichOneof("request")
                self.messages[phase or "none"] += 1
                started = time.perf_counter()
                try:
                    response = _dispatch(processor, request)
                    self.phase_seconds.observe(phase or "none", time.perf_counter() - started)
                except Exception as exc:
                    self._failed(processor, phase or "none", exc)
                    response = processor.fail(phase or "none")
                    if response is None:
                        await context.abort(
                            grpc.StatusCode.INTERNAL,
                            f"tollgate failed on request {processor.request_id}",
                        )
                        return
                if response is None:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, "ProcessingRequest without a phase"
                    )
                    return
                await context.write(response)
        finally:
            self.active_streams -= 1
            try:
                processor.close()
            except Exception as exc:
                # The processor still submitted a row (as internal_error) before raising.
                self._failed(processor, "close", exc)

    def _failed(self, processor: RequestProcessor, phase: str, exc: Exception) -> None:
        self.internal_errors[phase] += 1
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        log.error(
            "ext_proc %s handler failed for request %s: %s at %s (failed closed)",
            phase,
            processor.request_id,
            type(exc).__name__,
            where,
        )


def _dispatch(p: RequestProcessor, request: ep.ProcessingRequest) -> ep.ProcessingResponse | None:
    phase = request.WhichOneof("request")
    if phase == "request_headers":
        return p.request_headers(request.request_headers, request.metadata_context)
    if phase == "response_headers":
        return p.response_headers(request.response_headers)
    if phase == "response_body":
        return p.response_body(request.response_body, request.attributes)
    if phase == "request_body":
        return p.request_body(request.request_body)
    if phase == "request_trailers":
        return ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
    if phase == "response_trailers":
        return ep.ProcessingResponse(response_trailers=ep.TrailersResponse())
    return None

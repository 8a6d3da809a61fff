"""The ext_proc gRPC servicer: moves stream messages to a per-request processor.

It picks a :class:`RequestProcessor` for each stream, hands every ProcessingRequest to the
handler of its phase and writes back the answer. It does no I/O of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from tollgate.extproc.processor import RequestProcessor

__all__ = ["ExternalProcessorServicer"]

log = logging.getLogger(__name__)


class ExternalProcessorServicer(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Envoy's ``envoy.service.ext_proc.v3.ExternalProcessor``."""

    def __init__(self, new_processor: Callable[[], RequestProcessor]) -> None:
        self._new_processor = new_processor
        self.active_streams = 0

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
                response = _dispatch(processor, request)
                if response is None:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, "ProcessingRequest without a phase"
                    )
                    return
                await context.write(response)
        finally:
            self.active_streams -= 1
            processor.close()


def _dispatch(p: RequestProcessor, request: ep.ProcessingRequest) -> ep.ProcessingResponse | None:
    phase = request.WhichOneof("request")
    if phase == "request_headers":
        return p.request_headers(request.request_headers, request.metadata_context)
    if phase == "response_headers":
        return p.response_headers(request.response_headers)
    if phase == "response_body":
        return p.response_body(request.response_body)
    if phase == "request_body":
        return p.request_body(request.request_body)
    if phase == "request_trailers":
        return ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
    if phase == "response_trailers":
        return ep.ProcessingResponse(response_trailers=ep.TrailersResponse())
    return None

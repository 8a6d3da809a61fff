"""Pure builders of ext_proc ProcessingResponse messages (no state, no I/O)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2

from tollgate.extproc.plan import REQUEST_ID_KEY, TOLLGATE_NAMESPACE

__all__ = [
    "BODY_BUFFERED",
    "BODY_NONE",
    "BODY_STREAMED",
    "continue_request_body",
    "continue_request_headers",
    "continue_response_body",
    "continue_response_headers",
    "error_body",
    "immediate_error",
]

ProcessingMode = processing_mode_pb2.ProcessingMode
BODY_NONE = ProcessingMode.NONE
BODY_STREAMED = ProcessingMode.STREAMED
BODY_BUFFERED = ProcessingMode.BUFFERED


def _mutation(
    remove: Iterable[str] = (), set_headers: Iterable[tuple[str, bytes]] = ()
) -> ep.HeaderMutation:
    return ep.HeaderMutation(
        remove_headers=list(remove),
        set_headers=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=key, raw_value=value),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
            for key, value in set_headers
        ],
    )


def _headers_response(
    remove: Iterable[str], set_headers: Iterable[tuple[str, bytes]]
) -> ep.HeadersResponse:
    return ep.HeadersResponse(
        response=ep.CommonResponse(header_mutation=_mutation(remove, set_headers))
    )


def _write_metadata(response: ep.ProcessingResponse, values: Mapping[str, str]) -> None:
    """Strings into the stream's dynamic metadata, namespace ``tollgate`` (the virtual host
    turns some into response headers: envoyconf._metadata_headers)."""
    fields = response.dynamic_metadata.fields[TOLLGATE_NAMESPACE].struct_value.fields
    for key, value in values.items():
        fields[key].string_value = value


def continue_request_headers(
    *,
    request_id: str,
    metadata: Mapping[str, str] | None = None,
    remove: Iterable[str] = (),
    set_headers: Iterable[tuple[str, bytes]] = (),
    request_body_mode: int | None = None,
    json_answer: bool = False,
    clear_route_cache: bool = False,
) -> ep.ProcessingResponse:
    """Let the request go on, with headers removed/set; optionally ask for the request body
    (the headers then wait in Envoy, with no upstream connection, until the body is answered).

    ``json_answer``: the answer is one JSON document, so Envoy skips the response headers and
    sends the whole body buffered, with the status in its attributes; ``request_id`` then goes
    into the stream's dynamic metadata, from which Envoy's virtual host sets the client's
    ``x-tollgate-request-id`` (every other plan sets it on the response headers). ``metadata``
    is written there too (the limit headers). ``clear_route_cache``: Envoy recomputes the
    route after the mutation.
    """
    response = ep.ProcessingResponse(request_headers=_headers_response(remove, set_headers))
    response.request_headers.response.clear_route_cache = clear_route_cache
    # The request id only where Tollgate will not see the response headers to set it there.
    values = {REQUEST_ID_KEY: request_id} if json_answer and request_body_mode is None else {}
    values.update(metadata or {})
    if values:
        _write_metadata(response, values)
    if request_body_mode is not None:
        response.mode_override.request_body_mode = request_body_mode
        # An override replaces the whole mode, and the filter's own default skips response
        # headers (only the route's config asks for them: see envoyconf._ext_proc_filter).
        response.mode_override.response_header_mode = ProcessingMode.SEND
    elif json_answer:
        response.mode_override.response_header_mode = ProcessingMode.SKIP
        response.mode_override.response_body_mode = ProcessingMode.BUFFERED
    return response


def continue_response_headers(
    *,
    set_headers: Iterable[tuple[str, bytes]] = (),
    remove: Iterable[str] = (),
    response_body_mode: int | None = None,
) -> ep.ProcessingResponse:
    response = ep.ProcessingResponse(response_headers=_headers_response(remove, set_headers))
    if response_body_mode is not None:
        response.mode_override.response_body_mode = response_body_mode
    return response


def continue_request_body(
    *,
    remove: Iterable[str] = (),
    set_headers: Iterable[tuple[str, bytes]] = (),
    body: bytes | None = None,
    clear_route_cache: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> ep.ProcessingResponse:
    """Let a buffered request body go on, optionally replaced, with header changes (they apply
    because the headers are still held while the body is buffered); ``metadata`` is added to
    the stream's dynamic metadata (namespace ``tollgate``)."""
    common = ep.CommonResponse(
        header_mutation=_mutation(remove, set_headers), clear_route_cache=clear_route_cache
    )
    if body is not None:
        common.body_mutation.body = body
    response = ep.ProcessingResponse(request_body=ep.BodyResponse(response=common))
    if metadata:
        _write_metadata(response, metadata)
    return response


def continue_response_body(*, body: bytes | None = None) -> ep.ProcessingResponse:
    """Let a response body chunk go on, or replace it with ``body``."""
    response = ep.ProcessingResponse(response_body=ep.BodyResponse())
    if body is not None:
        response.response_body.response.body_mutation.body = body
    return response


def error_body(message: str, code: str, *, param: str | None = None) -> bytes:
    """An OpenAI-shaped error document."""
    return json.dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "code": code,
                "param": param,
            }
        },
        separators=(",", ":"),
    ).encode()


def immediate_error(
    status: int,
    code: str,
    message: str,
    *,
    param: str | None = None,
    extra_headers: Iterable[tuple[str, bytes]] = (),
) -> ep.ProcessingResponse:
    """Answer the client directly (no upstream connection) with an OpenAI-style error."""
    return ep.ProcessingResponse(
        immediate_response=ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=_mutation(set_headers=[("content-type", b"application/json"), *extra_headers]),
            body=error_body(message, code, param=param),
            details=code,
        )
    )

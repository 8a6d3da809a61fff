"""One RequestProcessor per ext_proc stream (= per HTTP request), with a handler per phase.

The processor decides, from what it has seen so far, what Envoy should do next, and at the
end of the exchange builds exactly one UsageRecord and hands it to the ledger sink. It does
no I/O and never waits: the sink's ``submit`` only enqueues.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from tollgate.extproc import responses
from tollgate.ledger.records import UsageRecord, new_request_id
from tollgate.policy.headers import REQUEST_ID_HEADER, is_attribution_header
from tollgate.policy.identity import Identity, resolve_from_headers
from tollgate.providers import ParsedResponse, UsageParser, parser_for
from tollgate.providers.usage import TOKEN_FIELDS
from tollgate.v1 import usage_pb2

__all__ = ["ProcessorContext", "RecordSink", "RequestProcessor", "header_map"]

log = logging.getLogger(__name__)


class RecordSink(Protocol):
    def submit(self, record: UsageRecord) -> bool: ...


@dataclass(frozen=True)
class ProcessorContext:
    """What every processor shares: where records go and the static route facts."""

    sink: RecordSink
    provider: str
    upstream_base_uri: str
    monotonic_ns: Callable[[], int] = field(default=time.monotonic_ns)
    wall_ns: Callable[[], int] = field(default=time.time_ns)


def header_map(headers: ep.HttpHeaders) -> dict[str, bytes]:
    """Header name → value bytes (``raw_value``; values are not always UTF-8).

    A repeated header keeps its values joined with ``,`` as HTTP allows for list headers.
    """
    out: dict[str, bytes] = {}
    for h in headers.headers.headers:
        value = h.raw_value if h.raw_value else h.value.encode("utf-8")
        key = h.key.lower()
        out[key] = out[key] + b"," + value if key in out else value
    return out


class RequestProcessor:
    """State of one request through its phases; ``close`` ends it exactly once."""

    def __init__(self, ctx: ProcessorContext) -> None:
        self._ctx = ctx
        self._started_ns = ctx.monotonic_ns()
        wall_ns = ctx.wall_ns()
        self._request_id = new_request_id(wall_ns // 1_000_000)
        self._created_us = wall_ns // 1000
        self._identity: Identity | None = None
        self._endpoint: str | None = None
        self._status: int | None = None
        self._streamed = False
        self._parser: UsageParser | None = None
        self._first_byte_ns: int | None = None
        self._finished = False

    @property
    def request_id(self) -> str:
        return self._request_id

    # -- phases -----------------------------------------------------------------------------

    def request_headers(self, msg: ep.HttpHeaders) -> ep.ProcessingResponse:
        headers = header_map(msg)
        path = headers.get(":path", b"/").decode("utf-8", "replace")
        self._endpoint = path.split("?", 1)[0]
        self._identity = resolve_from_headers(headers)
        strip = sorted(name for name in headers if is_attribution_header(name))
        return responses.continue_request_headers(
            remove=strip,
            # Usage can only be read from an uncompressed body.
            set_headers=[("accept-encoding", b"identity")],
        )

    def request_body(self, msg: ep.HttpBody) -> ep.ProcessingResponse:
        return responses.continue_request_body()

    def response_headers(self, msg: ep.HttpHeaders) -> ep.ProcessingResponse:
        headers = header_map(msg)
        try:
            self._status = int(headers.get(":status", b"0"))
        except ValueError:
            self._status = None
        set_headers = [(REQUEST_ID_HEADER, self._request_id.encode())]
        ok = self._status is not None and 200 <= self._status < 300
        content_type = headers.get("content-type", b"").split(b";", 1)[0].strip().lower()
        self._streamed = content_type == b"text/event-stream"
        if ok and not msg.end_of_stream and self._endpoint is not None:
            self._parser = parser_for(self._endpoint, streamed=self._streamed)
        if self._parser is None:
            self._finish(self._outcome_without_body())
            return responses.continue_response_headers(set_headers=set_headers)
        mode = responses.BODY_STREAMED if self._streamed else responses.BODY_BUFFERED
        return responses.continue_response_headers(set_headers=set_headers, response_body_mode=mode)

    def response_body(self, msg: ep.HttpBody) -> ep.ProcessingResponse:
        if msg.body and self._first_byte_ns is None:
            self._first_byte_ns = self._ctx.monotonic_ns()
        if self._parser is not None:
            self._parser.feed(msg.body)
        if msg.end_of_stream:
            self._finish(self._outcome_from_usage())
        return responses.continue_response_body()

    def close(self) -> None:
        """The ext_proc stream ended. If the exchange did not complete, the client went away."""
        if not self._finished:
            self._finish(usage_pb2.OUTCOME_CLIENT_ABORTED)

    # -- outcome and record -----------------------------------------------------------------

    def _outcome_without_body(self) -> int:
        if self._status is None or self._status >= 400:
            return usage_pb2.OUTCOME_UPSTREAM_ERROR
        return usage_pb2.OUTCOME_OK

    def _outcome_from_usage(self) -> int:
        assert self._parser is not None
        if self._parser.result().usage.reported:
            return usage_pb2.OUTCOME_OK
        return usage_pb2.OUTCOME_USAGE_MISSING

    def _finish(self, outcome: int) -> None:
        if self._finished:
            return
        self._finished = True
        parsed = self._parser.result() if self._parser is not None else None
        self._ctx.sink.submit(self._record(outcome, parsed))

    def _record(self, outcome: int, parsed: ParsedResponse | None) -> UsageRecord:
        now = self._ctx.monotonic_ns()
        record = UsageRecord(
            request_id=self._request_id,
            outcome=outcome,  # type: ignore[arg-type]
            streamed=self._streamed,
            provider=self._ctx.provider,
            upstream_base_uri=self._ctx.upstream_base_uri,
            latency_ms=(now - self._started_ns) // 1_000_000,
        )
        record.created_at.FromMicroseconds(self._created_us)
        if self._endpoint is not None:
            record.endpoint = self._endpoint
        if self._status is not None:
            record.status_code = self._status
        if self._identity is not None:
            record.end_user_id = self._identity.user_id
            record.identity_source = self._identity.source
        if self._first_byte_ns is not None and self._streamed:
            record.ttft_ms = (self._first_byte_ns - self._started_ns) // 1_000_000
        if parsed is not None:
            if parsed.model:
                record.model = parsed.model
            usage = parsed.usage
            for name in TOKEN_FIELDS:
                value = getattr(usage, name)
                if value is not None:
                    setattr(record, name, value)
        return record

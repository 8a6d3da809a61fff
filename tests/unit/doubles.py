"""Test doubles for the processor and its collaborators: a sink that keeps records, fixed
keys, a processor with an injected fault."""

from __future__ import annotations

from collections.abc import Mapping

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2

from tollgate.extproc.processor import RequestProcessor
from tollgate.ledger.records import UsageRecord
from tollgate.policy.keys import GatewayKey


class RecordingSink:
    """Takes every record (as the ledger writer would) and keeps it for the test to read."""

    accepting = True

    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def submit(self, record: UsageRecord) -> bool:
        self.records.append(record)
        return True


class FixedKeys:
    """Gateway keys by token, as the key cache would answer."""

    def __init__(self, keys: dict[bytes, GatewayKey] | None = None) -> None:
        self._keys = keys or {}

    def lookup(self, token: bytes) -> GatewayKey | None:
        return self._keys.get(token)


FAULT_HEADER = "x-test-fault"


class FaultyProcessor(RequestProcessor):
    """A RequestProcessor whose handler of one phase raises, for the phase error boundary.

    The phase is named by the request's ``x-test-fault`` header: ``request_headers``,
    ``request_body``, ``response_headers``, ``response_body`` (its first chunk) or
    ``response_body:N`` (its N-th chunk, once the response is under way). Requests without it
    are processed as usual. The request phases raise after doing their work (so what the
    request said is known), the response phases before (so nothing is recorded yet).
    """

    _body_chunks = 0

    def _fault(self, phase: str) -> None:
        wanted = self._headers.get(FAULT_HEADER)
        if wanted is None:
            return
        name, _, nth = wanted.decode().partition(":")
        if name != phase:
            return
        if phase == "response_body":
            self._body_chunks += 1
            if self._body_chunks != int(nth or 1):
                return
        raise RuntimeError(f"injected fault in {phase}")

    def request_headers(
        self, msg: ep.HttpHeaders, metadata: base_pb2.Metadata | None = None
    ) -> ep.ProcessingResponse:
        answer = super().request_headers(msg, metadata)
        self._fault("request_headers")
        return answer

    def request_body(self, msg: ep.HttpBody) -> ep.ProcessingResponse:
        answer = super().request_body(msg)
        self._fault("request_body")
        return answer

    def response_headers(self, msg: ep.HttpHeaders) -> ep.ProcessingResponse:
        self._fault("response_headers")
        return super().response_headers(msg)

    def response_body(
        self, msg: ep.HttpBody, attributes: Mapping[str, struct_pb2.Struct] | None = None
    ) -> ep.ProcessingResponse:
        self._fault("response_body")
        return super().response_body(msg, attributes)

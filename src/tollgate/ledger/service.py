"""UsageService: read access to the ledger over gRPC, on its own listener behind a token.

The service reads every record of every user, so it is never served without
:class:`BearerTokenInterceptor`: a call without ``authorization: Bearer <token>`` (compared in
constant time) ends with ``UNAUTHENTICATED`` before any handler runs.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import grpc
import psycopg
from google.protobuf import timestamp_pb2
from psycopg_pool import AsyncConnectionPool

from tollgate.ledger.queries import RequestRow, UsageFilter, fetch_requests, fetch_user_totals
from tollgate.ledger.records import OPTIONAL_SCALARS
from tollgate.v1 import usage_pb2, usage_pb2_grpc

__all__ = ["BearerTokenInterceptor", "UsageServicer", "row_to_record"]

_OUTCOMES = {
    "ok": usage_pb2.OUTCOME_OK,
    "blocked": usage_pb2.OUTCOME_BLOCKED,
    "upstream_error": usage_pb2.OUTCOME_UPSTREAM_ERROR,
    "client_aborted": usage_pb2.OUTCOME_CLIENT_ABORTED,
    "usage_missing": usage_pb2.OUTCOME_USAGE_MISSING,
    "internal_error": usage_pb2.OUTCOME_INTERNAL_ERROR,
}
_MAX_PAGE = 10_000


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call whose ``authorization`` metadata is not ``Bearer <token>``."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("an empty token authenticates nobody")
        self._expected = f"Bearer {token}".encode()

    def allows(self, metadata: Any) -> bool:
        """Whether ``metadata`` (the call's invocation metadata) carries the token."""
        sent = [value for key, value in (metadata or ()) if key.lower() == "authorization"]
        if len(sent) != 1:
            return False
        value = sent[0].encode() if isinstance(sent[0], str) else bytes(sent[0])
        return hmac.compare_digest(value, self._expected)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or self.allows(handler_call_details.invocation_metadata):
            return handler
        return _refusing(handler)


async def _unauthenticated(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")


def _refusing(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same shape as ``handler`` that ends the call UNAUTHENTICATED."""
    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_unauthenticated, **codec)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_unauthenticated, **codec)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_unauthenticated, **codec)
    return grpc.stream_stream_rpc_method_handler(_unauthenticated, **codec)


def _time(ts: timestamp_pb2.Timestamp, present: bool) -> datetime | None:
    return ts.ToDatetime(tzinfo=UTC) if present else None


def row_to_record(row: RequestRow) -> usage_pb2.UsageRecord:
    """The UsageRecord of one ledger row; NULL columns stay unset."""
    record = usage_pb2.UsageRecord(
        request_id=str(row.request_id),
        streamed=row.streamed,
        outcome=_OUTCOMES[row.outcome],
        tags=row.tags,
        limit_ids=row.limit_ids,
        logging_disabled=row.logging_disabled,
        usage_flags=row.usage_flags,
    )
    record.created_at.FromDatetime(row.created_at)
    for name in OPTIONAL_SCALARS:
        value = getattr(row, name)
        if value is not None:
            setattr(record, name, value)
    if row.cost_usd is not None:
        record.cost_usd = str(row.cost_usd)
    if row.units:
        record.units.update({k: float(v) for k, v in row.units.items()})
    return record


class UsageServicer(usage_pb2_grpc.UsageServiceServicer):  # type: ignore[misc]
    def __init__(self, pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]]) -> None:
        self._pool = pool

    async def StreamRecords(
        self, request: usage_pb2.StreamRecordsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        where = UsageFilter(
            user=request.end_user_id if request.HasField("end_user_id") else None,
            since=_time(request.since, request.HasField("since")),
            until=_time(request.until, request.HasField("until")),
        )
        limit = min(request.limit or _MAX_PAGE, _MAX_PAGE)
        async with self._pool.connection() as conn:
            rows = await fetch_requests(conn, where, limit=limit)
        for row in rows:
            yield row_to_record(row)

    async def SummarizeUsers(
        self, request: usage_pb2.SummarizeUsersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> usage_pb2.SummarizeUsersResponse:
        where = UsageFilter(
            since=_time(request.since, request.HasField("since")),
            until=_time(request.until, request.HasField("until")),
        )
        async with self._pool.connection() as conn:
            totals = await fetch_user_totals(conn, where)
        return usage_pb2.SummarizeUsersResponse(
            users=[
                usage_pb2.UserSummary(
                    end_user_id=t.end_user_id or "",
                    requests=t.requests,
                    input_tokens=t.input_tokens,
                    output_tokens=t.output_tokens,
                    total_tokens=t.total_tokens,
                    cost_usd="" if t.cost_usd is None else str(t.cost_usd),
                )
                for t in totals
            ]
        )

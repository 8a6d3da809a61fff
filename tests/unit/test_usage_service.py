"""UsageService over a real grpc.aio server and a real Postgres ledger."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from tests.unit.test_ledger_writer import make_writer, record
from tollgate.app import run_migrations
from tollgate.ledger.service import BearerTokenInterceptor, UsageServicer
from tollgate.v1 import usage_pb2, usage_pb2_grpc


@pytest.fixture
async def stub(database_url: str) -> AsyncIterator[usage_pb2_grpc.UsageServiceStub]:
    await run_migrations(database_url)
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
        database_url, open=False
    )
    await pool.open()
    first = record("alice", 10, 5)
    first.tags.append("beta")
    await make_writer(pool).write_batch(
        [first, record("alice", 20, 7), record("bob", 3, 1), record("carol", None, None)]
    )
    server = grpc.aio.server()
    usage_pb2_grpc.add_UsageServiceServicer_to_server(UsageServicer(pool), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield usage_pb2_grpc.UsageServiceStub(channel)
    await server.stop(0)
    await pool.close()


async def test_stream_records_of_one_user(stub: usage_pb2_grpc.UsageServiceStub) -> None:
    records = [
        r async for r in stub.StreamRecords(usage_pb2.StreamRecordsRequest(end_user_id="alice"))
    ]
    assert [(r.input_tokens, r.output_tokens) for r in records] == [(10, 5), (20, 7)]
    assert list(records[0].tags) == ["beta"]
    assert records[0].outcome == usage_pb2.OUTCOME_OK
    assert records[0].cost_usd  # priced by the writer


async def test_unreported_tokens_stay_unset(stub: usage_pb2_grpc.UsageServiceStub) -> None:
    (carol,) = [
        r async for r in stub.StreamRecords(usage_pb2.StreamRecordsRequest(end_user_id="carol"))
    ]
    assert not carol.HasField("input_tokens")
    assert not carol.HasField("cost_usd")


async def test_limit(stub: usage_pb2_grpc.UsageServiceStub) -> None:
    records = [r async for r in stub.StreamRecords(usage_pb2.StreamRecordsRequest(limit=3))]
    assert len(records) == 3


async def test_summarize_users(stub: usage_pb2_grpc.UsageServiceStub) -> None:
    summary = await stub.SummarizeUsers(usage_pb2.SummarizeUsersRequest())
    totals = {u.end_user_id: (u.requests, u.input_tokens, u.output_tokens) for u in summary.users}
    assert totals == {"alice": (2, 30, 12), "bob": (1, 3, 1), "carol": (1, 0, 0)}
    (carol,) = [u for u in summary.users if u.end_user_id == "carol"]
    assert carol.cost_usd == ""


TOKEN = "usage-token-0123456789"


@pytest.fixture
async def guarded(database_url: str) -> AsyncIterator[usage_pb2_grpc.UsageServiceStub]:
    """UsageService behind the bearer-token interceptor, as `tollgate serve` runs it."""
    await run_migrations(database_url)
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
        database_url, open=False
    )
    await pool.open()
    await make_writer(pool).write_batch([record("alice", 10, 5)])
    server = grpc.aio.server(interceptors=[BearerTokenInterceptor(TOKEN)])
    usage_pb2_grpc.add_UsageServiceServicer_to_server(UsageServicer(pool), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield usage_pb2_grpc.UsageServiceStub(channel)
    await server.stop(0)
    await pool.close()


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", "Bearer wrong-token"),),
        (("authorization", TOKEN),),
        (("authorization", f"Bearer {TOKEN}x"),),
        (("authorization", f"bearer {TOKEN}"),),
        (("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer other")),
        (("x-token", f"Bearer {TOKEN}"),),
    ],
)
async def test_calls_without_the_token_are_unauthenticated(
    guarded: usage_pb2_grpc.UsageServiceStub, metadata: tuple[tuple[str, str], ...]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await guarded.SummarizeUsers(usage_pb2.SummarizeUsersRequest(), metadata=metadata)
    assert unary.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        _ = [
            r
            async for r in guarded.StreamRecords(
                usage_pb2.StreamRecordsRequest(), metadata=metadata
            )
        ]
    assert streamed.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_calls_with_the_token_are_served(guarded: usage_pb2_grpc.UsageServiceStub) -> None:
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    summary = await guarded.SummarizeUsers(usage_pb2.SummarizeUsersRequest(), metadata=metadata)
    assert [(u.end_user_id, u.requests) for u in summary.users] == [("alice", 1)]
    records = [
        r async for r in guarded.StreamRecords(usage_pb2.StreamRecordsRequest(), metadata=metadata)
    ]
    assert [r.input_tokens for r in records] == [10]


def test_an_empty_token_is_refused() -> None:
    with pytest.raises(ValueError, match="empty token"):
        BearerTokenInterceptor("")

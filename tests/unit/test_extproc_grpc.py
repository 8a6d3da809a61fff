"""The ext_proc servicer on a real grpc.aio server (port 0), fed ProcessingRequest sequences."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from tests.unit.doubles import FAULT_HEADER, FaultyProcessor
from tollgate.extproc import responses
from tollgate.extproc.processor import ProcessorContext, RequestProcessor
from tollgate.extproc.server import ExternalProcessorServicer
from tollgate.ledger.records import UsageRecord
from tollgate.routing.router import Router
from tollgate.v1 import usage_pb2

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "openai"


class ListSink:
    """Collects records instead of a ledger writer (the processor takes any sink)."""

    def __init__(self) -> None:
        self.records: list[UsageRecord] = []
        self.arrived = asyncio.Event()

    accepting = True

    def submit(self, record: UsageRecord) -> bool:
        self.records.append(record)
        self.arrived.set()
        return True


def headers(*pairs: tuple[str, bytes], end: bool = False) -> ep.HttpHeaders:
    return ep.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in pairs]
        ),
        end_of_stream=end,
    )


REQUEST = ep.ProcessingRequest(
    request_headers=headers(
        (":method", b"POST"),
        (":path", b"/v1/chat/completions?x=1"),
        ("content-type", b"application/json"),
        ("authorization", b"Bearer sk-app-own-key"),
        ("x-tollgate-user-id", b"user_7a3f"),
        ("X-Proxyify-User-Id", b"other"),
    )
)


@pytest.fixture
async def channel() -> AsyncIterator[tuple[grpc.aio.Channel, ListSink]]:
    sink = ListSink()
    context = ProcessorContext(sink=sink, router=Router.single("openai", "http://up"))
    server = grpc.aio.server()
    ep_grpc.add_ExternalProcessorServicer_to_server(
        ExternalProcessorServicer(lambda: RequestProcessor(context)), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
        yield chan, sink
    await server.stop(0)


async def exchange(
    chan: grpc.aio.Channel, requests: list[ep.ProcessingRequest]
) -> list[ep.ProcessingResponse]:
    stub = ep_grpc.ExternalProcessorStub(chan)
    call = stub.Process()
    answers = []
    for request in requests:
        await call.write(request)
        answers.append(await call.read())
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    return answers


async def test_json_chat_completion(channel: tuple[grpc.aio.Channel, ListSink]) -> None:
    chan, sink = channel
    body = (FIXTURES / "chat_completion.json").read_bytes()
    answers = await exchange(
        chan,
        [
            REQUEST,
            ep.ProcessingRequest(
                response_headers=headers((":status", b"200"), ("content-type", b"application/json"))
            ),
            ep.ProcessingRequest(response_body=ep.HttpBody(body=body, end_of_stream=True)),
        ],
    )
    mutation = answers[0].request_headers.response.header_mutation
    assert sorted(mutation.remove_headers) == ["x-proxyify-user-id", "x-tollgate-user-id"]
    assert "authorization" not in mutation.remove_headers
    assert [(h.header.key, h.header.raw_value) for h in mutation.set_headers] == [
        ("accept-encoding", b"identity")
    ]
    assert answers[1].mode_override.response_body_mode == responses.BODY_BUFFERED
    set_back = answers[1].response_headers.response.header_mutation.set_headers
    assert set_back[0].header.key == "x-tollgate-request-id"
    assert answers[2].HasField("response_body")

    (record,) = sink.records
    assert set_back[0].header.raw_value.decode() == record.request_id
    # The response headers say it: nothing goes into the stream's dynamic metadata for it.
    assert "tollgate" not in answers[0].dynamic_metadata.fields
    assert record.end_user_id == "user_7a3f"
    assert record.identity_source == "header"
    assert record.endpoint == "/v1/chat/completions"
    assert record.outcome == usage_pb2.OUTCOME_OK
    assert (record.input_tokens, record.output_tokens, record.total_tokens) == (1117, 46, 1163)
    assert record.model == "gpt-4o-2024-08-06"
    assert record.status_code == 200
    assert not record.streamed


async def test_sse_stream_in_many_chunks(channel: tuple[grpc.aio.Channel, ListSink]) -> None:
    chan, sink = channel
    stream = (FIXTURES / "chat_stream_include_usage.sse").read_bytes()
    chunks = [stream[i : i + 37] for i in range(0, len(stream), 37)]
    requests = [
        REQUEST,
        ep.ProcessingRequest(
            response_headers=headers(
                (":status", b"200"), ("content-type", b"text/event-stream; charset=utf-8")
            )
        ),
        *[ep.ProcessingRequest(response_body=ep.HttpBody(body=c)) for c in chunks],
        ep.ProcessingRequest(response_body=ep.HttpBody(body=b"", end_of_stream=True)),
    ]
    answers = await exchange(chan, requests)
    assert answers[1].mode_override.response_body_mode == responses.BODY_STREAMED
    (record,) = sink.records
    assert record.streamed
    assert (record.input_tokens, record.cached_input_tokens, record.output_tokens) == (
        1117,
        1024,
        46,
    )
    assert record.HasField("ttft_ms")


async def test_upstream_error_is_recorded_without_reading_the_body(
    channel: tuple[grpc.aio.Channel, ListSink],
) -> None:
    chan, sink = channel
    answers = await exchange(
        chan,
        [
            REQUEST,
            ep.ProcessingRequest(
                response_headers=headers((":status", b"429"), ("content-type", b"application/json"))
            ),
        ],
    )
    assert not answers[1].HasField("mode_override")
    (record,) = sink.records
    assert record.outcome == usage_pb2.OUTCOME_UPSTREAM_ERROR
    assert record.status_code == 429
    assert not record.HasField("input_tokens")


async def test_client_abort_mid_stream(channel: tuple[grpc.aio.Channel, ListSink]) -> None:
    chan, sink = channel
    stub = ep_grpc.ExternalProcessorStub(chan)
    call = stub.Process()
    await call.write(REQUEST)
    await call.read()
    await call.write(
        ep.ProcessingRequest(
            response_headers=headers((":status", b"200"), ("content-type", b"text/event-stream"))
        )
    )
    await call.read()
    await call.write(
        ep.ProcessingRequest(response_body=ep.HttpBody(body=b'data: {"model":"m"}\n\n'))
    )
    await call.read()
    call.cancel()
    await asyncio.wait_for(sink.arrived.wait(), 5)
    (record,) = sink.records
    assert record.outcome == usage_pb2.OUTCOME_CLIENT_ABORTED
    assert record.model == "m"


async def test_non_utf8_user_header_does_not_crash(
    channel: tuple[grpc.aio.Channel, ListSink],
) -> None:
    chan, sink = channel
    request = ep.ProcessingRequest(
        request_headers=headers((":path", b"/v1/models"), ("x-tollgate-user-id", b"\xff\xfeuser"))
    )
    answers = await exchange(
        chan,
        [request, ep.ProcessingRequest(response_headers=headers((":status", b"200"), end=True))],
    )
    assert answers[0].request_headers.response.header_mutation.remove_headers == [
        "x-tollgate-user-id"
    ]
    (record,) = sink.records
    assert record.end_user_id == "\ufffd\ufffduser"
    assert record.outcome == usage_pb2.OUTCOME_OK


def test_long_user_id_is_truncated() -> None:
    sink = ListSink()
    processor = RequestProcessor(
        ProcessorContext(sink=sink, router=Router.single("openai", "http://up"))
    )
    processor.request_headers(
        headers((":path", b"/v1/chat/completions"), ("x-tollgate-user-id", b"u" * 300))
    )
    processor.close()
    assert sink.records[0].end_user_id == "u" * 255


# -- the phase error boundary (issue 11) ------------------------------------------------------


@pytest.fixture
async def faulty() -> AsyncIterator[tuple[grpc.aio.Channel, ListSink, ExternalProcessorServicer]]:
    sink = ListSink()
    context = ProcessorContext(sink=sink, router=Router.single("openai", "http://up"))
    servicer = ExternalProcessorServicer(lambda: FaultyProcessor(context))
    server = grpc.aio.server()
    ep_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
        yield chan, sink, servicer
    await server.stop(0)


def faulty_sequence(phase: str) -> list[ep.ProcessingRequest]:
    request = ep.ProcessingRequest()
    request.CopyFrom(REQUEST)
    request.request_headers.headers.headers.add(key=FAULT_HEADER, raw_value=phase.encode())
    return [
        request,
        ep.ProcessingRequest(request_body=ep.HttpBody(body=b'{"model": "m"}', end_of_stream=True)),
        ep.ProcessingRequest(
            response_headers=headers((":status", b"200"), ("content-type", b"text/event-stream"))
        ),
        ep.ProcessingRequest(
            response_body=ep.HttpBody(body=b'data: {"model":"m"}\n\n', end_of_stream=True)
        ),
    ]


@pytest.mark.parametrize(
    ("phase", "answered"),
    [("request_headers", 0), ("response_headers", 1), ("response_body", 2)],
)
async def test_a_raising_handler_fails_closed_and_is_recorded(
    faulty: tuple[grpc.aio.Channel, ListSink, ExternalProcessorServicer],
    phase: str,
    answered: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    chan, sink, servicer = faulty
    # Without a request body phase (the header identity decided): headers, then the response.
    sequence = [m for i, m in enumerate(faulty_sequence(phase)) if i != 1]
    call = ep_grpc.ExternalProcessorStub(chan).Process()
    for message in sequence[:answered]:
        await call.write(message)
        assert isinstance(await call.read(), ep.ProcessingResponse)
    await call.write(sequence[answered])
    if phase == "response_body":
        # Response headers have gone to the client: the stream is aborted, Envoy resets.
        with pytest.raises(grpc.aio.AioRpcError) as aborted:
            await call.read()
        assert aborted.value.code() == grpc.StatusCode.INTERNAL
    else:
        last = await call.read()
        assert isinstance(last, ep.ProcessingResponse)
        assert last.immediate_response.status.code == 500
        assert b'"internal_error"' in last.immediate_response.body
        call.cancel()
    await asyncio.wait_for(sink.arrived.wait(), 5)
    await asyncio.sleep(0.05)  # let the stream's end run (close() must not add a row)
    (record,) = sink.records
    assert record.outcome == usage_pb2.OUTCOME_INTERNAL_ERROR
    assert record.end_user_id == "user_7a3f"
    assert servicer.internal_errors == {phase: 1}
    assert any(record.request_id in r.getMessage() for r in caplog.records)
    assert not any("injected fault" in r.getMessage() for r in caplog.records)

    # The servicer keeps serving.
    sink.records.clear()
    await exchange(
        chan,
        [
            REQUEST,
            ep.ProcessingRequest(response_headers=headers((":status", b"200"), end=True)),
        ],
    )
    # processed as usual: a chat completion answered without a body reports no usage
    assert [r.outcome for r in sink.records] == [usage_pb2.OUTCOME_USAGE_MISSING]

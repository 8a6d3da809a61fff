"""The AWS event-stream decoder and the Bedrock stream and InvokeModel parsers.

Streams are framed by the fake provider's encoder (checked against botocore's decoder) or by
hand; vendor bodies follow the shapes the Bedrock user guide documents (not recordings)."""

from __future__ import annotations

import base64
import itertools
import json
import struct
import uuid
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from botocore.eventstream import EventStreamBuffer
from hypothesis import given, settings
from hypothesis import strategies as st

from tollgate.fakeprovider import _bedrock_chunk, _bedrock_event
from tollgate.metering.bedrock import (
    BedrockConverseParser,
    BedrockConverseStreamParser,
    BedrockInvokeParser,
    BedrockInvokeStreamParser,
    bedrock_model_id,
    bedrock_parser_for,
)
from tollgate.metering.eventstream import (
    EventStreamDecoder,
    EventStreamMessage,
    HeaderType,
    encode_message,
)
from tollgate.metering.framing import JsonOrSSEParser
from tollgate.metering.usage import ParsedResponse, RequestFacts, TokenUsage

MODEL = "anthropic.claude-3-5-haiku-20241022-v1:0"
EVENT = {":message-type": "event", ":content-type": "application/json"}


def frame(raw_headers: bytes, payload: bytes) -> bytes:
    """A message around raw header bytes, CRCs computed here (not by encode_message)."""
    total = 16 + len(raw_headers) + len(payload)
    prelude = struct.pack("!II", total, len(raw_headers))
    prelude += struct.pack("!I", zlib.crc32(prelude))
    body = prelude + raw_headers + payload
    return body + struct.pack("!I", zlib.crc32(body))


def string_header(name: str, value: str) -> bytes:
    raw = value.encode()
    return bytes([len(name)]) + name.encode() + b"\x07" + struct.pack("!H", len(raw)) + raw


def decode(chunks: list[bytes], decoder: EventStreamDecoder | None = None) -> list[Any]:
    decoder = decoder or EventStreamDecoder()
    return [message for chunk in chunks for message in decoder.feed(chunk)]


def event(event_type: str, payload: dict[str, Any]) -> bytes:
    return encode_message({":event-type": event_type, **EVENT}, json.dumps(payload).encode())


def chunk(document: dict[str, Any]) -> bytes:
    data = base64.b64encode(json.dumps(document).encode()).decode()
    return event("chunk", {"bytes": data})


def run(parser: JsonOrSSEParser, chunks: list[bytes]) -> ParsedResponse:
    for piece in chunks:
        parser.feed(piece)
    return parser.result()


def converse_stream() -> BedrockConverseStreamParser:
    return BedrockConverseStreamParser(streamed=True, request=RequestFacts(model=MODEL))


def invoke_stream() -> BedrockInvokeStreamParser:
    return BedrockInvokeStreamParser(streamed=True, request=RequestFacts(model=MODEL))


def invoke() -> BedrockInvokeParser:
    return BedrockInvokeParser(streamed=False, request=RequestFacts(model=MODEL))


# -- the decoder ---------------------------------------------------------------------------

ALL_TYPES: dict[str, Any] = {
    "true": True,
    "false": False,
    "byte": (HeaderType.BYTE, -128),
    "short": (HeaderType.SHORT, 32767),
    "integer": -(2**31),
    "long": 2**40,
    "bytes": b"\x00\xff raw",
    "string": "caf\u00e9 \U0001f916",
    "timestamp": datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC),
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
}
DECODED_TYPES: dict[str, Any] = {
    **ALL_TYPES,
    "byte": -128,
    "short": 32767,
}


def test_every_header_type_round_trips() -> None:
    message = encode_message(ALL_TYPES, b"payload")
    [decoded] = decode([message])
    assert decoded == EventStreamMessage(DECODED_TYPES, b"payload")
    assert decoded.text("string") == "caf\u00e9 \U0001f916"
    assert decoded.text("bytes") is None
    assert decoded.text("absent") is None


def test_botocore_reads_the_encoding() -> None:
    buffer = EventStreamBuffer()
    buffer.add_data(encode_message(ALL_TYPES, b'{"a": 1}') * 2)
    messages = list(buffer)
    assert len(messages) == 2
    headers = messages[0].headers
    assert headers["byte"] == -128
    assert headers["long"] == 2**40
    assert headers["string"] == "caf\u00e9 \U0001f916"
    assert headers["timestamp"] == 1714979289123  # botocore keeps milliseconds
    assert headers["uuid"] == ALL_TYPES["uuid"].bytes
    assert messages[1].payload == b'{"a": 1}'


def test_independent_framing_decodes() -> None:
    raw = string_header(":event-type", "chunk") + b"\x04flag\x00" + b"\x01n\x03\xff\xfe"
    [decoded] = decode([frame(raw, b"body")])
    assert decoded.headers == {":event-type": "chunk", "flag": True, "n": -2}
    assert decoded.payload == b"body"


def test_empty_headers_and_payload() -> None:
    message = encode_message({}, b"")
    assert len(message) == 16
    assert decode([message]) == [EventStreamMessage({}, b"")]


STREAM = b"".join(
    encode_message({":event-type": f"e{i}", "n": i}, ("caf\u00e9 " * i).encode()) for i in range(6)
)


def test_every_split_point() -> None:
    whole = decode([STREAM])
    assert len(whole) == 6
    for i in range(len(STREAM) + 1):
        assert decode([STREAM[:i], STREAM[i:]]) == whole, i


def test_byte_by_byte() -> None:
    decoder = EventStreamDecoder()
    messages = decode([STREAM[i : i + 1] for i in range(len(STREAM))], decoder)
    assert messages == decode([STREAM])
    assert decoder.messages == 6
    assert decoder.skipped == 0
    assert decoder.buffered == 0


def test_message_crc_mismatch_is_skipped_and_counted() -> None:
    good = encode_message({":event-type": "a"}, b"payload")
    bad = bytearray(good)
    bad[-6] ^= 0x01  # a payload byte: the prelude still checks out
    decoder = EventStreamDecoder()
    messages = decode([good, bytes(bad), good], decoder)
    assert len(messages) == 2
    assert decoder.corrupt == 1
    assert decoder.lost_sync == 0
    assert decoder.skipped == 1


@pytest.mark.parametrize(
    "raw_headers",
    [
        b"\x01x\x0a",  # type 10 does not exist
        b"\x01x\x07\x00\x09abc",  # string longer than the headers
        b"\x02\xff\xfex\x00",  # name not UTF-8
        b"\x01x\x07\x00\x02\xc3\x28",  # string not UTF-8
        b"\x00\x00",  # empty name
        b"\x01x\x00\x01x\x01",  # the same name twice
        b"\x01x\x05\x00\x00",  # long cut short
        b"\x01t\x08" + struct.pack("!q", 2**62),  # a timestamp beyond year 9999
        b"\x01u\x09" + b"\x00" * 8,  # uuid cut short
        b"\x01x",  # no type byte
    ],
)
def test_headers_that_do_not_parse_are_corrupt(raw_headers: bytes) -> None:
    decoder = EventStreamDecoder()
    after = encode_message({":event-type": "after"}, b"")
    messages = decode([frame(raw_headers, b"{}"), after], decoder)
    assert [m.text(":event-type") for m in messages] == ["after"]
    assert decoder.corrupt == 1


def test_garbage_is_skipped_until_the_next_prelude() -> None:
    message = encode_message({":event-type": "a"}, b"x")
    garbage = b"not an event stream \x00\x00\x00\x01\x00 more"
    decoder = EventStreamDecoder()
    for i in range(len(garbage) + 1):
        decoder = EventStreamDecoder()
        messages = decode([garbage[:i], garbage[i:] + message + garbage + message], decoder)
        assert len(messages) == 2, i
        assert decoder.lost_sync == 2
        assert decoder.skipped_bytes == 2 * len(garbage)
    assert decoder.corrupt == 0


def test_inconsistent_prelude_with_a_valid_crc_is_garbage() -> None:
    message = encode_message({":event-type": "a"}, b"x")
    for total, headers_length in ((8, 0), (20, 10)):
        prelude = struct.pack("!II", total, headers_length)
        prelude += struct.pack("!I", zlib.crc32(prelude))
        decoder = EventStreamDecoder()
        assert len(decode([prelude + message], decoder)) == 1
        assert decoder.lost_sync == 1


def bogus_prelude(total: int, headers_length: int = 0) -> bytes:
    prelude = struct.pack("!II", total, headers_length)
    return prelude + struct.pack("!I", zlib.crc32(prelude))


def test_oversized_message_is_passed_over_unkept() -> None:
    message = encode_message({":event-type": "a"}, b"x")
    big = encode_message({":event-type": "big"}, b"y" * 100)
    decoder = EventStreamDecoder(max_message_bytes=64)
    pieces = [big[:30], big[30:31], big[31:] + message]
    messages = decode([message, *pieces], decoder)
    assert [m.text(":event-type") for m in messages] == ["a", "a"]
    assert decoder.oversized == 1
    assert decoder.buffered == 0


def test_absurd_length_holds_no_memory() -> None:
    decoder = EventStreamDecoder()
    decode([bogus_prelude(2**32 - 1)], decoder)
    for _ in range(64):
        assert decoder.feed(b"\x00" * 65536) == []
        assert decoder.buffered == 0
    assert decoder.oversized == 1


def test_too_many_headers_are_oversized() -> None:
    decoder = EventStreamDecoder()
    decode([bogus_prelude(200_000, 150_000)], decoder)
    assert decoder.oversized == 1


def test_a_body_that_is_not_an_event_stream_stops_the_decoder() -> None:
    decoder = EventStreamDecoder(max_skipped_bytes=1000)
    text = b'{"message": "Internal server error"}' * 100
    assert decode([text, encode_message({}, b"late")], decoder) == []
    assert decoder.stopped
    assert decoder.buffered == 0
    assert decoder.lost_sync == 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=30), st.integers(16, 4096))
def test_arbitrary_bytes_never_raise_and_stay_bounded(chunks: list[bytes], limit: int) -> None:
    decoder = EventStreamDecoder(max_message_bytes=limit)
    for piece in chunks:
        decoder.feed(piece)
        assert decoder.buffered < max(limit, 12)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_damaged_streams_never_raise(data: st.DataObject) -> None:
    stream = bytearray(STREAM)
    for index in data.draw(st.lists(st.integers(0, len(stream) - 1), max_size=8)):
        stream[index] ^= data.draw(st.integers(1, 255))
    decoder = EventStreamDecoder()
    messages = decode([bytes(stream)], decoder)
    assert len(messages) + decoder.skipped >= 1
    assert len(messages) <= 6


@pytest.mark.parametrize(
    ("headers", "match"),
    [
        ({"": "x"}, "header name"),
        ({"x" * 256: "x"}, "header name"),
        ({"x": "y" * 65536}, "65535 bytes"),
        ({"x": (HeaderType.UUID, "not a uuid")}, "needs a UUID"),
        ({"x": (HeaderType.SHORT, "1")}, "needs an integer"),
    ],
)
def test_encode_refuses_what_cannot_be_framed(headers: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode_message(headers, b"")


# -- ConverseStream ------------------------------------------------------------------------


def converse_events(usage: dict[str, Any], pieces: list[str], stop: str = "end_turn") -> bytes:
    events = [_bedrock_event("messageStart", {"role": "assistant"})]
    events += [
        _bedrock_event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": p}})
        for p in pieces
    ]
    events.append(_bedrock_event("contentBlockStop", {"contentBlockIndex": 0}))
    events.append(_bedrock_event("messageStop", {"stopReason": stop}))
    events.append(_bedrock_event("metadata", {"usage": usage, "metrics": {"latencyMs": 412}}))
    return b"".join(events)


CONVERSE_USAGE = {
    "inputTokens": 37,
    "outputTokens": 115,
    "totalTokens": 2200,
    "cacheReadInputTokens": 1800,
    "cacheWriteInputTokens": 248,
}
CONVERSE_STREAM = converse_events(CONVERSE_USAGE, ["Die", " Antwort", " \u2014 42 \U0001f916"])
CONVERSE_TOKENS = TokenUsage(
    input_tokens=37,
    cached_input_tokens=1800,
    cache_write_tokens=248,
    output_tokens=115,
    total_tokens=2200,
)


def test_converse_stream_usage_and_model() -> None:
    parser = converse_stream()
    result = run(parser, [CONVERSE_STREAM])
    assert result.usage == CONVERSE_TOKENS
    assert result.model == MODEL
    assert parser.complete
    assert parser.skipped_events == 0
    assert parser.exception is None


def test_converse_stream_is_incomplete_before_metadata() -> None:
    metadata = _bedrock_event("metadata", {"usage": CONVERSE_USAGE, "metrics": {"latencyMs": 412}})
    assert CONVERSE_STREAM.endswith(metadata)
    parser = converse_stream()
    parser.feed(CONVERSE_STREAM[: -len(metadata)])
    assert not parser.complete
    assert not parser.result().usage.reported


def test_converse_stream_every_split_point() -> None:
    for i in range(len(CONVERSE_STREAM) + 1):
        parser = converse_stream()
        result = run(parser, [CONVERSE_STREAM[:i], CONVERSE_STREAM[i:]])
        assert result.usage == CONVERSE_TOKENS, i
        assert parser.complete


def test_converse_stream_exception_is_noted_not_fatal() -> None:
    exception = encode_message(
        {
            ":exception-type": "throttlingException",
            ":content-type": "application/json",
            ":message-type": "exception",
        },
        b'{"message":"Too many tokens, please wait before trying again."}',
    )
    start = _bedrock_event("messageStart", {"role": "assistant"})
    parser = converse_stream()
    result = run(parser, [start, exception])
    assert parser.exception == "throttlingException"
    assert not parser.complete
    assert parser.skipped_events == 0
    assert not result.usage.reported

    error = encode_message({":message-type": "error", ":error-code": "InternalFailure"}, b"")
    parser = converse_stream()
    run(parser, [error])
    assert parser.exception == "InternalFailure"


def test_converse_stream_bad_parts_are_skipped_and_counted() -> None:
    broken = bytearray(_bedrock_event("metadata", {"usage": {"inputTokens": 999}}))
    broken[-5] ^= 0xFF
    not_json = encode_message({":event-type": "metadata", **EVENT}, b"{not json")
    parser = converse_stream()
    result = run(parser, [bytes(broken), not_json, b"garbage", CONVERSE_STREAM])
    assert result.usage == CONVERSE_TOKENS
    assert parser.skipped_events == 3


def test_converse_stream_without_cache_fields() -> None:
    usage = {"inputTokens": 30, "outputTokens": 628, "totalTokens": 658}
    result = run(converse_stream(), [converse_events(usage, ["hi"])])
    assert result.usage == TokenUsage(input_tokens=30, output_tokens=628, total_tokens=658)


def test_converse_parser_keeps_its_behaviour_on_event_streams() -> None:
    parser = BedrockConverseParser(streamed=True, request=RequestFacts(model=MODEL))
    result = run(parser, [CONVERSE_STREAM])
    assert not result.usage.reported
    assert result.model == MODEL


# -- InvokeModel: the vendors' JSON bodies -------------------------------------------------

# Shapes as the Bedrock user guide documents each vendor's response (not recordings).
INVOKE_BODIES: list[tuple[str, dict[str, Any], TokenUsage]] = [
    (
        "anthropic",
        {
            "id": "msg_bdrk_01",
            "type": "message",
            "role": "assistant",
            "model": "claude-3-5-haiku-20241022",
            "content": [{"type": "text", "text": "Bonjour \u00e0 vous"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": 21,
                "cache_creation_input_tokens": 188,
                "cache_read_input_tokens": 2048,
                "output_tokens": 393,
            },
        },
        TokenUsage(
            input_tokens=21, cached_input_tokens=2048, cache_write_tokens=188, output_tokens=393
        ),
    ),
    (
        "nova",
        {
            "output": {"message": {"content": [{"text": "Hola"}], "role": "assistant"}},
            "stopReason": "end_turn",
            "usage": {
                "inputTokens": 17,
                "outputTokens": 300,
                "totalTokens": 917,
                "cacheReadInputTokenCount": 500,
                "cacheWriteInputTokenCount": 100,
            },
        },
        TokenUsage(
            input_tokens=17,
            cached_input_tokens=500,
            cache_write_tokens=100,
            output_tokens=300,
            total_tokens=917,
        ),
    ),
    (
        "llama",
        {
            "generation": "Ol\u00e1",
            "prompt_token_count": 12,
            "generation_token_count": 48,
            "stop_reason": "stop",
        },
        TokenUsage(input_tokens=12, output_tokens=48),
    ),
    (
        "titan text",
        {
            "inputTextTokenCount": 5,
            "results": [{"tokenCount": 20, "outputText": "Hallo", "completionReason": "FINISH"}],
        },
        TokenUsage(input_tokens=5, output_tokens=20),
    ),
    (
        "titan embeddings",
        {"embedding": [0.5, -0.25], "inputTextTokenCount": 7},
        TokenUsage(input_tokens=7),
    ),
    (
        "cohere command r",
        {
            "text": "Ciao",
            "finish_reason": "COMPLETE",
            "meta": {"billed_units": {"input_tokens": 9, "output_tokens": 3}},
        },
        TokenUsage(input_tokens=9, output_tokens=3),
    ),
    (
        "mistral large",
        {
            "id": "x",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hej"}}],
            "usage": {
                "prompt_tokens": 14,
                "completion_tokens": 6,
                "total_tokens": 20,
                "prompt_tokens_details": {"cached_tokens": 4},
            },
        },
        TokenUsage(input_tokens=14, output_tokens=6, total_tokens=20),
    ),
    ("mistral 7b", {"outputs": [{"text": "Hi", "stop_reason": "stop"}]}, TokenUsage()),
    ("cohere embed", {"embeddings": [[0.1]], "id": "x", "texts": ["a"]}, TokenUsage()),
]


@pytest.mark.parametrize(("vendor", "body", "usage"), INVOKE_BODIES, ids=lambda v: v)
def test_invoke_bodies(vendor: str, body: dict[str, Any], usage: TokenUsage) -> None:
    data = json.dumps(body, ensure_ascii=False).encode()
    parser = invoke()
    result = run(parser, [data[:7], data[7:]])
    assert result.usage == usage
    assert result.model == MODEL  # a body's own "model" is not taken
    assert parser.skipped_events == 0


def test_invoke_thinking_tokens_are_reasoning_tokens() -> None:
    details = {"thinking_tokens": 5}
    body = {"usage": {"input_tokens": 3, "output_tokens": 9, "output_tokens_details": details}}
    assert run(invoke(), [json.dumps(body).encode()]).usage.reasoning_tokens == 5


def test_invoke_malformed_or_error_body() -> None:
    parser = invoke()
    assert not run(parser, [b'{"usage": {"input_tokens": 3']).usage.reported
    assert parser.skipped_events == 1
    error = b'{"message": "The provided model identifier is invalid."}'
    assert not run(invoke(), [error]).usage.reported


def test_invoke_fields_of_wrong_type_stay_unset() -> None:
    usage = {"input_tokens": "12", "output_tokens": True, "inputTokens": 1.5}
    body = {"usage": usage, "prompt_token_count": None, "results": [{"tokenCount": "3"}]}
    assert not run(invoke(), [json.dumps(body).encode()]).usage.reported


# -- InvokeModelWithResponseStream -----------------------------------------------------------

METRICS = {"inputTokenCount": 21, "outputTokenCount": 393, "invocationLatency": 2311}


def anthropic_chunks(
    start_usage: dict[str, Any], delta_usage: dict[str, Any], metrics: dict[str, Any]
) -> list[dict[str, Any]]:
    message = {"id": "msg_bdrk_01", "type": "message", "role": "assistant", "content": []}
    return [
        {"type": "message_start", "message": {**message, "usage": start_usage}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}},
        {"type": "content_block_delta", "index": 0, "delta": {"text": "\u00a1Hola!"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": delta_usage},
        {"type": "message_stop", "amazon-bedrock-invocationMetrics": metrics},
    ]


ANTHROPIC_START = {
    "input_tokens": 21,
    "cache_creation_input_tokens": 188,
    "cache_read_input_tokens": 2048,
    "output_tokens": 1,
}
ANTHROPIC_METRICS = {
    **METRICS,
    "firstByteLatency": 402,
    "cacheReadInputTokenCount": 2048,
    "cacheWriteInputTokenCount": 188,
}
ANTHROPIC_USAGE = TokenUsage(
    input_tokens=21, cached_input_tokens=2048, cache_write_tokens=188, output_tokens=393
)

STREAM_CASES: list[tuple[str, list[dict[str, Any]], TokenUsage]] = [
    (
        "anthropic",
        anthropic_chunks(ANTHROPIC_START, {"output_tokens": 393}, ANTHROPIC_METRICS),
        ANTHROPIC_USAGE,
    ),
    (
        "nova",
        [
            {"messageStart": {"role": "assistant"}},
            {"contentBlockDelta": {"delta": {"text": "Hola"}, "contentBlockIndex": 0}},
            {"contentBlockStop": {"contentBlockIndex": 0}},
            {"messageStop": {"stopReason": "end_turn"}},
            {
                "metadata": {
                    "usage": {"inputTokens": 17, "outputTokens": 30},
                    "metrics": {},
                    "trace": {},
                },
                "amazon-bedrock-invocationMetrics": {
                    "inputTokenCount": 17,
                    "outputTokenCount": 30,
                    "invocationLatency": 800,
                    "firstByteLatency": 100,
                },
            },
        ],
        TokenUsage(input_tokens=17, output_tokens=30),
    ),
    (
        "llama",
        [
            {
                "generation": "Ol\u00e1",
                "prompt_token_count": 12,
                "generation_token_count": 1,
                "stop_reason": None,
            },
            {
                "generation": " mundo",
                "prompt_token_count": None,
                "generation_token_count": 2,
                "stop_reason": None,
            },
            {
                "generation": "",
                "prompt_token_count": None,
                "generation_token_count": 2,
                "stop_reason": "stop",
                "amazon-bedrock-invocationMetrics": {"inputTokenCount": 12, "outputTokenCount": 2},
            },
        ],
        TokenUsage(input_tokens=12, output_tokens=2),
    ),
    (
        "titan text",
        [
            {
                "outputText": "Hallo",
                "index": 0,
                "totalOutputTextTokenCount": 3,
                "completionReason": None,
                "inputTextTokenCount": 5,
            },
            {
                "outputText": " Welt",
                "index": 0,
                "totalOutputTextTokenCount": 6,
                "completionReason": "FINISH",
                "amazon-bedrock-invocationMetrics": {"inputTokenCount": 5, "outputTokenCount": 6},
            },
        ],
        TokenUsage(input_tokens=5, output_tokens=6),
    ),
    (
        "mistral 7b (metrics only)",
        [
            {"outputs": [{"text": "Hi", "stop_reason": None}]},
            {
                "outputs": [{"text": "!", "stop_reason": "stop"}],
                "amazon-bedrock-invocationMetrics": {
                    "inputTokenCount": 8,
                    "outputTokenCount": 2,
                    "invocationLatency": 90,
                    "firstByteLatency": 40,
                },
            },
        ],
        TokenUsage(input_tokens=8, output_tokens=2),
    ),
]


def invoke_stream_bytes(chunks: list[dict[str, Any]]) -> bytes:
    return b"".join(_bedrock_chunk(c) for c in chunks)


@pytest.mark.parametrize(("vendor", "chunks", "usage"), STREAM_CASES, ids=lambda v: v)
def test_invoke_streams(vendor: str, chunks: list[dict[str, Any]], usage: TokenUsage) -> None:
    body = invoke_stream_bytes(chunks)
    parser = invoke_stream()
    result = run(parser, [body[i : i + 97] for i in range(0, len(body), 97)])
    assert result.usage == usage
    assert result.model == MODEL
    assert parser.complete
    assert parser.skipped_events == 0


def test_invoke_stream_vendor_counts_win_over_metrics() -> None:
    # Bedrock's metrics disagree with Claude's own counts: the vendor's are recorded.
    metrics = {"inputTokenCount": 2257, "outputTokenCount": 400, "cacheReadInputTokenCount": 1}
    chunks = anthropic_chunks(ANTHROPIC_START, {"output_tokens": 393}, metrics)
    result = run(invoke_stream(), [invoke_stream_bytes(chunks)])
    assert result.usage == ANTHROPIC_USAGE


def test_invoke_stream_metrics_fill_what_the_vendor_leaves_out() -> None:
    start = {"input_tokens": 21, "output_tokens": 1}
    metrics = {"inputTokenCount": 99, "outputTokenCount": 393, "cacheWriteInputTokenCount": 7}
    chunks = anthropic_chunks(start, {}, metrics)
    result = run(invoke_stream(), [invoke_stream_bytes(chunks)])
    assert result.usage == TokenUsage(input_tokens=21, cache_write_tokens=7, output_tokens=1)


def test_invoke_stream_newer_deltas_repeat_input_counts() -> None:
    delta = {"input_tokens": 25, "output_tokens": 393, "cache_read_input_tokens": 2048}
    chunks = anthropic_chunks(ANTHROPIC_START, delta, ANTHROPIC_METRICS)
    result = run(invoke_stream(), [invoke_stream_bytes(chunks)])
    assert result.usage.input_tokens == 25
    assert result.usage.output_tokens == 393


def test_invoke_stream_cut_short_reports_what_it_saw() -> None:
    chunks = anthropic_chunks(ANTHROPIC_START, {"output_tokens": 393}, ANTHROPIC_METRICS)
    parser = invoke_stream()
    parser.feed(invoke_stream_bytes(chunks[:3]))
    assert not parser.complete
    result = parser.result()
    assert result.usage.output_tokens == 1
    assert result.usage.input_tokens == 21


def test_invoke_stream_message_stop_without_metrics_completes() -> None:
    parser = invoke_stream()
    parser.feed(_bedrock_chunk({"type": "message_stop"}))
    assert parser.complete


def test_invoke_stream_bad_chunks_are_skipped_and_counted() -> None:
    bad = [
        event("chunk", {"bytes": "not base64!"}),
        event("chunk", {"bytes": 12}),
        event("chunk", {"nothing": True}),
        event("chunk", {"bytes": base64.b64encode(b"[1, 2]").decode()}),
        event("chunk", {"bytes": base64.b64encode(b"\xff\xfe").decode()}),
        encode_message({":event-type": "chunk", **EVENT}, b"\x00"),
    ]
    good = invoke_stream_bytes(STREAM_CASES[2][1])
    parser = invoke_stream()
    result = run(parser, [*bad, good])
    assert result.usage == STREAM_CASES[2][2]
    assert parser.skipped_events == len(bad)


def test_invoke_stream_model_stream_error() -> None:
    error = encode_message(
        {
            ":exception-type": "modelStreamErrorException",
            ":content-type": "application/json",
            ":message-type": "exception",
        },
        b'{"message":"boom","originalStatusCode":500}',
    )
    chunks = anthropic_chunks(ANTHROPIC_START, {"output_tokens": 393}, ANTHROPIC_METRICS)
    parser = invoke_stream()
    result = run(parser, [invoke_stream_bytes(chunks[:2]), error])
    assert parser.exception == "modelStreamErrorException"
    assert not parser.complete
    assert result.usage.input_tokens == 21


def test_unknown_events_are_ignored() -> None:
    parser = invoke_stream()
    parser.feed(_bedrock_event("initial-response", {}) + _bedrock_event("somethingNew", {}))
    parser.feed(encode_message({":message-type": "mystery"}, b""))
    assert parser.skipped_events == 0
    assert not parser.result().usage.reported


# -- splits: the fake's streams, whole or cut anywhere ---------------------------------------

texts = st.lists(st.text(min_size=0, max_size=12), min_size=1, max_size=12)
counts = st.integers(0, 2**31 - 1)


@st.composite
def streams(draw: st.DrawFn) -> tuple[Callable[[], JsonOrSSEParser], bytes, TokenUsage]:
    pieces = draw(texts, label="pieces")
    kind = draw(st.sampled_from(["converse", "anthropic", "llama", "nova"]), label="kind")
    i, o, r, w = draw(counts), draw(counts), draw(counts), draw(counts)
    cached = draw(st.booleans(), label="cached")
    if kind == "converse":
        usage: dict[str, Any] = {"inputTokens": i, "outputTokens": o, "totalTokens": i + o}
        if cached:
            usage |= {"cacheReadInputTokens": r, "cacheWriteInputTokens": w}
        expected = TokenUsage(
            input_tokens=i,
            output_tokens=o,
            total_tokens=i + o,
            cached_input_tokens=r if cached else None,
            cache_write_tokens=w if cached else None,
        )
        return converse_stream, converse_events(usage, pieces), expected
    metrics = {"inputTokenCount": i, "outputTokenCount": o, "invocationLatency": 5}
    if cached:
        metrics |= {"cacheReadInputTokenCount": r, "cacheWriteInputTokenCount": w}
    if kind == "anthropic":
        start = {"input_tokens": i, "output_tokens": 1}
        chunks = anthropic_chunks(start, {"output_tokens": o}, metrics)
        chunks[2:3] = [
            {"type": "content_block_delta", "index": 0, "delta": {"text": p}} for p in pieces
        ]
    elif kind == "llama":
        chunks = [
            {
                "generation": p,
                "prompt_token_count": i if n == 0 else None,
                "generation_token_count": n + 1,
            }
            for n, p in enumerate(pieces)
        ]
        chunks.append({"generation": "", "generation_token_count": o})
        chunks[-1]["amazon-bedrock-invocationMetrics"] = metrics
    else:
        chunks = [{"contentBlockDelta": {"delta": {"text": p}}} for p in pieces]
        chunks.append(
            {
                "metadata": {"usage": {"inputTokens": i, "outputTokens": o}},
                "amazon-bedrock-invocationMetrics": metrics,
            }
        )
    expected = TokenUsage(
        input_tokens=i,
        output_tokens=o,
        cached_input_tokens=r if cached else None,
        cache_write_tokens=w if cached else None,
    )
    return invoke_stream, invoke_stream_bytes(chunks), expected


@settings(max_examples=150, deadline=None)
@given(streams(), st.data())
def test_any_split_gives_the_whole_streams_usage(
    stream: tuple[Callable[[], JsonOrSSEParser], bytes, TokenUsage], data: st.DataObject
) -> None:
    make, body, expected = stream
    whole = run(make(), [body])
    assert whole.usage == expected
    byte_by_byte = make()
    assert run(byte_by_byte, [body[i : i + 1] for i in range(len(body))]) == whole
    assert byte_by_byte.complete
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(body)), max_size=40), label="cuts")))
    points = [0, *cuts, len(body)]
    chunks = [body[a:b] for a, b in itertools.pairwise(points)]
    assert run(make(), chunks) == whole


@pytest.mark.parametrize(("vendor", "chunks", "usage"), STREAM_CASES[:3], ids=lambda v: v)
def test_invoke_stream_every_two_way_split(
    vendor: str, chunks: list[dict[str, Any]], usage: TokenUsage
) -> None:
    body = invoke_stream_bytes(chunks)
    for i in range(len(body) + 1):
        assert run(invoke_stream(), [body[:i], body[i:]]).usage == usage, i


# -- paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "kind"),
    [
        ("/model/m/converse", BedrockConverseParser),
        ("/model/m/converse-stream", BedrockConverseStreamParser),
        ("/model/m/invoke", BedrockInvokeParser),
        ("/model/m/invoke-with-response-stream", BedrockInvokeStreamParser),
        ("/model/m/invoke-with-response-stream?x=1", BedrockInvokeStreamParser),
    ],
)
def test_parser_for_each_action(endpoint: str, kind: type) -> None:
    parser = bedrock_parser_for(endpoint, streamed=False, request=RequestFacts())
    assert isinstance(parser, kind)


@pytest.mark.parametrize(
    "endpoint",
    ["/model/m/converse/x", "/model//invoke", "/v1/model/m/invoke", "/model/m/count-tokens", "/"],
)
def test_other_paths_have_no_parser(endpoint: str) -> None:
    assert bedrock_parser_for(endpoint, streamed=True, request=RequestFacts()) is None


ACCOUNT = "arn:aws:bedrock:us-east-1:123456789012"
HAIKU = "anthropic.claude-3-5-haiku-20241022-v1"
SONNET = "anthropic.claude-sonnet-4-5-20250929-v1"


@pytest.mark.parametrize(
    ("path_model", "model"),
    [
        (f"{HAIKU}%3A0", f"{HAIKU}:0"),
        (f"{HAIKU}:0", f"{HAIKU}:0"),
        (f"us.{HAIKU}%3A0", f"us.{HAIKU}:0"),
        (f"global.{SONNET}:0", f"global.{SONNET}:0"),
        (f"{ACCOUNT}:inference-profile%2Fus.{HAIKU}%3A0", f"us.{HAIKU}:0"),
        (
            "arn%3Aaws%3Abedrock%3Aus-east-1%3A%3Afoundation-model%2Fmeta.llama3-8b-instruct-v1%3A0",
            "meta.llama3-8b-instruct-v1:0",
        ),
        (
            f"{ACCOUNT}:inference-profile/eu.amazon.nova-lite-v1:0",
            "eu.amazon.nova-lite-v1:0",
        ),
        (
            f"{ACCOUNT}:application-inference-profile%2Fabc123",
            f"{ACCOUNT}:application-inference-profile/abc123",
        ),
        (f"{ACCOUNT}:provisioned-model%2Fxyz", f"{ACCOUNT}:provisioned-model/xyz"),
        (f"{ACCOUNT}:foundation-model/", f"{ACCOUNT}:foundation-model/"),
        ("bad%00id", "bad\ufffdid"),
    ],
)
def test_path_model(path_model: str, model: str) -> None:
    parser = bedrock_parser_for(
        f"/model/{path_model}/invoke", streamed=False, request=RequestFacts()
    )
    assert parser is not None
    assert parser.result().model == model


def test_the_path_model_wins_and_other_facts_stay() -> None:
    facts = RequestFacts(model="cheap-model", stream=True, input_chars=4)
    parser = bedrock_parser_for("/model/meta.llama3-70b/invoke", streamed=False, request=facts)
    assert isinstance(parser, BedrockInvokeParser)
    assert parser.request == RequestFacts(model="meta.llama3-70b", stream=True, input_chars=4)


def test_model_id_of_odd_arns() -> None:
    assert bedrock_model_id("arn:aws:bedrock") == "arn:aws:bedrock"
    assert bedrock_model_id("arn:a:b:c:d:inference-profile") == "arn:a:b:c:d:inference-profile"

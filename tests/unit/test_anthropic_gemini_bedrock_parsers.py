"""Anthropic Messages, Gemini and Bedrock Converse parsers against recorded payloads."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tollgate.metering.anthropic_messages import AnthropicMessagesParser
from tollgate.metering.bedrock import BedrockConverseParser
from tollgate.metering.framing import JsonOrSSEParser
from tollgate.metering.gemini import GeminiParser, _JsonObjects
from tollgate.metering.usage import ParsedResponse, RequestFacts, TokenUsage

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


ANTHROPIC_JSON = fixture("anthropic/message.json")
ANTHROPIC_STREAM = fixture("anthropic/message_stream.sse")
ANTHROPIC_ERROR_STREAM = fixture("anthropic/message_stream_error.sse")
GEMINI_JSON = fixture("gemini/generate_content.json")
GEMINI_SSE = fixture("gemini/stream.sse")
GEMINI_ARRAY = fixture("gemini/stream_array.json")
BEDROCK_JSON = fixture("bedrock/converse.json")

BEDROCK_MODEL_ID = "anthropic.claude-3-5-sonnet-20240620-v1:0"

ANTHROPIC_JSON_USAGE = TokenUsage(
    input_tokens=21, cached_input_tokens=2048, cache_write_tokens=188, output_tokens=393
)
ANTHROPIC_STREAM_USAGE = TokenUsage(
    input_tokens=472, cached_input_tokens=4096, cache_write_tokens=1536, output_tokens=89
)
# message_start only: the error event after it reports nothing.
ANTHROPIC_ERROR_USAGE = TokenUsage(
    input_tokens=1290, cached_input_tokens=0, cache_write_tokens=0, output_tokens=1
)
GEMINI_JSON_USAGE = TokenUsage(
    input_tokens=1311,
    cached_input_tokens=1024,
    output_tokens=58,
    reasoning_tokens=455,
    total_tokens=1824,
)
GEMINI_STREAM_USAGE = TokenUsage(
    input_tokens=12, output_tokens=21, reasoning_tokens=190, total_tokens=223
)
BEDROCK_USAGE = TokenUsage(
    input_tokens=37,
    cached_input_tokens=1800,
    cache_write_tokens=248,
    output_tokens=115,
    total_tokens=2200,
)


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], JsonOrSSEParser]
    body: bytes
    usage: TokenUsage
    model: str


def anthropic(streamed: bool) -> Callable[[], JsonOrSSEParser]:
    return lambda: AnthropicMessagesParser(
        streamed=streamed, request=RequestFacts(model="claude-sonnet-4-5", stream=streamed)
    )


def gemini(streamed: bool) -> Callable[[], JsonOrSSEParser]:
    return lambda: GeminiParser(streamed=streamed, request=RequestFacts(model="gemini-2.5"))


def bedrock() -> JsonOrSSEParser:
    return BedrockConverseParser(streamed=False, request=RequestFacts(model=BEDROCK_MODEL_ID))


CASES = [
    Case(
        "anthropic json",
        anthropic(False),
        ANTHROPIC_JSON,
        ANTHROPIC_JSON_USAGE,
        "claude-sonnet-4-5-20250929",
    ),
    Case(
        "anthropic stream",
        anthropic(True),
        ANTHROPIC_STREAM,
        ANTHROPIC_STREAM_USAGE,
        "claude-sonnet-4-5-20250929",
    ),
    Case(
        "anthropic error stream",
        anthropic(True),
        ANTHROPIC_ERROR_STREAM,
        ANTHROPIC_ERROR_USAGE,
        "claude-opus-4-1-20250805",
    ),
    Case("gemini json", gemini(False), GEMINI_JSON, GEMINI_JSON_USAGE, "gemini-2.5-flash"),
    Case("gemini sse", gemini(True), GEMINI_SSE, GEMINI_STREAM_USAGE, "gemini-2.5-pro"),
    Case("gemini array", gemini(True), GEMINI_ARRAY, GEMINI_STREAM_USAGE, "gemini-2.5-pro"),
    Case(
        "gemini array, not streamed",
        gemini(False),
        GEMINI_ARRAY,
        GEMINI_STREAM_USAGE,
        "gemini-2.5-pro",
    ),
    Case("bedrock json", bedrock, BEDROCK_JSON, BEDROCK_USAGE, BEDROCK_MODEL_ID),
]
# Every payload again with CRLF line ends (SSE allows them; JSON treats them as blanks).
ALL_CASES = [
    *CASES,
    *(
        Case(f"{c.name}, crlf", c.make, c.body.replace(b"\n", b"\r\n"), c.usage, c.model)
        for c in CASES
    ),
]


def run(parser: JsonOrSSEParser, chunks: list[bytes]) -> ParsedResponse:
    for chunk in chunks:
        parser.feed(chunk)
    return parser.result()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_whole_payload(case: Case) -> None:
    parser = case.make()
    result = run(parser, [case.body])
    assert result.usage == case.usage
    assert result.model == case.model
    assert result.units == {}
    assert parser.skipped_events == 0


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.name)
def test_every_two_way_split(case: Case) -> None:
    for i in range(len(case.body) + 1):
        result = run(case.make(), [case.body[:i], case.body[i:]])
        assert (result.usage, result.model) == (case.usage, case.model), i


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.name)
def test_byte_by_byte(case: Case) -> None:
    body = case.body
    result = run(case.make(), [body[i : i + 1] for i in range(len(body))])
    assert (result.usage, result.model) == (case.usage, case.model)


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.name)
def test_splits_inside_multibyte_characters(case: Case) -> None:
    inside = [i for i, byte in enumerate(case.body) if 0x80 <= byte <= 0xBF]
    assert inside, "every fixture carries multi-byte UTF-8"
    # All cuts at once: most characters are split into several pieces.
    points = [0, *inside, len(case.body)]
    chunks = [case.body[a:b] for a, b in itertools.pairwise(points)]
    result = run(case.make(), chunks)
    assert (result.usage, result.model) == (case.usage, case.model)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_arbitrary_splits(data: st.DataObject) -> None:
    case = data.draw(st.sampled_from(ALL_CASES), label="case")
    body = case.body
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=80), label="cuts")
    points = sorted(set(cuts))
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    result = run(case.make(), chunks)
    assert (result.usage, result.model) == (case.usage, case.model)


# Anthropic ---------------------------------------------------------------------------------


def events(body: bytes) -> list[bytes]:
    """The SSE events of a fixture, each with its blank line."""
    return [event + b"\n\n" for event in body.split(b"\n\n") if event.strip()]


def test_anthropic_result_after_message_start_only() -> None:
    parser = anthropic(True)()
    start, *rest = events(ANTHROPIC_STREAM)
    parser.feed(start)
    early = parser.result()
    assert early.model == "claude-sonnet-4-5-20250929"
    assert early.usage == TokenUsage(
        input_tokens=472, cached_input_tokens=4096, cache_write_tokens=1536, output_tokens=2
    )
    assert early.usage.total_tokens is None  # Anthropic reports no total
    for event in rest:
        parser.feed(event)
    assert parser.result().usage == ANTHROPIC_STREAM_USAGE


def test_anthropic_delta_with_output_only_keeps_start_counts() -> None:
    # The older message_delta shape: only the cumulative output_tokens.
    parser = anthropic(True)()
    parser.feed(events(ANTHROPIC_STREAM)[0])
    parser.feed(
        b"event: message_delta\n"
        b'data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
        b'"usage":{"output_tokens":15}}\n\n'
    )
    parser.feed(
        b"event: message_delta\n"
        b'data: {"type":"message_delta","delta":{},"usage":{"output_tokens":40}}\n\n'
    )
    assert parser.result().usage == TokenUsage(
        input_tokens=472, cached_input_tokens=4096, cache_write_tokens=1536, output_tokens=40
    )


def test_anthropic_error_event_is_not_fatal_nor_skipped() -> None:
    parser = anthropic(True)()
    result = run(parser, [ANTHROPIC_ERROR_STREAM])
    assert result.usage == ANTHROPIC_ERROR_USAGE
    assert parser.skipped_events == 0


def test_anthropic_malformed_event_is_skipped() -> None:
    body = events(ANTHROPIC_STREAM)
    bad = [
        b"event: message_delta\ndata: {not json\n\n",
        b'event: message_delta\ndata: ["a list"]\n\n',
        b'event: message_delta\ndata: {"type":"message_delta","usage":"many"}\n\n',
        b'event: message_start\ndata: {"type":"message_start","message":[1]}\n\n',
    ]
    parser = anthropic(True)()
    result = run(parser, [body[0], *bad, *body[1:]])
    assert result.usage == ANTHROPIC_STREAM_USAGE
    assert parser.skipped_events == 2


def test_anthropic_thinking_tokens_are_reasoning_tokens() -> None:
    body = (
        b'{"type":"message","model":"claude-opus-4-1-20250805","usage":{"input_tokens":9,'
        b'"output_tokens":300,"output_tokens_details":{"thinking_tokens":250}}}'
    )
    result = run(anthropic(False)(), [body])
    assert result.usage == TokenUsage(input_tokens=9, output_tokens=300, reasoning_tokens=250)


def test_anthropic_error_bodies_report_nothing() -> None:
    error = (
        b'{"type":"error","error":{"type":"invalid_request_error",'
        b'"message":"prompt is too long"},"request_id":"req_011CV5J4YZo4J3KLTDZgDN7S"}'
    )
    for streamed in (False, True):  # a streaming request refused before the stream starts
        result = run(anthropic(streamed)(), [error])
        assert not result.usage.reported
        assert result.model == "claude-sonnet-4-5"  # the request's model


def test_anthropic_fields_of_wrong_type_stay_unset() -> None:
    body = (
        b'{"type":"message","usage":{"input_tokens":"12","output_tokens":true,'
        b'"cache_read_input_tokens":null,"cache_creation_input_tokens":3}}'
    )
    result = AnthropicMessagesParser(streamed=False)
    result.feed(body)
    assert result.result() == ParsedResponse(usage=TokenUsage(cache_write_tokens=3), model=None)


# Gemini ------------------------------------------------------------------------------------


def test_gemini_array_result_mid_stream() -> None:
    parser = gemini(True)()
    first_end = GEMINI_ARRAY.index(b"},\r\n{") + 1
    parser.feed(GEMINI_ARRAY[:first_end])
    assert parser.result().usage == TokenUsage(
        input_tokens=12, output_tokens=4, reasoning_tokens=190, total_tokens=206
    )
    # Half of the second element is not an element yet.
    second_end = GEMINI_ARRAY.index(b"},\r\n{", first_end) + 1
    middle = (first_end + second_end) // 2
    parser.feed(GEMINI_ARRAY[first_end:middle])
    assert parser.result().usage.output_tokens == 4
    parser.feed(GEMINI_ARRAY[middle:second_end])
    assert parser.result().usage.output_tokens == 14
    parser.feed(GEMINI_ARRAY[second_end:])
    assert parser.result().usage == GEMINI_STREAM_USAGE


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.sampled_from('{}[]",:\\ \n\tab\u00e9\u4f60\U0001f600')),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=4), max_size=5),
    st.booleans(),
    st.data(),
)
def test_json_array_splitter_matches_json_loads(
    objects: list[dict[str, object]], ascii_only: bool, data: st.DataObject
) -> None:
    body = json.dumps(
        objects, ensure_ascii=ascii_only, indent=data.draw(st.sampled_from([None, 2]))
    )
    raw = body.encode()
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(raw)), max_size=30))))
    splitter = _JsonObjects(max_object_bytes=len(raw))
    out = [
        payload
        for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)
        for payload in splitter.feed(raw[a:b])
    ]
    assert [json.loads(payload) for payload in out] == objects


def test_gemini_sse_result_mid_stream() -> None:
    parser = gemini(True)()
    parser.feed(events(GEMINI_SSE)[0])
    assert parser.result() == ParsedResponse(
        usage=TokenUsage(input_tokens=12, output_tokens=4, reasoning_tokens=190, total_tokens=206),
        model="gemini-2.5-pro",
    )


def test_gemini_malformed_sse_event_is_skipped() -> None:
    parser = gemini(True)()
    result = run(parser, [b"data: {not json\n\ndata: [1, 2]\n\n", GEMINI_SSE])
    assert result.usage == GEMINI_STREAM_USAGE
    assert parser.skipped_events == 2


def test_gemini_malformed_array_elements_are_skipped() -> None:
    elements = GEMINI_ARRAY[1:-1].split(b",\r\n")
    body = b"[" + b",\r\n".join([b'{"usageMetadata": }', b"7", b'"x{y"', *elements]) + b"]"
    parser = gemini(True)()
    result = run(parser, [body])
    assert (result.usage, result.model) == (GEMINI_STREAM_USAGE, "gemini-2.5-pro")
    assert parser.skipped_events == 3


def test_gemini_oversized_element_is_skipped() -> None:
    small = b'{"usageMetadata":{"promptTokenCount":5}}'
    large = b'{"usageMetadata":{"promptTokenCount":999},"pad":"' + b"x" * 200 + b'"}'
    parser = GeminiParser(streamed=True, max_json_bytes=100)
    result = run(parser, [b"[", large, b",", small, b"]"])
    assert result.usage == TokenUsage(input_tokens=5)
    assert parser.skipped_events == 1


def test_gemini_error_body_reports_nothing() -> None:
    error = (
        b'{"error": {"code": 429, "message": "Resource has been exhausted",'
        b' "status": "RESOURCE_EXHAUSTED"}}'
    )
    for streamed in (False, True):
        result = run(gemini(streamed)(), [error])
        assert not result.usage.reported
        assert result.model == "gemini-2.5"  # the request's (path) model


def test_gemini_leading_blanks_do_not_decide_the_framing() -> None:
    result = run(gemini(True)(), [b"\r", b"\n  ", GEMINI_SSE])
    assert result.usage == GEMINI_STREAM_USAGE
    result = run(gemini(True)(), [b"\n", b" \r\n", GEMINI_ARRAY])
    assert result.usage == GEMINI_STREAM_USAGE


def test_gemini_unreported_counts_stay_none() -> None:
    body = b'{"usageMetadata":{"promptTokenCount":7,"totalTokenCount":7},"modelVersion":""}'
    result = run(gemini(False)(), [body])
    assert result.usage == TokenUsage(input_tokens=7, total_tokens=7)
    assert result.usage.output_tokens is None  # not reported is not zero
    assert result.model == "gemini-2.5"


# Bedrock -----------------------------------------------------------------------------------


def test_bedrock_without_a_request_model_has_none() -> None:
    result = run(BedrockConverseParser(streamed=False), [BEDROCK_JSON])
    assert result.usage == BEDROCK_USAGE
    assert result.model is None


def test_bedrock_without_cache_fields() -> None:
    body = b'{"usage":{"inputTokens":30,"outputTokens":628,"totalTokens":658}}'
    result = run(bedrock(), [body])
    assert result.usage == TokenUsage(input_tokens=30, output_tokens=628, total_tokens=658)
    assert result.usage.cached_input_tokens is None


def test_bedrock_stream_body_is_not_parsed() -> None:
    parser = BedrockConverseParser(streamed=True, request=RequestFacts(model=BEDROCK_MODEL_ID))
    # ConverseStream's binary event-stream framing (prelude, headers, payload, CRC).
    result = run(parser, [b"\x00\x00\x00\xc5\x00\x00\x00\x4b\x8a\x1f", BEDROCK_JSON])
    assert not result.usage.reported
    assert result.model == BEDROCK_MODEL_ID


def test_bedrock_malformed_body_reports_nothing() -> None:
    parser = bedrock()
    result = run(parser, [BEDROCK_JSON[:-20]])
    assert not result.usage.reported
    assert parser.skipped_events == 1

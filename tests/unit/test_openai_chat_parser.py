"""OpenAIChatParser against recorded payloads, re-split at every byte boundary."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from tollgate.metering.openai_chat import OpenAIChatParser
from tollgate.metering.usage import TokenUsage

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "openai"
STREAM = (FIXTURES / "chat_stream_include_usage.sse").read_bytes()
STREAM_CRLF = STREAM.replace(b"\n", b"\r\n")
JSON_BODY = (FIXTURES / "chat_completion.json").read_bytes()

STREAM_USAGE = TokenUsage(
    input_tokens=1117,
    cached_input_tokens=1024,
    output_tokens=46,
    reasoning_tokens=0,
    total_tokens=1163,
)


def parse(chunks: list[bytes], *, streamed: bool) -> tuple[TokenUsage, str | None]:
    parser = OpenAIChatParser(streamed=streamed)
    for chunk in chunks:
        parser.feed(chunk)
    result = parser.result()
    return result.usage, result.model


def test_non_streaming_body() -> None:
    usage, model = parse([JSON_BODY], streamed=False)
    assert model == "gpt-4o-2024-08-06"
    assert usage == TokenUsage(
        input_tokens=1117,
        cached_input_tokens=0,
        output_tokens=46,
        reasoning_tokens=0,
        total_tokens=1163,
    )


def test_stream_with_usage_chunk() -> None:
    assert parse([STREAM], streamed=True) == (STREAM_USAGE, "gpt-4o-2024-08-06")


def test_every_two_way_split_of_the_stream() -> None:
    for body in (STREAM, STREAM_CRLF):
        for i in range(len(body) + 1):
            assert parse([body[:i], body[i:]], streamed=True) == (STREAM_USAGE, "gpt-4o-2024-08-06")


@settings(max_examples=300)
@given(st.data())
def test_arbitrary_splits(data: st.DataObject) -> None:
    body = data.draw(st.sampled_from([STREAM, STREAM_CRLF]))
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=40))
    points = sorted(set(cuts))
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    assert parse(chunks, streamed=True) == (STREAM_USAGE, "gpt-4o-2024-08-06")


def test_stream_without_usage_reports_nothing() -> None:
    without = b"".join(
        event + b"\n\n" for event in STREAM.split(b"\n\n") if b'"usage":{' not in event and event
    )
    usage, model = parse([without], streamed=True)
    assert not usage.reported
    assert usage.input_tokens is None  # not reported is not zero
    assert model == "gpt-4o-2024-08-06"


def test_bad_events_are_skipped_not_fatal() -> None:
    parser = OpenAIChatParser(streamed=True)
    parser.feed(b"data: {not json\n\ndata: [1, 2]\n\n" + STREAM)
    assert parser.result().usage == STREAM_USAGE
    assert parser.skipped_events == 2


def test_malformed_json_body_reports_nothing() -> None:
    usage, model = parse([b'{"usage": {"prompt_tokens": 3'], streamed=False)
    assert not usage.reported
    assert model is None


def test_usage_fields_of_wrong_type_stay_unset() -> None:
    usage, _ = parse(
        [b'{"usage": {"prompt_tokens": "12", "completion_tokens": true, "total_tokens": 7}}'],
        streamed=False,
    )
    assert usage == TokenUsage(total_tokens=7)

"""SSEDecoder: events come out the same however the bytes are split."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tollgate.metering.sse import SSEDecoder, SSEEvent, SSEEventFilter

STREAM = (
    b": keep-alive comment\r\n"
    b"event: message_start\r\n"
    b'data: {"a": "caf\xc3\xa9"}\r\n'
    b"\r\n"
    b"data: line one\n"
    b"data: line two\n"
    b"\n"
    b"data:no-space\r"
    b"\r"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    SSEEvent("message_start", '{"a": "café"}'.encode()),
    SSEEvent("message", b"line one\nline two"),
    SSEEvent("message", b"no-space"),
    SSEEvent("message", b"[DONE]"),
]


def decode(chunks: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    return [event for chunk in chunks for event in decoder.feed(chunk)]


def test_whole_stream() -> None:
    assert decode([STREAM]) == EXPECTED


def test_every_single_split_point() -> None:
    for i in range(len(STREAM) + 1):
        assert decode([STREAM[:i], STREAM[i:]]) == EXPECTED, f"split at byte {i}"


def test_one_byte_at_a_time() -> None:
    assert decode([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_arbitrary_splits(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    chunks = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)], strict=True)]
    assert decode(chunks) == EXPECTED


def test_cr_at_chunk_end_then_lf_is_one_line_ending() -> None:
    assert decode([b"data: x\r", b"\n\r", b"\n"]) == [SSEEvent("message", b"x")]


def test_oversized_line_is_dropped_not_buffered() -> None:
    decoder = SSEDecoder(max_line_bytes=16)
    events = decoder.feed(b"data: " + b"x" * 100 + b"\n\ndata: ok\n\n")
    assert events == [SSEEvent("message", b"ok")]
    assert decoder.oversized_lines == 1


# -- SSEEventFilter ---------------------------------------------------------------------------

USAGE_EVENT = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
FILTER_STREAM = (
    b": keep-alive comment\n\n"
    b'data: {"id":"c","choices":[{"delta":{"content":"caf\xc3\xa9 \xf0\x9f\x98\x80"}}]}\n\n'
    b"event: other\r\ndata: two\r\ndata: lines\r\n\r\n" + USAGE_EVENT + b"data: [DONE]\n\n"
)


def is_usage_event(data: bytes) -> bool:
    return data.startswith(b"{") and b'"choices":[]' in data


def filtered(chunks: list[bytes]) -> tuple[bytes, int]:
    f = SSEEventFilter(is_usage_event)
    out = b"".join(f.feed(c) for c in chunks) + f.flush()
    return out, f.dropped


def test_filter_drops_only_the_selected_event() -> None:
    out, dropped = filtered([FILTER_STREAM])
    assert out == FILTER_STREAM.replace(USAGE_EVENT, b"")
    assert dropped == 1


def test_filter_keeps_everything_when_nothing_matches() -> None:
    stream = FILTER_STREAM.replace(USAGE_EVENT, b"")
    assert filtered([stream]) == (stream, 0)


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"])
def test_filter_every_two_way_split(ending: bytes) -> None:
    stream = FILTER_STREAM.replace(b"\r\n", b"\n").replace(b"\n", ending)
    usage = USAGE_EVENT.replace(b"\n", ending)
    expected = stream.replace(usage, b"")
    for i in range(len(stream) + 1):
        assert filtered([stream[:i], stream[i:]]) == (expected, 1), i


@settings(max_examples=300)
@given(st.data())
def test_filter_arbitrary_splits(data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.sets(st.integers(0, len(FILTER_STREAM)), max_size=40)))
    pieces = [
        FILTER_STREAM[a:b] for a, b in zip([0, *cuts], [*cuts, len(FILTER_STREAM)], strict=True)
    ]
    assert filtered(pieces) == (FILTER_STREAM.replace(USAGE_EVENT, b""), 1)


def test_filter_passes_an_unfinished_last_event_at_flush() -> None:
    f = SSEEventFilter(is_usage_event)
    assert f.feed(b"data: partial") == b""
    assert f.flush() == b"data: partial"

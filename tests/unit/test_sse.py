"""SSEDecoder: events come out the same however the bytes are split."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tollgate.providers.sse import SSEDecoder, SSEEvent

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

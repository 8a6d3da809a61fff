"""The OpenAI usage parsers beyond chat, against recorded payloads, re-split at any byte."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tollgate.metering.framing import JsonOrSSEParser
from tollgate.metering.openai_audio import OpenAISpeechParser, OpenAITranscriptionParser
from tollgate.metering.openai_completions import OpenAICompletionsParser
from tollgate.metering.openai_embeddings import OpenAIEmbeddingsParser
from tollgate.metering.openai_images import OpenAIImagesParser
from tollgate.metering.openai_responses import OpenAIResponsesParser, responses_usage
from tollgate.metering.usage import ParsedResponse, RequestFacts, TokenUsage

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "openai"


@dataclass(frozen=True)
class Case:
    """One recorded payload, the parser for its endpoint, and what it must report."""

    fixture: str
    parser: type[JsonOrSSEParser]
    usage: TokenUsage
    model: str | None
    units: dict[str, float] = field(default_factory=dict)
    request: RequestFacts = field(default_factory=RequestFacts)

    @property
    def streamed(self) -> bool:
        return self.fixture.endswith(".sse")

    @property
    def body(self) -> bytes:
        return (FIXTURES / self.fixture).read_bytes()

    @property
    def expected(self) -> ParsedResponse:
        return ParsedResponse(usage=self.usage, model=self.model, units=self.units)

    def new_parser(self) -> JsonOrSSEParser:
        return self.parser(streamed=self.streamed, request=self.request)


IMAGE_REQUEST = RequestFacts(model="gpt-image-1", image_count=2)
TRANSCRIBE_REQUEST = RequestFacts(model="gpt-4o-transcribe")
WHISPER_REQUEST = RequestFacts(model="whisper-1")
SPEECH_REQUEST = RequestFacts(model="gpt-4o-mini-tts", input_chars=45)

CASES = [
    Case(
        "completion.json",
        OpenAICompletionsParser,
        TokenUsage(input_tokens=5, output_tokens=7, total_tokens=12),
        "gpt-3.5-turbo-instruct",
    ),
    Case(
        "completion_stream_include_usage.sse",
        OpenAICompletionsParser,
        TokenUsage(input_tokens=6, output_tokens=9, total_tokens=15),
        "gpt-3.5-turbo-instruct",
    ),
    Case(
        "response.json",
        OpenAIResponsesParser,
        TokenUsage(
            input_tokens=36,
            cached_input_tokens=0,
            output_tokens=87,
            reasoning_tokens=0,
            total_tokens=123,
        ),
        "gpt-4.1-2025-04-14",
    ),
    Case(
        "response_stream.sse",
        OpenAIResponsesParser,
        TokenUsage(
            input_tokens=1324,
            cached_input_tokens=1152,
            output_tokens=217,
            reasoning_tokens=192,
            total_tokens=1541,
        ),
        "o4-mini-2025-04-16",
    ),
    Case(
        "response_stream_incomplete.sse",
        OpenAIResponsesParser,
        TokenUsage(
            input_tokens=22,
            cached_input_tokens=0,
            output_tokens=16,
            reasoning_tokens=0,
            total_tokens=38,
        ),
        "gpt-4.1-2025-04-14",
    ),
    # A failed response reports ``usage: null``: nothing is known, which is not zero.
    Case("response_stream_failed.sse", OpenAIResponsesParser, TokenUsage(), "gpt-4.1-2025-04-14"),
    Case(
        "embeddings.json",
        OpenAIEmbeddingsParser,
        TokenUsage(input_tokens=8, total_tokens=8),
        "text-embedding-3-small",
    ),
    Case(
        "image_generation.json",
        OpenAIImagesParser,
        TokenUsage(input_tokens=50, output_tokens=8320, total_tokens=8370),
        "gpt-image-1",
        {"images": 2},
        IMAGE_REQUEST,
    ),
    Case(
        "image_edit.json",
        OpenAIImagesParser,
        TokenUsage(input_tokens=623, output_tokens=1056, total_tokens=1679),
        "gpt-image-1",
        {"images": 1},
        IMAGE_REQUEST,
    ),
    Case(
        "image_generation_dalle3.json",
        OpenAIImagesParser,
        TokenUsage(),
        "dall-e-3",
        {"images": 1},
        RequestFacts(model="dall-e-3"),
    ),
    Case(
        "image_generation_stream.sse",
        OpenAIImagesParser,
        TokenUsage(input_tokens=90, output_tokens=4160, total_tokens=4250),
        "gpt-image-1",
        {"images": 1},
        IMAGE_REQUEST,
    ),
    Case(
        "image_edit_stream.sse",
        OpenAIImagesParser,
        TokenUsage(input_tokens=616, output_tokens=1056, total_tokens=1672),
        "gpt-image-1",
        {"images": 1},
        IMAGE_REQUEST,
    ),
    Case(
        "transcription.json",
        OpenAITranscriptionParser,
        TokenUsage(input_tokens=14, output_tokens=45, total_tokens=59),
        "gpt-4o-transcribe",
        request=TRANSCRIBE_REQUEST,
    ),
    Case(
        "transcription_whisper.json",
        OpenAITranscriptionParser,
        TokenUsage(),
        "whisper-1",
        {"audio_seconds": 9.0},
        WHISPER_REQUEST,
    ),
    # ``usage.seconds`` (what is billed) wins over the measured ``duration``.
    Case(
        "transcription_verbose.json",
        OpenAITranscriptionParser,
        TokenUsage(),
        "whisper-1",
        {"audio_seconds": 9.0},
        WHISPER_REQUEST,
    ),
    Case(
        "translation_verbose.json",
        OpenAITranscriptionParser,
        TokenUsage(),
        "whisper-1",
        {"audio_seconds": 4.699999809265137},
        WHISPER_REQUEST,
    ),
    Case(
        "transcription_stream.sse",
        OpenAITranscriptionParser,
        TokenUsage(input_tokens=14, output_tokens=18, total_tokens=32),
        "gpt-4o-transcribe",
        request=TRANSCRIBE_REQUEST,
    ),
    Case(
        "transcription.srt",
        OpenAITranscriptionParser,
        TokenUsage(),
        "whisper-1",
        {},
        WHISPER_REQUEST,
    ),
    Case(
        "transcription.vtt",
        OpenAITranscriptionParser,
        TokenUsage(),
        "whisper-1",
        {},
        WHISPER_REQUEST,
    ),
    Case(
        "transcription.txt",
        OpenAITranscriptionParser,
        TokenUsage(),
        "whisper-1",
        {},
        WHISPER_REQUEST,
    ),
    Case(
        "speech_stream.sse",
        OpenAISpeechParser,
        TokenUsage(input_tokens=14, output_tokens=101, total_tokens=115),
        "gpt-4o-mini-tts",
        {"characters": 45},
        SPEECH_REQUEST,
    ),
]
SSE_CASES = [case for case in CASES if case.streamed]
CASE_BY_NAME = {case.fixture: case for case in CASES}


def crlf(body: bytes) -> bytes:
    return body.replace(b"\n", b"\r\n")


def run(case: Case, chunks: list[bytes]) -> ParsedResponse:
    parser = case.new_parser()
    for chunk in chunks:
        parser.feed(chunk)
    return parser.result()


def split_at(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted(set(cuts))
    return [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]


def events_of(body: bytes) -> list[bytes]:
    """The fixture's events, each with its terminating blank line (LF fixtures only)."""
    return [event + b"\n\n" for event in body.split(b"\n\n") if event]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.fixture)
def test_fixture_reports_exactly_what_the_provider_sent(case: Case) -> None:
    assert run(case, [case.body]) == case.expected


@pytest.mark.parametrize("case", SSE_CASES, ids=lambda case: case.fixture)
def test_streams_have_multibyte_text_or_are_binary_payloads(case: Case) -> None:
    # The text streams carry multi-byte UTF-8, so byte-level splits land inside characters.
    if case.parser in (OpenAIImagesParser, OpenAISpeechParser):
        return
    assert any(byte >= 0x80 for byte in case.body)


@pytest.mark.parametrize("case", SSE_CASES, ids=lambda case: case.fixture)
@pytest.mark.parametrize("line_end", ["lf", "crlf"])
def test_one_byte_at_a_time(case: Case, line_end: str) -> None:
    """Every boundary at once: between CR and LF, and inside every multi-byte character."""
    body = crlf(case.body) if line_end == "crlf" else case.body
    assert run(case, [body[i : i + 1] for i in range(len(body))]) == case.expected


@pytest.mark.parametrize("case", SSE_CASES, ids=lambda case: case.fixture)
def test_split_between_every_cr_and_lf(case: Case) -> None:
    body = crlf(case.body)
    cuts = [i + 1 for i in range(len(body) - 1) if body[i : i + 2] == b"\r\n"]
    assert cuts
    assert run(case, split_at(body, cuts)) == case.expected


@pytest.mark.parametrize("case", SSE_CASES, ids=lambda case: case.fixture)
def test_split_inside_every_multibyte_character(case: Case) -> None:
    body = case.body
    cuts = [i for i in range(1, len(body)) if body[i] & 0xC0 == 0x80]  # continuation bytes
    assert run(case, split_at(body, cuts)) == case.expected


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_arbitrary_splits_give_the_same_result(data: st.DataObject) -> None:
    case = data.draw(st.sampled_from(SSE_CASES), label="fixture")
    body = data.draw(st.sampled_from([case.body, crlf(case.body)]), label="body")
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=80), label="cuts")
    assert run(case, split_at(body, cuts)) == case.expected


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_garbage_event_in_the_middle_changes_nothing(data: st.DataObject) -> None:
    case = data.draw(st.sampled_from(SSE_CASES), label="fixture")
    events = events_of(case.body)
    at = data.draw(st.integers(0, len(events)), label="at")
    garbage = data.draw(
        st.sampled_from(
            [
                b"data: {not json\n\n",
                b"data: [1, 2, 3]\n\n",
                b'data: "usage"\n\n',
                b"data: \xff\xfe{}\n\n",
                b'event: response.completed\ndata: {"type": "response.completed"\n\n',
                b'data: {"type": "response.completed", "response": "not an object"}\n\n',
                b'data: {"type": "transcript.text.done", "usage": null}\n\n',
                b'data: {"type": "speech.audio.done", "usage": [14, 101]}\n\n',
                b": keep-alive comment\n\n",
                b"\n\n\n",
            ]
        ),
        label="garbage",
    )
    body = b"".join([*events[:at], garbage, *events[at:]])
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=30), label="cuts")
    assert run(case, split_at(body, cuts)) == case.expected


@pytest.mark.parametrize("case", SSE_CASES, ids=lambda case: case.fixture)
def test_malformed_events_are_counted_and_skipped(case: Case) -> None:
    events = events_of(case.body)
    middle = len(events) // 2
    parser = case.new_parser()
    parser.feed(b"".join([*events[:middle], b"data: {not json\n\ndata: [1]\n\n", *events[middle:]]))
    assert parser.result() == case.expected
    assert parser.skipped_events == 2


def usage_event_index(case: Case) -> int:
    """Index of the (last) event that reports usage in ``case``'s fixture."""
    events = events_of(case.body)
    return max(i for i, event in enumerate(events) if b'"usage":{' in event)


@pytest.mark.parametrize(
    "case", [c for c in SSE_CASES if c.usage.reported], ids=lambda case: case.fixture
)
def test_result_mid_stream_reports_what_was_seen_so_far(case: Case) -> None:
    events = events_of(case.body)
    last = usage_event_index(case)
    parser = case.new_parser()
    parser.feed(b"".join(events[:last]))
    before = parser.result()
    assert not before.usage.reported  # not seen yet: None, not 0
    assert before.usage.input_tokens is None
    assert before.model == case.model
    parser.feed(events[last][:-1])  # the usage event, but not its terminating blank line
    assert not parser.result().usage.reported
    parser.feed(events[last][-1:])
    assert parser.result().usage == case.usage  # the stream has not ended, usage is known
    parser.feed(b"".join(events[last + 1 :]))
    assert parser.result() == case.expected


@pytest.mark.parametrize("case", SSE_CASES, ids=lambda case: case.fixture)
def test_stream_cut_before_its_usage_reports_nothing_not_zero(case: Case) -> None:
    events = events_of(case.body)
    kept = [event for event in events if b'"usage":{' not in event]
    result = run(case, kept)
    assert not result.usage.reported
    assert all(getattr(result.usage, name) is None for name in ("input_tokens", "output_tokens"))


# --- legacy completions ------------------------------------------------------------------


def test_completion_usage_details_when_present() -> None:
    parser = OpenAICompletionsParser(streamed=False)
    parser.feed(
        b'{"model": "gpt-3.5-turbo-instruct", "usage": {"prompt_tokens": 1200, '
        b'"completion_tokens": 10, "total_tokens": 1210, '
        b'"prompt_tokens_details": {"cached_tokens": 1024}}}'
    )
    assert parser.result().usage == TokenUsage(
        input_tokens=1200, cached_input_tokens=1024, output_tokens=10, total_tokens=1210
    )


# --- Responses API -------------------------------------------------------------------------


def test_responses_usage_reads_every_documented_field() -> None:
    usage = {
        "input_tokens": 2048,
        "input_tokens_details": {"cached_tokens": 1024, "cache_write_tokens": 512},
        "output_tokens": 300,
        "output_tokens_details": {"reasoning_tokens": 256},
        "total_tokens": 2348,
    }
    assert responses_usage(usage) == TokenUsage(
        input_tokens=2048,
        cached_input_tokens=1024,
        cache_write_tokens=512,
        output_tokens=300,
        reasoning_tokens=256,
        total_tokens=2348,
    )


@pytest.mark.parametrize("usage", [None, [], "12", 12, {}])
def test_responses_usage_of_nothing_is_not_reported(usage: object) -> None:
    assert responses_usage(usage) == TokenUsage()


def test_responses_usage_fields_of_wrong_type_stay_unset() -> None:
    usage = {
        "input_tokens": "36",
        "input_tokens_details": [0],
        "output_tokens": True,
        "output_tokens_details": {"reasoning_tokens": 1.5},
        "total_tokens": 123,
    }
    assert responses_usage(usage) == TokenUsage(total_tokens=123)


def test_failed_response_with_usage_reports_it() -> None:
    parser = OpenAIResponsesParser(streamed=True)
    parser.feed(
        b'event: response.failed\ndata: {"type": "response.failed", "sequence_number": 9, '
        b'"response": {"id": "resp_1", "object": "response", "status": "failed", '
        b'"model": "gpt-4.1-2025-04-14", "error": {"code": "server_error", "message": "x"}, '
        b'"usage": {"input_tokens": 40, "input_tokens_details": {"cached_tokens": 0}, '
        b'"output_tokens": 12, "output_tokens_details": {"reasoning_tokens": 0}, '
        b'"total_tokens": 52}}}\n\n'
    )
    result = parser.result()
    assert result.model == "gpt-4.1-2025-04-14"
    assert result.usage == TokenUsage(
        input_tokens=40,
        cached_input_tokens=0,
        output_tokens=12,
        reasoning_tokens=0,
        total_tokens=52,
    )


def test_responses_event_name_stands_in_for_a_missing_type() -> None:
    parser = OpenAIResponsesParser(streamed=True)
    parser.feed(
        b'event: response.completed\ndata: {"response": {"model": "gpt-4.1", '
        b'"usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}}}\n\n'
    )
    assert parser.result() == ParsedResponse(
        usage=TokenUsage(input_tokens=3, output_tokens=4, total_tokens=7), model="gpt-4.1"
    )


def test_responses_only_lifecycle_events_count() -> None:
    # An output item or a delta that happens to hold a "usage" or "response" key is not usage.
    parser = OpenAIResponsesParser(streamed=True)
    parser.feed(
        b'data: {"type": "response.output_text.delta", "delta": "x", '
        b'"usage": {"input_tokens": 999}, "response": {"model": "wrong"}}\n\n'
        b'data: {"type": "response.created", "response": {"model": "gpt-4.1", '
        b'"usage": {"input_tokens": 999}}}\n\n'
    )
    assert parser.result() == ParsedResponse(usage=TokenUsage(), model="gpt-4.1")


def test_responses_model_falls_back_to_the_request() -> None:
    parser = OpenAIResponsesParser(streamed=True, request=RequestFacts(model="gpt-4.1"))
    parser.feed(b'data: {"type": "error", "code": "server_error", "message": "x"}\n\n')
    assert parser.result() == ParsedResponse(usage=TokenUsage(), model="gpt-4.1")


def test_background_response_is_queued_without_usage() -> None:
    parser = OpenAIResponsesParser(streamed=False)
    parser.feed(
        b'{"id": "resp_1", "object": "response", "status": "queued", "background": true, '
        b'"model": "o3-2025-04-16", "output": [], "usage": null}'
    )
    assert parser.result() == ParsedResponse(usage=TokenUsage(), model="o3-2025-04-16")


# --- embeddings ---------------------------------------------------------------------------


def test_embeddings_report_no_output_tokens() -> None:
    result = run(CASE_BY_NAME["embeddings.json"], [CASE_BY_NAME["embeddings.json"].body])
    assert result.usage.output_tokens is None
    assert result.usage.reasoning_tokens is None


def test_embeddings_body_too_large_to_keep_is_read_from_its_end() -> None:
    case = CASE_BY_NAME["embeddings.json"]
    parser = OpenAIEmbeddingsParser(streamed=False, max_json_bytes=100)
    body = case.body
    for i in range(0, len(body), 7):
        parser.feed(body[i : i + 7])
    assert parser.result() == case.expected


def test_large_base64_embeddings_batch_is_metered() -> None:
    vector = "AAAAAD8AAIA/" * 1024  # base64 text, as with encoding_format "base64"
    doc = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": vector} for i in range(300)],
        "model": "text-embedding-3-large",
        "usage": {"prompt_tokens": 123456, "total_tokens": 123456},
    }
    body = json.dumps(doc, indent=2).encode()
    parser = OpenAIEmbeddingsParser(streamed=False, max_json_bytes=1024 * 1024)
    assert len(body) > 1024 * 1024
    for i in range(0, len(body), 65536):
        parser.feed(body[i : i + 65536])
    assert parser.result() == ParsedResponse(
        usage=TokenUsage(input_tokens=123456, total_tokens=123456),
        model="text-embedding-3-large",
    )


def test_truncated_large_embeddings_body_reports_nothing() -> None:
    body = b'{"object": "list", "data": [{"embedding": [' + b"0.125, " * 50_000
    parser = OpenAIEmbeddingsParser(streamed=False, max_json_bytes=4096)
    parser.feed(body)
    assert parser.result() == ParsedResponse(usage=TokenUsage(), model=None)


# --- images -------------------------------------------------------------------------------


def test_images_without_data_report_no_image_count() -> None:
    parser = OpenAIImagesParser(streamed=False, request=IMAGE_REQUEST)
    parser.feed(b'{"created": 1713833628, "data": null}')
    assert parser.result() == ParsedResponse(usage=TokenUsage(), model="gpt-image-1")


def test_images_count_every_completed_image_in_a_stream() -> None:
    completed = (FIXTURES / "image_generation_stream.sse").read_bytes().split(b"\n\n")[2] + b"\n\n"
    parser = OpenAIImagesParser(streamed=True, request=IMAGE_REQUEST)
    parser.feed(completed + completed)
    result = parser.result()
    assert result.units == {"images": 2}
    assert result.usage == CASE_BY_NAME["image_generation_stream.sse"].usage


def test_partial_images_are_not_counted() -> None:
    body = (FIXTURES / "image_edit_stream.sse").read_bytes()
    partial = body.split(b"\n\n")[0] + b"\n\n"
    parser = OpenAIImagesParser(streamed=True, request=IMAGE_REQUEST)
    parser.feed(partial)
    assert parser.result() == ParsedResponse(usage=TokenUsage(), model="gpt-image-1")


# --- transcriptions and translations --------------------------------------------------------


@pytest.mark.parametrize("name", ["transcription.srt", "transcription.vtt", "transcription.txt"])
def test_text_transcripts_report_nothing_and_never_raise(name: str) -> None:
    parser = OpenAITranscriptionParser(streamed=False, request=WHISPER_REQUEST)
    parser.feed((FIXTURES / name).read_bytes())
    result = parser.result()
    assert not result.usage.reported
    assert result.units == {}
    assert parser.skipped_events == 1


def test_verbose_duration_stands_in_only_without_usage() -> None:
    doc = json.loads((FIXTURES / "transcription_verbose.json").read_bytes())
    del doc["usage"]
    parser = OpenAITranscriptionParser(streamed=False)
    parser.feed(json.dumps(doc).encode())
    assert parser.result().units == {"audio_seconds": 8.470000267028809}


def test_token_usage_does_not_also_report_duration() -> None:
    parser = OpenAITranscriptionParser(streamed=False, request=TRANSCRIBE_REQUEST)
    parser.feed(
        b'{"text": "x", "duration": 12.5, "usage": {"type": "tokens", "input_tokens": 9, '
        b'"output_tokens": 2, "total_tokens": 11}}'
    )
    result = parser.result()
    assert result.units == {}
    assert result.usage == TokenUsage(input_tokens=9, output_tokens=2, total_tokens=11)


@pytest.mark.parametrize("seconds", [b'"9"', b"true", b"-1", b"NaN", b"Infinity", b"null", b"[9]"])
def test_bad_seconds_are_not_reported(seconds: bytes) -> None:
    parser = OpenAITranscriptionParser(streamed=False)
    parser.feed(b'{"text": "x", "usage": {"type": "duration", "seconds": ' + seconds + b"}}")
    assert parser.result().units == {}


def test_fractional_seconds_are_kept() -> None:
    parser = OpenAITranscriptionParser(streamed=False)
    parser.feed(b'{"text": "x", "usage": {"type": "duration", "seconds": 2.75}}')
    audio_seconds = parser.result().units["audio_seconds"]
    assert math.isclose(audio_seconds, 2.75)


def test_transcript_deltas_carry_no_usage() -> None:
    parser = OpenAITranscriptionParser(streamed=True)
    parser.feed(
        b'data: {"type": "transcript.text.delta", "delta": "x", '
        b'"usage": {"type": "tokens", "input_tokens": 999}}\n\n'
    )
    assert not parser.result().usage.reported


# --- text-to-speech -----------------------------------------------------------------------


AUDIO = (
    b"ID3\x04\x00\x00\x00\x00\x00#TSSE\x00\x00\x00\x0f\x00\x00\x03Lavf61.7.100"
    + bytes(range(256)) * 4096
)


def test_speech_audio_body_is_never_kept_or_read() -> None:
    parser = OpenAISpeechParser(streamed=False, request=SPEECH_REQUEST)
    for i in range(0, len(AUDIO), 16384):
        parser.feed(AUDIO[i : i + 16384])
    # Even a body that looks like usage JSON is audio here: it is not parsed.
    parser.feed(b'{"usage": {"input_tokens": 14, "output_tokens": 101, "total_tokens": 115}}')
    assert len(parser._body) == 0
    assert parser.result() == ParsedResponse(
        usage=TokenUsage(), model="gpt-4o-mini-tts", units={"characters": 45}
    )


def test_speech_without_known_input_reports_no_characters() -> None:
    parser = OpenAISpeechParser(streamed=False, request=RequestFacts(model="tts-1"))
    parser.feed(AUDIO)
    assert parser.result() == ParsedResponse(usage=TokenUsage(), model="tts-1", units={})


def test_speech_deltas_carry_no_usage() -> None:
    parser = OpenAISpeechParser(streamed=True, request=SPEECH_REQUEST)
    parser.feed(b'data: {"type": "speech.audio.delta", "audio": "SUQz", "usage": {"x": 1}}\n\n')
    assert not parser.result().usage.reported


# --- the same behaviour for every parser ------------------------------------------------------

PARSERS: list[Callable[..., JsonOrSSEParser]] = [
    OpenAICompletionsParser,
    OpenAIResponsesParser,
    OpenAIEmbeddingsParser,
    OpenAIImagesParser,
    OpenAITranscriptionParser,
    OpenAISpeechParser,
]


@pytest.mark.parametrize("make", PARSERS, ids=lambda make: make.__name__)
@pytest.mark.parametrize("streamed", [False, True])
def test_empty_body_reports_nothing(make: Callable[..., JsonOrSSEParser], streamed: bool) -> None:
    parser = make(streamed=streamed)
    assert parser.result() == ParsedResponse(usage=TokenUsage(), model=None)


@pytest.mark.parametrize("make", PARSERS, ids=lambda make: make.__name__)
def test_error_body_reports_nothing(make: Callable[..., JsonOrSSEParser]) -> None:
    parser = make(streamed=False, request=RequestFacts(model="m"))
    parser.feed(
        b'{"error": {"message": "Invalid API key", "type": "invalid_request_error", '
        b'"param": null, "code": "invalid_api_key"}}'
    )
    assert parser.result() == ParsedResponse(usage=TokenUsage(), model="m")

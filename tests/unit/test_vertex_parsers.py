"""Vertex AI usage parsers, path dispatch, Veo's requested seconds and location checks."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tollgate.metering.anthropic_messages import AnthropicMessagesParser
from tollgate.metering.gemini import GeminiParser
from tollgate.metering.usage import ParsedResponse, RequestFacts, TokenUsage, UsageParser
from tollgate.metering.vertex import (
    VeoGenerationParser,
    VertexEmbeddingsParser,
    VertexOperationPollParser,
    is_polling_endpoint,
    veo_video_seconds,
    vertex_parser_for,
    video_request,
)
from tollgate.routing.router import vertex_location

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "vertex"

V1 = "/v1/projects/my-project/locations/us-central1/publishers"
V1BETA1 = "/v1beta1/projects/my-project/locations/europe-west4/publishers"
GEMINI = f"{V1BETA1}/google/models/gemini-2.5-pro:generateContent"
GEMINI_STREAM = f"{V1BETA1}/google/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
CLAUDE = f"{V1}/anthropic/models/claude-sonnet-4-5@20250929:rawPredict"
CLAUDE_STREAM = f"{V1}/anthropic/models/claude-opus-4-1@20250805:streamRawPredict"
EMBED_PREDICT = f"{V1}/google/models/text-embedding-005:predict"
EMBED_CONTENT = f"{V1BETA1}/google/models/gemini-embedding-001:embedContent"
VEO = f"{V1}/google/models/veo-3.0-generate-001:predictLongRunning"
VEO_FETCH = f"{V1}/google/models/veo-3.0-generate-001:fetchPredictOperation"
VEO_OPERATION = f"{V1}/google/models/veo-3.0-generate-001/operations/a1b2c3d4"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def parser(endpoint: str, *, streamed: bool = False, **facts: Any) -> UsageParser:
    found = vertex_parser_for(endpoint, streamed=streamed, request=RequestFacts(**facts))
    assert found is not None
    return found


def run(parser: UsageParser, chunks: list[bytes]) -> ParsedResponse:
    for chunk in chunks:
        parser.feed(chunk)
    return parser.result()


# -- dispatch --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "kind", "model"),
    [
        (GEMINI, GeminiParser, "gemini-2.5-pro"),
        (GEMINI_STREAM, GeminiParser, "gemini-2.5-flash"),
        (f"{V1}/google/models/gemini-2.0-flash:streamGenerateContent", GeminiParser, None),
        ("/v1/publishers/google/models/gemini-2.5-flash:generateContent", GeminiParser, None),
        (CLAUDE, AnthropicMessagesParser, "claude-sonnet-4-5@20250929"),
        (CLAUDE_STREAM, AnthropicMessagesParser, None),
        (EMBED_PREDICT, VertexEmbeddingsParser, "text-embedding-005"),
        (
            f"{V1}/google/models/text-multilingual-embedding-002:predict",
            VertexEmbeddingsParser,
            None,
        ),
        (f"{V1}/google/models/gemini-embedding-001:predict", VertexEmbeddingsParser, None),
        (EMBED_CONTENT, VertexEmbeddingsParser, "gemini-embedding-001"),
        (
            f"{V1}/google/models/gemini-embedding-001:batchEmbedContents",
            VertexEmbeddingsParser,
            None,
        ),
        (VEO, VeoGenerationParser, "veo-3.0-generate-001"),
        (VEO_FETCH, VertexOperationPollParser, "veo-3.0-generate-001"),
        (VEO_OPERATION, VertexOperationPollParser, "veo-3.0-generate-001"),
        ("/v1/projects/p/locations/us-central1/operations/123", VertexOperationPollParser, None),
        # Percent-encoded as a client may send it: the same call once decoded.
        (
            f"{V1}/anthropic/models/claude-sonnet-4-5%4020250929%3ArawPredict",
            AnthropicMessagesParser,
            "claude-sonnet-4-5@20250929",
        ),
    ],
)
def test_dispatch(endpoint: str, kind: type, model: str | None) -> None:
    found = parser(endpoint)
    assert isinstance(found, kind)
    if model is not None:
        assert found.result().model == model


@pytest.mark.parametrize(
    "endpoint",
    [
        f"{V1}/anthropic/models/count-tokens:rawPredict",
        f"{V1}/anthropic/models/claude-sonnet-4-5@20250929:countTokens",
        f"{V1}/google/models/gemini-2.5-pro:countTokens",
        f"{V1}/google/models/gemini-2.5-pro:computeTokens",
        f"{V1}/google/models/imagen-4.0-generate-001:predict",
        f"{V1}/google/models/gemini-2.5-pro:rawPredict",
        f"{V1}/anthropic/models/claude-sonnet-4-5@20250929:generateContent",
        f"{V1}/mistralai/models/mistral-medium-3:rawPredict",
        f"{V1}/google/models/gemini-2.5-pro",
        f"{V1}/google/models/:generateContent",
        f"{V1}//models/gemini-2.5-pro:generateContent",
        f"{V1}/google/models/veo-3.0-generate-001/operations/a1b2c3d4:cancel",
        "/v1/projects/p/locations/us-central1/endpoints/42:generateContent",
        "/v1/projects/p/locations/us-central1/operations/",
        "/v1/models/gemini-2.5-pro:generateContent",
        "/v1/chat/completions",
        "/",
        "",
    ],
)
def test_not_metered(endpoint: str) -> None:
    assert vertex_parser_for(endpoint, streamed=False, request=RequestFacts()) is None


def test_path_model_replaces_the_request_model_and_keeps_the_other_facts() -> None:
    facts = RequestFacts(model="from-body", stream=True, input_chars=3, video_seconds=16.0)
    found = vertex_parser_for(VEO, streamed=False, request=facts)
    assert isinstance(found, VeoGenerationParser)
    assert found.request == RequestFacts(
        model="veo-3.0-generate-001", stream=True, input_chars=3, video_seconds=16.0
    )


def test_path_model_is_made_storable() -> None:
    found = parser(f"{V1}/google/models/gemini%00x:generateContent")
    assert found.result().model == "gemini\ufffdx"


@pytest.mark.parametrize(
    ("endpoint", "polling"),
    [
        (VEO_FETCH, True),
        (VEO_FETCH + "?alt=json", True),
        (VEO_OPERATION, True),
        ("/v1/projects/p/locations/us-central1/operations/123", True),
        ("/v1beta1/publishers/google/models/veo-2.0-generate-001/operations/9", True),
        (VEO, False),
        (GEMINI, False),
        (CLAUDE, False),
        (f"{V1}/anthropic/models/claude-sonnet-4-5@20250929:fetchPredictOperation", False),
        (f"{V1}/google/models/veo-3.0-generate-001/operations/9:cancel", False),
        ("/v1/chat/completions", False),
    ],
)
def test_is_polling_endpoint(endpoint: str, polling: bool) -> None:
    assert is_polling_endpoint(endpoint) is polling


# -- fixtures through every framing ----------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], UsageParser]
    body: bytes
    usage: TokenUsage
    model: str | None
    units: dict[str, float]


CASES = [
    Case(
        "gemini json",
        lambda: parser(GEMINI),
        fixture("gemini_generate_content.json"),
        TokenUsage(
            input_tokens=2310,
            cached_input_tokens=2048,
            output_tokens=71,
            reasoning_tokens=522,
            total_tokens=2903,
        ),
        "gemini-2.5-pro",
        {},
    ),
    Case(
        "gemini sse",
        lambda: parser(GEMINI_STREAM, streamed=True),
        fixture("gemini_stream.sse"),
        TokenUsage(input_tokens=19, output_tokens=17, reasoning_tokens=265, total_tokens=301),
        "gemini-2.5-flash",
        {},
    ),
    Case(
        "claude json",
        lambda: parser(CLAUDE),
        fixture("claude_raw_predict.json"),
        TokenUsage(
            input_tokens=37, cached_input_tokens=3072, cache_write_tokens=1290, output_tokens=142
        ),
        "claude-sonnet-4-5-20250929",  # the response's own model wins over the path's
        {},
    ),
    Case(
        "claude sse",
        lambda: parser(CLAUDE_STREAM, streamed=True),
        fixture("claude_stream_raw_predict.sse"),
        TokenUsage(
            input_tokens=1184, cached_input_tokens=0, cache_write_tokens=0, output_tokens=256
        ),
        "claude-opus-4-1-20250805",
        {},
    ),
    Case(
        "embeddings predict",
        lambda: parser(EMBED_PREDICT),
        fixture("embeddings_predict.json"),
        TokenUsage(input_tokens=17),
        "text-embedding-005",
        {"characters": 58},
    ),
    Case(
        "embed content",
        lambda: parser(EMBED_CONTENT),
        fixture("embed_content.json"),
        TokenUsage(input_tokens=9, total_tokens=9),
        "gemini-embedding-001",
        {},
    ),
    Case(
        "veo operation",
        lambda: parser(VEO, video_seconds=16.0),
        fixture("predict_long_running.json"),
        TokenUsage(),
        "veo-3.0-generate-001",
        {"video_seconds": 16.0},
    ),
    Case(
        "veo poll",
        lambda: parser(VEO_FETCH, video_seconds=16.0),
        fixture("fetch_predict_operation_done.json"),
        TokenUsage(),
        "veo-3.0-generate-001",
        {},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_whole_payload(case: Case) -> None:
    result = run(case.make(), [case.body])
    assert result == ParsedResponse(case.usage, case.model, case.units)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_two_way_split(case: Case) -> None:
    for i in range(len(case.body) + 1):
        result = run(case.make(), [case.body[:i], case.body[i:]])
        assert result == ParsedResponse(case.usage, case.model, case.units), i


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_byte_by_byte(case: Case) -> None:
    body = case.body
    result = run(case.make(), [body[i : i + 1] for i in range(len(body))])
    assert result == ParsedResponse(case.usage, case.model, case.units)


@pytest.mark.parametrize(
    "case", [c for c in CASES if any(byte >= 0x80 for byte in c.body)], ids=lambda c: c.name
)
def test_splits_inside_multibyte_characters(case: Case) -> None:
    # Every cut inside a multi-byte character at once.
    inside = [i for i, byte in enumerate(case.body) if 0x80 <= byte <= 0xBF]
    points = [0, *inside, len(case.body)]
    chunks = [case.body[a:b] for a, b in itertools.pairwise(points)]
    result = run(case.make(), chunks)
    assert result == ParsedResponse(case.usage, case.model, case.units)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_arbitrary_splits(data: st.DataObject) -> None:
    case = data.draw(st.sampled_from(CASES), label="case")
    body = case.body
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=60), label="cuts")
    points = sorted(set(cuts))
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    result = run(case.make(), chunks)
    assert result == ParsedResponse(case.usage, case.model, case.units)


@settings(max_examples=300, deadline=None)
@given(
    endpoint=st.sampled_from([GEMINI, CLAUDE, EMBED_PREDICT, EMBED_CONTENT, VEO, VEO_FETCH]),
    streamed=st.booleans(),
    chunks=st.lists(st.binary(max_size=64), max_size=8),
)
def test_feed_never_raises(endpoint: str, streamed: bool, chunks: list[bytes]) -> None:
    found = parser(endpoint, streamed=streamed, video_seconds=8.0)
    result = run(found, chunks)
    assert isinstance(result, ParsedResponse)


# -- Gemini on Vertex ------------------------------------------------------------------------


def test_gemini_traffic_type_only_chunks_report_nothing() -> None:
    first_event = fixture("gemini_stream.sse").split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    result = run(parser(GEMINI_STREAM, streamed=True), [first_event])
    assert result.usage == TokenUsage()
    assert result.model == "gemini-2.5-flash"


# -- Claude on Vertex ------------------------------------------------------------------------


def test_claude_without_a_response_model_keeps_the_path_model() -> None:
    body = json.dumps({"type": "message", "usage": {"input_tokens": 5, "output_tokens": 7}})
    result = run(parser(CLAUDE), [body.encode()])
    assert result.model == "claude-sonnet-4-5@20250929"
    assert result.usage == TokenUsage(input_tokens=5, output_tokens=7)


def test_claude_stream_is_complete_at_message_stop() -> None:
    found = parser(CLAUDE_STREAM, streamed=True)
    body = fixture("claude_stream_raw_predict.sse")
    found.feed(body[: body.index(b"event: message_stop")])
    assert not found.complete
    found.feed(body[body.index(b"event: message_stop") :])
    assert found.complete


# -- embeddings ------------------------------------------------------------------------------


def prediction(token_count: object) -> dict[str, Any]:
    statistics = {"truncated": False, "token_count": token_count}
    return {"embeddings": {"statistics": statistics, "values": [0.5, -0.25]}}


def embeddings(doc: dict[str, Any]) -> ParsedResponse:
    return run(parser(EMBED_PREDICT), [json.dumps(doc).encode()])


def test_embeddings_token_counts_as_doubles_are_summed() -> None:
    result = embeddings({"predictions": [prediction(4.0), prediction(3)]})
    assert result.usage == TokenUsage(input_tokens=7)
    assert result.units == {}


@pytest.mark.parametrize("bad", [None, 2.5, -1, True, "4", float("inf"), [], {}])
def test_embeddings_unusable_token_counts_are_left_out(bad: object) -> None:
    result = embeddings({"predictions": [prediction(bad), prediction(5)]})
    assert result.usage == TokenUsage(input_tokens=5)
    only_bad = embeddings({"predictions": [prediction(bad)]})
    assert only_bad.usage == TokenUsage()


@pytest.mark.parametrize(
    "predictions",
    [
        [],
        [{}],
        [{"embeddings": {"values": [0.1]}}],
        [{"embeddings": {"statistics": None}}],
        ["not an object", 3, None],
        "not a list",
    ],
)
def test_embeddings_without_statistics_report_no_tokens(predictions: object) -> None:
    result = embeddings({"predictions": predictions, "metadata": {"billableCharacterCount": 12}})
    assert result.usage == TokenUsage()
    assert result.units == {"characters": 12}


@pytest.mark.parametrize("metadata", [{}, {"billableCharacterCount": "12"}, None, [], "x"])
def test_embeddings_without_billable_characters_report_no_units(metadata: object) -> None:
    result = embeddings({"predictions": [prediction(2)], "metadata": metadata})
    assert result.units == {}
    assert result.usage == TokenUsage(input_tokens=2)


def test_batch_embed_contents_usage_metadata() -> None:
    doc = {
        "embeddings": [{"values": [0.1]}, {"values": [0.2]}],
        "usageMetadata": {"promptTokenCount": 14, "totalTokenCount": 14},
    }
    endpoint = f"{V1}/google/models/gemini-embedding-001:batchEmbedContents"
    result = run(parser(endpoint), [json.dumps(doc).encode()])
    assert result.usage == TokenUsage(input_tokens=14, total_tokens=14)


def test_embeddings_error_body_reports_nothing() -> None:
    error = {"error": {"code": 400, "message": "bad", "status": "INVALID_ARGUMENT"}}
    result = embeddings(error)
    assert result == ParsedResponse(TokenUsage(), "text-embedding-005", {})


def test_embeddings_are_json_even_when_called_streamed() -> None:
    found = parser(EMBED_PREDICT, streamed=True)
    result = run(found, [fixture("embeddings_predict.json")])
    assert result.usage == TokenUsage(input_tokens=17)


# -- Veo -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "doc",
    [
        {"name": ""},
        {"name": 42},
        {"done": False},
        {"name": "projects/p/operations/1", "error": {"code": 3, "message": "bad"}},
        {"error": {"code": 400, "message": "bad", "status": "INVALID_ARGUMENT"}},
    ],
)
def test_veo_without_an_accepted_operation_reports_no_seconds(doc: dict[str, Any]) -> None:
    result = run(parser(VEO, video_seconds=8.0), [json.dumps(doc).encode()])
    assert result == ParsedResponse(TokenUsage(), "veo-3.0-generate-001", {})


def test_veo_reports_nothing_when_the_request_seconds_are_unknown() -> None:
    result = run(parser(VEO), [fixture("predict_long_running.json")])
    assert result.units == {}


def test_veo_operation_that_is_already_done_counts_once() -> None:
    doc = json.loads(fixture("fetch_predict_operation_done.json"))
    result = run(parser(VEO, video_seconds=12.0), [json.dumps(doc).encode()])
    assert result.units == {"video_seconds": 12.0}


def test_veo_truncated_body_reports_nothing() -> None:
    body = fixture("predict_long_running.json")
    result = run(parser(VEO, video_seconds=8.0), [body[: len(body) // 2]])
    assert result.units == {}


def test_polling_keeps_nothing_of_a_large_body() -> None:
    found = parser(VEO_FETCH)
    assert isinstance(found, VertexOperationPollParser)
    found.feed(b'{"name": "x", "done": true, "response": {"videos": [{"bytesBase64Encoded": "')
    found.feed(b"A" * 1_000_000)
    assert len(found._body) == 0
    assert found.result() == ParsedResponse(TokenUsage(), "veo-3.0-generate-001", {})


@pytest.mark.parametrize(
    ("parameters", "model", "seconds"),
    [
        ({"durationSeconds": 8, "sampleCount": 1}, "veo-3.0-generate-001", 8.0),
        ({"durationSeconds": 6, "sampleCount": 4}, "veo-3.0-fast-generate-001", 24.0),
        ({"durationSeconds": 5, "sampleCount": 2}, "veo-2.0-generate-001", 10.0),
        ({"durationSeconds": 4}, "veo-3.1-generate-preview", 4.0),
        ({"sampleCount": 3}, "veo-3.0-generate-001", 24.0),
        ({"sampleCount": 2}, "veo-2.0-generate-001", 16.0),
        ({}, "veo-3.0-generate-001", 8.0),
        (None, "veo-3.0-generate-001", 8.0),
        ({"durationSeconds": None, "sampleCount": None}, "veo-3.0-generate-001", 8.0),
        # 0 cannot be told from unset once read into a protobuf message: the default.
        ({"durationSeconds": 0, "sampleCount": 0}, "veo-3.0-generate-001", 8.0),
        ({"durationSeconds": 8.0, "sampleCount": 2.0}, "veo-3.0-generate-001", 16.0),
        ({"durationSeconds": "6", "sampleCount": "2"}, "veo-3.0-generate-001", 12.0),
        ({"durationSeconds": 60, "sampleCount": 8}, "veo-3.0-generate-001", 480.0),
        ({"durationSeconds": 7, "resolution": "1080p"}, "VEO-2.0-GENERATE-001", 7.0),
        ({"durationSeconds": 8}, "publishers/google/models/veo-3.0-generate-001", 8.0),
    ],
)
def test_veo_video_seconds(parameters: object, model: str, seconds: float) -> None:
    body = {"instances": [{"prompt": "a cat"}], "parameters": parameters}
    if parameters is None:
        del body["parameters"]
    assert veo_video_seconds(body, model) == seconds


@pytest.mark.parametrize(
    "parameters",
    [
        {"durationSeconds": -8},
        {"sampleCount": -1},
        {"durationSeconds": 61},
        {"sampleCount": 9},
        {"durationSeconds": 10**30},
        {"durationSeconds": 7.5},
        {"durationSeconds": float("nan")},
        {"durationSeconds": float("inf")},
        {"durationSeconds": True},
        {"sampleCount": False},
        {"durationSeconds": "8s"},
        {"durationSeconds": " 8"},
        {"durationSeconds": "-8"},
        {"durationSeconds": "\uff18"},  # a full-width 8
        {"durationSeconds": "9" * 5000},
        {"durationSeconds": "1e1"},
        {"durationSeconds": []},
        {"durationSeconds": {"seconds": 8}},
        "durationSeconds=8",
        [8],
        7,
    ],
)
def test_veo_video_seconds_refuses_unusable_values(parameters: object) -> None:
    assert veo_video_seconds({"parameters": parameters}, "veo-3.0-generate-001") is None


@pytest.mark.parametrize("model", ["imagen-4.0-generate-001", "gemini-2.5-pro", "", "xveo-3"])
def test_veo_video_seconds_is_none_for_other_models(model: str) -> None:
    assert veo_video_seconds({"parameters": {"durationSeconds": 8}}, model) is None


# -- locations -------------------------------------------------------------------------------


def location_path(location: str, tail: str = "/publishers/google/models/m:generateContent") -> str:
    return f"/v1/projects/my-project/locations/{location}{tail}"


@pytest.mark.parametrize(
    "location",
    [
        "us-central1",
        "europe-west4",
        "asia-northeast1",
        "northamerica-northeast2",
        "me-central2",
        "us",
        "eu",
        "global",
        "a",
        "a" * 63,
        "a1-b2-c3",
    ],
)
def test_vertex_location_accepts_labels(location: str) -> None:
    assert vertex_location(location_path(location)) == location


@pytest.mark.parametrize(
    "path",
    [
        "/v1beta1/projects/p/locations/europe-west4/publishers/google/models/m:streamGenerateContent"
        "?alt=sse",
        "/v1/projects/p/locations/europe-west4",
        "/v1/projects/p/locations/europe-west4/operations/1",
        "/v1/projects/p/locations/europe-west4:evaluateInstances",
        "/v1/projects/p/locations/europe-west4?x=/locations/evil",
    ],
)
def test_vertex_location_in_other_path_shapes(path: str) -> None:
    assert vertex_location(path) == "europe-west4"


@pytest.mark.parametrize(
    "location",
    [
        "",
        "us-central1.evil.com",
        "evil.com",
        "..",
        ".",
        "%2e",
        "%2e%2e",
        "us-central1%2eevil.com",
        "us%2Dcentral1",
        "US-CENTRAL1",
        "Us",
        "a" * 64,
        "-us",
        "us-",
        "us--central1",
        "1us",
        "us_central1",
        "us central1",
        "us-central1\x00",
        "us-central1\n",
        "\uff55\uff53",  # a full-width "us"
        "us-céntral1",
        "us-central1@evil.com",
        "evil.com#",
        "user:pass@evil",
        "[::1]",
        "127.0.0.1",
    ],
)
def test_vertex_location_refuses_anything_else(location: str) -> None:
    assert vertex_location(location_path(location)) is None


@pytest.mark.parametrize(
    "path",
    [
        "/v1/publishers/google/models/gemini-2.5-flash:generateContent",  # express mode
        "/v2/projects/p/locations/us-central1/publishers/google/models/m:generateContent",
        "/team-a/v1/projects/p/locations/us-central1/publishers/google/models/m:predict",
        "/v1/projects//locations/us-central1/publishers/google/models/m:predict",
        "/v1/projects/p/us-central1/publishers/google/models/m:predict",
        "/v1/projects/p/locations//publishers/google/models/m:predict",
        "v1/projects/p/locations/us-central1/publishers/google/models/m:predict",
        "/V1/projects/p/locations/us-central1",
        "",
        "/",
    ],
)
def test_vertex_location_needs_a_project_path(path: str) -> None:
    assert vertex_location(path) is None


@pytest.mark.parametrize(
    ("endpoint", "body", "expected"),
    [
        (
            f"{V1}/google/models/veo-3.0-generate-001:predictLongRunning",
            {"parameters": {"durationSeconds": 6, "sampleCount": 2, "resolution": "1080p"}},
            (12.0, 1080.0),
        ),
        (f"{V1}/google/models/veo-3.0-generate-001:predictLongRunning", {}, (8.0, None)),
        (
            f"{V1}/google/models/veo-3.0-generate-001:predictLongRunning",
            {"parameters": {"resolution": "8K"}},
            (8.0, None),
        ),
        (
            f"{V1}/google/models/veo-3.0-generate-001:predictLongRunning",
            {"parameters": {"durationSeconds": -1, "resolution": "720p"}},
            (None, None),
        ),
        (f"{V1}/google/models/gemini-2.5-pro:generateContent", {"parameters": {}}, (None, None)),
        (f"{V1}/google/models/imagen-4:predictLongRunning", {}, (None, None)),
    ],
)
def test_video_request_reads_seconds_and_height(
    endpoint: str, body: dict[str, Any], expected: tuple[float | None, float | None]
) -> None:
    assert video_request(endpoint, body) == expected


def test_veo_rows_carry_the_height_with_the_seconds() -> None:
    endpoint = f"{V1}/google/models/veo-3.0-generate-001:predictLongRunning"
    facts = RequestFacts(video_seconds=16.0, video_height=1080.0)
    parser = vertex_parser_for(endpoint, streamed=False, request=facts)
    assert parser is not None
    parser.feed(b'{"name": "projects/p/locations/l/publishers/google/models/v/operations/1"}')
    assert parser.result().units == {"video_seconds": 16.0, "video_height": 1080.0}

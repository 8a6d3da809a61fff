"""The fake provider's Vertex AI endpoints, driven by the official SDKs in Vertex mode.

google-genai (``genai.Client(vertexai=True)``) and ``anthropic.AsyncAnthropicVertex`` talk to
the fake through a tap: a pass-through proxy that keeps each exchange's bytes as they went
by, the way Tollgate sees them. Each test checks that the counts the SDK hands its caller
are the counts Tollgate's Vertex parser takes from those same bytes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import anthropic
import google.oauth2.credentials
import pytest
from aiohttp import web
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from tollgate.fakeprovider import serve
from tollgate.metering.usage import ParsedResponse, RequestFacts, TokenUsage
from tollgate.metering.vertex import (
    is_polling_endpoint,
    veo_video_seconds,
    vertex_parser_for,
)
from tollgate.routing.router import vertex_location

PROJECT = "tollgate-test"
LOCATION = "us-central1"
CLAUDE_REGION = "us-east5"
GEMINI = "gemini-2.5-flash"
CLAUDE = "claude-sonnet-4-5@20250929"
VEO = "veo-3.0-generate-001"
PROMPT = "Write one sentence about a stone bridge over a river."


@dataclass
class Exchange:
    """One request and its answer as they passed the tap."""

    method: str
    path: str  # as sent, with the query string
    request_body: bytes
    status: int
    content_type: str
    chunks: list[bytes] = field(default_factory=list)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def streamed(self) -> bool:
        return self.content_type.startswith("text/event-stream")

    def metered(self) -> ParsedResponse:
        """What Tollgate's Vertex parser records from these bytes, fed as they arrived."""
        facts = RequestFacts()
        if self.path.split("?", 1)[0].endswith(":predictLongRunning"):
            model = self.path.split("/models/", 1)[1].split(":", 1)[0]
            facts = RequestFacts(
                video_seconds=veo_video_seconds(json.loads(self.request_body), model)
            )
        parser = vertex_parser_for(self.path, streamed=self.streamed, request=facts)
        assert parser is not None, self.path
        for chunk in self.chunks:
            parser.feed(chunk)
        return parser.result()


class Tap:
    """A pass-through proxy in front of the fake that keeps every exchange."""

    def __init__(self, upstream: str, session: aiohttp.ClientSession) -> None:
        self._upstream = upstream
        self._session = session
        self.exchanges: list[Exchange] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {
            name: value
            for name, value in request.headers.items()
            if name.lower() not in ("host", "content-length", "transfer-encoding")
        }
        async with self._session.request(
            request.method, self._upstream + request.raw_path, data=body, headers=headers
        ) as upstream:
            content_type = upstream.headers.get("Content-Type", "")
            exchange = Exchange(
                request.method, request.raw_path, body, upstream.status, content_type
            )
            self.exchanges.append(exchange)
            response = web.StreamResponse(
                status=upstream.status, headers={"Content-Type": content_type}
            )
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                exchange.chunks.append(chunk)
                await response.write(chunk)
            await response.write_eof()
            return response

    def last(self, suffix: str) -> Exchange:
        matching = [e for e in self.exchanges if e.path.split("?", 1)[0].endswith(suffix)]
        assert matching, f"no request ending in {suffix}"
        return matching[-1]


@pytest.fixture(autouse=True)
def _no_cloud_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "GOOGLE_API_KEY",
        "GEMINI_API_KEY",
        "GOOGLE_CLOUD_PROJECT",
        "GOOGLE_CLOUD_LOCATION",
        "GOOGLE_GENAI_API_VERSION",
        "GOOGLE_GENAI_USE_VERTEXAI",
        "ANTHROPIC_VERTEX_BASE_URL",
        "ANTHROPIC_VERTEX_PROJECT_ID",
        "CLOUD_ML_REGION",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def fake() -> AsyncIterator[str]:
    runner, port = await serve("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def tap(fake: str, http: aiohttp.ClientSession) -> AsyncIterator[tuple[Tap, str]]:
    proxy = Tap(fake, http)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield proxy, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def genai_client(base_url: str, session: aiohttp.ClientSession, **options: Any) -> genai.Client:
    # The SDK's own aiohttp session subclasses ClientSession, which aiohttp warns about (an
    # error here); it uses the one it is given instead.
    return genai.Client(
        vertexai=True,
        project=PROJECT,
        location=LOCATION,
        credentials=google.oauth2.credentials.Credentials(token="ya29.test"),
        http_options=types.HttpOptions(
            base_url=base_url,
            retry_options=types.HttpRetryOptions(attempts=1),
            aiohttp_client=session,
            **options,
        ),
    )


@pytest.fixture
async def gemini(tap: tuple[Tap, str]) -> AsyncIterator[genai.Client]:
    async with aiohttp.ClientSession() as session:
        client = genai_client(tap[1], session)
        try:
            yield client
        finally:
            await client.aio.aclose()


@pytest.fixture
async def claude(tap: tuple[Tap, str]) -> AsyncIterator[anthropic.AsyncAnthropicVertex]:
    client = anthropic.AsyncAnthropicVertex(
        region=CLAUDE_REGION,
        project_id=PROJECT,
        base_url=tap[1] + "/v1",
        access_token="ya29.test",
        max_retries=0,
    )
    try:
        yield client
    finally:
        await client.close()


def vertex_path(method: str, model: str, *, version: str = "v1beta1") -> str:
    models = f"/{version}/projects/{PROJECT}/locations/{LOCATION}/publishers/google/models"
    return f"{models}/{model}:{method}"


def gemini_usage(usage: types.GenerateContentResponseUsageMetadata | None) -> TokenUsage:
    assert usage is not None
    return TokenUsage(
        input_tokens=usage.prompt_token_count,
        cached_input_tokens=usage.cached_content_token_count,
        output_tokens=usage.candidates_token_count,
        reasoning_tokens=usage.thoughts_token_count,
        total_tokens=usage.total_token_count,
    )


# -- Gemini ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1beta1", "v1"])
async def test_generate_content(tap: tuple[Tap, str], version: str) -> None:
    proxy, base = tap
    async with aiohttp.ClientSession() as session:
        options = {"api_version": version} if version == "v1" else {}
        client = genai_client(base, session, **options)
        response = await client.aio.models.generate_content(model=GEMINI, contents=PROMPT)
        await client.aio.aclose()

    exchange = proxy.last(":generateContent")
    assert exchange.path == vertex_path("generateContent", GEMINI, version=version)
    assert exchange.method == "POST"
    assert exchange.status == 200
    assert vertex_location(exchange.path) == LOCATION
    metered = exchange.metered()
    assert metered.usage == gemini_usage(response.usage_metadata)
    assert metered.usage.reasoning_tokens  # a 2.5 model thinks: the fake reports thoughts
    assert metered.model == response.model_version == GEMINI
    assert metered.units == {}


async def test_generate_content_stream(tap: tuple[Tap, str], gemini: genai.Client) -> None:
    proxy, _ = tap
    chunks = [
        chunk
        async for chunk in await gemini.aio.models.generate_content_stream(
            model=GEMINI, contents=PROMPT
        )
    ]

    exchange = proxy.last(":streamGenerateContent")
    assert exchange.path == vertex_path("streamGenerateContent", GEMINI) + "?alt=sse"
    assert exchange.streamed
    assert len(chunks) > 1
    metered = exchange.metered()
    assert metered.usage == gemini_usage(chunks[-1].usage_metadata)
    assert metered.model == GEMINI
    text = "".join(chunk.text or "" for chunk in chunks)
    assert len(text.split(" ")) == metered.usage.output_tokens


# -- embeddings ------------------------------------------------------------------------------


async def test_embed_content_predict(tap: tuple[Tap, str], gemini: genai.Client) -> None:
    proxy, _ = tap
    contents = ["Stone bridges last.", "Old ones, too: the Pont du Gard is 2,000 years old."]
    response = await gemini.aio.models.embed_content(
        model="text-embedding-005",
        contents=contents,
        config=types.EmbedContentConfig(output_dimensionality=16),
    )

    exchange = proxy.last(":predict")
    assert exchange.path == vertex_path("predict", "text-embedding-005")
    assert json.loads(exchange.request_body) == {
        "instances": [{"content": text} for text in contents],
        "parameters": {"outputDimensionality": 16},
    }
    assert response.embeddings is not None
    assert [len(e.values or []) for e in response.embeddings] == [16, 16]
    counts = [e.statistics.token_count for e in response.embeddings if e.statistics]
    assert len(counts) == 2
    metered = exchange.metered()
    assert metered.usage == TokenUsage(input_tokens=int(sum(c or 0 for c in counts)))
    assert response.metadata is not None
    assert metered.units == {"characters": response.metadata.billable_character_count}
    assert metered.units["characters"] == sum(len(text.replace(" ", "")) for text in contents)
    assert metered.model == "text-embedding-005"


async def test_embed_content_gemini(tap: tuple[Tap, str], gemini: genai.Client) -> None:
    proxy, _ = tap
    one = await gemini.aio.models.embed_content(
        model="gemini-embedding-001", contents="How old is the oldest stone bridge?"
    )

    exchange = proxy.last(":embedContent")
    assert exchange.path == vertex_path("embedContent", "gemini-embedding-001")
    assert one.embeddings is not None
    assert len(one.embeddings[0].values or []) == 3072
    statistics = one.embeddings[0].statistics
    assert statistics is not None
    metered = exchange.metered()
    assert metered.usage.input_tokens == statistics.token_count
    assert metered.usage.total_tokens == statistics.token_count
    assert metered.model == "gemini-embedding-001"

    two = await gemini.aio.models.embed_content(
        model="gemini-embedding-001", contents=["Stone bridges.", "Wooden bridges."]
    )
    batch = proxy.last(":batchEmbedContents")
    assert batch.path == vertex_path("batchEmbedContents", "gemini-embedding-001")
    assert two.embeddings is not None
    assert len(two.embeddings) == 2
    usage = json.loads(batch.body)["usageMetadata"]
    assert batch.metered().usage == TokenUsage(
        input_tokens=usage["promptTokenCount"], total_tokens=usage["totalTokenCount"]
    )


# -- Veo -------------------------------------------------------------------------------------


async def test_generate_videos_and_poll_until_done(
    tap: tuple[Tap, str], gemini: genai.Client, http: aiohttp.ClientSession
) -> None:
    proxy, base = tap
    operation = await gemini.aio.models.generate_videos(
        model=VEO,
        source=types.GenerateVideosSource(prompt="A stone bridge at dawn, mist on the river."),
        config=types.GenerateVideosConfig(duration_seconds=6, number_of_videos=2),
    )

    started = proxy.last(":predictLongRunning")
    assert started.path == vertex_path("predictLongRunning", VEO)
    assert json.loads(started.request_body)["parameters"] == {
        "durationSeconds": 6,
        "sampleCount": 2,
    }
    assert operation.name is not None
    assert operation.name.startswith(
        f"projects/{PROJECT}/locations/{LOCATION}/publishers/google/models/{VEO}/operations/"
    )
    assert not operation.done
    assert started.metered() == ParsedResponse(TokenUsage(), VEO, {"video_seconds": 12.0})
    assert not is_polling_endpoint(started.path)

    polls = 0
    while not operation.done:
        operation = await gemini.aio.operations.get(operation)
        polls += 1
        assert polls <= 2
    assert polls == 2
    assert operation.response is not None
    videos = operation.response.generated_videos or []
    assert len(videos) == 2
    assert all(v.video is not None and v.video.mime_type == "video/mp4" for v in videos)
    assert all(v.video is not None and len(v.video.video_bytes or b"") == 64 * 6 for v in videos)

    fetches = [e for e in proxy.exchanges if e.path.endswith(":fetchPredictOperation")]
    assert len(fetches) == 2
    for fetch in fetches:
        assert fetch.path == vertex_path("fetchPredictOperation", VEO)
        assert json.loads(fetch.request_body) == {"operationName": operation.name}
        assert is_polling_endpoint(fetch.path)
        assert fetch.metered() == ParsedResponse(TokenUsage(), VEO, {})

    # A plain GET of the operation (the generic long-running operations API) polls it too.
    get_path = f"/v1/{operation.name}"
    async with http.get(base + get_path) as resp:
        assert resp.status == 200
        got = await resp.json()
    assert got["done"] is True
    assert len(got["response"]["videos"]) == 2
    polled = proxy.last(get_path.rsplit("/", 1)[1])
    assert polled.method == "GET"
    assert is_polling_endpoint(polled.path)
    assert polled.metered() == ParsedResponse(TokenUsage(), VEO, {})


async def test_generate_videos_defaults_and_storage_uri(
    tap: tuple[Tap, str], gemini: genai.Client
) -> None:
    proxy, _ = tap
    operation = await gemini.aio.models.generate_videos(
        model=VEO,
        source=types.GenerateVideosSource(prompt="A wooden bridge."),
        config=types.GenerateVideosConfig(output_gcs_uri="gs://bucket/veo/"),
    )
    started = proxy.last(":predictLongRunning")
    assert "durationSeconds" not in json.loads(started.request_body)["parameters"]
    assert started.metered().units == {"video_seconds": 8.0}  # 8 s x 1 sample, the defaults

    while not operation.done:
        operation = await gemini.aio.operations.get(operation)
    assert operation.response is not None
    videos = operation.response.generated_videos or []
    assert len(videos) == 1
    assert videos[0].video is not None
    assert videos[0].video.uri is not None
    assert videos[0].video.uri.startswith("gs://bucket/veo/")


@pytest.mark.parametrize(
    ("model", "config", "message"),
    [
        (VEO, types.GenerateVideosConfig(duration_seconds=5), "durationSeconds"),
        ("veo-2.0-generate-001", types.GenerateVideosConfig(duration_seconds=4), "durationSeconds"),
        (VEO, types.GenerateVideosConfig(number_of_videos=5), "sampleCount"),
    ],
)
async def test_generate_videos_refuses_what_veo_refuses(
    tap: tuple[Tap, str],
    gemini: genai.Client,
    model: str,
    config: types.GenerateVideosConfig,
    message: str,
) -> None:
    proxy, _ = tap
    with pytest.raises(genai_errors.ClientError, match=message):
        await gemini.aio.models.generate_videos(
            model=model, source=types.GenerateVideosSource(prompt="x"), config=config
        )
    assert proxy.last(":predictLongRunning").status == 400


async def test_unknown_operation_is_404(tap: tuple[Tap, str], gemini: genai.Client) -> None:
    unknown = types.GenerateVideosOperation(
        name=f"projects/{PROJECT}/locations/{LOCATION}/publishers/google/models/{VEO}"
        "/operations/00000000-0000-0000-0000-000000000000"
    )
    with pytest.raises(genai_errors.ClientError, match="NOT_FOUND"):
        await gemini.aio.operations.get(unknown)


# -- Claude ----------------------------------------------------------------------------------


def claude_usage(usage: anthropic.types.Usage) -> TokenUsage:
    return TokenUsage(
        input_tokens=usage.input_tokens,
        cached_input_tokens=usage.cache_read_input_tokens,
        cache_write_tokens=usage.cache_creation_input_tokens,
        output_tokens=usage.output_tokens,
    )


def claude_path(method: str) -> str:
    return f"/v1/projects/{PROJECT}/locations/{CLAUDE_REGION}/publishers/anthropic/models/{method}"


@pytest.mark.parametrize("cached", [False, True])
async def test_claude_messages_create(
    tap: tuple[Tap, str], claude: anthropic.AsyncAnthropicVertex, cached: bool
) -> None:
    proxy, _ = tap
    system: list[Any] = [{"type": "text", "text": "You are a civil engineer. " * 20}]
    if cached:
        system[0]["cache_control"] = {"type": "ephemeral"}
    message = await claude.messages.create(
        model=CLAUDE,
        max_tokens=64,
        system=system,
        messages=[{"role": "user", "content": PROMPT}],
    )

    exchange = proxy.last(":rawPredict")
    assert exchange.path == claude_path(f"{CLAUDE}:rawPredict")
    sent = json.loads(exchange.request_body)
    assert "model" not in sent
    assert isinstance(sent["anthropic_version"], str)
    assert message.id.startswith("msg_vrtx_")
    metered = exchange.metered()
    assert metered.usage == claude_usage(message.usage)
    assert bool(metered.usage.cached_input_tokens) is cached
    assert metered.model == message.model == "claude-sonnet-4-5-20250929"
    assert vertex_location(exchange.path) == CLAUDE_REGION


async def test_claude_messages_stream(
    tap: tuple[Tap, str], claude: anthropic.AsyncAnthropicVertex
) -> None:
    proxy, _ = tap
    async with claude.messages.stream(
        model=CLAUDE, max_tokens=64, messages=[{"role": "user", "content": PROMPT}]
    ) as stream:
        final = await stream.get_final_message()

    exchange = proxy.last(":streamRawPredict")
    assert exchange.path == claude_path(f"{CLAUDE}:streamRawPredict")
    assert json.loads(exchange.request_body)["stream"] is True
    assert exchange.streamed
    metered = exchange.metered()
    assert metered.usage == claude_usage(final.usage)
    assert metered.model == final.model


async def test_claude_count_tokens_is_answered_but_not_metered(
    tap: tuple[Tap, str], claude: anthropic.AsyncAnthropicVertex
) -> None:
    proxy, _ = tap
    counted = await claude.messages.count_tokens(
        model=CLAUDE, messages=[{"role": "user", "content": PROMPT}]
    )
    exchange = proxy.last("count-tokens:rawPredict")
    assert exchange.path == claude_path("count-tokens:rawPredict")
    assert counted.input_tokens == 3 + -(-len(PROMPT) // 4)
    assert vertex_parser_for(exchange.path, streamed=False, request=RequestFacts()) is None


async def test_claude_requires_anthropic_version(fake: str, http: aiohttp.ClientSession) -> None:
    body = {"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(fake + claude_path(f"{CLAUDE}:rawPredict"), json=body) as resp:
        assert resp.status == 400
        error = await resp.json()
    assert error["error"]["type"] == "invalid_request_error"
    assert "anthropic_version" in error["error"]["message"]


# -- routing inside the fake -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status"),
    [
        (claude_path(f"{CLAUDE}:generateContent"), 404),
        (vertex_path("predict", "imagen-4.0-generate-001"), 404),
        (vertex_path("predictLongRunning", "imagen-4.0-generate-001"), 404),
        (vertex_path("countTokens", GEMINI), 404),  # answered by the Gemini handler
        (vertex_path("fetchPredictOperation", VEO), 404),  # no such operation
    ],
)
async def test_vertex_routes_do_not_shadow_each_other(
    fake: str, http: aiohttp.ClientSession, path: str, status: int
) -> None:
    body = {"anthropic_version": "vertex-2023-10-16", "contents": [{"parts": [{"text": "x"}]}]}
    async with http.post(fake + path, json={**body, "operationName": "nope"}) as resp:
        assert resp.status == status
        error = await resp.json()
    assert error["error"]["status"] == "NOT_FOUND"


async def test_vertex_requests_are_recorded_with_the_path_model(
    fake: str, http: aiohttp.ClientSession
) -> None:
    gemini_body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    claude_body = {
        "anthropic_version": "vertex-2023-10-16",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}],
    }
    calls = [
        (vertex_path("generateContent", GEMINI), gemini_body),
        (vertex_path("predict", "text-embedding-005"), {"instances": [{"content": "hi"}]}),
        (claude_path(f"{CLAUDE}:rawPredict"), claude_body),
    ]
    for path, body in calls:
        async with http.post(fake + path, json=body) as resp:
            assert resp.status == 200
    async with http.get(fake + "/_fake/requests") as resp:
        requests = (await resp.json())["requests"]
    assert [(r["path"], r["model"]) for r in requests] == [
        (vertex_path("generateContent", GEMINI), GEMINI),
        (vertex_path("predict", "text-embedding-005"), "text-embedding-005"),
        (claude_path(f"{CLAUDE}:rawPredict"), CLAUDE),
    ]


async def test_unknown_v1beta1_paths_are_recorded(fake: str, http: aiohttp.ClientSession) -> None:
    async with http.get(fake + "/v1beta1/projects/p/locations/l/nothing") as resp:
        assert resp.status == 404
    async with http.get(fake + "/_fake/requests") as resp:
        requests = (await resp.json())["requests"]
    assert [r["path"] for r in requests] == ["/v1beta1/projects/p/locations/l/nothing"]

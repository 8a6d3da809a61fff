"""Every metered format through real Envoy, Tollgate and Postgres (issue 5, acceptance 1).

The official `openai` SDK drives the OpenAI formats and the official `anthropic` SDK the
Anthropic ones; Gemini and Bedrock go over plain HTTP. For each call the ledger row's token
fields must equal what the upstream sent (as the client saw it) and `cost_usd` must equal
genai-prices' price for that usage (NULL where genai-prices has no price).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from genai_prices import Usage, calc_price

from tests.integration.conftest import (
    FakeUpstream,
    RunningTollgate,
    row_for,
    running_tollgate,
)
from tollgate.metering.usage import TOKEN_FIELDS

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Tell me something about ledgers."}]
TOKENS = TOKEN_FIELDS


@pytest.fixture
def stack(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream
) -> Iterator[RunningTollgate]:
    """`tollgate up` with every provider pointed at the fake upstream."""
    providers = {
        "anthropic": {"base_uri": fake_upstream.url},
        "gemini": {"base_uri": fake_upstream.url},
        "bedrock": {"base_uri": fake_upstream.url, "api": "bedrock", "auth": "none"},
    }
    with running_tollgate(
        tmp_path / "state", database_url, fake_upstream, providers=json.dumps(providers)
    ) as running:
        yield running


def genai_cost(provider_id: str, model: str, **usage: int | None) -> Decimal | None:
    """genai-prices' price for ``usage`` (input counted with cache tokens, as it expects)."""
    values = {k: v for k, v in usage.items() if v is not None}
    try:
        price = calc_price(Usage(**values), model_ref=model, provider_id=provider_id)
    except LookupError:
        return None
    return Decimal(price.total_price).quantize(Decimal("1e-10"))


def check(
    row: dict[str, Any],
    *,
    provider: str,
    model: str,
    tokens: dict[str, int | None],
    cost: Decimal | None,
    units: dict[str, float] | None = None,
) -> None:
    assert row["outcome"] == "ok", row
    assert (row["provider"], row["model"]) == (provider, model)
    got = {name: row[name] for name in TOKENS}
    want = {name: tokens.get(name) for name in TOKENS}
    assert got == want
    assert row["units"] == units
    assert row["cost_usd"] == cost


def oai(running: RunningTollgate) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=running.envoy_url,
        api_key="sk-app",
        default_headers={"x-tollgate-user-id": "formats"},
        max_retries=0,
    )


def openai_tokens(usage: Any) -> dict[str, int | None]:
    """Ledger token fields from an OpenAI chat/completions ``usage`` as the client saw it."""
    prompt = getattr(usage, "prompt_tokens_details", None)
    completion = getattr(usage, "completion_tokens_details", None)
    return {
        "input_tokens": usage.prompt_tokens,
        "cached_input_tokens": prompt.cached_tokens if prompt else None,
        "output_tokens": usage.completion_tokens,
        "reasoning_tokens": completion.reasoning_tokens if completion else None,
        "total_tokens": usage.total_tokens,
    }


def responses_tokens(usage: Any) -> dict[str, int | None]:
    return {
        "input_tokens": usage.input_tokens,
        "cached_input_tokens": usage.input_tokens_details.cached_tokens,
        "cache_write_tokens": getattr(usage.input_tokens_details, "cache_write_tokens", None),
        "output_tokens": usage.output_tokens,
        "reasoning_tokens": usage.output_tokens_details.reasoning_tokens,
        "total_tokens": usage.total_tokens,
    }


def openai_cost(model: str, t: dict[str, int | None]) -> Decimal | None:
    return genai_cost(
        "openai",
        model,
        input_tokens=t.get("input_tokens"),
        output_tokens=t.get("output_tokens"),
        cache_read_tokens=t.get("cached_input_tokens"),
    )


def test_openai_chat_and_legacy_completions(stack: RunningTollgate, database_url: str) -> None:
    c = oai(stack)
    raw = c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    completion = raw.parse()
    t = openai_tokens(completion.usage)
    check(
        row_for(database_url, raw.headers["x-tollgate-request-id"]),
        provider="openai",
        model=completion.model,
        tokens=t,
        cost=openai_cost(completion.model, t),
    )
    raw = c.completions.with_raw_response.create(model="gpt-3.5-turbo-instruct", prompt="Hi")
    legacy = raw.parse()
    t = openai_tokens(legacy.usage)
    check(
        row_for(database_url, raw.headers["x-tollgate-request-id"]),
        provider="openai",
        model=legacy.model,
        tokens=t,
        cost=openai_cost(legacy.model, t),
    )
    raw = c.completions.with_raw_response.create(
        model="gpt-3.5-turbo-instruct",
        prompt="Hi",
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(raw.parse())
    (final,) = [ch for ch in chunks if ch.usage is not None]
    t = openai_tokens(final.usage)
    check(
        row_for(database_url, raw.headers["x-tollgate-request-id"]),
        provider="openai",
        model=final.model,
        tokens=t,
        cost=openai_cost(final.model, t),
    )


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_openai_responses(stack: RunningTollgate, database_url: str, stream: bool) -> None:
    c = oai(stack)
    raw = c.responses.with_raw_response.create(model="gpt-4o-mini", input="Hello", stream=stream)
    if stream:
        events = list(raw.parse())
        (done,) = [e for e in events if e.type == "response.completed"]
        response = done.response
    else:
        response = raw.parse()
    t = responses_tokens(response.usage)
    check(
        row_for(database_url, raw.headers["x-tollgate-request-id"]),
        provider="openai",
        model=response.model,
        tokens=t,
        cost=openai_cost(response.model, t),
    )


def test_openai_embeddings(stack: RunningTollgate, database_url: str) -> None:
    raw = oai(stack).embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["one", "two"]
    )
    result = raw.parse()
    t: dict[str, int | None] = {
        "input_tokens": result.usage.prompt_tokens,
        "total_tokens": result.usage.total_tokens,
    }
    check(
        row_for(database_url, raw.headers["x-tollgate-request-id"]),
        provider="openai",
        model=result.model,
        tokens=t,
        cost=openai_cost(result.model, t),
    )


def test_openai_images(stack: RunningTollgate, database_url: str) -> None:
    c = oai(stack)
    raw = c.images.with_raw_response.generate(model="gpt-image-1", prompt="a ledger", n=2)
    images = raw.parse()
    assert images.usage is not None
    t: dict[str, int | None] = {
        "input_tokens": images.usage.input_tokens,
        "output_tokens": images.usage.output_tokens,
        "total_tokens": images.usage.total_tokens,
    }
    row = row_for(database_url, raw.headers["x-tollgate-request-id"])
    check(
        row,
        provider="openai",
        model="gpt-image-1",
        tokens=t,
        cost=genai_cost(
            "openai",
            "gpt-image-1",
            input_tokens=t["input_tokens"],
            output_tokens=t["output_tokens"],
        ),
        units={"images": 2.0},
    )
    raw = c.images.with_raw_response.generate(model="dall-e-3", prompt="a ledger", n=1)
    assert raw.parse().usage is None
    row = row_for(database_url, raw.headers["x-tollgate-request-id"])
    # No token usage exists for dall-e-3; the image count is what there is to price.
    check(row, provider="openai", model="dall-e-3", tokens={}, cost=None, units={"images": 1.0})


def test_openai_audio(stack: RunningTollgate, database_url: str, tmp_path: Path) -> None:
    c = oai(stack)
    audio = tmp_path / "clip.mp3"
    audio.write_bytes(b"ID3" + b"\x00" * 2000)
    raw = c.audio.transcriptions.with_raw_response.create(
        model="whisper-1", file=audio, response_format="json"
    )
    transcription = raw.parse()
    seconds = transcription.usage.seconds  # type: ignore[union-attr]
    check(
        row_for(database_url, raw.headers["x-tollgate-request-id"]),
        provider="openai",
        model="whisper-1",
        tokens={},
        cost=None,
        units={"audio_seconds": float(seconds)},
    )
    raw = c.audio.transcriptions.with_raw_response.create(model="gpt-4o-transcribe", file=audio)
    usage = raw.parse().usage
    t = {
        "input_tokens": usage.input_tokens,  # type: ignore[union-attr]
        "output_tokens": usage.output_tokens,  # type: ignore[union-attr]
        "total_tokens": usage.total_tokens,  # type: ignore[union-attr]
    }
    check(
        row_for(database_url, raw.headers["x-tollgate-request-id"]),
        provider="openai",
        model="gpt-4o-transcribe",
        tokens=t,
        cost=genai_cost(
            "openai",
            "gpt-4o-transcribe",
            input_tokens=t["input_tokens"],
            output_tokens=t["output_tokens"],
        ),
    )
    text = "Read this ledger aloud, please."
    raw_speech = c.audio.speech.with_raw_response.create(model="tts-1", voice="alloy", input=text)
    assert raw_speech.content
    check(
        row_for(database_url, raw_speech.headers["x-tollgate-request-id"]),
        provider="openai",
        model="tts-1",
        tokens={},
        cost=None,
        units={"characters": float(len(text))},
    )


def test_anthropic_messages(stack: RunningTollgate, database_url: str) -> None:
    client = anthropic.Anthropic(
        base_url=stack.envoy_url.removesuffix("/v1"),
        api_key="sk-ant-app",
        default_headers={"x-tollgate-user-id": "formats"},
        max_retries=0,
    )
    system = [{"type": "text", "text": "You keep ledgers.", "cache_control": {"type": "ephemeral"}}]
    raw = client.messages.with_raw_response.create(
        model="claude-haiku-4-5",
        max_tokens=64,
        messages=MESSAGES,
        system=system,  # type: ignore[arg-type]
    )
    check_anthropic(database_url, raw.headers["x-tollgate-request-id"], raw.parse())
    with client.messages.stream(
        model="claude-haiku-4-5",
        max_tokens=64,
        messages=MESSAGES,  # type: ignore[arg-type]
    ) as stream:
        request_id = stream.response.headers["x-tollgate-request-id"]
        final = stream.get_final_message()
    check_anthropic(database_url, request_id, final)


def check_anthropic(database_url: str, request_id: str, message: Any) -> None:
    """The row of an Anthropic call against the usage the SDK saw: tokens as Anthropic
    reports them, cost with the input counted as genai-prices counts it (cache included)."""
    u = message.usage
    check(
        row_for(database_url, request_id),
        provider="anthropic",
        model=message.model,
        tokens={
            "input_tokens": u.input_tokens,
            "cached_input_tokens": u.cache_read_input_tokens,
            "cache_write_tokens": u.cache_creation_input_tokens,
            "output_tokens": u.output_tokens,
        },
        cost=genai_cost(
            "anthropic",
            message.model,
            input_tokens=u.input_tokens
            + (u.cache_read_input_tokens or 0)
            + (u.cache_creation_input_tokens or 0),
            output_tokens=u.output_tokens,
            cache_read_tokens=u.cache_read_input_tokens,
            cache_write_tokens=u.cache_creation_input_tokens,
        ),
    )


def post_json(url: str, body: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "x-tollgate-user-id": "formats"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        return {k.lower(): v for k, v in r.getheaders()}, r.read()


def gemini_tokens(meta: dict[str, Any]) -> dict[str, int | None]:
    return {
        "input_tokens": meta.get("promptTokenCount"),
        "cached_input_tokens": meta.get("cachedContentTokenCount"),
        "output_tokens": meta.get("candidatesTokenCount"),
        "reasoning_tokens": meta.get("thoughtsTokenCount"),
        "total_tokens": meta.get("totalTokenCount"),
    }


def test_gemini_generate_content(stack: RunningTollgate, database_url: str) -> None:
    root = stack.envoy_url.removesuffix("/v1")
    body = {"contents": [{"role": "user", "parts": [{"text": "Hello"}]}]}
    headers, data = post_json(f"{root}/v1beta/models/gemini-2.0-flash:generateContent", body)
    reply = json.loads(data)
    t = gemini_tokens(reply["usageMetadata"])
    row = row_for(database_url, headers["x-tollgate-request-id"])
    check(
        row,
        provider="gemini",
        model=reply["modelVersion"],
        tokens=t,
        cost=gemini_cost(reply["modelVersion"], t),
    )
    headers, data = post_json(
        f"{root}/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", body
    )
    chunks = [
        json.loads(line[5:]) for line in data.decode().splitlines() if line.startswith("data:")
    ]
    t = gemini_tokens(chunks[-1]["usageMetadata"])
    assert t["reasoning_tokens"], "the fake reports thoughts for 2.5 models"
    row = row_for(database_url, headers["x-tollgate-request-id"])
    model = chunks[-1]["modelVersion"]
    check(row, provider="gemini", model=model, tokens=t, cost=gemini_cost(model, t))
    assert row["streamed"] is True


def gemini_cost(model: str, t: dict[str, int | None]) -> Decimal | None:
    """genai-prices' price: Google bills thoughts as output (they are not in candidates)."""
    return genai_cost(
        "google",
        model,
        input_tokens=t["input_tokens"],
        output_tokens=(t["output_tokens"] or 0) + (t["reasoning_tokens"] or 0),
        cache_read_tokens=t["cached_input_tokens"],
    )


def test_bedrock_converse(stack: RunningTollgate, database_url: str) -> None:
    root = stack.envoy_url.removesuffix("/v1")
    model = "anthropic.claude-3-haiku-20240307-v1:0"
    body = {"messages": [{"role": "user", "content": [{"text": "Hello"}]}]}
    headers, data = post_json(f"{root}/model/{model}/converse", body)
    usage = json.loads(data)["usage"]
    t = {
        "input_tokens": usage["inputTokens"],
        "output_tokens": usage["outputTokens"],
        "total_tokens": usage["totalTokens"],
        "cached_input_tokens": usage.get("cacheReadInputTokens"),
        "cache_write_tokens": usage.get("cacheWriteInputTokens"),
    }
    row = row_for(database_url, headers["x-tollgate-request-id"])
    # genai-prices counts Bedrock's cache reads and writes as input (they are not in it).
    cost = genai_cost(
        "aws",
        model,
        input_tokens=t["input_tokens"]
        + (t["cached_input_tokens"] or 0)
        + (t["cache_write_tokens"] or 0),  # type: ignore[operator]
        output_tokens=t["output_tokens"],
        cache_read_tokens=t["cached_input_tokens"],
        cache_write_tokens=t["cache_write_tokens"],
    )
    check(row, provider="bedrock", model=model, tokens=t, cost=cost)

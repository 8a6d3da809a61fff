"""The fake provider's Bedrock endpoints through boto3 and anthropic.AnthropicBedrock.

The SDKs parse the replies (boto3 checks every event-stream CRC), and Tollgate's parsers, fed
the very bytes the SDKs read, must see the same token counts. Expected counts follow the
rules in tollgate.fakeprovider's docstring."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import anthropic
import boto3
import httpx2
import pytest
from botocore.client import BaseClient
from botocore.exceptions import ClientError
from botocore.response import StreamingBody

from tollgate.fakeprovider import serve
from tollgate.metering.bedrock import bedrock_parser_for
from tollgate.metering.usage import ParsedResponse, RequestFacts, TokenUsage

CLAUDE = "anthropic.claude-3-5-haiku-20241022-v1:0"
PROFILE_ARN = (
    "arn:aws:bedrock:us-east-1:123456789012:inference-profile/"
    "us.anthropic.claude-3-5-haiku-20241022-v1:0"
)
LLAMA = "meta.llama3-8b-instruct-v1:0"
NOVA = "us.amazon.nova-lite-v1:0"
EVENT_STREAM = "application/vnd.amazon.eventstream"

MESSAGES: list[dict[str, Any]] = [
    {"role": "user", "content": [{"text": "Tell me about bridges."}]},
    {"role": "assistant", "content": [{"text": "Which kind?"}]},
    {"role": "user", "content": [{"text": "Stone ones, por favor \u2014 \U0001f309"}]},
]
CHARS = len("Tell me about bridges.Which kind?Stone ones, por favor \u2014 \U0001f309")
SYSTEM_TEXT = "You are a patient guide to old stone bridges and the rivers under them. " * 4
CLAUDE_MESSAGES: list[dict[str, Any]] = [
    {"role": "user", "content": "Tell me about bridges."},
    {"role": "assistant", "content": [{"type": "text", "text": "Which kind?"}]},
    {"role": "user", "content": "Stone ones, por favor \u2014 \U0001f309"},
]
PROMPT = "Write one sentence about a stone bridge over a river."


def tokens(text: str) -> int:
    """T(n): one token per started group of four characters."""
    return math.ceil(len(text) / 4)


# -- the fake, the SDKs and what they read -------------------------------------------------


@pytest.fixture(scope="module")
def fake_url() -> Iterator[str]:
    """The fake provider on its own event loop in a thread: the SDKs here are synchronous."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner, port = asyncio.run_coroutine_threadsafe(serve("127.0.0.1", 0), loop).result(10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


class Wire:
    """The body bytes of every response an SDK read, in the chunks they arrived in."""

    def __init__(self) -> None:
        self.bodies: list[list[bytes]] = []

    def last(self) -> list[bytes]:
        return self.bodies[-1]


class _TeeStream:
    """botocore's raw event-stream body, its chunks kept as they pass to the SDK."""

    def __init__(self, raw: Any, chunks: list[bytes]) -> None:
        self._raw = raw
        self._chunks = chunks

    def stream(self) -> Iterator[bytes]:
        for chunk in self._raw.stream():
            self._chunks.append(chunk)
            yield chunk

    def close(self) -> None:
        self._raw.close()


@pytest.fixture
def wire() -> Wire:
    return Wire()


@pytest.fixture
def bedrock(fake_url: str, wire: Wire) -> Iterator[BaseClient]:
    client = boto3.client(
        "bedrock-runtime",
        endpoint_url=fake_url,
        region_name="us-east-1",
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="secret",
    )

    def keep_body(response_dict: dict[str, Any], **_: Any) -> None:
        chunks: list[bytes] = []
        wire.bodies.append(chunks)
        body = response_dict["body"]
        if isinstance(body, bytes):
            chunks.append(body)
        elif isinstance(body, StreamingBody):  # InvokeModel's blob
            data = body.read()
            chunks.append(data)
            response_dict["body"] = StreamingBody(io.BytesIO(data), len(data))
        else:  # an event stream
            response_dict["body"] = _TeeStream(body, chunks)

    client.meta.events.register("before-parse.bedrock-runtime", keep_body)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def claude(fake_url: str, wire: Wire) -> Iterator[anthropic.AnthropicBedrock]:
    def keep_body(response: httpx2.Response) -> None:
        response.read()
        wire.bodies.append([response.content])

    http = httpx2.Client(event_hooks={"response": [keep_body]})
    with anthropic.AnthropicBedrock(
        base_url=fake_url,
        aws_access_key="x",
        aws_secret_key="y",
        aws_region="us-east-1",
        max_retries=0,
        http_client=http,
    ) as sdk:
        yield sdk


def last_request(fake_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{fake_url}/_fake/requests") as resp:
        requests: list[dict[str, Any]] = json.load(resp)["requests"]
    return requests[-1]


def metered(fake_url: str, wire: Wire, *, streamed: bool) -> tuple[ParsedResponse, Any]:
    """What Tollgate meters from the last response's bytes, by the path the SDK called."""
    path = last_request(fake_url)["path"]
    parser = bedrock_parser_for(path, streamed=streamed, request=RequestFacts())
    assert parser is not None, path
    for chunk in wire.last():
        parser.feed(chunk)
    return parser.result(), parser


def converse_usage(usage: dict[str, Any]) -> TokenUsage:
    """The SDK's TokenUsage in Tollgate's terms."""
    return TokenUsage(
        input_tokens=usage["inputTokens"],
        output_tokens=usage["outputTokens"],
        total_tokens=usage["totalTokens"],
        cached_input_tokens=usage.get("cacheReadInputTokens"),
        cache_write_tokens=usage.get("cacheWriteInputTokens"),
    )


# -- Converse and ConverseStream -----------------------------------------------------------


def test_converse(bedrock: BaseClient, fake_url: str, wire: Wire) -> None:
    response = bedrock.converse(modelId=CLAUDE, messages=MESSAGES, system=[{"text": SYSTEM_TEXT}])

    usage = response["usage"]
    prompt = 3 * 3 + math.ceil(CHARS / 4) + tokens(SYSTEM_TEXT)
    words = response["output"]["message"]["content"][0]["text"].split(" ")
    assert usage == {
        "inputTokens": prompt,
        "outputTokens": len(words),
        "totalTokens": prompt + len(words),
    }
    result, parser = metered(fake_url, wire, streamed=False)
    assert result.usage == converse_usage(usage)
    assert result.model == CLAUDE
    assert parser.skipped_events == 0


def test_converse_stream(bedrock: BaseClient, fake_url: str, wire: Wire) -> None:
    system = [{"text": SYSTEM_TEXT}, {"cachePoint": {"type": "default"}}]
    request: dict[str, Any] = {"modelId": PROFILE_ARN, "messages": MESSAGES, "system": system}
    whole = bedrock.converse(**request)
    response = bedrock.converse_stream(**request)

    assert response["ResponseMetadata"]["HTTPHeaders"]["content-type"] == EVENT_STREAM
    events = list(response["stream"])
    kinds = [next(iter(event)) for event in events]
    assert kinds[0] == "messageStart"
    assert kinds[-3:] == ["contentBlockStop", "messageStop", "metadata"]
    text = "".join(e["contentBlockDelta"]["delta"]["text"] for e in events[1:-3])
    assert text == whole["output"]["message"]["content"][0]["text"]
    assert events[-2]["messageStop"]["stopReason"] == "end_turn"
    metadata = events[-1]["metadata"]
    assert isinstance(metadata["metrics"]["latencyMs"], int)
    usage = metadata["usage"]
    assert usage == whole["usage"]
    system_tokens = tokens(SYSTEM_TEXT)
    assert usage["cacheReadInputTokens"] == system_tokens - system_tokens // 3
    assert usage["outputTokens"] == len(text.split(" "))

    result, parser = metered(fake_url, wire, streamed=True)
    assert result.usage == converse_usage(usage)
    assert result.model == "us.anthropic.claude-3-5-haiku-20241022-v1:0"
    assert parser.complete
    assert parser.skipped_events == 0
    assert parser.exception is None
    assert "%2F" in last_request(fake_url)["path"]


def test_converse_stream_output_limit(bedrock: BaseClient, fake_url: str, wire: Wire) -> None:
    response = bedrock.converse_stream(
        modelId=NOVA, messages=MESSAGES, inferenceConfig={"maxTokens": 2}
    )
    events = list(response["stream"])
    assert events[-2]["messageStop"]["stopReason"] == "max_tokens"
    assert events[-1]["metadata"]["usage"]["outputTokens"] == 2
    result, _ = metered(fake_url, wire, streamed=True)
    assert result.usage.output_tokens == 2


def test_converse_stream_errors_before_the_stream(bedrock: BaseClient) -> None:
    with pytest.raises(ClientError, match="ValidationException"):
        bedrock.converse_stream(modelId=CLAUDE, messages=[])


# -- InvokeModel and InvokeModelWithResponseStream -----------------------------------------

CLAUDE_BODY: dict[str, Any] = {
    "anthropic_version": "bedrock-2023-05-31",
    "max_tokens": 200,
    "system": "Be terse.",
    "messages": CLAUDE_MESSAGES,
}
CLAUDE_PROMPT = 3 * 3 + math.ceil(CHARS / 4) + tokens("Be terse.")


def vendor_counts(model: str, body: dict[str, Any]) -> tuple[int, int]:
    """(input, output) as the vendor's InvokeModel body reports them."""
    if model.startswith("meta."):
        return body["prompt_token_count"], body["generation_token_count"]
    if "nova" in model:
        return body["usage"]["inputTokens"], body["usage"]["outputTokens"]
    return body["usage"]["input_tokens"], body["usage"]["output_tokens"]


INVOKE_CASES = [
    (CLAUDE, CLAUDE_BODY, CLAUDE_PROMPT),
    (LLAMA, {"prompt": PROMPT, "max_gen_len": 100}, tokens(PROMPT)),
    (
        NOVA,
        {"schemaVersion": "messages-v1", "messages": MESSAGES, "system": [{"text": "Be terse."}]},
        CLAUDE_PROMPT,
    ),
]


@pytest.mark.parametrize(("model", "body", "prompt"), INVOKE_CASES, ids=["claude", "llama", "nova"])
def test_invoke_model(
    bedrock: BaseClient, fake_url: str, wire: Wire, model: str, body: dict[str, Any], prompt: int
) -> None:
    response = bedrock.invoke_model(modelId=model, body=json.dumps(body))

    assert response["contentType"] == "application/json"
    reply = json.loads(response["body"].read())
    input_tokens, output_tokens = vendor_counts(model, reply)
    assert input_tokens == prompt
    assert 5 <= output_tokens <= 40
    headers = response["ResponseMetadata"]["HTTPHeaders"]
    assert headers["x-amzn-bedrock-input-token-count"] == str(input_tokens)
    assert headers["x-amzn-bedrock-output-token-count"] == str(output_tokens)
    result, parser = metered(fake_url, wire, streamed=False)
    assert result.usage.input_tokens == input_tokens
    assert result.usage.output_tokens == output_tokens
    assert result.model == model
    assert parser.skipped_events == 0


def stream_counts(model: str, chunks: list[dict[str, Any]]) -> tuple[int, int]:
    """(input, output) as the vendor's stream chunks report them."""
    if model.startswith("meta."):
        return chunks[0]["prompt_token_count"], chunks[-1]["generation_token_count"]
    if "nova" in model:
        usage = chunks[-1]["metadata"]["usage"]
        return usage["inputTokens"], usage["outputTokens"]
    start = next(c for c in chunks if c["type"] == "message_start")
    delta = next(c for c in chunks if c["type"] == "message_delta")
    return start["message"]["usage"]["input_tokens"], delta["usage"]["output_tokens"]


@pytest.mark.parametrize(("model", "body", "prompt"), INVOKE_CASES, ids=["claude", "llama", "nova"])
def test_invoke_model_with_response_stream(
    bedrock: BaseClient, fake_url: str, wire: Wire, model: str, body: dict[str, Any], prompt: int
) -> None:
    whole = json.loads(bedrock.invoke_model(modelId=model, body=json.dumps(body))["body"].read())
    response = bedrock.invoke_model_with_response_stream(modelId=model, body=json.dumps(body))

    assert response["contentType"] == "application/json"
    assert response["ResponseMetadata"]["HTTPHeaders"]["content-type"] == EVENT_STREAM
    chunks = [json.loads(event["chunk"]["bytes"]) for event in response["body"]]
    counts = stream_counts(model, chunks)
    assert counts == vendor_counts(model, whole)
    metrics = chunks[-1]["amazon-bedrock-invocationMetrics"]
    assert (metrics["inputTokenCount"], metrics["outputTokenCount"]) == counts
    assert metrics["invocationLatency"] >= metrics["firstByteLatency"] >= 1

    result, parser = metered(fake_url, wire, streamed=True)
    assert (result.usage.input_tokens, result.usage.output_tokens) == counts
    assert result.model == model
    assert parser.complete
    assert parser.skipped_events == 0
    # Streamed or not, the same request meters the same (but for the total that Nova's
    # InvokeModel body reports and its stream does not).
    not_streamed = bedrock_parser_for(
        f"/model/{model}/invoke", streamed=False, request=RequestFacts()
    )
    assert not_streamed is not None
    not_streamed.feed(json.dumps(whole).encode())
    assert replace(not_streamed.result().usage, total_tokens=None) == result.usage


def test_invoke_stream_chunks_are_base64_json(bedrock: BaseClient, wire: Wire) -> None:
    response = bedrock.invoke_model_with_response_stream(
        modelId=LLAMA, body=json.dumps({"prompt": PROMPT, "max_gen_len": 3})
    )
    chunks = [json.loads(event["chunk"]["bytes"]) for event in response["body"]]
    assert [c["generation_token_count"] for c in chunks] == [1, 2, 3, 3]
    assert chunks[-1]["stop_reason"] == "length"
    raw = b"".join(wire.last())
    # The wire carries each chunk as {"bytes": base64, "p": padding}, as AWS sends it.
    assert base64.b64encode(json.dumps(chunks[0], separators=(",", ":")).encode()) in raw
    assert b'"p":"abc' in raw


@pytest.mark.parametrize(
    ("model", "body", "message"),
    [
        ("cohere.command-r-v1:0", {"message": "hi"}, "model identifier is invalid"),
        (CLAUDE, {"max_tokens": 5, "messages": []}, r"required key \[anthropic_version\]"),
        (CLAUDE, {"anthropic_version": "x", "messages": []}, r"required key \[max_tokens\]"),
        (LLAMA, {"max_gen_len": 5}, r"required key \[prompt\]"),
        (NOVA, {"messages": []}, r"required key \[messages\]"),
    ],
)
def test_invoke_errors(bedrock: BaseClient, model: str, body: dict[str, Any], message: str) -> None:
    with pytest.raises(ClientError, match=message) as raised:
        bedrock.invoke_model(modelId=model, body=json.dumps(body))
    assert raised.value.response["Error"]["Code"] == "ValidationException"
    with pytest.raises(ClientError, match=message):
        bedrock.invoke_model_with_response_stream(modelId=model, body=json.dumps(body))


def test_invoke_claude_prompt_cache(bedrock: BaseClient, fake_url: str, wire: Wire) -> None:
    system = [{"type": "text", "text": SYSTEM_TEXT, "cache_control": {"type": "ephemeral"}}]
    body = {**CLAUDE_BODY, "system": system}
    response = bedrock.invoke_model(modelId=CLAUDE, body=json.dumps(body))
    usage = json.loads(response["body"].read())["usage"]
    system_tokens = tokens(SYSTEM_TEXT)
    assert usage["input_tokens"] == 3 * 3 + math.ceil(CHARS / 4)
    assert usage["cache_read_input_tokens"] == system_tokens - system_tokens // 3
    assert usage["cache_creation_input_tokens"] == system_tokens // 3
    headers = response["ResponseMetadata"]["HTTPHeaders"]
    read = headers["x-amzn-bedrock-cache-read-input-token-count"]
    assert read == str(usage["cache_read_input_tokens"])
    result, _ = metered(fake_url, wire, streamed=False)
    assert result.usage == TokenUsage(
        input_tokens=usage["input_tokens"],
        cached_input_tokens=usage["cache_read_input_tokens"],
        cache_write_tokens=usage["cache_creation_input_tokens"],
        output_tokens=usage["output_tokens"],
    )

    stream = bedrock.invoke_model_with_response_stream(modelId=CLAUDE, body=json.dumps(body))
    chunks = [json.loads(event["chunk"]["bytes"]) for event in stream["body"]]
    metrics = chunks[-1]["amazon-bedrock-invocationMetrics"]
    assert metrics["cacheReadInputTokenCount"] == usage["cache_read_input_tokens"]
    assert metrics["cacheWriteInputTokenCount"] == usage["cache_creation_input_tokens"]
    streamed, _ = metered(fake_url, wire, streamed=True)
    assert streamed.usage == result.usage


# -- anthropic.AnthropicBedrock ------------------------------------------------------------


def test_anthropic_bedrock_create(
    claude: anthropic.AnthropicBedrock, fake_url: str, wire: Wire
) -> None:
    message = claude.messages.create(
        model=CLAUDE, max_tokens=200, system="Be terse.", messages=CLAUDE_MESSAGES
    )

    assert message.model == "claude-3-5-haiku-20241022"
    assert message.id.startswith("msg_bdrk_")
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == CLAUDE_PROMPT
    block = message.content[0]
    assert block.type == "text"
    assert message.usage.output_tokens == len(block.text.split(" "))
    request = last_request(fake_url)
    assert request["path"] == "/model/anthropic.claude-3-5-haiku-20241022-v1:0/invoke"
    assert request["model"] == CLAUDE
    result, _ = metered(fake_url, wire, streamed=False)
    assert result.usage == TokenUsage(
        input_tokens=message.usage.input_tokens,
        cached_input_tokens=message.usage.cache_read_input_tokens,
        cache_write_tokens=message.usage.cache_creation_input_tokens,
        output_tokens=message.usage.output_tokens,
    )
    assert result.model == CLAUDE


def test_anthropic_bedrock_stream(
    claude: anthropic.AnthropicBedrock, fake_url: str, wire: Wire
) -> None:
    system: Any = [{"type": "text", "text": SYSTEM_TEXT, "cache_control": {"type": "ephemeral"}}]
    with claude.messages.stream(
        model=PROFILE_ARN, max_tokens=4, system=system, messages=CLAUDE_MESSAGES
    ) as stream:
        text = "".join(stream.text_stream)
        message = stream.get_final_message()

    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 4
    assert len(text.split(" ")) == 4
    system_tokens = tokens(SYSTEM_TEXT)
    assert message.usage.cache_read_input_tokens == system_tokens - system_tokens // 3
    request = last_request(fake_url)
    assert request["path"].endswith("/invoke-with-response-stream")
    assert "%2F" in request["path"]
    result, parser = metered(fake_url, wire, streamed=True)
    assert result.usage == TokenUsage(
        input_tokens=message.usage.input_tokens,
        cached_input_tokens=message.usage.cache_read_input_tokens,
        cache_write_tokens=message.usage.cache_creation_input_tokens,
        output_tokens=message.usage.output_tokens,
    )
    assert result.model == "us.anthropic.claude-3-5-haiku-20241022-v1:0"
    assert parser.complete

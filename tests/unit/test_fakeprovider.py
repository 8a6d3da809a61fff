"""Tests for the fake provider upstream, driven through the official openai and anthropic SDKs."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import math
import select
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from tollgate.fakeprovider import serve

MESSAGES: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say something about bridges, please."},
]


@pytest.fixture
async def port() -> AsyncIterator[int]:
    runner, bound = await serve("127.0.0.1", 0)
    try:
        yield bound
    finally:
        await runner.cleanup()


@pytest.fixture
async def client(port: int) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="test", max_retries=0)
    try:
        yield sdk
    finally:
        await sdk.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def recorded(http: aiohttp.ClientSession, port: int) -> dict[str, Any]:
    async with http.get(f"http://127.0.0.1:{port}/_fake/requests") as resp:
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


async def clear(http: aiohttp.ClientSession, port: int) -> None:
    async with http.delete(f"http://127.0.0.1:{port}/_fake/requests") as resp:
        assert resp.status == 200


async def stream_events(
    http: aiohttp.ClientSession, port: int, payload: dict[str, Any]
) -> tuple[aiohttp.ClientResponse, list[bytes]]:
    """POST a streaming request and split the raw body into SSE events."""
    async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=payload) as resp:
        raw = await resp.read()
    assert raw.endswith(b"\n\n")
    return resp, raw[: -len(b"\n\n")].split(b"\n\n")


# -- non-streaming -------------------------------------------------------------------------


async def test_non_streaming_completion_shape_and_usage(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o-mini"
    assert completion.system_fingerprint == "fp_tollgate_fake"
    assert isinstance(completion.created, int)
    assert abs(completion.created - time.time()) < 60
    choice = completion.choices[0]
    assert choice.index == 0
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.refusal is None
    content = choice.message.content
    assert content is not None
    assert content == content.strip()
    words = content.split(" ")
    assert all(words)
    assert 5 <= len(words) <= 40

    usage = completion.usage
    assert usage is not None
    chars = sum(len(m["content"]) for m in MESSAGES)
    assert usage.prompt_tokens == 3 * len(MESSAGES) + math.ceil(chars / 4)
    assert usage.completion_tokens == len(words)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert usage.prompt_tokens_details.audio_tokens == 0
    details = usage.completion_tokens_details
    assert details is not None
    assert details.reasoning_tokens == 0
    assert details.accepted_prediction_tokens == 0
    assert details.rejected_prediction_tokens == 0


async def test_same_request_same_reply_and_different_messages_differ(
    client: openai.AsyncOpenAI,
) -> None:
    first = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    second = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    other = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Something else entirely."}]
    )
    other_model = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)

    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.usage == second.usage
    assert first.id == second.id
    assert other.choices[0].message.content != first.choices[0].message.content
    assert other.id != first.id
    assert other_model.choices[0].message.content != first.choices[0].message.content
    assert other_model.model == "gpt-4o"


async def test_prompt_tokens_count_text_parts(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "abcde"},
                    {"type": "text", "text": "fgh"},
                ],
            }
        ],
    )
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 3 + math.ceil(8 / 4)


async def test_max_tokens_caps_reply_and_sets_length(client: openai.AsyncOpenAI) -> None:
    full = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    capped = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=3
    )
    capped_new = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_completion_tokens=2
    )
    roomy = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=1000
    )

    full_words = (full.choices[0].message.content or "").split(" ")
    assert capped.choices[0].finish_reason == "length"
    assert (capped.choices[0].message.content or "").split(" ") == full_words[:3]
    assert capped.usage is not None
    assert capped.usage.completion_tokens == 3
    assert capped_new.usage is not None
    assert capped_new.usage.completion_tokens == 2
    assert roomy.choices[0].finish_reason == "stop"
    assert roomy.choices[0].message.content == full.choices[0].message.content


async def test_model_defaults_when_absent(port: int, http: aiohttp.ClientSession) -> None:
    async with http.post(
        f"http://127.0.0.1:{port}/v1/chat/completions", json={"messages": MESSAGES}
    ) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        body = await resp.json()
    assert body["model"] == "gpt-4o-mini"
    assert body["choices"][0]["logprobs"] is None


# -- streaming -----------------------------------------------------------------------------


async def test_stream_with_usage_matches_non_streaming(client: openai.AsyncOpenAI) -> None:
    plain = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    stream = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]

    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    first = chunks[0]
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    final = chunks[-1]
    assert final.choices == []
    assert final.usage == plain.usage
    assert all(c.usage is None for c in chunks[:-1])
    finishing = chunks[-2]
    assert finishing.choices[0].finish_reason == "stop"
    assert finishing.choices[0].delta.content is None
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == plain.choices[0].message.content
    # one content chunk per word, plus the role chunk, the finish chunk and the usage chunk
    assert plain.usage is not None
    assert len(chunks) == plain.usage.completion_tokens + 3


async def test_stream_without_usage_has_no_usage_chunk(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    )
    chunks = [chunk async for chunk in stream]

    assert chunks
    assert all(c.usage is None for c in chunks)
    assert all(len(c.choices) == 1 for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_stream_wire_format(port: int, http: aiohttp.ClientSession) -> None:
    payload = {
        "model": "gpt-4o-mini",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    resp, events = await stream_events(http, port, payload)

    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in resp.headers
    assert events[-1] == b"data: [DONE]"
    assert all(e.startswith(b"data: {") for e in events[:-1])
    objects = [json.loads(e[len(b"data: ") :]) for e in events[:-1]]
    assert all("usage" in o for o in objects)
    assert all(o["usage"] is None for o in objects[:-1])
    assert objects[0]["choices"][0]["delta"] == {
        "role": "assistant",
        "content": "",
        "refusal": None,
    }
    assert objects[-2]["choices"][0]["delta"] == {}
    assert objects[-1]["choices"] == []
    words = [o["choices"][0]["delta"]["content"] for o in objects[1:-2]]
    assert not words[0].startswith(" ")
    assert all(w.startswith(" ") and " " not in w[1:] for w in words[1:])
    assert objects[-1]["usage"]["completion_tokens"] == len(words)

    _, plain_events = await stream_events(http, port, {**payload, "stream_options": None})
    plain_objects = [json.loads(e[len(b"data: ") :]) for e in plain_events[:-1]]
    assert plain_events[-1] == b"data: [DONE]"
    assert all("usage" not in o for o in plain_objects)


# -- errors and other endpoints ------------------------------------------------------------


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
async def test_invalid_json_is_400(port: int, http: aiohttp.ClientSession, body: bytes) -> None:
    async with http.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 400
        assert resp.content_type == "application/json"
        error = (await resp.json())["error"]
    assert error["code"] == "invalid_json"
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None
    assert error["message"]


async def test_non_object_json_raises_bad_request_in_sdk(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.post(
            "/chat/completions", body="not json", cast_to=dict, options={"max_retries": 0}
        )
    assert caught.value.status_code == 400
    assert caught.value.code == "invalid_json"


async def test_missing_messages_is_400(port: int, http: aiohttp.ClientSession) -> None:
    async with http.post(
        f"http://127.0.0.1:{port}/v1/chat/completions", json={"model": "gpt-4o-mini"}
    ) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["code"] == "missing_required_parameter"
    assert error["param"] == "messages"


async def test_models_list(client: openai.AsyncOpenAI) -> None:
    models = [m async for m in client.models.list()]
    ids = {m.id for m in models}
    assert "gpt-4o-mini" in ids
    assert all(m.object == "model" for m in models)


async def test_unknown_path_is_404_and_only_v1_is_recorded(
    port: int, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"http://127.0.0.1:{port}/v1/nope?x=1") as resp:
        assert resp.status == 404
        error = (await resp.json())["error"]
    assert error["code"] == "not_found"
    assert error["type"] == "invalid_request_error"
    async with http.post(f"http://127.0.0.1:{port}/elsewhere", data=b"abc") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"

    requests = (await recorded(http, port))["requests"]
    assert [(r["method"], r["path"]) for r in requests] == [("GET", "/v1/nope?x=1")]


async def test_health(port: int, http: aiohttp.ClientSession) -> None:
    async with http.get(f"http://127.0.0.1:{port}/_fake/health") as resp:
        assert resp.status == 200
        assert await resp.text() == "ok"
    assert (await recorded(http, port))["requests"] == []


# -- recording -----------------------------------------------------------------------------


async def test_recording_keeps_repeated_and_custom_headers(
    port: int, http: aiohttp.ClientSession, client: openai.AsyncOpenAI
) -> None:
    body = json.dumps({"messages": MESSAGES}).encode()
    async with http.post(
        f"http://127.0.0.1:{port}/v1/chat/completions?trace=1",
        data=body,
        headers=[("X-Tag", "one"), ("X-Tag", "two"), ("Content-Type", "application/json")],
    ) as resp:
        assert resp.status == 200
    await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_headers={"X-Tollgate-User": "alice"}
    )

    requests = (await recorded(http, port))["requests"]
    assert len(requests) == 2
    raw, sdk = requests
    assert raw["method"] == "POST"
    assert raw["path"] == "/v1/chat/completions?trace=1"
    assert raw["body_length"] == len(body)
    assert ["x-tag", "one"] in raw["headers"]
    assert ["x-tag", "two"] in raw["headers"]
    assert [h for h in raw["headers"] if h[0] == "x-tag"] == [["x-tag", "one"], ["x-tag", "two"]]
    assert sdk["path"] == "/v1/chat/completions"
    assert ["x-tollgate-user", "alice"] in sdk["headers"]
    assert ["authorization", "Bearer test"] in sdk["headers"]
    assert all(name == name.lower() for name, _ in sdk["headers"])
    content_length = dict(sdk["headers"])["content-length"]
    assert sdk["body_length"] == int(content_length) > 0


async def test_recording_decodes_non_ascii_header_bytes(
    port: int, http: aiohttp.ClientSession
) -> None:
    request = (
        b"GET /v1/models HTTP/1.1\r\n"
        b"Host: 127.0.0.1\r\n"
        b"X-Name: caf\xe9\r\n"
        b"Connection: close\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        reply = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()
    assert reply.startswith(b"HTTP/1.1 200")

    requests = (await recorded(http, port))["requests"]
    assert ["x-name", "caf\u00e9"] in requests[0]["headers"]


async def test_clear_and_connection_count(port: int, http: aiohttp.ClientSession) -> None:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    state = await recorded(http, port)
    assert state == {"requests": [], "connections": 0}

    # three requests over one kept-alive connection
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as one:
        for _ in range(3):
            async with one.post(url, json={"messages": MESSAGES}) as resp:
                assert resp.status == 200
    state = await recorded(http, port)
    assert len(state["requests"]) == 3
    assert state["connections"] == 1

    # a second client opens a second connection
    async with aiohttp.ClientSession() as two, two.get(f"http://127.0.0.1:{port}/v1/models") as r:
        assert r.status == 200
    assert (await recorded(http, port))["connections"] == 2

    await clear(http, port)
    assert await recorded(http, port) == {"requests": [], "connections": 0}


async def test_bounded_to_given_host() -> None:
    runner, bound = await serve("127.0.0.1", 0)
    try:
        assert bound > 0
        assert runner.addresses == [("127.0.0.1", bound)]
    finally:
        await runner.cleanup()


# -- delays --------------------------------------------------------------------------------


async def test_latency_and_chunk_delay(http: aiohttp.ClientSession) -> None:
    runner, bound = await serve("127.0.0.1", 0, latency_ms=200, chunk_delay_ms=20)
    try:
        url = f"http://127.0.0.1:{bound}/v1/chat/completions"
        started = time.monotonic()
        async with http.post(url, json={"messages": MESSAGES}) as resp:
            usage = (await resp.json())["usage"]
        assert time.monotonic() - started >= 0.2

        started = time.monotonic()
        async with http.post(url, json={"messages": MESSAGES, "stream": True}) as resp:
            await resp.read()
        # latency, then role + words + finish + [DONE] events with a delay between each
        events = usage["completion_tokens"] + 3
        assert time.monotonic() - started >= 0.2 + (events - 1) * 0.02
    finally:
        await runner.cleanup()


# -- command line --------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_module_prints_address_and_exits_cleanly(signum: signal.Signals) -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "tollgate.fakeprovider", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready, "fake provider did not print its address in time"
            line = proc.stdout.readline().decode()
            prefix = "fake provider listening on http://127.0.0.1:"
            assert line.startswith(prefix)
            assert line.endswith("\n")
            port = int(line[len(prefix) :])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_fake/health", timeout=5) as r:
                assert r.read() == b"ok"

            proc.send_signal(signum)
            rest, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert rest == b""
    assert b"Traceback" not in err


# == formats beyond chat completions ========================================================
#
# Every reply below is parsed by the provider's official SDK where one exists (openai,
# anthropic); Gemini and Bedrock are read as plain HTTP. Expected token counts follow the
# rules in the module docstring of tollgate.fakeprovider.


def tokens(text: str) -> int:
    """T(n): one token per started group of four characters."""
    return math.ceil(len(text) / 4)


def split_sse(raw: bytes, separator: bytes = b"\n\n") -> list[tuple[str | None, Any]]:
    """Raw SSE bytes as (event name, decoded data) pairs; ``[DONE]`` stays a string."""
    assert raw.endswith(separator)
    events: list[tuple[str | None, Any]] = []
    for block in raw[: -len(separator)].split(separator):
        lines = block.decode().splitlines()
        names = [line[len("event: ") :] for line in lines if line.startswith("event: ")]
        data = "\n".join(line[len("data: ") :] for line in lines if line.startswith("data: "))
        events.append((names[0] if names else None, data if data == "[DONE]" else json.loads(data)))
    return events


@pytest.fixture
async def claude(port: int) -> AsyncIterator[anthropic.AsyncAnthropic]:
    sdk = anthropic.AsyncAnthropic(
        base_url=f"http://127.0.0.1:{port}", api_key="test-key", max_retries=0
    )
    try:
        yield sdk
    finally:
        await sdk.close()


CLAUDE = "claude-haiku-4-5"
PROMPT = "Write one sentence about a stone bridge over a river."


# -- OpenAI legacy completions -------------------------------------------------------------


async def test_legacy_completion_usage_and_default_limit(client: openai.AsyncOpenAI) -> None:
    roomy = await client.completions.create(
        model="gpt-3.5-turbo-instruct", prompt=PROMPT, max_tokens=100
    )
    default = await client.completions.create(model="gpt-3.5-turbo-instruct", prompt=PROMPT)

    assert roomy.object == "text_completion"
    assert roomy.id.startswith("cmpl-")
    words = roomy.choices[0].text.split(" ")
    assert 5 <= len(words) <= 40
    assert roomy.choices[0].finish_reason == "stop"
    assert roomy.usage is not None
    assert roomy.usage.prompt_tokens == tokens(PROMPT)
    assert roomy.usage.completion_tokens == len(words)
    assert roomy.usage.total_tokens == tokens(PROMPT) + len(words)
    # max_tokens defaults to 16, as in OpenAI's API
    assert default.choices[0].text.split(" ") == words[:16]
    assert default.choices[0].finish_reason == ("length" if len(words) > 16 else "stop")
    assert default.usage is not None
    assert default.usage.completion_tokens == min(16, len(words))


async def test_legacy_completion_prompt_lists_and_token_arrays(client: openai.AsyncOpenAI) -> None:
    several = await client.completions.create(
        model="gpt-3.5-turbo-instruct", prompt=["ab", "cdefg"], max_tokens=100
    )
    token_array = await client.completions.create(
        model="gpt-3.5-turbo-instruct", prompt=[101, 102, 103], max_tokens=100
    )

    assert [c.index for c in several.choices] == [0, 1]
    assert several.usage is not None
    assert several.usage.prompt_tokens == 1 + 2
    assert several.usage.completion_tokens == sum(len(c.text.split(" ")) for c in several.choices)
    assert token_array.usage is not None
    assert token_array.usage.prompt_tokens == 3


async def test_legacy_completion_stream_usage_chunk(client: openai.AsyncOpenAI) -> None:
    plain = await client.completions.create(
        model="gpt-3.5-turbo-instruct", prompt=PROMPT, max_tokens=100
    )
    stream = await client.completions.create(
        model="gpt-3.5-turbo-instruct",
        prompt=PROMPT,
        max_tokens=100,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    quiet = await client.completions.create(
        model="gpt-3.5-turbo-instruct", prompt=PROMPT, max_tokens=100, stream=True
    )
    quiet_chunks = [chunk async for chunk in quiet]

    assert chunks[-1].choices == []
    assert chunks[-1].usage == plain.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].text for c in chunks[:-1]) == plain.choices[0].text
    assert all(c.usage is None and len(c.choices) == 1 for c in quiet_chunks)


# -- OpenAI responses ----------------------------------------------------------------------


async def test_responses_usage_and_shape(client: openai.AsyncOpenAI) -> None:
    response = await client.responses.create(
        model="gpt-4.1-mini", input=PROMPT, instructions="Be terse."
    )

    assert response.object == "response"
    assert response.id.startswith("resp_")
    assert response.status == "completed"
    assert [item.type for item in response.output] == ["message"]
    words = response.output_text.split(" ")
    assert 5 <= len(words) <= 40
    usage = response.usage
    assert usage is not None
    assert usage.input_tokens == 3 * 2 + tokens(PROMPT + "Be terse.")
    assert usage.output_tokens == len(words)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0
    assert usage.output_tokens_details.reasoning_tokens == 0


async def test_responses_reasoning_model_and_prompt_cache_key(client: openai.AsyncOpenAI) -> None:
    items: Any = [
        {"role": "user", "content": "First question."},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": [{"type": "input_text", "text": "Second question."}]},
    ]
    response = await client.responses.create(
        model="o4-mini", input=items, prompt_cache_key="team-a"
    )

    assert [item.type for item in response.output] == ["reasoning", "message"]
    words = len(response.output_text.split(" "))
    usage = response.usage
    assert usage is not None
    chars = len("First question.First answer.Second question.")
    assert usage.input_tokens == 3 * 3 + math.ceil(chars / 4)
    assert usage.input_tokens_details.cached_tokens == usage.input_tokens // 2
    assert usage.output_tokens_details.reasoning_tokens == 4 * words
    assert usage.output_tokens == 5 * words
    assert usage.total_tokens == usage.input_tokens + 5 * words


async def test_responses_stream_events(client: openai.AsyncOpenAI) -> None:
    plain = await client.responses.create(model="gpt-4.1-mini", input=PROMPT)
    stream = await client.responses.create(model="gpt-4.1-mini", input=PROMPT, stream=True)
    events = [event async for event in stream]

    types = [event.type for event in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == plain.output_text
    assert len(deltas) == len(plain.output_text.split(" "))
    first, last = events[0], events[-1]
    assert first.type == "response.created"
    assert first.response.usage is None
    assert last.type == "response.completed"
    assert last.response.usage == plain.usage
    assert last.response.output_text == plain.output_text


async def test_responses_stream_wire_format(port: int, http: aiohttp.ClientSession) -> None:
    payload = {"model": "gpt-4.1-mini", "input": PROMPT, "stream": True}
    async with http.post(f"http://127.0.0.1:{port}/v1/responses", json=payload) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = await resp.read()

    events = split_sse(raw)
    assert all(name == data["type"] for name, data in events)
    assert events[-1][0] == "response.completed"
    assert b"[DONE]" not in raw


async def test_responses_output_limit_makes_it_incomplete(client: openai.AsyncOpenAI) -> None:
    response = await client.responses.create(
        model="gpt-4.1-mini", input=PROMPT, max_output_tokens=3
    )
    stream = await client.responses.create(
        model="gpt-4.1-mini", input=PROMPT, max_output_tokens=3, stream=True
    )
    events = [event async for event in stream]

    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None
    assert response.usage.output_tokens == 3
    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.usage == response.usage


# -- OpenAI embeddings ---------------------------------------------------------------------


async def test_embeddings_usage_and_vectors(client: openai.AsyncOpenAI) -> None:
    # the SDK asks for base64 unless told otherwise, and decodes it
    packed = await client.embeddings.create(model="text-embedding-3-small", input=["abc", "defgh"])
    floats = await client.embeddings.create(
        model="text-embedding-3-small", input=["abc", "defgh"], encoding_format="float"
    )
    one = await client.embeddings.create(model="text-embedding-3-large", input="abc")
    small = await client.embeddings.create(
        model="text-embedding-3-small", input=[[1, 2, 3, 4, 5]], dimensions=8
    )

    assert packed.usage.prompt_tokens == packed.usage.total_tokens == 1 + 2
    assert [d.index for d in packed.data] == [0, 1]
    assert len(packed.data[0].embedding) == 1536
    assert all(-1 <= v < 1 for v in packed.data[0].embedding)
    assert [d.embedding for d in floats.data] == [d.embedding for d in packed.data]
    assert packed.data[0].embedding != packed.data[1].embedding
    assert len(one.data[0].embedding) == 3072
    assert one.usage.prompt_tokens == 1
    assert len(small.data[0].embedding) == 8
    assert small.usage.prompt_tokens == 5


async def test_embeddings_reject_empty_input(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        await client.embeddings.create(model="text-embedding-3-small", input="")


# -- OpenAI images -------------------------------------------------------------------------


async def test_gpt_image_usage(client: openai.AsyncOpenAI) -> None:
    low = await client.images.generate(
        model="gpt-image-1", prompt=PROMPT, n=2, quality="low", size="1024x1536"
    )
    auto = await client.images.generate(model="gpt-image-1", prompt=PROMPT)

    assert low.data is not None
    assert len(low.data) == 2
    image = low.data[0].b64_json
    assert image is not None
    assert base64.b64decode(image).startswith(b"\x89PNG\r\n\x1a\n")
    assert low.usage is not None
    assert low.usage.input_tokens == low.usage.input_tokens_details.text_tokens == tokens(PROMPT)
    assert low.usage.input_tokens_details.image_tokens == 0
    assert low.usage.output_tokens == 2 * 408
    assert low.usage.total_tokens == tokens(PROMPT) + 2 * 408
    assert auto.usage is not None
    assert auto.usage.output_tokens == 1056  # auto counts as medium, 1024x1024


async def test_dall_e_has_no_usage(client: openai.AsyncOpenAI) -> None:
    urls = await client.images.generate(model="dall-e-3", prompt=PROMPT)
    inline = await client.images.generate(
        model="dall-e-2", prompt=PROMPT, n=3, response_format="b64_json"
    )

    assert urls.usage is None
    assert urls.data is not None
    assert urls.data[0].url is not None
    assert urls.data[0].revised_prompt == PROMPT
    assert inline.usage is None
    assert inline.data is not None
    assert len(inline.data) == 3
    assert all(d.b64_json for d in inline.data)


# -- OpenAI audio --------------------------------------------------------------------------

AUDIO = ("speech.wav", b"RIFF" + bytes(range(256)) * 160, "audio/wav")  # 40,964 bytes: 3 s


async def test_whisper_transcription_reports_duration(client: openai.AsyncOpenAI) -> None:
    json_reply = await client.audio.transcriptions.create(model="whisper-1", file=AUDIO)
    text = await client.audio.transcriptions.create(
        model="whisper-1", file=AUDIO, response_format="text"
    )
    verbose = await client.audio.transcriptions.create(
        model="whisper-1", file=AUDIO, response_format="verbose_json"
    )
    srt = await client.audio.transcriptions.create(
        model="whisper-1", file=AUDIO, response_format="srt"
    )

    usage = json_reply.usage
    assert usage is not None
    assert usage.type == "duration"
    assert usage.seconds == 3
    assert 5 <= len(json_reply.text.split(" ")) <= 40
    assert text == json_reply.text
    assert verbose.duration == 3
    assert verbose.usage is not None
    assert verbose.usage.seconds == 3
    assert verbose.text == json_reply.text
    assert srt.startswith("1\n00:00:00,000 --> 00:00:03,000\n")


async def test_gpt_4o_transcription_reports_tokens(client: openai.AsyncOpenAI) -> None:
    reply = await client.audio.transcriptions.create(
        model="gpt-4o-transcribe", file=AUDIO, prompt="Names: Ada, Grace."
    )

    usage = reply.usage
    assert usage is not None
    assert usage.type == "tokens"
    assert usage.input_token_details is not None
    assert usage.input_token_details.audio_tokens == 10 * 3
    assert usage.input_token_details.text_tokens == tokens("Names: Ada, Grace.")
    assert usage.input_tokens == 30 + tokens("Names: Ada, Grace.")
    assert usage.output_tokens == len(reply.text.split(" "))
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


async def test_transcription_stream(client: openai.AsyncOpenAI) -> None:
    plain = await client.audio.transcriptions.create(model="gpt-4o-mini-transcribe", file=AUDIO)
    stream = await client.audio.transcriptions.create(
        model="gpt-4o-mini-transcribe", file=AUDIO, stream=True
    )
    events = [event async for event in stream]

    assert {e.type for e in events[:-1]} == {"transcript.text.delta"}
    assert "".join(e.delta for e in events if e.type == "transcript.text.delta") == plain.text
    done = events[-1]
    assert done.type == "transcript.text.done"
    assert done.text == plain.text
    assert done.usage is not None
    assert plain.usage is not None
    assert done.usage.model_dump() == plain.usage.model_dump()


async def test_transcription_wire_details(port: int, http: aiohttp.ClientSession) -> None:
    def form(**fields: str) -> aiohttp.FormData:
        data = aiohttp.FormData()
        data.add_field("file", AUDIO[1], filename=AUDIO[0], content_type=AUDIO[2])
        for name, value in fields.items():
            data.add_field(name, value)
        return data

    url = f"http://127.0.0.1:{port}/v1/audio/transcriptions"
    async with http.post(url, data=form(model="whisper-1", response_format="text")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
    # whisper-1 ignores "stream"
    async with http.post(url, data=form(model="whisper-1", stream="true")) as resp:
        assert resp.content_type == "application/json"
        assert (await resp.json())["usage"] == {"type": "duration", "seconds": 3}
    async with http.post(url, data=form(model="whisper-1", response_format="xml")) as resp:
        assert resp.status == 400
    async with http.post(url, data=form(response_format="json")) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "model"

    requests = (await recorded(http, port))["requests"]
    assert [r["model"] for r in requests] == ["whisper-1", "whisper-1", "whisper-1", None]


async def test_speech_returns_audio_bytes(client: openai.AsyncOpenAI) -> None:
    text = "Hello from the fake provider."
    mp3 = await client.audio.speech.create(model="gpt-4o-mini-tts", voice="alloy", input=text)
    again = await client.audio.speech.create(model="gpt-4o-mini-tts", voice="alloy", input=text)
    wav = await client.audio.speech.create(
        model="tts-1", voice="alloy", input=text + "!", response_format="wav"
    )

    assert mp3.response.headers["Content-Type"] == "audio/mpeg"
    assert len(mp3.content) == 64 * len(text)
    assert again.content == mp3.content
    assert wav.response.headers["Content-Type"] == "audio/wav"
    assert len(wav.content) == 64 * (len(text) + 1)


async def test_speech_sse_stream(client: openai.AsyncOpenAI) -> None:
    text = "Hello from the fake provider."
    instructions = "Speak slowly."
    audio = await client.audio.speech.create(
        model="gpt-4o-mini-tts", voice="alloy", input=text, instructions=instructions
    )
    sse = await client.audio.speech.create(
        model="gpt-4o-mini-tts",
        voice="alloy",
        input=text,
        instructions=instructions,
        stream_format="sse",
    )

    assert sse.response.headers["Content-Type"].startswith("text/event-stream")
    events = split_sse(sse.content)
    deltas = [data for _, data in events if data["type"] == "speech.audio.delta"]
    assert len(deltas) == math.ceil(64 * len(text) / 1024)
    assert b"".join(base64.b64decode(d["audio"]) for d in deltas) == audio.content
    name, done = events[-1]
    assert name is None
    assert done == {
        "type": "speech.audio.done",
        "usage": {
            "input_tokens": tokens(text) + tokens(instructions),
            "output_tokens": len(text),
            "total_tokens": tokens(text) + tokens(instructions) + len(text),
        },
    }


async def test_speech_sse_not_for_tts_1(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        await client.audio.speech.create(
            model="tts-1", voice="alloy", input="hi", stream_format="sse"
        )


# -- Anthropic -----------------------------------------------------------------------------

CLAUDE_MESSAGES: list[Any] = [
    {"role": "user", "content": "Tell me about bridges."},
    {"role": "assistant", "content": [{"type": "text", "text": "Which kind?"}]},
    {"role": "user", "content": "Stone ones."},
]
CLAUDE_CHARS = len("Tell me about bridges.Which kind?Stone ones.")
SYSTEM_TEXT = "You are a patient guide to old stone bridges and the rivers under them. " * 4


async def test_anthropic_message_without_cache(
    claude: anthropic.AsyncAnthropic, port: int, http: aiohttp.ClientSession
) -> None:
    message = await claude.messages.create(
        model=CLAUDE, max_tokens=100, system="Be terse.", messages=CLAUDE_MESSAGES
    )

    assert message.type == "message"
    assert message.role == "assistant"
    assert message.model == CLAUDE
    assert message.stop_reason == "end_turn"
    block = message.content[0]
    assert block.type == "text"
    words = block.text.split(" ")
    assert 5 <= len(words) <= 40
    usage = message.usage
    assert usage.input_tokens == 3 * 3 + math.ceil(CLAUDE_CHARS / 4) + tokens("Be terse.")
    assert usage.output_tokens == len(words)
    assert usage.cache_creation_input_tokens == 0
    assert usage.cache_read_input_tokens == 0

    # the classic header pair, as curl examples and older SDKs send it
    async with http.post(
        f"http://127.0.0.1:{port}/v1/messages",
        json={"model": CLAUDE, "max_tokens": 100, "messages": CLAUDE_MESSAGES},
        headers={"x-api-key": "raw-key", "anthropic-version": "2023-06-01"},
    ) as resp:
        assert resp.status == 200
        assert resp.headers["request-id"].startswith("req_")

    sdk, raw = (await recorded(http, port))["requests"]
    assert sdk["path"] == raw["path"] == "/v1/messages"
    assert sdk["model"] == raw["model"] == CLAUDE
    assert ["authorization", "Bearer test-key"] in sdk["headers"]
    assert any(name == "anthropic-version" for name, _ in sdk["headers"])
    assert ["x-api-key", "raw-key"] in raw["headers"]
    assert ["anthropic-version", "2023-06-01"] in raw["headers"]


async def test_anthropic_prompt_cache_counts(claude: anthropic.AsyncAnthropic) -> None:
    system: Any = [{"type": "text", "text": SYSTEM_TEXT, "cache_control": {"type": "ephemeral"}}]
    five_minutes = await claude.messages.create(
        model=CLAUDE, max_tokens=100, system=system, messages=CLAUDE_MESSAGES
    )
    system_1h: Any = [{**system[0], "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    one_hour = await claude.messages.create(
        model=CLAUDE, max_tokens=100, system=system_1h, messages=CLAUDE_MESSAGES
    )

    cached = tokens(SYSTEM_TEXT)
    usage = five_minutes.usage
    assert usage.input_tokens == 3 * 3 + math.ceil(CLAUDE_CHARS / 4)
    assert usage.cache_creation_input_tokens == cached // 3
    assert usage.cache_read_input_tokens == cached - cached // 3
    assert usage.cache_creation_input_tokens != usage.cache_read_input_tokens
    assert usage.cache_creation is not None
    assert usage.cache_creation.ephemeral_5m_input_tokens == cached // 3
    assert usage.cache_creation.ephemeral_1h_input_tokens == 0
    assert one_hour.usage.cache_creation is not None
    assert one_hour.usage.cache_creation.ephemeral_1h_input_tokens == cached // 3
    assert one_hour.usage.cache_creation.ephemeral_5m_input_tokens == 0


async def test_anthropic_max_tokens(claude: anthropic.AsyncAnthropic) -> None:
    message = await claude.messages.create(model=CLAUDE, max_tokens=2, messages=CLAUDE_MESSAGES)

    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 2


async def test_anthropic_stream_events(claude: anthropic.AsyncAnthropic) -> None:
    system: Any = [{"type": "text", "text": SYSTEM_TEXT, "cache_control": {"type": "ephemeral"}}]
    plain = await claude.messages.create(
        model=CLAUDE, max_tokens=100, system=system, messages=CLAUDE_MESSAGES
    )
    stream = await claude.messages.create(
        model=CLAUDE, max_tokens=100, system=system, messages=CLAUDE_MESSAGES, stream=True
    )
    events = [event async for event in stream]

    n_words = plain.usage.output_tokens
    assert [e.type for e in events] == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * n_words,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0]
    assert start.type == "message_start"
    assert start.message.content == []
    assert start.message.usage.output_tokens == 1
    assert start.message.usage.input_tokens == plain.usage.input_tokens
    assert start.message.usage.cache_read_input_tokens == plain.usage.cache_read_input_tokens
    assert (
        start.message.usage.cache_creation_input_tokens == plain.usage.cache_creation_input_tokens
    )
    delta = events[-2]
    assert delta.type == "message_delta"
    assert delta.delta.stop_reason == "end_turn"
    assert delta.usage.output_tokens == n_words

    async with claude.messages.stream(
        model=CLAUDE, max_tokens=100, system=system, messages=CLAUDE_MESSAGES
    ) as helper:
        final = await helper.get_final_message()
    assert final.usage == plain.usage
    assert [block.model_dump(exclude={"parsed_output"}) for block in final.content] == [
        block.model_dump() for block in plain.content
    ]


async def test_anthropic_stream_wire_format(port: int, http: aiohttp.ClientSession) -> None:
    payload = {"model": CLAUDE, "max_tokens": 100, "messages": CLAUDE_MESSAGES, "stream": True}
    async with http.post(f"http://127.0.0.1:{port}/v1/messages", json=payload) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = await resp.read()

    events = split_sse(raw)
    assert all(name == data["type"] for name, data in events)
    assert [name for name, _ in events[:3]] == ["message_start", "content_block_start", "ping"]
    assert events[-2][1]["usage"] == {"output_tokens": len(events) - 6}


async def test_anthropic_errors(claude: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        await claude.messages.create(
            model=CLAUDE,
            max_tokens=0,  # not a valid limit: treated as missing
            messages=CLAUDE_MESSAGES,
        )
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
    }


# -- Gemini --------------------------------------------------------------------------------

GEMINI_BODY: dict[str, Any] = {
    "systemInstruction": {"parts": [{"text": "Be terse."}]},
    "contents": [
        {"role": "user", "parts": [{"text": "Tell me about bridges."}]},
        {"role": "model", "parts": [{"text": "Which kind?"}]},
        {"role": "user", "parts": [{"text": "Stone ones."}, {"text": " Old ones."}]},
    ],
}
GEMINI_PROMPT = 3 * 3 + tokens("Be terse.Tell me about bridges.Which kind?Stone ones. Old ones.")


async def gemini(
    http: aiohttp.ClientSession, port: int, path: str, body: dict[str, Any] = GEMINI_BODY
) -> tuple[aiohttp.ClientResponse, bytes]:
    async with http.post(f"http://127.0.0.1:{port}{path}", json=body) as resp:
        return resp, await resp.read()


async def test_gemini_generate_content(port: int, http: aiohttp.ClientSession) -> None:
    resp, raw = await gemini(http, port, "/v1beta/models/gemini-2.0-flash:generateContent?key=k")

    assert resp.status == 200
    assert resp.content_type == "application/json"
    body = json.loads(raw)
    candidate = body["candidates"][0]
    assert candidate["content"]["role"] == "model"
    assert candidate["finishReason"] == "STOP"
    words = candidate["content"]["parts"][0]["text"].split(" ")
    assert 5 <= len(words) <= 40
    assert body["modelVersion"] == "gemini-2.0-flash"
    assert body["responseId"]
    usage = body["usageMetadata"]
    assert usage["promptTokenCount"] == GEMINI_PROMPT
    assert usage["candidatesTokenCount"] == len(words)
    assert usage["totalTokenCount"] == GEMINI_PROMPT + len(words)
    assert "thoughtsTokenCount" not in usage

    requests = (await recorded(http, port))["requests"]
    assert [(r["path"], r["model"]) for r in requests] == [
        ("/v1beta/models/gemini-2.0-flash:generateContent?key=k", "gemini-2.0-flash")
    ]


@pytest.mark.parametrize("model", ["gemini-2.5-flash", "gemini-2.0-flash-thinking-exp"])
async def test_gemini_thinking_models_report_thoughts(
    port: int, http: aiohttp.ClientSession, model: str
) -> None:
    _, raw = await gemini(http, port, f"/v1beta/models/{model}:generateContent")

    usage = json.loads(raw)["usageMetadata"]
    words = usage["candidatesTokenCount"]
    assert usage["thoughtsTokenCount"] == 4 * words
    assert usage["totalTokenCount"] == GEMINI_PROMPT + 5 * words


async def test_gemini_stream_sse(port: int, http: aiohttp.ClientSession) -> None:
    _, whole = await gemini(http, port, "/v1beta/models/gemini-2.5-pro:generateContent")
    resp, raw = await gemini(
        http, port, "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse"
    )

    assert resp.headers["Content-Type"].startswith("text/event-stream")
    chunks = [data for _, data in split_sse(raw, separator=b"\r\n\r\n")]
    plain = json.loads(whole)
    assert len(chunks) == plain["usageMetadata"]["candidatesTokenCount"]
    text = "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks)
    assert text == plain["candidates"][0]["content"]["parts"][0]["text"]
    counts = [c["usageMetadata"]["candidatesTokenCount"] for c in chunks]
    assert counts == list(range(1, len(chunks) + 1))
    assert chunks[-1]["usageMetadata"] == plain["usageMetadata"]
    assert all("finishReason" not in c["candidates"][0] for c in chunks[:-1])
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"


async def test_gemini_stream_json_array(port: int, http: aiohttp.ClientSession) -> None:
    _, whole = await gemini(http, port, "/v1beta/models/gemini-2.0-flash:generateContent")
    resp, raw = await gemini(http, port, "/v1beta/models/gemini-2.0-flash:streamGenerateContent")

    assert resp.content_type == "application/json"
    assert resp.headers.get("Transfer-Encoding") == "chunked"
    chunks = json.loads(raw)
    assert isinstance(chunks, list)
    assert chunks[-1]["usageMetadata"] == json.loads(whole)["usageMetadata"]


async def test_gemini_vertex_path_limit_and_errors(port: int, http: aiohttp.ClientSession) -> None:
    vertex = "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.0-flash"
    limited = {**GEMINI_BODY, "generationConfig": {"maxOutputTokens": 2}}
    resp, raw = await gemini(http, port, vertex + ":generateContent", limited)
    assert resp.status == 200
    body = json.loads(raw)
    assert body["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert body["usageMetadata"]["candidatesTokenCount"] == 2

    resp, raw = await gemini(http, port, vertex + ":countTokens")
    assert resp.status == 404
    assert json.loads(raw)["error"]["status"] == "NOT_FOUND"
    resp, raw = await gemini(http, port, vertex + ":generateContent", {"contents": []})
    assert resp.status == 400
    assert json.loads(raw)["error"]["status"] == "INVALID_ARGUMENT"


# -- Bedrock -------------------------------------------------------------------------------

BEDROCK_MODEL = "anthropic.claude-3-haiku-20240307-v1:0"
BEDROCK_BODY: dict[str, Any] = {
    "messages": [
        {"role": "user", "content": [{"text": "Tell me about bridges."}]},
        {"role": "assistant", "content": [{"text": "Which kind?"}]},
        {"role": "user", "content": [{"text": "Stone ones."}]},
    ],
    "system": [{"text": SYSTEM_TEXT}],
}


async def converse(
    http: aiohttp.ClientSession, port: int, body: dict[str, Any], model: str = BEDROCK_MODEL
) -> dict[str, Any]:
    quoted = urllib.parse.quote(model, safe="")
    async with http.post(f"http://127.0.0.1:{port}/model/{quoted}/converse", json=body) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        result: dict[str, Any] = await resp.json()
        return result


async def test_bedrock_converse(port: int, http: aiohttp.ClientSession) -> None:
    body = await converse(http, port, BEDROCK_BODY)

    message = body["output"]["message"]
    assert message["role"] == "assistant"
    words = message["content"][0]["text"].split(" ")
    assert 5 <= len(words) <= 40
    assert body["stopReason"] == "end_turn"
    prompt = 3 * 3 + math.ceil(CLAUDE_CHARS / 4) + tokens(SYSTEM_TEXT)
    assert body["usage"] == {
        "inputTokens": prompt,
        "outputTokens": len(words),
        "totalTokens": prompt + len(words),
    }
    assert isinstance(body["metrics"]["latencyMs"], int)


async def test_bedrock_cache_point_limit_and_arn(port: int, http: aiohttp.ClientSession) -> None:
    cached = {
        **BEDROCK_BODY,
        "system": [*BEDROCK_BODY["system"], {"cachePoint": {"type": "default"}}],
        "inferenceConfig": {"maxTokens": 3},
    }
    arn = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-v1"
    body = await converse(http, port, cached, model=arn)

    system = tokens(SYSTEM_TEXT)
    prompt = 3 * 3 + math.ceil(CLAUDE_CHARS / 4)
    assert body["stopReason"] == "max_tokens"
    assert body["usage"] == {
        "inputTokens": prompt,
        "outputTokens": 3,
        "totalTokens": prompt + 3 + system,
        "cacheReadInputTokens": system - system // 3,
        "cacheWriteInputTokens": system // 3,
    }
    requests = (await recorded(http, port))["requests"]
    assert requests[-1]["model"] == arn
    # the ARN's '/' travels percent-encoded (the client leaves ':' as it is)
    assert "%2F" in requests[-1]["path"]
    assert urllib.parse.unquote(requests[-1]["path"]) == f"/model/{arn}/converse"


# -- test knobs ----------------------------------------------------------------------------


async def test_gzip_knob_compresses_json(
    port: int, http: aiohttp.ClientSession, client: openai.AsyncOpenAI
) -> None:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    payload = {"messages": MESSAGES}
    async with aiohttp.ClientSession(auto_decompress=False) as raw_http:
        async with raw_http.post(
            url,
            json=payload,
            headers={"x-fake-content-encoding": "gzip", "Accept-Encoding": "identity"},
        ) as resp:
            assert resp.headers["Content-Encoding"] == "gzip"
            compressed = await resp.read()
        async with raw_http.post(url, json=payload) as resp:
            assert "Content-Encoding" not in resp.headers
            identity = await resp.read()

    assert compressed.startswith(b"\x1f\x8b")
    unzipped, plain = json.loads(gzip.decompress(compressed)), json.loads(identity)
    assert {**unzipped, "created": 0} == {**plain, "created": 0}
    # and an SDK, which decodes gzip whatever it asked for, still reads the usage
    completion = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        extra_headers={"x-fake-content-encoding": "gzip"},
    )
    assert completion.usage is not None
    assert completion.usage.model_dump(exclude_none=True) == plain["usage"]


async def test_gzip_knob_compresses_streams(port: int) -> None:
    url = f"http://127.0.0.1:{port}/v1/messages"
    payload = {"model": CLAUDE, "max_tokens": 100, "messages": CLAUDE_MESSAGES, "stream": True}
    async with aiohttp.ClientSession(auto_decompress=False) as raw_http:
        async with raw_http.post(
            url, json=payload, headers={"x-fake-content-encoding": "gzip"}
        ) as resp:
            assert resp.headers["Content-Encoding"] == "gzip"
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            compressed = await resp.read()
        async with raw_http.post(url, json=payload) as resp:
            identity = await resp.read()

    assert gzip.decompress(compressed) == identity


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("x-fake-chunk-delay-ms", "soon"),
        ("x-fake-chunk-delay-ms", "-5"),
        ("x-fake-content-encoding", "br"),
        ("x-fake-words", "0"),
        ("x-fake-words", "many"),
        ("x-fake-words", "100001"),
    ],
)
async def test_malformed_knob_is_400(
    port: int, http: aiohttp.ClientSession, name: str, value: str
) -> None:
    async with http.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={"messages": MESSAGES},
        headers={name: value},
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_fake_knob"
    assert (await recorded(http, port))["requests"] == []


async def test_chunk_delay_knob(port: int, http: aiohttp.ClientSession) -> None:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    payload = {"messages": MESSAGES, "stream": True}
    started = time.monotonic()
    async with http.post(url, json=payload, headers={"x-fake-chunk-delay-ms": "30"}) as resp:
        raw = await resp.read()
    elapsed = time.monotonic() - started

    events = raw.count(b"\n\n")
    assert elapsed >= (events - 1) * 0.03


async def test_words_knob_sets_the_reply_length(
    port: int, http: aiohttp.ClientSession, client: openai.AsyncOpenAI
) -> None:
    natural = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert natural.usage is not None
    natural_words = natural.usage.completion_tokens
    same = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        extra_headers={"x-fake-words": str(natural_words)},
    )
    # the knob at the natural length changes nothing but the length
    assert same.choices[0].message.content == natural.choices[0].message.content

    long = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_headers={"x-fake-words": "250"}
    )
    content = long.choices[0].message.content
    assert content is not None
    assert len(content.split(" ")) == 250
    assert content.startswith(natural.choices[0].message.content or "")
    assert long.usage is not None
    assert long.usage.completion_tokens == 250
    assert long.choices[0].finish_reason == "stop"

    capped = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        max_tokens=100,
        extra_headers={"x-fake-words": "250"},
    )
    assert capped.usage is not None
    assert capped.usage.completion_tokens == 100
    assert capped.choices[0].finish_reason == "length"

    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    payload = {"messages": MESSAGES, "stream": True}
    async with http.post(url, json=payload, headers={"x-fake-words": "250"}) as resp:
        raw = await resp.read()
    chunks = [json.loads(e[len(b"data: ") :]) for e in raw.split(b"\n\n")[:-2]]
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    assert len(pieces) == 250
    assert all(pieces)
    assert "".join(pieces) == content


async def test_chunk_delay_knob_lets_a_client_abort(port: int, http: aiohttp.ClientSession) -> None:
    url = f"http://127.0.0.1:{port}/v1/messages"
    payload = {"model": CLAUDE, "max_tokens": 100, "messages": CLAUDE_MESSAGES, "stream": True}
    async with http.post(url, json=payload, headers={"x-fake-chunk-delay-ms": "200"}) as resp:
        first = await resp.content.readuntil(b"\n\n")
        assert first.startswith(b"event: message_start\n")
        resp.close()  # drop the connection mid-stream
    await asyncio.sleep(0.5)  # the fake's next write finds the connection gone

    async with http.get(f"http://127.0.0.1:{port}/_fake/health") as health:
        assert await health.text() == "ok"
    assert len((await recorded(http, port))["requests"]) == 1


# -- recording across providers ------------------------------------------------------------


async def test_every_provider_request_is_recorded(
    port: int,
    http: aiohttp.ClientSession,
    client: openai.AsyncOpenAI,
    claude: anthropic.AsyncAnthropic,
) -> None:
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi")
    await client.responses.create(model="gpt-4.1-mini", input="hi")
    await client.embeddings.create(model="text-embedding-3-small", input="hi")
    await client.images.generate(model="gpt-image-1", prompt="hi")
    await client.audio.transcriptions.create(model="whisper-1", file=AUDIO)
    await client.audio.speech.create(model="gpt-4o-mini-tts", voice="alloy", input="hi")
    await claude.messages.create(model=CLAUDE, max_tokens=10, messages=CLAUDE_MESSAGES)
    await gemini(http, port, "/v1beta/models/gemini-2.0-flash:generateContent")
    await converse(http, port, BEDROCK_BODY)
    azure = "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21"
    async with http.post(f"http://127.0.0.1:{port}{azure}", json={"messages": MESSAGES}) as resp:
        assert resp.status == 200

    requests = (await recorded(http, port))["requests"]
    paths = [urllib.parse.unquote(r["path"].split("?")[0]) for r in requests]
    assert [(r["method"], path, r["model"]) for r, path in zip(requests, paths, strict=True)] == [
        ("POST", "/v1/chat/completions", "gpt-4o-mini"),
        ("POST", "/v1/completions", "gpt-3.5-turbo-instruct"),
        ("POST", "/v1/responses", "gpt-4.1-mini"),
        ("POST", "/v1/embeddings", "text-embedding-3-small"),
        ("POST", "/v1/images/generations", "gpt-image-1"),
        ("POST", "/v1/audio/transcriptions", "whisper-1"),
        ("POST", "/v1/audio/speech", "gpt-4o-mini-tts"),
        ("POST", "/v1/messages", CLAUDE),
        ("POST", "/v1beta/models/gemini-2.0-flash:generateContent", "gemini-2.0-flash"),
        ("POST", f"/model/{BEDROCK_MODEL}/converse", BEDROCK_MODEL),
        ("POST", "/openai/deployments/prod-4o/chat/completions", None),
    ]
    assert all(r["body_length"] > 0 for r in requests)

"""Tests for the fake OpenAI-compatible upstream, driven through the official openai SDK."""

from __future__ import annotations

import asyncio
import json
import math
import select
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
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

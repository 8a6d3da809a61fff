"""Each request's plan, counted at the ext_proc server through real Envoy: the messages Envoy
sends Tollgate per request (``tollgate_extproc_messages_total`` by phase), and that the lean
plans still record the request exactly (docs/adr/011-lean-plans.md)."""

from __future__ import annotations

import gzip
import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest

from tests.integration.conftest import (
    FakeUpstream,
    RunningTollgate,
    running_tollgate,
    wait_for_rows,
)
from tests.integration.test_operations import scrape, total

pytestmark = pytest.mark.integration

PHASES = ("request_headers", "request_body", "response_headers", "response_body")
MESSAGES = [{"role": "user", "content": "Count my messages, please."}]


@pytest.fixture
def running(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream
) -> Iterator[RunningTollgate]:
    with running_tollgate(
        tmp_path / "state",
        database_url,
        fake_upstream,
        identity_sources="header,body_user,body_metadata_user_id",
        skip_json_response_headers="true",
    ) as up:
        yield up


def messages(running: RunningTollgate) -> dict[str, float]:
    metrics = scrape(running.env)["tollgate_extproc_messages_total"]
    return {phase: total(metrics, phase=phase) for phase in PHASES}


def counted(running: RunningTollgate, send: Any) -> tuple[dict[str, float], Any]:
    """What ``send()`` returned and the messages Tollgate got for it, by phase."""
    before = messages(running)
    result = send()
    after = messages(running)
    return {phase: after[phase] - before[phase] for phase in PHASES}, result


_CLIENTS: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Each test's SDK clients are closed with it (no pooled socket left for the GC)."""
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


def client(running: RunningTollgate, **headers: str) -> openai.OpenAI:
    made = openai.OpenAI(
        base_url=running.envoy_url, api_key="sk-app", default_headers=headers, max_retries=0
    )
    _CLIENTS.append(made)
    return made


def row(database_url: str, request_id: str) -> dict[str, Any]:
    (found,) = wait_for_rows(database_url, "request_id = %s", (request_id,), 1, timeout_s=5)
    return found


def test_header_identified_chat_is_two_messages(
    running: RunningTollgate, database_url: str
) -> None:
    chat = client(running, **{"x-tollgate-user-id": "alice"}).chat.completions
    sent, raw = counted(
        running,
        lambda: chat.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES),
    )
    # The answer is one JSON document: no response headers, its status in the attributes.
    assert sent == {
        "request_headers": 1,
        "request_body": 0,
        "response_headers": 0,
        "response_body": 1,
    }
    completion = raw.parse()
    record = row(database_url, raw.headers["x-tollgate-request-id"])
    assert (record["end_user_id"], record["identity_source"]) == ("alice", "header")
    assert record["input_tokens"] == completion.usage.prompt_tokens
    assert record["output_tokens"] == completion.usage.completion_tokens
    assert record["model"] == completion.model


def test_by_default_a_json_answer_keeps_its_response_headers(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream
) -> None:
    # Envoy holds them until Tollgate has read the body: a client that hangs up right after
    # the headers still leaves its usage recorded.
    with running_tollgate(tmp_path / "default", database_url, fake_upstream) as default:
        chat = client(default, **{"x-tollgate-user-id": "dora"}).chat.completions
        sent, raw = counted(
            default,
            lambda: chat.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES),
        )
        assert sent == {
            "request_headers": 1,
            "request_body": 0,
            "response_headers": 1,
            "response_body": 1,
        }
        assert row(database_url, raw.headers["x-tollgate-request-id"])["outcome"] == "ok"


def test_body_user_comes_from_envoy_without_a_body_message(
    running: RunningTollgate, database_url: str
) -> None:
    chat = client(running).chat.completions
    sent, raw = counted(
        running,
        lambda: chat.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, user="body-bob"
        ),
    )
    assert sent["request_body"] == sent["response_headers"] == 0
    assert sent["request_headers"] == sent["response_body"] == 1
    record = row(database_url, raw.headers["x-tollgate-request-id"])
    assert (record["end_user_id"], record["identity_source"]) == ("body-bob", "body_user")


@pytest.mark.parametrize("case", ["upstream-error", "gzip-answer"])
def test_a_json_answer_without_its_headers_is_still_read_exactly(
    running: RunningTollgate, database_url: str, case: str
) -> None:
    # The status comes from Envoy's response.code attribute; an encoding from the bytes.
    knob = {"upstream-error": {"x-fake-words": "many"}, "gzip-answer": {}}[case]
    headers = {
        "content-type": "application/json",
        "x-tollgate-user-id": "carol",
        "accept-encoding": "gzip",
        **knob,
    }
    if case == "gzip-answer":
        headers["x-fake-content-encoding"] = "gzip"
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode()
    sent, (status, request_id, answer) = counted(running, lambda: _post(running, body, headers))
    assert request_id, "no x-tollgate-request-id"
    assert (sent["response_headers"], sent["response_body"]) == (0, 1)
    record = row(database_url, request_id)
    assert record["status_code"] == status
    if case == "upstream-error":
        assert status == 400
        assert record["outcome"] == "upstream_error"
    else:
        assert status == 200
        completion = json.loads(gzip.decompress(answer))  # passed on as the upstream sent it
        assert record["outcome"] == "ok"
        assert record["input_tokens"] == completion["usage"]["prompt_tokens"]
        assert record["output_tokens"] == completion["usage"]["completion_tokens"]


def _post(running: RunningTollgate, body: bytes, headers: dict[str, str]) -> tuple[int, str, bytes]:
    url = urlsplit(running.envoy_url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.getheader("x-tollgate-request-id") or "", response.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("case", "body", "headers"),
    [
        # Envoy cannot parse a compressed body: Tollgate reads it.
        (
            "gzip",
            gzip.compress(b'{"model":"gpt-4o-mini","messages":[],"user":"gz-user"}'),
            {"content-encoding": "gzip"},
        ),
        # Envoy reads the number 12345 as a double; Tollgate's reading keeps "12345".
        ("number", b'{"model":"gpt-4o-mini","messages":[],"user":12345}', {}),
        # Envoy accepts only exactly application/json.
        (
            "charset",
            b'{"model":"gpt-4o-mini","messages":[],"user":"cs-user"}',
            {"content-type": "application/json; charset=utf-8"},
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 10 else "",
)
def test_the_body_is_read_when_envoy_cannot_settle_the_user(
    running: RunningTollgate, database_url: str, case: str, body: bytes, headers: dict[str, str]
) -> None:
    sent, (status, request_id, _) = counted(
        running,
        lambda: _post(running, body, {"content-type": "application/json", **headers}),
    )
    assert status == 200, case
    assert sent["request_body"] == 1
    expected = {"gzip": "gz-user", "number": "12345", "charset": "cs-user"}[case]
    assert row(database_url, request_id)["end_user_id"] == expected


def test_invalid_json_is_still_refused_before_the_upstream(
    running: RunningTollgate, database_url: str, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.clear()
    sent, (status, request_id, body) = counted(
        running,
        lambda: _post(running, b'{"model": "m", "user": ', {"content-type": "application/json"}),
    )
    assert status == 400
    assert json.loads(body)["error"]["code"] == "invalid_json"
    assert sent["request_body"] == 1
    assert sent["response_body"] == 0
    assert row(database_url, request_id)["block_reason"] == "invalid_json"
    assert fake_upstream.recorded()["requests"] == []


@pytest.mark.parametrize("client_asks", [False, True], ids=["injected", "asked"])
def test_a_stream_sends_its_body_only_to_inject_include_usage(
    running: RunningTollgate, database_url: str, client_asks: bool
) -> None:
    chat = client(running, **{"x-tollgate-user-id": "streamer"}).chat.completions
    options = {"stream_options": {"include_usage": True}} if client_asks else {}

    def stream() -> tuple[str, list[Any]]:
        raw = chat.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, **options
        )
        return raw.headers["x-tollgate-request-id"], list(raw.parse())

    sent, (request_id, chunks) = counted(running, stream)
    assert sent["request_body"] == (0 if client_asks else 1)
    assert sent["request_headers"] == sent["response_headers"] == 1
    assert sent["response_body"] >= 1  # one per chunk Envoy received: SSE is streamed
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == (1 if client_asks else 0)  # the injected chunk stays hidden
    record = row(database_url, request_id)
    assert record["output_tokens"] > 0
    assert record["streamed"]


def test_an_unmetered_endpoint_sends_no_body(running: RunningTollgate, database_url: str) -> None:
    models = client(running, **{"x-tollgate-user-id": "lister"}).models
    sent, raw = counted(running, lambda: models.with_raw_response.list())
    assert sent == {
        "request_headers": 1,
        "request_body": 0,
        "response_headers": 1,
        "response_body": 0,
    }
    record = row(database_url, raw.headers["x-tollgate-request-id"])
    assert (record["endpoint"], record["status_code"]) == ("/v1/models", 200)

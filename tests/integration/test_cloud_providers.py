"""Vertex AI and Bedrock through real Envoy, Tollgate and Postgres, with the official SDKs as
clients (issue 17, acceptance 1-3): google-genai in Vertex mode, anthropic's Vertex and Bedrock
clients, boto3's bedrock-runtime. The cloud providers' upstream is one fake provider and the
default provider (openai) another, so a test sees where each request went: the caller's
credentials reach only the provider they belong to, and nothing reaches the default.
"""

from __future__ import annotations

import contextlib
import gc
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import boto3
import google.oauth2.credentials
import pytest
from botocore.config import Config
from genai_prices import Usage, calc_price
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from tests.cloud_support import service_account_file
from tests.integration.conftest import (
    FakeUpstream,
    RunningTollgate,
    create_key,
    running_tollgate,
    started_fake_upstream,
    wait_for_rows,
)

pytestmark = [
    pytest.mark.integration,
    # google-genai's sync client leaves a socket of its own to the garbage collector during
    # Veo operation polling (seen in CI only: the collector's timing decides where). The
    # leak is the test client's, not Tollgate's: the connection's warning is ignored here,
    # and every test collects garbage at its end (below) so that none escapes this module.
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"
    ),
]


@pytest.fixture(autouse=True)
def _collect_the_sdks_garbage() -> Iterator[None]:
    yield
    gc.collect()


PROJECT, LOCATION = "tollgate-test", "us-central1"
GEMINI, VEO, EMBEDDING = "gemini-2.5-flash", "veo-3.0-generate-001", "text-embedding-005"
CLAUDE_VERTEX = "claude-haiku-4-5@20251001"
CLAUDE_BEDROCK = "us.anthropic.claude-haiku-4-5-20251001-v1:0"
LLAMA_BEDROCK = "meta.llama3-1-8b-instruct-v1:0"
APP_TOKEN = "ya29.the-apps-own-token"
VIDEO_PRICE = Decimal("0.40")


@pytest.fixture
def cloud_upstream(tmp_path: Path) -> Iterator[FakeUpstream]:
    with started_fake_upstream(tmp_path / "cloud-fake.log") as upstream:
        yield upstream


@pytest.fixture
def stack(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream, cloud_upstream: FakeUpstream
) -> Iterator[RunningTollgate]:
    """`tollgate up`: openai (the default) at one fake; Vertex AI, Bedrock and Anthropic at the
    other; a price for Veo's video seconds (genai-prices has none)."""
    providers = {
        "vertex": {"base_uri": cloud_upstream.url},
        "bedrock": {"base_uri": cloud_upstream.url, "region": "us-east-1"},
        "anthropic": {"base_uri": cloud_upstream.url},
    }
    prices = {f"vertex/{VEO}": {"per_video_second": str(VIDEO_PRICE)}}
    with running_tollgate(
        tmp_path / "state",
        database_url,
        fake_upstream,
        providers=json.dumps(providers),
        price_overrides=json.dumps(prices),
    ) as running:
        yield running


def rows_of(database_url: str, user: str, count: int) -> list[dict[str, Any]]:
    rows = wait_for_rows(database_url, "end_user_id = %s", (user,), count, timeout_s=10)
    assert len(rows) == count, rows
    return rows


def genai_cost(model: str, provider_id: str, **usage: int | None) -> Decimal:
    values = {k: v for k, v in usage.items() if v is not None}
    price = calc_price(Usage(**values), model_ref=model, provider_id=provider_id)
    return Decimal(price.total_price).quantize(Decimal("1e-10"))


def requests_seen(upstream: FakeUpstream) -> list[dict[str, Any]]:
    return list(upstream.recorded()["requests"])


def header(request: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in request["headers"] if key == name]


def vertex_client(stack: RunningTollgate, user: str) -> genai.Client:
    return genai.Client(
        vertexai=True,
        project=PROJECT,
        location=LOCATION,
        credentials=google.oauth2.credentials.Credentials(token=APP_TOKEN),
        http_options=types.HttpOptions(
            base_url=stack.envoy_url.removesuffix("/v1"),
            headers={"x-tollgate-user-id": user},
            retry_options=types.HttpRetryOptions(attempts=1),
        ),
    )


# -- 1. the SDKs, attributed, priced, their credentials where they belong ------------------------


def test_google_genai_in_vertex_mode(
    stack: RunningTollgate,
    database_url: str,
    fake_upstream: FakeUpstream,
    cloud_upstream: FakeUpstream,
) -> None:
    with vertex_client(stack, "vx-gemini") as client:  # closed: its httpx client warns if not
        answer = client.models.generate_content(model=GEMINI, contents="Count the ledgers.")
        streamed = list(
            client.models.generate_content_stream(model=GEMINI, contents="Stream the count.")
        )
        embedded = client.models.embed_content(model=EMBEDDING, contents=["one", "two ledgers"])
    rows = rows_of(database_url, "vx-gemini", 3)
    by_endpoint = {row["endpoint"].rsplit(":", 1)[1]: row for row in rows}

    for row, usage in (
        (by_endpoint["generateContent"], answer.usage_metadata),
        (by_endpoint["streamGenerateContent"], streamed[-1].usage_metadata),
    ):
        assert usage is not None
        assert (row["outcome"], row["provider"], row["model"]) == ("ok", "vertex", GEMINI)
        assert row["input_tokens"] == usage.prompt_token_count
        assert row["output_tokens"] == usage.candidates_token_count
        assert row["reasoning_tokens"] == usage.thoughts_token_count
        output = (usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0)
        want = genai_cost(
            GEMINI, "google", input_tokens=usage.prompt_token_count, output_tokens=output
        )
        assert row["cost_usd"] == want
    assert by_endpoint["streamGenerateContent"]["streamed"] is True
    embedding = by_endpoint["predict"]
    assert embedded.embeddings is not None
    tokens = [e.statistics.token_count for e in embedded.embeddings if e.statistics]
    assert embedding["input_tokens"] == sum(int(t or 0) for t in tokens)
    assert (embedding["provider"], embedding["model"]) == ("vertex", EMBEDDING)

    cloud = requests_seen(cloud_upstream)
    assert len(cloud) == 3
    for request in cloud:
        assert header(request, "authorization") == [f"Bearer {APP_TOKEN}"]
        assert not header(request, "x-tollgate-user-id")
    assert requests_seen(fake_upstream) == []  # nothing went to the default provider


def test_anthropic_vertex_client(
    stack: RunningTollgate,
    database_url: str,
    fake_upstream: FakeUpstream,
    closing: Callable[[Any], Any],
) -> None:
    client = closing(
        anthropic.AnthropicVertex(
            region="us-east5",
            project_id=PROJECT,
            access_token=APP_TOKEN,
            base_url=stack.envoy_url,
            default_headers={"x-tollgate-user-id": "vx-claude"},
            max_retries=0,
        )
    )
    rows = check_claude(client, CLAUDE_VERTEX, database_url)
    assert {row["provider"] for row in rows} == {"vertex"}
    assert all(row["model"].startswith("claude-haiku-4-5") for row in rows)
    assert requests_seen(fake_upstream) == []


def check_claude(client: Any, model: str, database_url: str) -> list[dict[str, Any]]:
    """One Messages call and one stream through ``client`` (its user-id header set): both rows
    carry the tokens the SDK saw, priced as genai-prices prices them for the row's provider
    (Claude's input counted with its cache reads and writes)."""
    user = client.default_headers["x-tollgate-user-id"]
    message = client.messages.create(
        model=model, max_tokens=64, messages=[{"role": "user", "content": "Hello"}]
    )
    with client.messages.stream(
        model=model, max_tokens=64, messages=[{"role": "user", "content": "Stream"}]
    ) as stream:
        final = stream.get_final_message()
    rows = rows_of(database_url, user, 2)
    for row, seen in zip(rows, (message, final), strict=True):
        assert row["outcome"] == "ok"
        assert row["input_tokens"] == seen.usage.input_tokens
        assert row["output_tokens"] == seen.usage.output_tokens
        cached = seen.usage.cache_read_input_tokens or 0
        written = seen.usage.cache_creation_input_tokens or 0
        want = genai_cost(
            model,
            {"vertex": "google", "bedrock": "aws"}[row["provider"]],
            input_tokens=seen.usage.input_tokens + cached + written,
            output_tokens=seen.usage.output_tokens,
            cache_read_tokens=cached or None,
            cache_write_tokens=written or None,
        )
        assert row["cost_usd"] == want
    assert rows[1]["streamed"] is True
    return rows


def test_anthropic_bedrock_client(
    stack: RunningTollgate,
    database_url: str,
    cloud_upstream: FakeUpstream,
    closing: Callable[[Any], Any],
) -> None:
    client = closing(
        anthropic.AnthropicBedrock(
            aws_access_key="AKIDAPP",
            aws_secret_key="app-secret",
            aws_region="us-east-1",
            base_url=stack.envoy_url.removesuffix("/v1"),
            default_headers={"x-tollgate-user-id": "br-claude"},
            max_retries=0,
        )
    )
    rows = check_claude(client, CLAUDE_BEDROCK, database_url)
    assert {(row["provider"], row["model"]) for row in rows} == {("bedrock", CLAUDE_BEDROCK)}
    # The app's own SigV4 signature went through to Bedrock, untouched.
    for request in requests_seen(cloud_upstream):
        (auth,) = header(request, "authorization")
        assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKIDAPP/")


def bedrock_runtime(stack: RunningTollgate, user: str) -> Any:
    client = boto3.client(
        "bedrock-runtime",
        region_name="us-east-1",
        endpoint_url=stack.envoy_url.removesuffix("/v1"),
        aws_access_key_id="AKIDAPP",
        aws_secret_access_key="app-secret",
        config=Config(retries={"max_attempts": 1}),
    )

    def attribute(request: Any, **_: Any) -> None:
        # after signing: Tollgate strips it, so it must not be part of the signature
        request.headers["x-tollgate-user-id"] = user

    client.meta.events.register("before-send.bedrock-runtime.*", attribute)
    return client


@pytest.fixture
def closing() -> Iterator[Callable[[Any], Any]]:
    """Closes the SDK clients given to it at the end of the test: a socket left to the garbage
    collector is a ResourceWarning, which fails whichever test is running then."""
    with contextlib.ExitStack() as stack:

        def close_later(client: Any) -> Any:
            stack.callback(client.close)
            return client

        yield close_later


def test_boto3_converse_stream_and_invoke_with_response_stream(
    stack: RunningTollgate,
    database_url: str,
    fake_upstream: FakeUpstream,
    closing: Callable[[Any], Any],
) -> None:
    client = closing(bedrock_runtime(stack, "br-boto3"))
    converse = client.converse_stream(
        modelId=CLAUDE_BEDROCK,
        messages=[{"role": "user", "content": [{"text": "Count the beans."}]}],
    )
    usage = next(e["metadata"]["usage"] for e in converse["stream"] if "metadata" in e)
    invoked = client.invoke_model_with_response_stream(
        modelId=LLAMA_BEDROCK,
        body=json.dumps({"prompt": "Count the beans.", "max_gen_len": 64}),
    )
    metrics: dict[str, Any] = {}
    for event in invoked["body"]:
        chunk = json.loads(event["chunk"]["bytes"])
        metrics = chunk.get("amazon-bedrock-invocationMetrics", metrics)
    rows = rows_of(database_url, "br-boto3", 2)
    by_endpoint = {row["endpoint"].rsplit("/", 1)[1]: row for row in rows}
    stream_row = by_endpoint["converse-stream"]
    assert (stream_row["outcome"], stream_row["provider"]) == ("ok", "bedrock")
    assert stream_row["streamed"] is True
    assert stream_row["model"] == CLAUDE_BEDROCK
    assert (stream_row["input_tokens"], stream_row["output_tokens"]) == (
        usage["inputTokens"],
        usage["outputTokens"],
    )
    assert stream_row["cost_usd"] == genai_cost(
        CLAUDE_BEDROCK,
        "aws",
        input_tokens=usage["inputTokens"],
        output_tokens=usage["outputTokens"],
    )
    invoke_row = by_endpoint["invoke-with-response-stream"]
    assert invoke_row["model"] == LLAMA_BEDROCK
    assert (invoke_row["input_tokens"], invoke_row["output_tokens"]) == (
        metrics["inputTokenCount"],
        metrics["outputTokenCount"],
    )
    assert invoke_row["cost_usd"] == genai_cost(
        LLAMA_BEDROCK,
        "aws",
        input_tokens=metrics["inputTokenCount"],
        output_tokens=metrics["outputTokenCount"],
    )
    assert requests_seen(fake_upstream) == []


# -- 2. a family's path without its provider -------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        f"/v1beta1/projects/{PROJECT}/locations/{LOCATION}/publishers/google/models/"
        f"{GEMINI}:generateContent",
        f"/model/{CLAUDE_BEDROCK}/converse",
    ],
    ids=["vertex", "bedrock"],
)
def test_a_path_without_its_provider_is_refused_before_any_upstream(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream, path: str
) -> None:
    with running_tollgate(tmp_path / "state", database_url, fake_upstream) as running:
        body = json.dumps({"contents": [{"parts": [{"text": "hi"}]}]}).encode()
        request = urllib.request.Request(
            running.envoy_url.removesuffix("/v1") + path,
            data=body,
            headers={
                "content-type": "application/json",
                "authorization": f"Bearer {APP_TOKEN}",
                "x-tollgate-user-id": "nowhere",
            },
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        # The error holds the connection: closed here, not by the garbage collector later
        # (a ResourceWarning in whichever test runs then).
        with refused.value:
            assert refused.value.code == 400
            error = json.loads(refused.value.read())["error"]
        assert error["code"] == "provider_not_configured"
        (row,) = rows_of(database_url, "nowhere", 1)
        assert (row["outcome"], row["block_reason"]) == ("blocked", "provider_not_configured")
        assert requests_seen(fake_upstream) == []


# -- 3. Veo: one charged row for the video, free rows for polling ---------------------------------


def test_veo_generation_is_charged_once_and_polling_is_free(
    stack: RunningTollgate, database_url: str
) -> None:
    with vertex_client(stack, "u1") as client:
        operation = client.models.generate_videos(
            model=VEO,
            source=types.GenerateVideosSource(prompt="A ledger, slowly filling."),
            config=types.GenerateVideosConfig(duration_seconds=6, number_of_videos=2),
        )
        polls = 0
        while not operation.done:
            operation = client.operations.get(operation)
            polls += 1
            assert polls <= 5
    rows = rows_of(database_url, "u1", 1 + polls)
    (created,) = [r for r in rows if r["endpoint"].endswith(":predictLongRunning")]
    assert (created["outcome"], created["model"]) == ("ok", VEO), created
    assert created["units"] == {"video_seconds": 12.0}, created
    assert created["cost_usd"] == 12 * VIDEO_PRICE, created
    polled = [r for r in rows if r["endpoint"].endswith(":fetchPredictOperation")]
    assert len(polled) == polls, rows
    for row in polled:
        assert (row["outcome"], row["model"]) == ("ok", VEO), row
        assert not row["units"], row
        assert row["cost_usd"] == 0, row


# -- gateway keys: the credentials Tollgate holds, never the app's ------------------------------


def until_the_key_is_known(call: Callable[[], Any], unknown: Callable[[Exception], bool]) -> Any:
    """``call()``, again while it fails with 401: the key cache reloads every few seconds."""
    deadline = time.monotonic() + 15
    while True:
        try:
            return call()
        except Exception as exc:
            if not unknown(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.3)


def test_vertex_gateway_key_sends_a_token_minted_from_the_service_account(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream, cloud_upstream: FakeUpstream
) -> None:
    with service_account_file(tmp_path) as (key_file, token_endpoint):
        providers = {
            "vertex": {"base_uri": cloud_upstream.url, "service_account_file": str(key_file)}
        }
        with running_tollgate(
            tmp_path / "state", database_url, fake_upstream, providers=json.dumps(providers)
        ) as running:
            token, key_id = create_key(running.env, "vertex-app", "--user", "sa-user")
            client = genai.Client(
                vertexai=True,
                project=PROJECT,
                location=LOCATION,
                credentials=google.oauth2.credentials.Credentials(token=APP_TOKEN),
                http_options=types.HttpOptions(
                    base_url=running.envoy_url.removesuffix("/v1"),
                    headers={"x-tollgate-key": token},
                    retry_options=types.HttpRetryOptions(attempts=1),
                ),
            )
            with client:
                until_the_key_is_known(
                    lambda: client.models.generate_content(model=GEMINI, contents="Count."),
                    lambda exc: isinstance(exc, genai_errors.APIError) and exc.code == 401,
                )
            (row,) = rows_of(database_url, "sa-user", 1)
            assert (row["outcome"], row["key_id"], row["provider"]) == ("ok", key_id, "vertex")
    assert token_endpoint.assertions  # Tollgate signed in as the service account
    (request,) = [
        r for r in requests_seen(cloud_upstream) if r["path"].endswith(":generateContent")
    ]
    assert header(request, "authorization") == ["Bearer ya29.minted-1"]
    assert not header(request, "x-tollgate-key")
    assert APP_TOKEN not in json.dumps(request["headers"])


def test_bedrock_gateway_key_requests_are_re_signed(
    tmp_path: Path,
    database_url: str,
    fake_upstream: FakeUpstream,
    cloud_upstream: FakeUpstream,
    closing: Callable[[Any], Any],
) -> None:
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    aws = {"AWS_ACCESS_KEY_ID": "AKIDTOLLGATE", "AWS_SECRET_ACCESS_KEY": "tollgate-secret"}
    providers = {
        "bedrock": {"base_uri": cloud_upstream.url, "region": "us-east-1", "auth": "sigv4"}
    }
    with running_tollgate(
        tmp_path / "state",
        database_url,
        fake_upstream,
        extra_env={
            **aws,
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "AWS_CONFIG_FILE": "/nonexistent",
        },
        providers=json.dumps(providers),
    ) as running:
        token, _ = create_key(running.env, "bedrock-app", "--user", "signed-user")
        client = closing(bedrock_runtime(running, "ignored-user"))
        client.meta.events.register(
            "before-send.bedrock-runtime.*",
            lambda request, **_: request.headers.__setitem__("x-tollgate-key", token),
        )
        body = json.dumps({"prompt": "Count.", "max_gen_len": 16}).encode()
        answer = until_the_key_is_known(
            lambda: client.invoke_model(modelId=LLAMA_BEDROCK, body=body),
            lambda exc: (
                isinstance(exc, client.exceptions.ClientError)
                and exc.response["ResponseMetadata"]["HTTPStatusCode"] == 401
            ),
        )
        assert json.loads(answer["body"].read())["generation_token_count"] > 0
        (row,) = rows_of(database_url, "signed-user", 1)
        assert (row["outcome"], row["provider"], row["model"]) == ("ok", "bedrock", LLAMA_BEDROCK)
    (request,) = [r for r in requests_seen(cloud_upstream) if r["path"].endswith("/invoke")]
    (auth,) = header(request, "authorization")
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKIDTOLLGATE/")
    assert not header(request, "x-tollgate-key")
    # The signature is valid for what the upstream received, with Tollgate's secret.
    (host,) = header(request, "host")
    (amz_date,) = header(request, "x-amz-date")
    signed = {"host": host, "x-amz-date": amz_date}
    for content_type in header(request, "content-type"):  # boto3 sends none for invoke_model
        signed["content-type"] = content_type
    assert f"SignedHeaders={';'.join(sorted(signed))}," in auth
    sent = AWSRequest(
        method="POST", url=f"{cloud_upstream.url}{request['path']}", data=body, headers=signed
    )
    sent.context["timestamp"] = amz_date
    signer = SigV4Auth(Credentials(*aws.values()), "bedrock", "us-east-1")
    expected = signer.signature(signer.string_to_sign(sent, signer.canonical_request(sent)), sent)
    assert auth.endswith("Signature=" + expected)

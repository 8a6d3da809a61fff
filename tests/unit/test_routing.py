"""Providers, route selection and what the processor tells Envoy for a route (no network)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from tests.unit.doubles import FixedKeys, RecordingSink
from tollgate.app import build_router
from tollgate.config import ConfigError, load_settings
from tollgate.extproc.processor import ProcessorContext, RequestProcessor
from tollgate.policy.keys import GatewayKey
from tollgate.policy.refusal import PolicyRefusal
from tollgate.routing.providers import load_providers
from tollgate.routing.router import Router, api_for_path

ENV = {"OPENAI_API_KEY": "sk-openai-test", "ANTHROPIC_API_KEY": "sk-ant-test"}


def router(environ: dict[str, str] | None = None, **settings: object) -> Router:
    return build_router(load_settings(environ={}, **settings), ENV if environ is None else environ)


# -- providers -------------------------------------------------------------------------------


def test_built_in_providers_and_credentials() -> None:
    providers = load_providers(load_settings(environ={}), ENV)
    assert set(providers) >= {"openai", "anthropic", "gemini"}
    assert providers["openai"].credential_header() == ("authorization", b"Bearer sk-openai-test")
    assert providers["anthropic"].credential_header() == ("x-api-key", b"sk-ant-test")
    assert ("anthropic-version", "2023-06-01") in providers["anthropic"].headers
    assert providers["gemini"].credential_header() is None  # GEMINI_API_KEY not set
    assert "sk-openai-test" not in repr(providers["openai"])


def test_configured_providers_from_file_and_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "azure-key"
    secret.write_text("azure-secret\n")
    conf = tmp_path / "t.toml"
    conf.write_text(
        f"""
default_provider = "ollama"
[providers.azure]
base_uri = "https://myres.openai.azure.com"
auth = "api-key"
api = "azure"
api_key_file = "{secret}"
[providers.ollama]
base_uri = "http://127.0.0.1:11434"
auth = "none"
"""
    )
    s = load_settings(conf, environ={})
    providers = load_providers(s, {})
    assert providers["azure"].credential_header() == ("api-key", b"azure-secret")
    assert providers["ollama"].credential_header() is None
    assert not providers["ollama"].needs_credential
    assert str(providers["ollama"].base) == "http://127.0.0.1:11434"


def test_providers_from_environment_json() -> None:
    s = load_settings(
        environ={"TOLLGATE_PROVIDERS": '{"vllm": {"base_uri": "http://10.0.0.5:8000/v1x"}}'}
    )
    assert load_providers(s, {})["vllm"].base.path == "/v1x"


@pytest.mark.parametrize(
    ("providers", "message"),
    [
        ({"x": {"base_uri": "ftp://nope"}}, "base_uri"),
        ({"x": {"base_uri": "http://h", "auth": "magic"}}, "auth must be"),
        ({"x": {"base_uri": "http://h", "colour": "red"}}, "unknown keys"),
        ({"x": {"base_uri": "http://h", "api_key_file": "/no/such/file"}}, "api_key_file"),
    ],
)
def test_bad_provider_config_is_refused(providers: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_providers(load_settings(environ={}, providers=providers), {})


def test_upstream_url_overrides_the_default_provider() -> None:
    s = load_settings(environ={"TOLLGATE_UPSTREAM_URL": "http://127.0.0.1:8090"})
    assert str(load_providers(s, {})["openai"].base) == "http://127.0.0.1:8090"


# -- route selection --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/v1/chat/completions", None),
        ("/v1/messages", "anthropic"),
        ("/v1/messages?beta=true", "anthropic"),
        ("/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21", "azure"),
        ("/v1beta/models/gemini-2.0-flash:generateContent", "gemini"),
        ("/v1beta/openai/chat/completions", "gemini"),
        (
            "/v1beta1/projects/p/locations/us-central1/publishers/google/models/"
            "gemini-2.5-flash:generateContent",
            "vertex",
        ),
        ("/v1/projects/p/locations/global/publishers/anthropic/models/c:rawPredict", "vertex"),
        ("/v1/projects/p/locations/us-central1/operations/123", "vertex"),
        ("/v1/publishers/google/models/gemini-2.5-flash:generateContent?key=k", "vertex"),
        ("/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/converse", "bedrock"),
        ("/model/us.anthropic.claude-haiku-4-5-20251001-v1%3A0/converse-stream", "bedrock"),
        ("/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ainference-profile%2Fx/invoke", "bedrock"),
        ("/model/meta.llama3-1-8b-instruct-v1%3A0/invoke-with-response-stream", "bedrock"),
        ("/model/x/converse/extra", "bedrock"),  # not metered, but still Bedrock's
        ("/model/x/invoke/", "bedrock"),
        ("/async-invoke", "bedrock"),
        ("/guardrail/g1/version/1/apply", "bedrock"),
        ("/v1/models", None),
    ],
)
def test_api_for_path(path: str, api: str | None) -> None:
    assert api_for_path(path) == api


def test_route_by_path_and_default() -> None:
    r = router()
    chat = r.route("/v1/chat/completions")
    assert (chat.provider, chat.base_uri, chat.path) == (
        "openai",
        "https://api.openai.com",
        "/v1/chat/completions",
    )
    messages = r.route("/v1/messages")
    assert (messages.provider, messages.api) == ("anthropic", "anthropic")
    # No azure provider configured: an Azure path (and its api-key) never goes to the
    # default provider.
    with pytest.raises(PolicyRefusal) as refused:
        r.route("/openai/deployments/x/chat/completions")
    assert (refused.value.status, refused.value.code) == (400, "provider_not_configured")


VERTEX_GEMINI = "/v1beta1/projects/p/locations/{}/publishers/google/models/gemini-2.5-flash"


@pytest.mark.parametrize(
    "path",
    [
        VERTEX_GEMINI.format("us-central1") + ":generateContent",
        "/v1/projects/p/locations/europe-west4/publishers/anthropic/models/c@1:rawPredict",
        "/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/converse-stream",
        "/model/meta.llama3-1-8b-instruct-v1%3A0/invoke",
        "/openai/deployments/prod/chat/completions?api-version=2024-10-21",
    ],
)
def test_family_paths_without_their_provider_are_refused(path: str) -> None:
    """The default provider (openai, with its key) never gets another family's request."""
    with pytest.raises(PolicyRefusal) as refused:
        router().route(path)
    assert (refused.value.status, refused.value.code) == (400, "provider_not_configured")


def test_vertex_routes_to_the_paths_regional_host() -> None:
    r = router(providers={"vertex": {}})
    central = r.route(VERTEX_GEMINI.format("us-central1") + ":streamGenerateContent?alt=sse")
    assert (central.provider, central.api, central.base_uri) == (
        "vertex",
        "vertex",
        "https://us-central1-aiplatform.googleapis.com",
    )
    assert central.path == VERTEX_GEMINI.format("us-central1") + ":streamGenerateContent?alt=sse"
    assert r.route(VERTEX_GEMINI.format("global") + ":generateContent").base_uri == (
        "https://aiplatform.googleapis.com"
    )
    assert r.route(VERTEX_GEMINI.format("eu") + ":generateContent").base_uri == (
        "https://aiplatform.eu.rep.googleapis.com"
    )
    express = r.route("/v1/publishers/google/models/gemini-2.5-flash:generateContent?key=k")
    assert express.base_uri == "https://aiplatform.googleapis.com"
    # Pay-i style: the base-URI header names the regional host itself.
    pinned = r.route(
        VERTEX_GEMINI.format("us-east5") + ":generateContent",
        "https://us-east5-aiplatform.googleapis.com",
    )
    assert (pinned.provider, pinned.base_uri) == (
        "vertex",
        "https://us-east5-aiplatform.googleapis.com",
    )


@pytest.mark.parametrize(
    "location",
    ["US-CENTRAL1", "us-central1.evil.com", "us_central1", "-us", "us-", "a" * 64, "%2e%2e", ""],
)
def test_vertex_locations_that_are_no_host_label_are_refused(location: str) -> None:
    r = router(providers={"vertex": {}})
    with pytest.raises(PolicyRefusal) as refused:
        r.route(VERTEX_GEMINI.format(location) + ":generateContent")
    assert refused.value.code == "invalid_path"


def test_vertex_with_its_own_base_uri_is_not_regional() -> None:
    r = router(providers={"vertex": {"base_uri": "http://127.0.0.1:9000"}})
    route = r.route(VERTEX_GEMINI.format("us-central1") + ":generateContent")
    assert route.base_uri == "http://127.0.0.1:9000"


def test_a_family_path_cannot_be_sent_to_another_familys_provider() -> None:
    r = router(providers={"vertex": {}})
    path = VERTEX_GEMINI.format("us-central1") + ":generateContent"
    for base_uri in ("https://api.openai.com", "https://api.anthropic.com/v1"):
        with pytest.raises(PolicyRefusal) as refused:
            r.route(path, base_uri)
        assert refused.value.code == "provider_mismatch"
    with pytest.raises(PolicyRefusal) as refused:
        r.for_model("/v1/messages", "openai/gpt-4o")
    assert refused.value.code == "provider_mismatch"
    # Not a regional host: a look-alike is no provider's, and not on the allow-list.
    with pytest.raises(PolicyRefusal) as refused:
        r.route(path, "https://us-central1-aiplatform.googleapis.com.evil.example")
    assert refused.value.code == "base_uri_not_allowed"


def test_bedrock_from_its_region() -> None:
    r = router(providers={"bedrock": {"region": "eu-central-1"}})
    route = r.route("/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/invoke")
    assert (route.provider, route.api, route.base_uri) == (
        "bedrock",
        "bedrock",
        "https://bedrock-runtime.eu-central-1.amazonaws.com",
    )
    with pytest.raises(ConfigError, match="not an AWS region"):
        router(providers={"bedrock": {"region": "eu-central-1.evil.com"}})
    with pytest.raises(ConfigError, match="region is for Bedrock"):
        router(providers={"vertex": {"region": "us-east-1"}})


@pytest.mark.parametrize(
    "request_path",
    [
        "/../team-b/v1/chat/completions",
        "/v1/../../team-b/v1/chat/completions",
        "/./v1/chat/completions",
        "/%2e%2e/team-b/v1/chat/completions",
        "/%2E%2e/v1/chat/completions",
        "/v1%2fchat/completions",
        "/v1%5cchat/completions",
        "/v1\\chat/completions",
        "/%252e%252e/team-b/v1/chat/completions",
        "/v1/chat/completions\x01",
        "*",
    ],
)
def test_paths_that_could_leave_the_base_prefix_are_refused(request_path: str) -> None:
    r = Router.single("custom", "http://127.0.0.1:9/team-a")
    for route in (
        lambda: r.route(request_path),
        lambda: r.route(request_path, "http://127.0.0.1:9/team-a"),
        lambda: r.for_model(request_path, "custom/gpt-4o"),
    ):
        with pytest.raises(PolicyRefusal) as refused:
            route()
        assert (refused.value.status, refused.value.code) == (400, "invalid_path")


def test_processor_refuses_an_unsafe_path_before_any_upstream_header() -> None:
    sink = RecordingSink()
    processor = RequestProcessor(
        ProcessorContext(sink=sink, router=Router.single("custom", "http://127.0.0.1:9/team-a"))
    )
    msg = ep.HttpHeaders(end_of_stream=True)
    for key, value in ((":method", b"GET"), (":path", b"/%252e%252e/team-b/v1/models")):
        msg.headers.headers.add(key=key, raw_value=value)
    response = processor.request_headers(msg)
    assert response.immediate_response.status.code == 400
    assert json.loads(response.immediate_response.body)["error"]["code"] == "invalid_path"
    (record,) = sink.records
    assert (record.block_reason, record.endpoint) == (
        "invalid_path",
        "/%252e%252e/team-b/v1/models",
    )


def test_route_by_base_uri_header() -> None:
    r = router(base_uri_allow_list=("http://127.0.0.1:8001/prefix",))
    custom = r.route("/v1/chat/completions?x=1", "http://127.0.0.1:8001/prefix")
    assert custom.base_uri == "http://127.0.0.1:8001/prefix"
    assert custom.path == "/prefix/v1/chat/completions?x=1"
    assert custom.credentials is None  # no provider key ever goes to a custom base URI
    owned = r.route("/v1/messages", "https://api.anthropic.com")
    assert owned.provider == "anthropic"
    assert owned.credentials is not None
    for refused in ("http://169.254.169.254", "http://127.0.0.1:8001/other", "junk"):
        with pytest.raises(PolicyRefusal) as caught:
            r.route("/v1/chat/completions", refused)
        assert (caught.value.status, caught.value.code) == (403, "base_uri_not_allowed")


def test_route_by_model_prefix() -> None:
    r = router()
    routed = r.for_model("/v1/chat/completions", "anthropic/claude-3-5-haiku-latest")
    assert routed is not None
    assert (routed[0].provider, routed[1]) == ("anthropic", "claude-3-5-haiku-latest")
    assert r.for_model("/v1/chat/completions", "meta-llama/Llama-3-8b") is None
    assert r.for_model("/v1/chat/completions", "gpt-4o") is None
    assert r.for_model("/v1/chat/completions", "openai/") is None
    assert router(model_prefix_routing=False).for_model("/x", "openai/gpt-4o") is None


# -- what the processor asks of Envoy ---------------------------------------------------------


def request(*pairs: tuple[str, bytes], path: bytes = b"/v1/chat/completions") -> ep.HttpHeaders:
    base = [(":method", b"POST"), (":path", path), ("content-type", b"application/json")]
    return ep.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in [*base, *pairs]]
        )
    )


def mutation_of(common: ep.CommonResponse) -> tuple[dict[str, bytes], list[str]]:
    m = common.header_mutation
    return {h.header.key: h.header.raw_value for h in m.set_headers}, list(m.remove_headers)


def run(
    r: Router, *pairs: tuple[str, bytes], body: object, key: GatewayKey | None = None, **kw: bytes
) -> tuple[RequestProcessor, ep.ProcessingResponse, ep.ProcessingResponse, RecordingSink]:
    sink = RecordingSink()
    keys = FixedKeys({b"tg_k": key} if key is not None else {})
    p = RequestProcessor(ProcessorContext(sink=sink, router=r, keys=keys))
    first = p.request_headers(request(*pairs, **kw))
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    second = p.request_body(ep.HttpBody(body=raw, end_of_stream=True))
    return p, first, second, sink


INJECT = GatewayKey("key_i", "inject", None, None, None, True)
PASS = GatewayKey("key_p", "pass", None, None, None, False)


def test_injected_credentials_replace_the_apps() -> None:
    _, first, second, _ = run(
        router(),
        ("authorization", b"Bearer tg_k"),
        ("x-api-key", b"app-key"),
        body={"model": "anthropic/claude-3-5-haiku-latest", "messages": []},
        key=INJECT,
    )
    assert first.mode_override.request_body_mode  # body read for the model prefix
    assert "authorization" in mutation_of(first.request_headers.response)[1]
    common = second.request_body.response
    set_headers, removed = mutation_of(common)
    assert set_headers["x-api-key"] == b"sk-ant-test"
    assert set_headers["anthropic-version"] == b"2023-06-01"
    assert set_headers["x-tollgate-upstream-host"] == b"api.anthropic.com:443"
    assert set_headers["x-tollgate-upstream-scheme"] == b"https"
    assert "x-api-key" not in removed  # overwritten, not removed
    assert common.clear_route_cache
    new_body = common.body_mutation.body
    assert json.loads(new_body)["model"] == "claude-3-5-haiku-latest"
    assert set_headers["content-length"] == str(len(new_body)).encode()


def test_passthrough_keeps_the_apps_credentials() -> None:
    _, _, second, _ = run(
        router(),
        ("x-tollgate-key", b"tg_k"),
        ("authorization", b"Bearer sk-app-own"),
        body={"model": "gpt-4o-mini"},
        key=PASS,
    )
    set_headers, removed = mutation_of(second.request_body.response)
    assert "authorization" not in set_headers
    assert "authorization" not in removed
    assert not second.request_body.response.HasField("body_mutation")


def test_missing_provider_key_is_refused_when_injecting() -> None:
    _, _, second, sink = run(
        router(environ={}), ("x-tollgate-key", b"tg_k"), body={"model": "gpt-4o"}, key=INJECT
    )
    payload = json.loads(second.immediate_response.body)
    assert second.immediate_response.status.code == 500
    assert payload["error"]["code"] == "provider_credentials_missing"
    assert sink.records[0].block_reason == "provider_credentials_missing"


def test_gzip_body_is_rewritten_decoded() -> None:
    raw = gzip.compress(json.dumps({"model": "openai/gpt-4o-mini"}).encode())
    _, _, second, _ = run(router(), ("content-encoding", b"gzip"), body=raw)
    _, removed = mutation_of(second.request_body.response)
    assert "content-encoding" in removed
    assert json.loads(second.request_body.response.body_mutation.body) == {"model": "gpt-4o-mini"}


def test_path_prefix_and_ledger_fields_for_a_custom_base_uri() -> None:
    r = router(base_uri_allow_list=("http://127.0.0.1:8001/prefix",))
    p, first, _, sink = run(
        r,
        ("x-tollgate-base-uri", b"http://127.0.0.1:8001/prefix"),
        body={"model": "m"},
        path=b"/v1/embeddings",
    )
    # With a base URI no model prefix can re-route; embeddings' bodies say nothing a parser
    # needs: the body is not read and the route is set at once.
    assert not first.HasField("mode_override")
    set_headers, _ = mutation_of(first.request_headers.response)
    assert set_headers[":path"] == b"/prefix/v1/embeddings"
    assert set_headers["x-tollgate-upstream-host"] == b"127.0.0.1:8001"
    assert set_headers["x-tollgate-upstream-scheme"] == b"http"
    p.close()
    assert sink.records[0].upstream_base_uri == "http://127.0.0.1:8001/prefix"


def test_azure_model_comes_from_route_as_resource() -> None:
    r = router(
        providers={
            "azure": {"base_uri": "https://res.openai.azure.com", "auth": "api-key", "api": "azure"}
        }
    )
    p, _, _, sink = run(
        r,
        ("x-tollgate-route-as-resource", b"gpt-4o"),
        body={"messages": []},
        path=b"/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21",
    )
    p.close()
    record = sink.records[0]
    assert (record.provider, record.model) == ("azure", "gpt-4o")
    assert record.upstream_base_uri == "https://res.openai.azure.com"


def test_key_limited_to_other_providers_is_refused_after_model_routing() -> None:
    key = GatewayKey("key_o", "openai-only", None, None, frozenset({"openai"}), False)
    _, first, second, _ = run(
        router(), ("x-tollgate-key", b"tg_k"), body={"model": "anthropic/claude-x"}, key=key
    )
    assert first.HasField("request_headers")
    payload = json.loads(second.immediate_response.body)
    assert payload["error"]["code"] == "provider_not_allowed"


# -- Bedrock requests Tollgate signs --------------------------------------------------------------

AWS_ENV = {"AWS_ACCESS_KEY_ID": "AKIDTOLLGATE", "AWS_SECRET_ACCESS_KEY": "tollgate-secret"}


def test_bedrock_gateway_key_requests_are_signed_with_the_gateways_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    r = router(providers={"bedrock": {"region": "us-west-2", "auth": "sigv4"}})
    path = b"/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/invoke"
    body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 5, "messages": []}
    _, first, second, _ = run(
        r,
        ("authorization", b"Bearer tg_k"),
        ("x-amz-date", b"20200101T000000Z"),
        ("x-amz-security-token", b"the-apps-session"),
        body=body,
        key=INJECT,
        path=path,
    )
    assert first.mode_override.request_body_mode  # the signature needs the body
    set_headers, removed = mutation_of(second.request_body.response)
    # The app's session token goes; its date is replaced (set, not removed: Envoy applies a
    # removal after the sets).
    assert "x-amz-security-token" in removed
    assert "x-amz-date" not in removed
    assert "x-amz-security-token" not in set_headers  # long-term keys: no session token
    auth = set_headers["authorization"].decode()
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKIDTOLLGATE/")
    assert "/us-west-2/bedrock/aws4_request" in auth
    assert "SignedHeaders=content-type;host;x-amz-date" in auth
    # The signature an AWS service would compute for what Envoy sends.
    sent = AWSRequest(
        method="POST",
        url="https://bedrock-runtime.us-west-2.amazonaws.com" + path.decode(),
        data=json.dumps(body).encode(),
        headers={
            "host": "bedrock-runtime.us-west-2.amazonaws.com:443",
            "content-type": "application/json",
            "x-amz-date": set_headers["x-amz-date"].decode(),
        },
    )
    sent.context["timestamp"] = set_headers["x-amz-date"].decode()
    signer = SigV4Auth(Credentials(*AWS_ENV.values()), "bedrock", "us-west-2")
    canonical = signer.canonical_request(sent)
    expected = signer.signature(signer.string_to_sign(sent, canonical), sent)
    assert auth.endswith("Signature=" + expected)


def test_sigv4_needs_bedrock_and_a_region() -> None:
    with pytest.raises(ConfigError, match="sigv4"):
        router(providers={"x": {"base_uri": "http://127.0.0.1:9", "auth": "sigv4"}})
    with pytest.raises(ConfigError, match="set region"):
        router(providers={"bedrock": {"base_uri": "http://127.0.0.1:9", "auth": "sigv4"}})

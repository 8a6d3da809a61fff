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
    # No azure provider configured: Azure-shaped paths fall back to the default.
    assert r.route("/openai/deployments/x/chat/completions").provider == "openai"


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

"""Rendered Envoy bootstraps are accepted by the real Envoy binary (`--mode validate`)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from tests.jwt_support import make_signing_key
from tests.tls_support import make_ca
from tests.unit.doubles import RecordingSink
from tollgate.config import load_settings
from tollgate.envoyconf import (
    JWT_METADATA_NAMESPACE,
    JWT_PAYLOAD_KEY,
    TARGETS,
    UPSTREAM_HOST_HEADER,
    UPSTREAM_HOST_PATTERN,
    UPSTREAM_SCHEME_HEADER,
    render_yaml,
)
from tollgate.extproc.edge_limits import (
    CLIENT_MAX_HEADERS_COUNT,
    CLIENT_MAX_HEADERS_KB,
    ENVOY_ERROR_CODES,
    ENVOY_ERROR_HEADER,
    MUTATION_HEADROOM_COUNT,
    MUTATION_HEADROOM_KB,
    check_client_headers,
    check_content_length,
)
from tollgate.extproc.plan import FACT_RULES, REQUEST_FACTS_NAMESPACE, TOLLGATE_NAMESPACE
from tollgate.extproc.processor import ProcessorContext, RequestProcessor
from tollgate.localstack import envoy_binary
from tollgate.policy.refusal import PolicyRefusal
from tollgate.routing.router import Router
from tollgate.v1 import usage_pb2

REPO = Path(__file__).resolve().parent.parent.parent


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def connection_manager(doc: dict) -> dict:
    return doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def ext_proc_filter(doc: dict) -> dict:
    hcm = connection_manager(doc)
    (ext,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc"]
    return ext["typed_config"]


def cluster(doc: dict, name: str) -> dict:
    (found,) = [c for c in doc["static_resources"]["clusters"] if c["name"] == name]
    return found


def routes(doc: dict) -> list[dict]:
    (vhost,) = connection_manager(doc)["route_config"]["virtual_hosts"]
    assert vhost["domains"] == ["*"]
    return vhost["routes"]


def default_doc() -> dict:
    return yaml.safe_load(render_yaml(load_settings(environ={})))


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_target_validates(target: str, tmp_path: Path) -> None:
    path = tmp_path / f"{target}.yaml"
    path.write_text(render_yaml(load_settings(environ={}), target))
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


def test_ext_proc_fails_closed_and_lets_tollgate_pick_body_modes() -> None:
    doc = yaml.safe_load(render_yaml(load_settings(environ={})))
    ext = ext_proc_filter(doc)
    assert ext.get("failure_mode_allow", False) is False
    assert ext["allow_mode_override"] is True
    assert ext["message_timeout"] == "5s"
    names = [f["name"] for f in connection_manager(doc)["http_filters"]]
    assert names == [
        "tollgate.local_reply_observer",
        "envoy.filters.http.json_to_metadata",
        "envoy.filters.http.ext_proc",
        "envoy.filters.http.dynamic_forward_proxy",
        "envoy.filters.http.router",
    ]


def test_json_to_metadata_reads_each_fact_of_small_json_bodies_for_ext_proc() -> None:
    doc = yaml.safe_load(render_yaml(load_settings(environ={})))
    wrapped = filter_config(doc, "envoy.filters.http.json_to_metadata")
    assert wrapped["@type"].endswith("ExtensionWithMatcher")
    (skip,) = wrapped["xds_matcher"]["matcher_list"]["matchers"]
    small = skip["predicate"]["not_matcher"]["single_predicate"]
    assert small["input"]["typed_config"]["header_name"] == "content-length"
    pattern = small["value_match"]["safe_regex"]["regex"]
    # Envoy matches the whole value: up to 99,999 bytes declared.
    assert re.fullmatch(pattern, "99999")
    assert not re.fullmatch(pattern, "100000")
    assert skip["on_match"]["action"]["typed_config"]["@type"].endswith("SkipFilter")
    config = wrapped["extension_config"]["typed_config"]["request_rules"]
    assert config["allow_content_types"] == ["application/json"]
    rules = {r["on_present"]["key"]: r for r in config["rules"]}
    assert set(rules) == set(FACT_RULES)
    for key, path in FACT_RULES.items():
        rule = rules[key]
        assert [s["key"] for s in rule["selectors"]] == list(path)
        for action in ("on_present", "on_missing", "on_error"):
            assert rule[action]["metadata_namespace"] == REQUEST_FACTS_NAMESPACE
        # The markers Tollgate reads (tollgate.extproc.plan): null missing, a list unparsed.
        assert rule["on_missing"]["value"] is None
        assert isinstance(rule["on_error"]["value"], list)


def filter_config(doc: dict, name: str) -> dict:
    (found,) = [f for f in connection_manager(doc)["http_filters"] if f["name"] == name]
    return found["typed_config"]


def test_ext_proc_sees_responses_only_of_requests_it_saw() -> None:
    doc = default_doc()
    # The filter's own default skips response headers, so a local reply to a request it
    # never saw is not held for it; the virtual host's per-route config asks for them.
    assert ext_proc_filter(doc)["processing_mode"]["response_header_mode"] == "SKIP"
    assert ext_proc_filter(doc)["processing_mode"]["request_header_mode"] == "SEND"
    (vhost,) = connection_manager(doc)["route_config"]["virtual_hosts"]
    per_route = vhost["typed_per_filter_config"]
    main = per_route["envoy.filters.http.ext_proc"]["overrides"]["processing_mode"]
    assert (main["request_header_mode"], main["response_header_mode"]) == ("SEND", "SEND")
    assert per_route["tollgate.local_reply_observer"]["disabled"] is True


def test_local_reply_observer_never_holds_or_fails_a_request() -> None:
    observer = filter_config(default_doc(), "tollgate.local_reply_observer")
    assert observer["observability_mode"] is True
    assert observer["failure_mode_allow"] is True
    mode = observer["processing_mode"]
    assert (mode["request_header_mode"], mode["response_header_mode"]) == ("SKIP", "SEND")
    assert observer["grpc_service"] == ext_proc_filter(default_doc())["grpc_service"]


def test_local_replies_get_openai_json_and_name_their_error() -> None:
    mappers = connection_manager(default_doc())["local_reply_config"]["mappers"]
    seen = {}
    for mapper in mappers:
        body = json.loads(mapper["body"]["inline_string"])
        (header,) = mapper["headers_to_add"]
        assert header["header"] == {"key": ENVOY_ERROR_HEADER, "value": body["error"]["code"]}
        assert body["error"]["code"] in ENVOY_ERROR_CODES
        assert mapper["body_format_override"]["content_type"] == "application/json"
        expression = mapper["filter"]["extension_filter"]["typed_config"]["expression"]
        seen[body["error"]["code"]] = expression
    assert set(seen) == ENVOY_ERROR_CODES
    assert seen["upgrade_required"].startswith("response.code == 426 &&")
    assert "'request_payload_too_large'" in seen["body_too_large"]
    assert "'path_normalization_failed'" in seen["invalid_path"]
    # Tollgate's own answers (details = its error code) are left as they are.
    for expression in seen.values():
        assert "response.code_details" in expression


def test_dot_segments_reach_tollgate_and_encoded_slashes_are_refused() -> None:
    hcm = connection_manager(default_doc())
    # Tollgate refuses dot segments itself (400 invalid_path): Envoy must not resolve them.
    assert hcm["normalize_path"] is False
    assert hcm["merge_slashes"] is True
    assert hcm["path_with_escaped_slashes_action"] == "REJECT_REQUEST"


def test_header_limits_leave_room_for_tollgate_edits() -> None:
    hcm = connection_manager(default_doc())
    assert hcm["max_request_headers_kb"] == CLIENT_MAX_HEADERS_KB + MUTATION_HEADROOM_KB
    assert (
        hcm["common_http_protocol_options"]["max_headers_count"]
        == CLIENT_MAX_HEADERS_COUNT + MUTATION_HEADROOM_COUNT
    )
    # Envoy's defaults are what clients are held to (by Tollgate).
    assert (CLIENT_MAX_HEADERS_COUNT, CLIENT_MAX_HEADERS_KB) == (100, 60)


def test_upstreams_cannot_pass_their_errors_off_as_envoys() -> None:
    plaintext, tls, _ = routes(default_doc())
    for route in (plaintext, tls):
        assert route["response_headers_to_remove"] == [ENVOY_ERROR_HEADER]


# -- upstreams: Envoy's dynamic forward proxy, steered by Tollgate's headers -----------------

HOST_MATCH = {
    "name": UPSTREAM_HOST_HEADER,
    "string_match": {"safe_regex": {"regex": UPSTREAM_HOST_PATTERN}},
}
FORWARD_PROXY_ROUTE = {
    "envoy.filters.http.dynamic_forward_proxy": {
        "@type": "type.googleapis.com/"
        "envoy.extensions.filters.http.dynamic_forward_proxy.v3.PerRouteConfig",
        "host_rewrite_header": UPSTREAM_HOST_HEADER,
    }
}


def test_routes_plaintext_then_verified_tls_then_not_routed() -> None:
    plaintext, tls, not_routed = routes(default_doc())

    assert plaintext["match"] == {
        "prefix": "/",
        "headers": [
            {"name": UPSTREAM_SCHEME_HEADER, "string_match": {"exact": "http"}},
            HOST_MATCH,
        ],
    }
    assert tls["match"] == {"prefix": "/", "headers": [HOST_MATCH]}
    for route, cluster_name in ((plaintext, "upstream_http"), (tls, "upstream_https")):
        # The route timeout is upstream_timeout_s, and there is no retry policy (no retries).
        assert route["route"] == {"cluster": cluster_name, "timeout": "600s"}
        assert route["typed_per_filter_config"] == FORWARD_PROXY_ROUTE
        assert route["request_headers_to_remove"] == [UPSTREAM_HOST_HEADER, UPSTREAM_SCHEME_HEADER]

    assert not_routed["match"] == {"prefix": "/"}
    assert not_routed["direct_response"]["status"] == 502
    assert json.loads(not_routed["direct_response"]["body"]["inline_string"]) == {
        "error": {
            "message": "request was not routed by Tollgate",
            "type": "invalid_request_error",
            "code": "not_routed",
            "param": None,
        }
    }
    assert not_routed["response_headers_to_add"] == [
        {
            "header": {"key": "content-type", "value": "application/json"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    ]


@pytest.mark.parametrize(
    ("value", "routed"),
    [
        ("api.openai.com:443", True),
        ("localhost:8443", True),
        ("my-resource.openai.azure.com:443", True),
        ("10.0.0.7:8080", True),
        ("[::1]:8080", True),
        ("[2001:db8::1]:443", True),
        ("", False),
        ("api.openai.com", False),  # no port
        ("[::1]", False),
        ("user@evil.example:443", False),
        ("evil.example:443/x", False),
        ("a:1,b:2", False),
    ],
)
def test_upstream_host_pattern(value: str, routed: bool) -> None:
    # RE2 (Envoy's safe_regex) matches the whole value, as fullmatch does; the pattern uses
    # nothing whose meaning differs between the two engines.
    assert (re.fullmatch(UPSTREAM_HOST_PATTERN, value) is not None) is routed


def test_client_sent_upstream_headers_are_removed_before_routing() -> None:
    hcm = connection_manager(default_doc())
    (early,) = hcm["early_header_mutation_extensions"]
    assert early["name"] == "envoy.http.early_header_mutation.header_mutation"
    assert early["typed_config"]["mutations"] == [
        {"remove": UPSTREAM_HOST_HEADER},
        {"remove": UPSTREAM_SCHEME_HEADER},
    ]


def test_upstream_clusters_are_forward_proxies_sharing_one_dns_cache() -> None:
    doc = default_doc()
    (proxy,) = [
        f
        for f in connection_manager(doc)["http_filters"]
        if f["name"] == "envoy.filters.http.dynamic_forward_proxy"
    ]
    dns_cache = proxy["typed_config"]["dns_cache_config"]
    assert dns_cache == {"name": "tollgate_upstreams", "dns_lookup_family": "V4_PREFERRED"}
    for name in ("upstream_https", "upstream_http"):
        upstream = cluster(doc, name)
        assert upstream["cluster_type"]["name"] == "envoy.clusters.dynamic_forward_proxy"
        assert upstream["cluster_type"]["typed_config"]["dns_cache_config"] == dns_cache
        assert upstream["lb_policy"] == "CLUSTER_PROVIDED"
        assert upstream["connect_timeout"] == "10s"
        assert upstream["per_connection_buffer_limit_bytes"] == 32 * 1024 * 1024
        assert "load_assignment" not in upstream
    assert "upstream" not in [c["name"] for c in doc["static_resources"]["clusters"]]


def test_https_cluster_verifies_the_certificate_of_each_requests_host() -> None:
    upstream = cluster(default_doc(), "upstream_https")
    options = upstream["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    # SNI and the SAN check follow the host the forward proxy rewrote the request to.
    assert options["upstream_http_protocol_options"] == {
        "auto_sni": True,
        "auto_san_validation": True,
    }
    tls = upstream["transport_socket"]["typed_config"]
    assert tls["@type"].endswith("UpstreamTlsContext")
    assert "sni" not in tls
    assert tls["common_tls_context"] == {
        "validation_context": {"trusted_ca": {"filename": "/etc/ssl/certs/ca-certificates.crt"}}
    }


def test_http_cluster_is_plaintext() -> None:
    assert "transport_socket" not in cluster(default_doc(), "upstream_http")


def test_upstream_ca_file_replaces_the_system_bundle(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    text = render_yaml(load_settings(environ={"TOLLGATE_UPSTREAM_CA_FILE": str(ca.cert_path)}))
    upstream = cluster(yaml.safe_load(text), "upstream_https")
    validation = upstream["transport_socket"]["typed_config"]["common_tls_context"][
        "validation_context"
    ]
    assert validation == {"trusted_ca": {"filename": str(ca.cert_path)}}
    path = tmp_path / "ca.yaml"
    path.write_text(text)
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_upstream_url_no_longer_shapes_the_envoy_config() -> None:
    rendered = {
        render_yaml(load_settings(environ={"TOLLGATE_UPSTREAM_URL": url}))
        for url in ("https://api.openai.com", "http://127.0.0.1:8090", "https://[::1]:8443")
    }
    assert len(rendered) == 1


@pytest.mark.parametrize("path", sorted((REPO / "envoy").glob("*.yaml")), ids=lambda p: p.name)
def test_committed_configs_are_current_and_valid(path: Path) -> None:
    target = path.stem.removeprefix("envoy-")
    assert path.read_text() == render_yaml(load_settings(environ={}), target), (
        f"{path.name} is stale: run `tollgate envoy-config --target {target} -o {path}`"
    )
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


# -- end-user JWTs (Envoy's jwt_authn in front of ext_proc) ----------------------------------

JWT_ISSUER = "https://id.example.com/"


def http_filters(doc: dict) -> list[dict]:
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["http_filters"]


def jwt_authn_config(doc: dict) -> dict:
    (jwt,) = [f for f in http_filters(doc) if f["name"] == "envoy.filters.http.jwt_authn"]
    return jwt["typed_config"]


def write_jwks(tmp_path: Path) -> Path:
    _key, jwks = make_signing_key("test-key")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    return path


def jwt_settings(tmp_path: Path, **environ: str) -> dict[str, str]:
    return {
        "TOLLGATE_JWT_ISSUER": JWT_ISSUER,
        "TOLLGATE_JWT_AUDIENCES": "tollgate,llm-gateway",
        "TOLLGATE_JWT_JWKS_FILE": str(write_jwks(tmp_path)),
        **environ,
    }


def test_jwt_authn_runs_before_ext_proc_and_its_payload_is_forwarded(tmp_path: Path) -> None:
    settings = load_settings(environ=jwt_settings(tmp_path))
    doc = yaml.safe_load(render_yaml(settings))
    names = [f["name"] for f in http_filters(doc)]
    assert names == [
        "envoy.filters.http.jwt_authn",
        "tollgate.local_reply_observer",
        "envoy.filters.http.json_to_metadata",
        "envoy.filters.http.ext_proc",
        "envoy.filters.http.dynamic_forward_proxy",
        "envoy.filters.http.router",
    ]
    assert ext_proc_filter(doc)["metadata_options"] == {
        "forwarding_namespaces": {"untyped": [REQUEST_FACTS_NAMESPACE, JWT_METADATA_NAMESPACE]},
        "receiving_namespaces": {"untyped": [TOLLGATE_NAMESPACE]},
    }

    jwt = jwt_authn_config(doc)
    bearer, bare = jwt["providers"]["tollgate_users"], jwt["providers"]["tollgate_users_bare"]
    for provider in (bearer, bare):
        assert provider["issuer"] == JWT_ISSUER
        assert provider["audiences"] == ["tollgate", "llm-gateway"]
        assert provider["local_jwks"] == {"filename": settings.jwt_jwks_file}
        assert provider["payload_in_metadata"] == JWT_PAYLOAD_KEY
        assert provider.get("forward", False) is False  # Envoy removes the verified token
    assert bearer["from_headers"] == [{"name": "x-tollgate-jwt", "value_prefix": "Bearer "}]
    assert bare["from_headers"] == [{"name": "x-tollgate-jwt"}]
    (rule,) = jwt["rules"]
    assert rule["match"] == {"prefix": "/"}
    # Either form may verify; no token passes; the bare form first (see _jwt_filter).
    assert rule["requires"]["requires_any"]["requirements"] == [
        {"provider_name": "tollgate_users_bare"},
        {"provider_name": "tollgate_users"},
        {"allow_missing": {}},
    ]

    path = tmp_path / "jwt.yaml"
    path.write_text(render_yaml(settings))
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_jwt_in_authorization_header_uses_the_bearer_form_only(tmp_path: Path) -> None:
    doc = yaml.safe_load(
        render_yaml(
            load_settings(environ=jwt_settings(tmp_path, TOLLGATE_JWT_HEADER="authorization"))
        )
    )
    jwt = jwt_authn_config(doc)
    assert list(jwt["providers"]) == ["tollgate_users"]
    assert jwt["providers"]["tollgate_users"]["from_headers"] == [
        {"name": "authorization", "value_prefix": "Bearer "}
    ]
    assert jwt["rules"][0]["requires"]["requires_any"]["requirements"] == [
        {"provider_name": "tollgate_users"},
        {"allow_missing": {}},
    ]


def test_remote_jwks_gets_a_verified_tls_cluster_and_validates(tmp_path: Path) -> None:
    uri = "https://id.example.com/.well-known/jwks.json"
    settings = load_settings(
        environ={"TOLLGATE_JWT_ISSUER": JWT_ISSUER, "TOLLGATE_JWT_JWKS_URI": uri}
    )
    text = render_yaml(settings)
    doc = yaml.safe_load(text)
    remote = jwt_authn_config(doc)["providers"]["tollgate_users"]["remote_jwks"]
    assert remote["http_uri"] == {"uri": uri, "cluster": "tollgate_jwks", "timeout": "5s"}
    assert remote["cache_duration"] == "300s"
    assert remote["async_fetch"] == {"fast_listener": True}
    assert "audiences" not in jwt_authn_config(doc)["providers"]["tollgate_users"]

    (jwks,) = [c for c in doc["static_resources"]["clusters"] if c["name"] == "tollgate_jwks"]
    assert jwks["type"] == "LOGICAL_DNS"
    assert jwks["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"
    ] == {"address": "id.example.com", "port_value": 443}
    tls = jwks["transport_socket"]["typed_config"]
    assert tls["sni"] == "id.example.com"
    validation = tls["common_tls_context"]["validation_context"]
    assert validation["match_typed_subject_alt_names"][0]["matcher"]["exact"] == "id.example.com"

    path = tmp_path / "remote.yaml"
    path.write_text(text)
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_jwks_file_wins_over_uri_and_needs_no_cluster(tmp_path: Path) -> None:
    settings = load_settings(
        environ=jwt_settings(tmp_path, TOLLGATE_JWT_JWKS_URI="https://id.example.com/jwks")
    )
    doc = yaml.safe_load(render_yaml(settings))
    provider = jwt_authn_config(doc)["providers"]["tollgate_users"]
    assert "remote_jwks" not in provider
    assert provider["local_jwks"] == {"filename": settings.jwt_jwks_file}
    assert "tollgate_jwks" not in [c["name"] for c in doc["static_resources"]["clusters"]]


def test_jwt_disabled_leaves_no_trace() -> None:
    doc = yaml.safe_load(render_yaml(load_settings(environ={})))
    assert ext_proc_filter(doc)["metadata_options"] == {
        "forwarding_namespaces": {"untyped": [REQUEST_FACTS_NAMESPACE]},
        "receiving_namespaces": {"untyped": [TOLLGATE_NAMESPACE]},
    }
    assert "envoy.filters.http.jwt_authn" not in [f["name"] for f in http_filters(doc)]
    assert "tollgate_jwks" not in [c["name"] for c in doc["static_resources"]["clusters"]]


def mtls_settings(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for Envoy's mutual TLS to a Tollgate on a non-loopback address."""
    ca = make_ca(tmp_path)
    server_cert, server_key = ca.issue(["tollgate.internal"], tmp_path)
    client_cert, client_key = ca.issue(["envoy"], tmp_path, client=True)
    return {
        "TOLLGATE_GRPC_ADDRESS": "10.0.0.7:9002",
        "TOLLGATE_GRPC_TLS_CERT_FILE": str(server_cert),
        "TOLLGATE_GRPC_TLS_KEY_FILE": str(server_key),
        "TOLLGATE_GRPC_TLS_CLIENT_CA_FILE": str(ca.cert_path),
        "TOLLGATE_ENVOY_GRPC_CLIENT_CERT_FILE": str(client_cert),
        "TOLLGATE_ENVOY_GRPC_CLIENT_KEY_FILE": str(client_key),
        "TOLLGATE_ENVOY_GRPC_CA_FILE": str(ca.cert_path),
        **extra,
    }


def extproc_tls(doc: dict) -> dict:
    socket = cluster(doc, "tollgate_extproc")["transport_socket"]
    assert socket["name"] == "envoy.transport_sockets.tls"
    return socket["typed_config"]


def test_extproc_cluster_presents_envoys_client_certificate(tmp_path: Path) -> None:
    env = mtls_settings(tmp_path, TOLLGATE_ENVOY_GRPC_SERVER_NAME="tollgate.internal")
    settings = load_settings(environ=env)
    text = render_yaml(settings)
    tls = extproc_tls(yaml.safe_load(text))
    assert tls["@type"].endswith("UpstreamTlsContext")
    assert tls["sni"] == "tollgate.internal"
    common = tls["common_tls_context"]
    assert common["alpn_protocols"] == ["h2"]
    assert common["tls_certificates"] == [
        {
            "certificate_chain": {"filename": env["TOLLGATE_ENVOY_GRPC_CLIENT_CERT_FILE"]},
            "private_key": {"filename": env["TOLLGATE_ENVOY_GRPC_CLIENT_KEY_FILE"]},
        }
    ]
    validation = common["validation_context"]
    assert validation["trusted_ca"] == {"filename": env["TOLLGATE_ENVOY_GRPC_CA_FILE"]}
    assert validation["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "tollgate.internal"}}
    ]
    path = tmp_path / "mtls.yaml"
    path.write_text(text)
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_extproc_tls_checks_an_ip_san_without_sni(tmp_path: Path) -> None:
    tls = extproc_tls(yaml.safe_load(render_yaml(load_settings(environ=mtls_settings(tmp_path)))))
    assert "sni" not in tls
    (san,) = tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
    assert san == {"san_type": "IP_ADDRESS", "matcher": {"exact": "10.0.0.7"}}


def test_extproc_cluster_is_plaintext_without_envoy_client_certificate() -> None:
    assert "transport_socket" not in cluster(default_doc(), "tollgate_extproc")


# -- Envoy's edge as Tollgate's ext_proc sees it ----------------------------------------------


def _headers(*pairs: tuple[str, bytes], end_of_stream: bool = True) -> ep.HttpHeaders:
    msg = ep.HttpHeaders(end_of_stream=end_of_stream)
    for key, value in pairs:
        msg.headers.headers.add(key=key, raw_value=value)
    return msg


def _processor() -> tuple[RequestProcessor, RecordingSink]:
    sink = RecordingSink()
    ctx = ProcessorContext(sink=sink, router=Router.single("openai", "http://127.0.0.1:9"))
    return RequestProcessor(ctx), sink


REQUEST = ((":method", b"POST"), (":path", b"/v1/chat/completions"), (":authority", b"x"))


@pytest.mark.parametrize(
    ("count", "value_bytes", "refused"),
    [
        (100, 1, False),
        (101, 1, True),
        (10, 6138, False),  # 60 KiB exactly, with the six-byte names
        (10, 6139, True),
    ],
)
def test_clients_are_held_to_the_standard_header_limits(
    count: int, value_bytes: int, refused: bool
) -> None:
    # Pseudo-headers and the headers Envoy adds do not count against the client.
    envoy_added = (("x-request-id", b"r" * 36), ("x-forwarded-proto", b"http"))
    client = tuple((f"x-h{i:03d}", b"v" * value_bytes) for i in range(count))
    msg = _headers(*REQUEST, *envoy_added, *client)
    if refused:
        with pytest.raises(PolicyRefusal) as refusal:
            check_client_headers(msg)
        assert (refusal.value.status, refusal.value.code) == (431, "headers_too_large")
    else:
        check_client_headers(msg)


def test_too_many_headers_are_refused_with_a_blocked_row() -> None:
    processor, sink = _processor()
    msg = _headers(*REQUEST, *((f"x-h{i}", b"v") for i in range(101)))
    response = processor.request_headers(msg)
    assert response.immediate_response.status.code == 431
    (record,) = sink.records
    assert (record.block_reason, record.endpoint) == ("headers_too_large", "/v1/chat/completions")


def test_a_declared_body_over_the_limit_is_refused_before_it_is_read() -> None:
    check_content_length(b"100", 100)
    check_content_length(None, 100)
    check_content_length(b"nonsense", 100)
    with pytest.raises(PolicyRefusal) as refusal:
        check_content_length(b"101", 100)
    assert (refusal.value.status, refusal.value.code) == (413, "body_too_large")


@pytest.mark.parametrize("code", sorted(ENVOY_ERROR_CODES))
def test_envoy_local_replies_are_recorded_as_blocked_with_their_code(code: str) -> None:
    # The observer's stream: only the response headers of Envoy's own reply.
    processor, sink = _processor()
    processor.response_headers(_headers((":status", b"400"), (ENVOY_ERROR_HEADER, code.encode())))
    processor.close()
    (record,) = sink.records
    assert record.outcome == usage_pb2.OUTCOME_BLOCKED
    assert record.block_reason == code
    assert not record.HasField("endpoint")


def test_envoy_413_after_tollgate_saw_the_request_keeps_what_it_knew() -> None:
    processor, sink = _processor()
    headers = (*REQUEST, ("content-type", b"application/json"), ("x-tollgate-user-id", b"u-1"))
    processor.request_headers(_headers(*headers, end_of_stream=False))
    processor.response_headers(
        _headers((":status", b"413"), (ENVOY_ERROR_HEADER, b"body_too_large"))
    )
    (record,) = sink.records
    assert (record.outcome, record.block_reason) == (usage_pb2.OUTCOME_BLOCKED, "body_too_large")
    assert (record.endpoint, record.end_user_id) == ("/v1/chat/completions", "u-1")


def test_an_unknown_error_code_header_is_not_trusted() -> None:
    processor, sink = _processor()
    processor.request_headers(_headers(*REQUEST))
    processor.response_headers(_headers((":status", b"413"), (ENVOY_ERROR_HEADER, b"made_up")))
    (record,) = sink.records
    assert record.outcome == usage_pb2.OUTCOME_UPSTREAM_ERROR
    assert not record.HasField("block_reason")

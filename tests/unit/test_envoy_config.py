"""Rendered Envoy bootstraps are accepted by the real Envoy binary (`--mode validate`)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.jwt_support import make_signing_key
from tollgate.config import load_settings
from tollgate.envoyconf import JWT_METADATA_NAMESPACE, JWT_PAYLOAD_KEY, TARGETS, render_yaml
from tollgate.localstack import envoy_binary

REPO = Path(__file__).resolve().parent.parent.parent


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def ext_proc_filter(doc: dict) -> dict:
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (ext,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc"]
    return ext["typed_config"]


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
    hcm_filters = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    names = [f["name"] for f in hcm_filters["typed_config"]["http_filters"]]
    assert names == ["envoy.filters.http.ext_proc", "envoy.filters.http.router"]


def test_https_upstream_verifies_certificate_and_sni() -> None:
    doc = yaml.safe_load(
        render_yaml(load_settings(environ={"TOLLGATE_UPSTREAM_URL": "https://api.example.com"}))
    )
    (upstream,) = [c for c in doc["static_resources"]["clusters"] if c["name"] == "upstream"]
    tls = upstream["transport_socket"]["typed_config"]
    assert tls["sni"] == "api.example.com"
    validation = tls["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"]["filename"] == "/etc/ssl/certs/ca-certificates.crt"
    assert validation["match_typed_subject_alt_names"][0]["matcher"]["exact"] == "api.example.com"


def test_plain_http_upstream_has_no_tls() -> None:
    doc = yaml.safe_load(
        render_yaml(load_settings(environ={"TOLLGATE_UPSTREAM_URL": "http://127.0.0.1:8090"}))
    )
    (upstream,) = [c for c in doc["static_resources"]["clusters"] if c["name"] == "upstream"]
    assert "transport_socket" not in upstream
    assert upstream["type"] == "STATIC"


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
        "envoy.filters.http.ext_proc",
        "envoy.filters.http.router",
    ]
    assert ext_proc_filter(doc)["metadata_options"] == {
        "forwarding_namespaces": {"untyped": [JWT_METADATA_NAMESPACE]}
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
    assert "metadata_options" not in ext_proc_filter(doc)
    assert "envoy.filters.http.jwt_authn" not in [f["name"] for f in http_filters(doc)]
    assert "tollgate_jwks" not in [c["name"] for c in doc["static_resources"]["clusters"]]

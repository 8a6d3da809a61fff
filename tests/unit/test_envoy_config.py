"""Rendered Envoy bootstraps are accepted by the real Envoy binary (`--mode validate`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tollgate.config import load_settings
from tollgate.envoyconf import TARGETS, render_yaml
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

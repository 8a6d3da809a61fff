"""Credentials Tollgate mints for Vertex AI gateway keys: access tokens from a service account,
got from a real HTTP token endpoint (a local one) with a JWT signed by the account's key."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cloud_support import EMAIL, TokenEndpoint, service_account_file
from tollgate.config import ConfigError
from tollgate.routing.cloud_credentials import GoogleAccessTokens


@pytest.fixture
def service_account(tmp_path: Path) -> Iterator[tuple[Path, TokenEndpoint]]:
    with service_account_file(tmp_path) as made:
        yield made


def test_tokens_are_minted_from_the_service_account(
    service_account: tuple[Path, TokenEndpoint],
) -> None:
    path, endpoint = service_account
    tokens = GoogleAccessTokens("vertex", str(path))
    assert tokens.token() is None  # nothing before start()
    tokens.start()
    try:
        assert tokens.token() == "ya29.minted-1"
        (claims,) = endpoint.assertions
        assert claims["iss"] == EMAIL
        # google-auth names Google's token endpoint as the audience, wherever it posts.
        assert claims["aud"] == "https://oauth2.googleapis.com/token"
        assert claims["scope"] == "https://www.googleapis.com/auth/cloud-platform"
        assert tokens.refresh()
        assert tokens.token() == "ya29.minted-2"
        assert "ya29" not in repr(tokens)
    finally:
        tokens.stop()


def test_a_bad_key_file_is_refused_without_showing_it(tmp_path: Path) -> None:
    secret = tmp_path / "sa.json"
    secret.write_text('{"type": "service_account", "private_key": "-----BEGIN SECRET"}')
    with pytest.raises(ConfigError, match="not a readable service account key") as refused:
        GoogleAccessTokens("vertex", str(secret))
    assert "BEGIN SECRET" not in str(refused.value)
    with pytest.raises(ConfigError, match="not a readable service account key"):
        GoogleAccessTokens("vertex", str(tmp_path / "missing.json"))


def test_an_unreachable_token_endpoint_leaves_no_token(
    service_account: tuple[Path, TokenEndpoint], tmp_path: Path
) -> None:
    path, _ = service_account
    info = json.loads(path.read_text())
    info["token_uri"] = "http://127.0.0.1:9/token"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(info))
    tokens = GoogleAccessTokens("vertex", str(broken))
    assert not tokens.refresh()
    assert tokens.token() is None

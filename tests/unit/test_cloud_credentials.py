"""Credentials Tollgate mints for Vertex AI gateway keys: access tokens from a service account,
got from a real HTTP token endpoint (a local one) with a JWT signed by the account's key."""

from __future__ import annotations

import http.server
import json
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tollgate.config import ConfigError
from tollgate.routing.cloud_credentials import GoogleAccessTokens

EMAIL = "tollgate@project.iam.gserviceaccount.com"


class TokenEndpoint:
    """Google's OAuth token endpoint as a service account sees it: a JWT-bearer grant in,
    an access token out (each one new)."""

    def __init__(self, public_key: Any) -> None:
        self.assertions: list[dict[str, Any]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                form = urllib.parse.parse_qs(
                    self.rfile.read(int(self.headers["content-length"])).decode()
                )
                claims = jwt.decode(
                    form["assertion"][0],
                    public_key,
                    algorithms=["RS256"],
                    options={"verify_aud": False},
                )
                outer.assertions.append(claims)
                answer = json.dumps(
                    {"access_token": f"ya29.minted-{len(outer.assertions)}", "expires_in": 3600}
                ).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()


@pytest.fixture
def service_account(tmp_path: Path) -> Iterator[tuple[Path, TokenEndpoint]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    endpoint = TokenEndpoint(key.public_key())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    path = tmp_path / "sa.json"
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "project",
                "private_key_id": "k1",
                "private_key": pem,
                "client_email": EMAIL,
                "token_uri": endpoint.url,
            }
        )
    )
    yield path, endpoint
    endpoint.server.shutdown()
    endpoint.server.server_close()


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

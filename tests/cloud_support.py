"""A Google service account and its OAuth token endpoint, local (no Google involved): for the
tests of the access tokens Tollgate mints for Vertex AI gateway keys."""

from __future__ import annotations

import http.server
import json
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

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


@contextmanager
def service_account_file(tmp_path: Path) -> Iterator[tuple[Path, TokenEndpoint]]:
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
    try:
        yield path, endpoint
    finally:
        endpoint.server.shutdown()
        endpoint.server.server_close()

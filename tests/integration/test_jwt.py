"""End-user JWTs through real Envoy (`jwt_authn`), real Tollgate and real Postgres.

Envoy verifies the token (issuer, audience, expiry, signature against a local JWKS), removes it
from the request and forwards the verified payload to ext_proc as metadata; Tollgate takes the
end-user id from its `sub` claim. A token that is sent but does not verify is refused by Envoy
(401; 403 for a wrong audience) before the request reaches Tollgate or the upstream; no token at
all leaves the other identity sources in charge.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.integration.conftest import (
    FakeUpstream,
    RunningTollgate,
    running_tollgate,
    tollgate_command,
    wait_for_rows,
)
from tests.jwt_support import make_signing_key, sign

pytestmark = pytest.mark.integration

ISSUER = "https://idp.tollgate.test"
AUDIENCE = "tollgate"
KID = "idp-key-1"
JWT_HEADER = "x-tollgate-jwt"
MESSAGES = [{"role": "user", "content": "Who am I?"}]


@dataclass
class JwtTollgate:
    running: RunningTollgate
    private_key: rsa.RSAPrivateKey

    def token(self, **overrides: Any) -> str:
        """A token Envoy accepts, unless ``overrides`` change (or, as None, drop) claims."""
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "jwt-user-42",
            "iat": now,
            "exp": now + 600,
        }
        claims.update(overrides)
        return sign(self.private_key, KID, {k: v for k, v in claims.items() if v is not None})

    def client(self, **headers: str) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.running.envoy_url,
            api_key="sk-app-own-key",
            default_headers=headers,
            max_retries=0,
        )


@pytest.fixture
def jwt_tollgate(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream
) -> Iterator[JwtTollgate]:
    """`tollgate up` with JWT identity on: issuer, audience and a local JWKS file."""
    private_key, jwks = make_signing_key(KID)
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(jwks))
    with running_tollgate(
        tmp_path / "state",
        database_url,
        fake_upstream,
        jwt_issuer=ISSUER,
        jwt_audiences=AUDIENCE,
        jwt_jwks_file=str(jwks_file),
    ) as running:
        yield JwtTollgate(running, private_key)


def chat(client: openai.OpenAI, **extra_headers: str) -> str:
    """One chat completion; returns its x-tollgate-request-id."""
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_headers=extra_headers or None
    )
    assert raw.parse().choices[0].message.content
    return raw.headers["x-tollgate-request-id"]


def ledger_row(database_url: str, request_id: str) -> dict[str, Any]:
    rows = wait_for_rows(database_url, "request_id = %s", (request_id,), 1, timeout_s=5)
    assert len(rows) == 1, f"no ledger row for {request_id}"
    return rows[0]


def test_verified_jwt_names_the_user_and_never_reaches_the_upstream(
    jwt_tollgate: JwtTollgate, fake_upstream: FakeUpstream, database_url: str
) -> None:
    token = jwt_tollgate.token()
    bearer = jwt_tollgate.client(**{JWT_HEADER: f"Bearer {token}"})

    plain = ledger_row(database_url, chat(bearer))
    assert (plain["end_user_id"], plain["identity_source"]) == ("jwt-user-42", "jwt")
    assert plain["outcome"] == "ok"

    # A client-sent user id next to a verified token does not win over it.
    spoofed = ledger_row(database_url, chat(bearer, **{"x-tollgate-user-id": "mallory"}))
    assert (spoofed["end_user_id"], spoofed["identity_source"]) == ("jwt-user-42", "jwt")

    # The "Bearer " prefix is optional on the custom header.
    bare = ledger_row(database_url, chat(jwt_tollgate.client(**{JWT_HEADER: token})))
    assert (bare["end_user_id"], bare["identity_source"]) == ("jwt-user-42", "jwt")

    seen = fake_upstream.recorded()["requests"]
    assert len(seen) == 3
    for request in seen:
        names = {name.lower() for name, _value in request["headers"]}
        assert JWT_HEADER not in names
        assert "x-tollgate-user-id" not in names
        assert not any(token in value for _name, value in request["headers"])


def test_token_that_does_not_verify_is_refused_by_envoy_and_reaches_nothing(
    jwt_tollgate: JwtTollgate, fake_upstream: FakeUpstream, database_url: str
) -> None:
    other_key, _ = make_signing_key(KID)
    now = int(time.time())
    valid_claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "jwt-user-42", "exp": now + 600}
    unauthorized = (openai.AuthenticationError, 401)
    # Envoy answers a wrong audience with 403, every other failed check with 401.
    cases: dict[str, tuple[str, tuple[type[openai.APIStatusError], int], str]] = {
        "signed by another key": (
            sign(other_key, KID, valid_claims),
            unauthorized,
            "Jwt verification fails",
        ),
        # An hour past `exp`, well beyond Envoy's 60 s clock skew.
        "expired": (
            jwt_tollgate.token(iat=now - 7200, exp=now - 3600),
            unauthorized,
            "Jwt is expired",
        ),
        "wrong audience": (
            jwt_tollgate.token(aud="someone-else"),
            (openai.PermissionDeniedError, 403),
            "Audiences in Jwt are not allowed",
        ),
        "unknown issuer": (jwt_tollgate.token(iss="https://evil.test"), unauthorized, ""),
        "not a JWT": ("not-a-jwt", unauthorized, ""),
    }
    for label, (token, (error, status), reason) in cases.items():
        for value in (f"Bearer {token}", token):
            client = jwt_tollgate.client(**{JWT_HEADER: value, "x-tollgate-user-id": "mallory"})
            with pytest.raises(error) as refused:
                chat(client)
            assert refused.value.status_code == status, (label, value[:7])
            assert reason in refused.value.response.text, (label, value[:7])
            # Envoy refused it before Tollgate saw the request; it is still a blocked row.
            row = ledger_row(database_url, refused.value.response.headers["x-tollgate-request-id"])
            assert (row["outcome"], row["block_reason"], row["status_code"]) == (
                "blocked",
                "invalid_jwt",
                status,
            ), label
            assert row["end_user_id"] is None, label
    assert fake_upstream.recorded() == {"requests": [], "connections": 0}


def test_no_token_leaves_the_other_identity_sources_in_charge(
    jwt_tollgate: JwtTollgate, fake_upstream: FakeUpstream, database_url: str
) -> None:
    client = jwt_tollgate.client(**{"x-tollgate-user-id": "header-user"})
    row = ledger_row(database_url, chat(client))
    assert (row["end_user_id"], row["identity_source"]) == ("header-user", "header")
    assert row["outcome"] == "ok"
    (seen,) = fake_upstream.recorded()["requests"]
    assert "x-tollgate-user-id" not in {name.lower() for name, _ in seen["headers"]}


def test_a_spent_budget_refuses_a_jwt_identified_user(
    jwt_tollgate: JwtTollgate, fake_upstream: FakeUpstream, database_url: str
) -> None:
    tollgate_command(
        jwt_tollgate.running.env, "limits", "create", "jwt-daily", "--scope", "user",
        "--subject", "jwt-user-42", "--measure", "usd", "--max", "0.01", "--period", "day",
    )  # fmt: skip
    time.sleep(2.5)  # one refresh of the limits (limit_cache_refresh_s, 2 s)
    # 2,000 output tokens of gpt-4o: $0.02, the whole budget at once.
    app = jwt_tollgate.client(
        **{JWT_HEADER: f"Bearer {jwt_tollgate.token()}", "x-fake-words": "2000"}
    )
    app.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    fake_upstream.clear()
    with pytest.raises(openai.RateLimitError) as refused:
        app.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert refused.value.response.json()["error"]["code"] == "budget_exceeded"
    assert fake_upstream.recorded()["requests"] == []
    request_id = refused.value.response.headers["x-tollgate-request-id"]
    (row,) = wait_for_rows(database_url, "request_id = %s", (request_id,), 1, timeout_s=10)
    assert (row["end_user_id"], row["identity_source"], row["block_reason"]) == (
        "jwt-user-42",
        "jwt",
        "budget_exceeded",
    )

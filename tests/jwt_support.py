"""Test-only JWT issuing: an RSA signing key with its JWKS, and RS256 tokens signed by it."""

from __future__ import annotations

import json
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm


def make_signing_key(kid: str) -> tuple[rsa.RSAPrivateKey, dict[str, Any]]:
    """A fresh RSA key and the JWKS (``{"keys": [...]}``) that publishes its public half."""
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_jwk = json.loads(RSAAlgorithm.to_jwk(private_key.public_key()))
    public_jwk.update(kid=kid, alg="RS256", use="sig")
    return private_key, {"keys": [public_jwk]}


def sign(private_key: rsa.RSAPrivateKey, kid: str, claims: dict[str, Any]) -> str:
    """``claims`` as a compact RS256 JWT with ``kid`` in its header."""
    return jwt.encode(claims, private_key, algorithm="RS256", headers={"kid": kid})

"""Providers: where each one lives, how it authenticates, and the credential Tollgate holds.

Built in: ``openai``, ``anthropic`` and ``gemini``; ``vertex`` (regional hosts) and
``bedrock`` (``region = …``) once named. Operators add or change providers with
``[providers.NAME]`` tables (Azure OpenAI, vLLM, Ollama, LM Studio, …). A provider's API key
is read once at start-up from an environment variable or a mounted secret file; it is never
logged and never part of a repr.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tollgate.config import ConfigError, Settings
from tollgate.routing.allowlist import BaseUri, InvalidBaseUri, parse_base_uri
from tollgate.routing.cloud_credentials import AwsSigner, GoogleAccessTokens

__all__ = ["APIS", "AUTH_STYLES", "CLIENT_AUTH_HEADERS", "Provider", "load_providers"]

# How a provider takes its key: style → header name (and the value's prefix).
AUTH_STYLES: dict[str, tuple[str, str] | None] = {
    "bearer": ("authorization", "Bearer "),
    "x-api-key": ("x-api-key", ""),
    "api-key": ("api-key", ""),
    "x-goog-api-key": ("x-goog-api-key", ""),
    "none": None,
    # AWS Signature Version 4 over the whole request (Bedrock): signed once the body is known.
    "sigv4": None,
}
# Every header a client may carry a provider credential in; removed when Tollgate injects.
CLIENT_AUTH_HEADERS: tuple[str, ...] = ("authorization", "x-api-key", "api-key", "x-goog-api-key")
# Request and usage formats Tollgate understands.
APIS: tuple[str, ...] = ("openai", "anthropic", "gemini", "azure", "bedrock", "vertex")

_BUILT_IN: dict[str, dict[str, Any]] = {
    "openai": {
        "base_uri": "https://api.openai.com",
        "auth": "bearer",
        "api_key_env": "OPENAI_API_KEY",
        "api": "openai",
    },
    "anthropic": {
        "base_uri": "https://api.anthropic.com",
        "auth": "x-api-key",
        "api_key_env": "ANTHROPIC_API_KEY",
        "headers": {"anthropic-version": "2023-06-01"},
        "api": "anthropic",
    },
    "gemini": {
        "base_uri": "https://generativelanguage.googleapis.com",
        "auth": "x-goog-api-key",
        "api_key_env": "GEMINI_API_KEY",
        "api": "gemini",
    },
}
# Built in too, but only used once named in `providers` (an empty table will do): their
# traffic goes to a cloud account the operator chooses to use, never by default.
_OPT_IN: dict[str, dict[str, Any]] = {
    "vertex": {
        # Regional: each request goes to its path's location's host (docs/routing.md).
        "base_uri": "https://aiplatform.googleapis.com",
        "auth": "bearer",
        "api": "vertex",
    },
    "bedrock": {"auth": "none", "api": "bedrock"},
}
_KEYS = frozenset(
    {
        "base_uri",
        "auth",
        "api_key_env",
        "api_key_file",
        "headers",
        "api",
        "region",
        "service_account_file",
    }
)
# An AWS region name (us-east-1, eu-central-2, us-gov-west-1, ap-southeast-7).
_AWS_REGION = re.compile(r"[a-z]{2}(?:-gov|-iso[a-z]*)?-[a-z]+-[0-9]{1,2}")


@dataclass(frozen=True)
class Provider:
    """One upstream provider as routing sees it."""

    name: str
    base: BaseUri
    api: str = "openai"
    auth: str = "bearer"
    api_key: str | None = field(default=None, repr=False)
    headers: tuple[tuple[str, str], ...] = ()
    region: str | None = None
    # Vertex AI: access tokens minted from a service account (instead of a static key).
    tokens: GoogleAccessTokens | None = field(default=None, repr=False, compare=False)
    # Bedrock with auth = "sigv4": signs each request with the credentials Tollgate holds.
    signer: AwsSigner | None = field(default=None, repr=False, compare=False)

    def credential_header(self) -> tuple[str, bytes] | None:
        """The header carrying this provider's key, or None when it has none or needs none
        (a SigV4 signature is made per request, by :attr:`signer`)."""
        style = AUTH_STYLES[self.auth]
        secret = self.tokens.token() if self.tokens is not None else self.api_key
        if style is None or secret is None:
            return None
        name, prefix = style
        return name, (prefix + secret).encode()

    @property
    def needs_credential(self) -> bool:
        return AUTH_STYLES[self.auth] is not None or self.auth == "sigv4"

    @property
    def regional(self) -> bool:
        """A Vertex AI provider on Google's own hosts: each request goes to the regional host
        of the location its path names (a configured base URI elsewhere is used as is)."""
        return self.api == "vertex" and self.base.host == "aiplatform.googleapis.com"


def _api_key(name: str, table: Mapping[str, Any], environ: Mapping[str, str]) -> str | None:
    path = table.get("api_key_file")
    if path:
        try:
            key = Path(str(path)).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"provider {name!r}: cannot read api_key_file: {exc.strerror}"
            ) from None
        return key or None
    env_name = table.get("api_key_env")
    if env_name:
        return environ.get(str(env_name), "").strip() or None
    return None


def _provider(name: str, table: Mapping[str, Any], environ: Mapping[str, str]) -> Provider:
    unknown = set(table) - _KEYS
    if unknown:
        raise ConfigError(f"provider {name!r}: unknown keys {sorted(unknown)}")
    region = table.get("region")
    if region is not None and not _AWS_REGION.fullmatch(str(region)):
        raise ConfigError(f"provider {name!r}: region {region!r} is not an AWS region name")
    if region is not None and table.get("api") != "bedrock":
        raise ConfigError(f"provider {name!r}: region is for Bedrock (api = 'bedrock')")
    base_uri = table.get("base_uri")
    if base_uri is None and region is not None:
        base_uri = f"https://bedrock-runtime.{region}.amazonaws.com"
    if base_uri is None:
        raise ConfigError(f"provider {name!r}: set base_uri (or region, for Bedrock)")
    try:
        base = parse_base_uri(str(base_uri))
    except InvalidBaseUri as exc:
        raise ConfigError(f"provider {name!r}: base_uri: {exc}") from None
    auth = str(table.get("auth", "bearer"))
    if auth not in AUTH_STYLES:
        raise ConfigError(f"provider {name!r}: auth must be one of {', '.join(AUTH_STYLES)}")
    api = str(table.get("api", "openai"))
    if api not in APIS:
        raise ConfigError(f"provider {name!r}: api must be one of {', '.join(APIS)}")
    headers = table.get("headers", {})
    if not isinstance(headers, Mapping):
        raise ConfigError(f"provider {name!r}: headers must be a table of name = value")
    key_file = table.get("service_account_file")
    if key_file is not None and (api != "vertex" or auth != "bearer"):
        raise ConfigError(f"provider {name!r}: service_account_file is for Vertex AI (bearer)")
    signer = None
    if auth == "sigv4":
        sign_region = region or _region_of(base.host)
        if api != "bedrock" or sign_region is None:
            raise ConfigError(
                f"provider {name!r}: auth = 'sigv4' is for Bedrock, with its region (set region)"
            )
        signer = AwsSigner(name, str(sign_region))
    return Provider(
        name=name,
        base=base,
        api=api,
        auth=auth,
        api_key=_api_key(name, table, environ),
        headers=tuple((str(k).lower(), str(v)) for k, v in headers.items()),
        region=None if region is None else str(region),
        tokens=GoogleAccessTokens(name, str(key_file)) if key_file is not None else None,
        signer=signer,
    )


def _region_of(host: str) -> str | None:
    """The region of an AWS endpoint host (``bedrock-runtime.us-east-1.amazonaws.com``)."""
    parts = host.split(".")
    if len(parts) == 4 and parts[2:] == ["amazonaws", "com"] and _AWS_REGION.fullmatch(parts[1]):
        return parts[1]
    return None


def load_providers(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> dict[str, Provider]:
    """Built-in providers merged with the configured ones, keys read, ``upstream_url`` applied."""
    env = os.environ if environ is None else environ
    tables: dict[str, dict[str, Any]] = {name: dict(t) for name, t in _BUILT_IN.items()}
    for name, table in settings.providers.items():
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise ConfigError(f"provider name {name!r}: use letters, digits, - and _")
        key = name.lower()
        merged = tables.get(key, _OPT_IN.get(key, {})) | dict(table)
        tables[key] = merged
    default = settings.default_provider.lower()
    if default not in tables:
        raise ConfigError(f"default_provider {default!r} is not a configured provider")
    if settings.upstream_url:
        tables[default] = tables[default] | {"base_uri": settings.upstream_url}
    return {name: _provider(name, table, env) for name, table in tables.items()}

"""Providers: where each one lives, how it authenticates, and the credential Tollgate holds.

Built in: ``openai``, ``anthropic`` and ``gemini``. Operators add or change providers with
``[providers.NAME]`` tables (Azure OpenAI, vLLM, Ollama, LM Studio, …). A provider's API key
is read once at start-up from an environment variable or a mounted secret file; it is never
logged and never part of a repr.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tollgate.config import ConfigError, Settings
from tollgate.routing.allowlist import BaseUri, InvalidBaseUri, parse_base_uri

__all__ = ["APIS", "AUTH_STYLES", "CLIENT_AUTH_HEADERS", "Provider", "load_providers"]

# How a provider takes its key: style → header name (and the value's prefix).
AUTH_STYLES: dict[str, tuple[str, str] | None] = {
    "bearer": ("authorization", "Bearer "),
    "x-api-key": ("x-api-key", ""),
    "api-key": ("api-key", ""),
    "x-goog-api-key": ("x-goog-api-key", ""),
    "none": None,
}
# Every header a client may carry a provider credential in; removed when Tollgate injects.
CLIENT_AUTH_HEADERS: tuple[str, ...] = ("authorization", "x-api-key", "api-key", "x-goog-api-key")
# Request and usage formats Tollgate understands.
APIS: tuple[str, ...] = ("openai", "anthropic", "gemini", "azure", "bedrock")

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
_KEYS = frozenset({"base_uri", "auth", "api_key_env", "api_key_file", "headers", "api"})


@dataclass(frozen=True)
class Provider:
    """One upstream provider as routing sees it."""

    name: str
    base: BaseUri
    api: str = "openai"
    auth: str = "bearer"
    api_key: str | None = field(default=None, repr=False)
    headers: tuple[tuple[str, str], ...] = ()

    def credential_header(self) -> tuple[str, bytes] | None:
        """The header carrying this provider's key, or None when it has none or needs none."""
        style = AUTH_STYLES[self.auth]
        if style is None or self.api_key is None:
            return None
        name, prefix = style
        return name, (prefix + self.api_key).encode()

    @property
    def needs_credential(self) -> bool:
        return AUTH_STYLES[self.auth] is not None


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
    try:
        base = parse_base_uri(str(table.get("base_uri", "")))
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
    return Provider(
        name=name,
        base=base,
        api=api,
        auth=auth,
        api_key=_api_key(name, table, environ),
        headers=tuple((str(k).lower(), str(v)) for k, v in headers.items()),
    )


def load_providers(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> dict[str, Provider]:
    """Built-in providers merged with the configured ones, keys read, ``upstream_url`` applied."""
    env = os.environ if environ is None else environ
    tables: dict[str, dict[str, Any]] = {name: dict(t) for name, t in _BUILT_IN.items()}
    for name, table in settings.providers.items():
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise ConfigError(f"provider name {name!r}: use letters, digits, - and _")
        merged = tables.get(name.lower(), {}) | dict(table)
        tables[name.lower()] = merged
    default = settings.default_provider.lower()
    if default not in tables:
        raise ConfigError(f"default_provider {default!r} is not a configured provider")
    if settings.upstream_url:
        tables[default] = tables[default] | {"base_uri": settings.upstream_url}
    return {name: _provider(name, table, env) for name, table in tables.items()}

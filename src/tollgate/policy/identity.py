"""End-user identity: where it comes from and how it is normalised."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tollgate.policy.headers import USER_ID_HEADERS

__all__ = ["MAX_USER_ID_CHARS", "Identity", "normalise_user_id", "resolve_from_headers"]

MAX_USER_ID_CHARS = 255


@dataclass(frozen=True)
class Identity:
    user_id: str
    source: str


def normalise_user_id(raw: bytes) -> str | None:
    """Decode (invalid UTF-8 replaced, never an error), trim, truncate; empty means absent."""
    text = raw.decode("utf-8", "replace").strip()
    if not text:
        return None
    return text[:MAX_USER_ID_CHARS]


def resolve_from_headers(headers: Mapping[str, bytes]) -> Identity | None:
    """The first user-id header present (canonical name first, then aliases)."""
    for name in USER_ID_HEADERS:
        raw = headers.get(name)
        if raw is None:
            continue
        user_id = normalise_user_id(raw)
        if user_id is not None:
            return Identity(user_id, "header")
    return None

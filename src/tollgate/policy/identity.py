"""End-user identity: the candidate sources of one request, normalisation, and which one wins.

Sources (names are what ``identity_source`` records in the ledger):

- trusted: ``jwt`` (a claim of a JWT Envoy's ``jwt_authn`` verified), ``key`` (the user a
  gateway key is bound to);
- client-sent: ``header`` (``x-tollgate-user-id`` or an alias), ``body_user``,
  ``body_safety_identifier``, ``body_metadata_user_id`` (Anthropic's ``metadata.user_id``).

Trusted sources are always tried before client-sent ones, each group in the configured order,
so a client cannot replace the identity its credentials carry (anti-spoofing). A client-sent
id that differs from the trusted one is ignored or refused, as configured.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import struct_pb2

from tollgate.policy.headers import USER_ID_HEADERS
from tollgate.policy.refusal import PolicyRefusal

__all__ = [
    "BODY_SOURCES",
    "JWT_METADATA_NAMESPACE",
    "JWT_PAYLOAD_KEY",
    "MAX_USER_ID_CHARS",
    "TRUSTED_SOURCES",
    "Identity",
    "IdentityResolver",
    "body_candidates",
    "header_candidate",
    "jwt_claim",
    "normalise_user_id",
]

MAX_USER_ID_CHARS = 255
TRUSTED_SOURCES = ("jwt", "key")
BODY_SOURCES = ("body_user", "body_safety_identifier", "body_metadata_user_id")

# Where Envoy's jwt_authn filter puts the verified payload (``payload_in_metadata``), and the
# ext_proc filter forwards it from (``metadata_options.forwarding_namespaces``).
JWT_METADATA_NAMESPACE = "envoy.filters.http.jwt_authn"
JWT_PAYLOAD_KEY = "jwt_payload"

_STRICT = re.compile(r"[A-Za-z0-9._:@-]+")
# C0/C1 control characters (NUL cannot even be stored in a Postgres text column) and lone
# surrogates (a JSON body's "\ud800" escape; no UTF-8 encoder accepts them).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclass(frozen=True)
class Identity:
    user_id: str
    source: str


def normalise_user_id(raw: bytes | str) -> str | None:
    """Decoded (invalid UTF-8 replaced, never an error), control characters and lone
    surrogates replaced, trimmed, truncated to 255 characters; empty or whitespace-only means
    absent (None). The result can always be encoded and stored."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = _CONTROL.sub("\ufffd", text.strip()).strip()
    if not text:
        return None
    return text[:MAX_USER_ID_CHARS]


def header_candidate(headers: Mapping[str, bytes]) -> str | None:
    """The first non-empty user-id header (canonical name first, then the aliases)."""
    for name in USER_ID_HEADERS:
        raw = headers.get(name)
        if raw is not None:
            user_id = normalise_user_id(raw)
            if user_id is not None:
                return user_id
    return None


def _scalar(value: Any) -> str | None:
    if isinstance(value, str):
        return normalise_user_id(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return normalise_user_id(str(value))
    return None


def body_candidates(body: Mapping[str, Any]) -> dict[str, str]:
    """The user ids a JSON request body names: ``user``, ``safety_identifier`` and
    ``metadata.user_id``. Values that are not strings (or integers) are ignored."""
    found: dict[str, str] = {}
    for source, value in (
        ("body_user", body.get("user")),
        ("body_safety_identifier", body.get("safety_identifier")),
    ):
        user_id = _scalar(value)
        if user_id is not None:
            found[source] = user_id
    metadata = body.get("metadata")
    if isinstance(metadata, Mapping):
        user_id = _scalar(metadata.get("user_id"))
        if user_id is not None:
            found["body_metadata_user_id"] = user_id
    return found


def jwt_claim(payload: struct_pb2.Struct, claim_path: str) -> str | None:
    """The claim at ``claim_path`` (dots reach into objects) of a verified JWT payload."""
    node: struct_pb2.Struct | None = payload
    value: struct_pb2.Value | None = None
    for part in claim_path.split("."):
        if node is None or part not in node.fields:
            return None
        value = node.fields[part]
        node = value.struct_value if value.WhichOneof("kind") == "struct_value" else None
    if value is None:
        return None
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return normalise_user_id(value.string_value)
    if kind == "number_value" and value.number_value.is_integer():
        return normalise_user_id(str(int(value.number_value)))
    return None


class IdentityResolver:
    """Picks the end user of a request from its candidates, per the configured policy."""

    def __init__(
        self, order: Iterable[str], *, strict: bool = False, refuse_spoofing: bool = False
    ) -> None:
        order = tuple(order)
        self._trusted = tuple(s for s in order if s in TRUSTED_SOURCES)
        self._client = tuple(s for s in order if s not in TRUSTED_SOURCES)
        self._strict = strict
        self._refuse_spoofing = refuse_spoofing

    def uses(self, source: str) -> bool:
        return source in self._trusted or source in self._client

    def wants_body(self, candidates: Mapping[str, str]) -> bool:
        """Whether the body could still change the outcome, given the header candidates."""
        if not any(self.uses(s) for s in BODY_SOURCES):
            return False
        if any(s in candidates for s in self._trusted):
            # The body cannot win; it matters only if a conflict is to be refused.
            return self._refuse_spoofing
        for source in self._client:
            if source in candidates:
                return False
            if source in BODY_SOURCES:
                return True
        return False

    def pick(self, candidates: Mapping[str, str]) -> Identity | None:
        """The winning identity (trusted sources first), or None when no source has one."""
        return self._first(self._trusted, candidates) or self._first(self._client, candidates)

    def check(self, identity: Identity, candidates: Mapping[str, str]) -> None:
        """Raises :class:`PolicyRefusal` when the picked identity may not be used: a client-sent
        id contradicts a trusted one (and spoofing is refused), or in strict mode the id has
        characters outside ``[A-Za-z0-9._:@-]``."""
        spoofed = identity.source in TRUSTED_SOURCES and any(
            candidates[s] != identity.user_id for s in self._client if s in candidates
        )
        if spoofed and self._refuse_spoofing:
            raise PolicyRefusal.user_id_mismatch()
        if self._strict and not _STRICT.fullmatch(identity.user_id):
            raise PolicyRefusal.invalid_user_id()

    @staticmethod
    def _first(order: tuple[str, ...], candidates: Mapping[str, str]) -> Identity | None:
        for source in order:
            user_id = candidates.get(source)
            if user_id is not None:
                return Identity(user_id, source)
        return None

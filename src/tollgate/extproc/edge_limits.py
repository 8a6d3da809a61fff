"""The limits Envoy's edge holds a request to, shared by the rendered config and ext_proc.

Envoy checks a mutated request against the same header limits its codec holds clients to, so
a request near the limit that Tollgate edits (upstream host and scheme, ``accept-encoding``,
credentials, ``content-length``) would fail with a bare 500. The rendered listener therefore
allows :data:`MUTATION_HEADROOM_COUNT` more headers and :data:`MUTATION_HEADROOM_KB` more
KiB than the standard limits, and Tollgate itself holds clients to the standard ones
(:data:`CLIENT_MAX_HEADERS_COUNT`, :data:`CLIENT_MAX_HEADERS_KB`, Envoy's defaults),
refusing more with 431 ``headers_too_large``.

Envoy's own local replies (HTTP/1.0, headers its codec refuses, a body over the buffer limit,
an encoded slash) carry :data:`ENVOY_ERROR_HEADER` with the error code of their JSON body, so
the ledger row can say the same (:data:`ENVOY_ERROR_CODES`).
"""

from __future__ import annotations

from dataclasses import dataclass

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from tollgate.policy.refusal import PolicyRefusal

__all__ = [
    "CLIENT_MAX_HEADERS_COUNT",
    "CLIENT_MAX_HEADERS_KB",
    "ENVOY_ERROR_CODES",
    "ENVOY_ERROR_HEADER",
    "ENVOY_LOCAL_REPLIES",
    "MUTATION_HEADROOM_COUNT",
    "MUTATION_HEADROOM_KB",
    "EnvoyLocalReply",
    "check_client_headers",
    "check_content_length",
    "declared_length",
    "envoy_error_code",
]

#: Envoy's default ``max_headers_count``: what a client may send.
CLIENT_MAX_HEADERS_COUNT = 100
#: Envoy's default ``max_request_headers_kb``: what a client may send.
CLIENT_MAX_HEADERS_KB = 60
#: Headers Tollgate may add on top of a client's (it adds at most about ten).
MUTATION_HEADROOM_COUNT = 32
#: KiB Tollgate's header edits may add (credentials and host names are short).
MUTATION_HEADROOM_KB = 8

#: Response header on Envoy's own local replies: the ``code`` of their JSON error body.
ENVOY_ERROR_HEADER = "x-tollgate-error-code"


@dataclass(frozen=True, slots=True)
class EnvoyLocalReply:
    """One kind of Envoy's own local reply: its status and ``%RESPONSE_CODE_DETAILS%``
    (exact values or prefixes), the error ``code`` Tollgate gives it and its message."""

    status: int
    code: str
    message: str
    details: tuple[str, ...] = ()
    detail_prefixes: tuple[str, ...] = ()

    def matches(self, status: int | None, details: str) -> bool:
        return status == self.status and (
            details in self.details or details.startswith(self.detail_prefixes)
        )


#: Envoy's local replies that Tollgate names. Envoy's config gives each its OpenAI-style body
#: and :data:`ENVOY_ERROR_HEADER` (a CEL condition built from the same entry); a plan that
#: skips the response headers reads the status and details from ext_proc's attributes.
ENVOY_LOCAL_REPLIES: tuple[EnvoyLocalReply, ...] = (
    EnvoyLocalReply(426, "upgrade_required", "HTTP/1.1 or later is required.", ("low_version",)),
    EnvoyLocalReply(
        431,
        "headers_too_large",
        f"The request headers exceed {CLIENT_MAX_HEADERS_COUNT} headers or "
        f"{CLIENT_MAX_HEADERS_KB} KiB.",
        detail_prefixes=("http1.", "http2."),
    ),
    EnvoyLocalReply(
        413, "body_too_large", "The request body is too large.", ("request_payload_too_large",)
    ),
    EnvoyLocalReply(
        400,
        "invalid_path",
        "Invalid request path: encoded slashes or backslashes, or a path that cannot be "
        "normalised.",
        ("path_normalization_failed",),
    ),
    EnvoyLocalReply(
        400,
        "bad_request",
        "The request is not valid HTTP (invalid characters or framing).",
        detail_prefixes=("http1.", "http2."),
    ),
)
#: The codes Envoy's local replies are given; the ledger's ``block_reason`` for them.
ENVOY_ERROR_CODES = frozenset(reply.code for reply in ENVOY_LOCAL_REPLIES)


def envoy_error_code(status: int | None, details: str) -> str | None:
    """The code of the Envoy local reply with this status and details, if it is one."""
    for reply in ENVOY_LOCAL_REPLIES:
        if reply.matches(status, details):
            return reply.code
    return None


# Request headers Envoy's connection manager adds before ext_proc sees the request.
_ENVOY_ADDED = frozenset({"x-request-id", "x-forwarded-proto"})


def check_client_headers(headers: ep.HttpHeaders) -> None:
    """Refuse (431 ``headers_too_large``) more headers than a client may send.

    Counts what the client sent: neither pseudo-headers nor the headers Envoy adds itself
    (:data:`_ENVOY_ADDED`), each header's name and value bytes.
    """
    entries = [
        h
        for h in headers.headers.headers
        if not h.key.startswith(":") and h.key.lower() not in _ENVOY_ADDED
    ]
    size = sum(len(h.key) + len(h.raw_value or h.value.encode()) for h in entries)
    if len(entries) > CLIENT_MAX_HEADERS_COUNT or size > CLIENT_MAX_HEADERS_KB * 1024:
        raise PolicyRefusal(
            431,
            "headers_too_large",
            f"The request headers exceed {CLIENT_MAX_HEADERS_COUNT} headers or "
            f"{CLIENT_MAX_HEADERS_KB} KiB.",
        )


def declared_length(content_length: bytes | None) -> int | None:
    """The body length a ``content-length`` value declares; None when absent or not plain
    ASCII digits (no sign, no ``_``, as Python's ``int`` would take)."""
    if content_length is None or not content_length.strip().isdigit():
        return None
    return int(content_length)


def check_content_length(content_length: bytes | None, max_body_bytes: int) -> None:
    """Refuse (413 ``body_too_large``) a body Tollgate must read that is declared too large.

    Refused before the body is read: a body over Envoy's buffer limit that arrives while the
    request headers are with Tollgate would otherwise stall the request (Envoy 1.40).
    """
    length = declared_length(content_length)
    if length is not None and length > max_body_bytes:
        raise PolicyRefusal(
            413, "body_too_large", f"The request body exceeds {max_body_bytes} bytes."
        )

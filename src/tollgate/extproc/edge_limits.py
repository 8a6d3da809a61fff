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

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from tollgate.policy.refusal import PolicyRefusal

__all__ = [
    "CLIENT_MAX_HEADERS_COUNT",
    "CLIENT_MAX_HEADERS_KB",
    "ENVOY_ERROR_CODES",
    "ENVOY_ERROR_HEADER",
    "MUTATION_HEADROOM_COUNT",
    "MUTATION_HEADROOM_KB",
    "check_client_headers",
    "check_content_length",
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
#: The codes Envoy's local replies are given; the ledger's ``block_reason`` for them.
ENVOY_ERROR_CODES = frozenset(
    {
        "upgrade_required",
        "headers_too_large",
        "body_too_large",
        "invalid_path",
        "bad_request",
    }
)
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

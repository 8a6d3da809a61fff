"""The attribution headers Tollgate reads, with the aliases other proxies' apps send.

None of these ever reaches the upstream provider. Names are lower case: Envoy hands
ext_proc lower-cased header names.
"""

from __future__ import annotations

__all__ = [
    "ATTRIBUTION_HEADERS",
    "CREDENTIAL_HEADERS",
    "FORWARD_PREFIXES",
    "LIMIT_REMAINING_HEADER",
    "LIMIT_RESET_HEADER",
    "LIST_HEADERS",
    "REQUEST_ID_HEADER",
    "USER_ID_HEADERS",
    "is_attribution_header",
    "is_look_alike",
]

USER_ID_HEADERS: tuple[str, ...] = ("x-tollgate-user-id", "x-proxyify-user-id", "xproxy-user-id")
ENFORCE_HEADERS = ("x-tollgate-enforce-user-id", "x-usagepanda-enforce-user-ids")
LIMIT_IDS_HEADERS = ("x-tollgate-limit-ids", "xproxy-limit-ids")
TAGS_HEADERS = ("x-tollgate-tags", "xproxy-request-tags")
LOGGING_DISABLE_HEADERS = ("x-tollgate-logging-disable", "xproxy-logging-disable")
BASE_URI_HEADERS = ("x-tollgate-base-uri", "xproxy-provider-baseuri")
USE_CASE_ID_HEADERS = ("x-tollgate-use-case-id", "xproxy-usecase-id")
USE_CASE_NAME_HEADERS = ("x-tollgate-use-case-name", "xproxy-usecase-name")
USE_CASE_VERSION_HEADERS = ("x-tollgate-use-case-version", "xproxy-usecase-version")
ROUTE_AS_RESOURCE_HEADERS = ("x-tollgate-route-as-resource", "xproxy-routeas-resource")
GATEWAY_KEY_HEADER = "x-tollgate-key"
FORWARD_PREFIXES: tuple[str, ...] = ("x-tollgate-forward-", "xproxy-forward-")

ATTRIBUTION_HEADERS: frozenset[str] = frozenset(
    (
        *USER_ID_HEADERS,
        *ENFORCE_HEADERS,
        *LIMIT_IDS_HEADERS,
        *TAGS_HEADERS,
        *LOGGING_DISABLE_HEADERS,
        *BASE_URI_HEADERS,
        *USE_CASE_ID_HEADERS,
        *USE_CASE_NAME_HEADERS,
        *USE_CASE_VERSION_HEADERS,
        *ROUTE_AS_RESOURCE_HEADERS,
        GATEWAY_KEY_HEADER,
    )
)

REQUEST_ID_HEADER = "x-tollgate-request-id"
#: On allowed answers: what remains of the tightest limit the request was charged to (in its
#: measure) and when its period resets (RFC 3339, UTC; absent for a total limit).
LIMIT_REMAINING_HEADER = "x-tollgate-limit-remaining"
LIMIT_RESET_HEADER = "x-tollgate-limit-reset"


# Header names that hold lists: repeated headers are combined (RFC 9110 section 5.3). For any
# other header the first occurrence counts.
LIST_HEADERS: frozenset[str] = frozenset((*TAGS_HEADERS, *LIMIT_IDS_HEADERS))

# Tollgate's own namespace and Pay-i's: nothing in them is meant for a provider.
RESERVED_PREFIXES: tuple[str, ...] = ("x-tollgate-", "xproxy-")


# Headers that carry a credential (a gateway key or a provider key). Sent more than once with
# different values, the request is refused (``ambiguous_credentials``): no rule for picking
# one could be both obvious and safe.
CREDENTIAL_HEADERS: frozenset[str] = frozenset(
    ("authorization", "x-api-key", "api-key", "x-goog-api-key", GATEWAY_KEY_HEADER)
)


def is_attribution_header(name: str) -> bool:
    """True for every header Tollgate consumes: the table above, any case of alias, and
    everything in the ``x-tollgate-`` and ``xproxy-`` namespaces (forwards included)."""
    return name in ATTRIBUTION_HEADERS or name.startswith(RESERVED_PREFIXES)


def is_look_alike(name: str) -> bool:
    """True for a name that is one of Tollgate's once ``_`` is read as ``-``
    (``x_tollgate_user_id``, ``xproxy_user-id``): stripped like the real one, never honoured.

    Many servers treat ``_`` and ``-`` alike in header names (CGI, WSGI); a proxy that filters
    on the canonical name would let the look-alike through.
    """
    return "_" in name and is_attribution_header(name.replace("_", "-"))

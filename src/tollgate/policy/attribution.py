"""Reads the attribution headers of one request: tags, use case, limits, switches, forwards.

Every header named in :mod:`tollgate.policy.headers` is consumed here and removed before the
upstream; ``x-tollgate-forward-<name>`` (alias ``xproxy-forward-<name>``) is passed on as
``<name>``. Values are bytes and may be any bytes: nothing here raises on bad encoding.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from tollgate.policy import headers as h
from tollgate.policy.refusal import PolicyRefusal
from tollgate.routing.providers import CLIENT_AUTH_HEADERS

__all__ = [
    "MAX_LIST_ITEMS",
    "MAX_TEXT_CHARS",
    "RequestAttribution",
    "ambiguous_credential",
    "forwardable",
    "holds_gateway_key",
    "parse_attribution",
    "parse_bool",
]

MAX_TEXT_CHARS = 255
MAX_LIST_ITEMS = 64

# Names a forward header may not produce (compared with "_" read as "-"): credentials of any
# provider, hop-by-hop and framing headers, the headers Tollgate sets itself, and (checked
# apart) pseudo-headers, AWS signature headers and Tollgate's own namespaces. Forwarding
# exists to pass an application header that would otherwise be consumed, not to add
# credentials next to injected ones or to steer the proxy.
_NOT_FORWARDABLE = frozenset(
    {
        # credentials
        *CLIENT_AUTH_HEADERS,
        "proxy-authorization",
        "cookie",
        "ocp-apim-subscription-key",
        # hop-by-hop and framing
        "host",
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "content-length",
        # set by Tollgate
        "accept-encoding",
        "content-encoding",
    }
)
# Bedrock's SigV4 headers (x-amz-date, x-amz-security-token, x-amz-content-sha256) are signed.
_NOT_FORWARDABLE_PREFIXES = (":", "x-amz-")
# A gateway key as a token: "tg_" not inside a longer token, and long enough to be one (keys
# are "tg_" + 43 characters; a shorter tail is no secret).
_GATEWAY_TOKEN = re.compile(rb"(?<![A-Za-z0-9_-])tg_[A-Za-z0-9_-]{16}")
# In an authorization value, a comma followed by a new "scheme credentials" pair: Envoy joins
# repeated authorization headers into one value with ",". (SigV4's ", SignedHeaders=…" is
# an auth-param, "name=value", and does not match.)
_NEXT_CREDENTIAL = re.compile(rb",[ \t]*[!#$%&'*+.^_`|~0-9A-Za-z-]+ +[^ \t=,]")

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


@dataclass(frozen=True)
class RequestAttribution:
    """What the attribution headers of one request say (all optional)."""

    tags: tuple[str, ...] = ()
    limit_ids: tuple[str, ...] = ()
    use_case_id: str | None = None
    use_case_name: str | None = None
    use_case_version: str | None = None
    logging_disabled: bool = False
    enforce_override: bool | None = None
    gateway_token: bytes | None = None
    route_as_resource: str | None = None
    base_uri: str | None = None
    forwards: tuple[tuple[str, bytes], ...] = ()
    strip: tuple[str, ...] = ()
    # A switch header whose value is unusable (the request is refused, with what was read).
    invalid_header: str | None = None

    def refuse_if_invalid(self) -> None:
        """Raises :class:`PolicyRefusal` (400 ``invalid_header_value``) for an unusable switch."""
        if self.invalid_header is not None:
            raise PolicyRefusal.invalid_header_value(self.invalid_header, "true or false")


def _text(raw: bytes | None) -> str | None:
    """Decoded (invalid UTF-8 replaced), trimmed, truncated; empty means absent."""
    if raw is None:
        return None
    text = raw.decode("utf-8", "replace").strip()
    return text[:MAX_TEXT_CHARS] if text else None


def _raw_text(raw: bytes | None) -> str | None:
    """Decoded as sent (invalid UTF-8 replaced): for values that are validated elsewhere."""
    return None if raw is None else raw.decode("utf-8", "replace")


def _list(raw: bytes | None) -> tuple[str, ...]:
    """A comma-separated list: items trimmed, empties dropped, duplicates kept once."""
    if raw is None:
        return ()
    items: dict[str, None] = {}
    for part in raw.decode("utf-8", "replace").split(","):
        item = part.strip()[:MAX_TEXT_CHARS]
        if item:
            items[item] = None
        if len(items) >= MAX_LIST_ITEMS:
            break
    return tuple(items)


def parse_bool(raw: bytes) -> bool | None:
    """``true``/``false`` (also 1/0, yes/no, on/off), any case; None when it is neither."""
    text = raw.decode("utf-8", "replace").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    return None


def _first(headers: Mapping[str, bytes], names: tuple[str, ...]) -> bytes | None:
    for name in names:
        value = headers.get(name)
        if value is not None:
            return value
    return None


def _bearer_gateway_token(authorization: bytes | None) -> bytes | None:
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() == b"bearer" and token.startswith(b"tg_"):
        return token
    return None


def forwardable(target: str) -> bool:
    """Whether ``x-tollgate-forward-<target>`` may send ``target`` upstream (see
    ``_NOT_FORWARDABLE``); ``_`` counts as ``-``, as many servers read it."""
    if not target or target.startswith(_NOT_FORWARDABLE_PREFIXES):
        return False
    name = target.replace("_", "-") if "_" in target else target
    return (
        name not in _NOT_FORWARDABLE
        and not name.startswith(_NOT_FORWARDABLE_PREFIXES)
        and not h.is_attribution_header(name)
    )


def holds_gateway_key(value: bytes) -> bool:
    """Whether a header value holds something shaped like a gateway key (``tg_…``) anywhere:
    inside a list, after ``Bearer``, in a query string."""
    return b"tg_" in value and _GATEWAY_TOKEN.search(value) is not None


def ambiguous_credential(headers: Mapping[str, bytes], repeated: Collection[str]) -> str | None:
    """The credential header that makes the request ambiguous, or None: one of
    :data:`~tollgate.policy.headers.CREDENTIAL_HEADERS` sent more than once with different
    values (``repeated``: the names that were), or an ``authorization`` value holding more than
    one credential (how Envoy passes repeated ``authorization`` headers: joined with ``,``)."""
    for name in repeated:
        if name in h.CREDENTIAL_HEADERS:
            return name
    authorization = headers.get("authorization")
    if (
        authorization is not None
        and b"," in authorization
        and _NEXT_CREDENTIAL.search(authorization) is not None
    ):
        return "authorization"
    return None


def parse_attribution(headers: Mapping[str, bytes]) -> RequestAttribution:
    """Read the attribution headers. Never raises: an unusable switch is noted in
    ``invalid_header`` (see :meth:`RequestAttribution.refuse_if_invalid`), so a refusal still
    keeps the tags, use case and key the request named."""
    enforce_override: bool | None = None
    invalid_header: str | None = None
    enforce_raw = _first(headers, h.ENFORCE_HEADERS)
    if enforce_raw is not None:
        enforce_override = parse_bool(enforce_raw)
        if enforce_override is None:
            invalid_header = h.ENFORCE_HEADERS[0]
    logging_raw = _first(headers, h.LOGGING_DISABLE_HEADERS)
    # Anything but an explicit "false" keeps bodies out of logs: the safe reading.
    logging_disabled = logging_raw is not None and parse_bool(logging_raw) is not False

    # Look-alikes (``x_tollgate_user_id``) are stripped too, and never read.
    strip = [name for name in headers if h.is_attribution_header(name) or h.is_look_alike(name)]
    bearer = _bearer_gateway_token(headers.get("authorization"))
    if bearer is not None:
        strip.append("authorization")
    key_header = headers.get(h.GATEWAY_KEY_HEADER)
    gateway_token = key_header.strip() if key_header is not None else bearer

    forwards: list[tuple[str, bytes]] = []
    for name, value in headers.items():
        for prefix in h.FORWARD_PREFIXES:
            if name.startswith(prefix):
                target = name.removeprefix(prefix)
                if forwardable(target):
                    forwards.append((target, value))
                break

    return RequestAttribution(
        tags=_list(_first(headers, h.TAGS_HEADERS)),
        limit_ids=_list(_first(headers, h.LIMIT_IDS_HEADERS)),
        use_case_id=_text(_first(headers, h.USE_CASE_ID_HEADERS)),
        use_case_name=_text(_first(headers, h.USE_CASE_NAME_HEADERS)),
        use_case_version=_text(_first(headers, h.USE_CASE_VERSION_HEADERS)),
        logging_disabled=logging_disabled,
        enforce_override=enforce_override,
        gateway_token=gateway_token,
        route_as_resource=_text(_first(headers, h.ROUTE_AS_RESOURCE_HEADERS)),
        base_uri=_raw_text(_first(headers, h.BASE_URI_HEADERS)),
        forwards=tuple(forwards),
        strip=tuple(sorted(strip)),
        invalid_header=invalid_header,
    )

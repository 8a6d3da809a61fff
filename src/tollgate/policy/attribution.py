"""Reads the attribution headers of one request: tags, use case, limits, switches, forwards.

Every header named in :mod:`tollgate.policy.headers` is consumed here and removed before the
upstream; ``x-tollgate-forward-<name>`` (alias ``xproxy-forward-<name>``) is passed on as
``<name>``. Values are bytes and may be any bytes: nothing here raises on bad encoding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tollgate.policy import headers as h
from tollgate.policy.refusal import PolicyRefusal

__all__ = [
    "MAX_LIST_ITEMS",
    "MAX_TEXT_CHARS",
    "RequestAttribution",
    "parse_attribution",
    "parse_bool",
]

MAX_TEXT_CHARS = 255
MAX_LIST_ITEMS = 64

# Names a forward header may not produce: pseudo-headers, hop-by-hop and framing headers, and
# the ones Envoy routes on. Forwarding exists to pass an application header that would
# otherwise be consumed, not to steer the proxy.
_NOT_FORWARDABLE = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)

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


def parse_attribution(headers: Mapping[str, bytes]) -> RequestAttribution:
    """Read the attribution headers; raises :class:`PolicyRefusal` for an unusable switch."""
    enforce_override: bool | None = None
    enforce_raw = _first(headers, h.ENFORCE_HEADERS)
    if enforce_raw is not None:
        enforce_override = parse_bool(enforce_raw)
        if enforce_override is None:
            raise PolicyRefusal.invalid_header_value(h.ENFORCE_HEADERS[0], "true or false")
    logging_raw = _first(headers, h.LOGGING_DISABLE_HEADERS)
    # Anything but an explicit "false" keeps bodies out of logs: the safe reading.
    logging_disabled = logging_raw is not None and parse_bool(logging_raw) is not False

    strip = [name for name in headers if h.is_attribution_header(name)]
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
                if (
                    target
                    and target not in _NOT_FORWARDABLE
                    and not h.is_attribution_header(target)
                ):
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
    )

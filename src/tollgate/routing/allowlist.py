"""The base-URI allow-list: which custom upstreams an app may ask for (Tollgate's SSRF guard).

An app may ask, per request, for its own upstream base URI (``x-tollgate-base-uri``). The
value is attacker-controlled, so it is parsed here by hand, strictly, and anything ambiguous
is refused rather than interpreted; only a base URI on the operator's allow-list is honoured.

Accepted syntax (everything else raises :class:`InvalidBaseUri`)::

    http[s]://host[:port][/segment[/segment...]][/]

* scheme ``http`` or ``https`` (any case); no userinfo, query, fragment, backslash,
  whitespace, control or non-ASCII characters, and no percent-encoding anywhere;
* host: a DNS name of ASCII letters, digits, ``-`` and ``.`` (lower-cased, one trailing dot
  dropped), a canonical dotted-quad IPv4 address, or a bracketed IPv6 literal (no zone id,
  no IPv4-mapped address). IPv4 spellings that resolvers accept but people misread
  (``2852039166``, ``0xA9FEA9FE``, ``0251.0376.0251.0376``, ``127.1``) are refused, as is any
  name whose last label looks numeric. Internationalised names are out of scope: write them
  in their ASCII ``xn--`` form;
* port: 1-65535 in plain decimal, no sign or leading zeros; 80/443 from the scheme if absent;
* path: segments of RFC 3986 unreserved characters and sub-delims (plus ``:`` and ``@``),
  none empty, ``.`` or ``..``; one trailing ``/`` is dropped.

Request paths joined to a base URI are checked too (:func:`check_request_path`): no ``.`` or
``..`` segments, encoded dots, slashes or backslashes, backslashes or control characters.

Exceptions: :class:`InvalidBaseUri` and :class:`InvalidRequestPath` (both
:class:`ValueError`) and nothing else.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "BaseUri",
    "BaseUriAllowList",
    "InvalidBaseUri",
    "InvalidRequestPath",
    "check_request_path",
    "parse_base_uri",
]

MAX_BASE_URI_LENGTH = 2048
_MAX_DNS_NAME_LENGTH = 253
_EXCERPT_LENGTH = 80

_DEFAULT_PORTS = {"http": 80, "https": 443}

# Printable ASCII except space; the separators we refuse are checked one by one after this.
_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]+")
_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# A last label that a WHATWG URL parser or inet_aton would read as (part of) an IPv4 number.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
_DOTTED_QUAD_OCTET = re.compile(r"0|[1-9][0-9]{0,2}")
_IPV6_LITERAL = re.compile(r"[0-9A-Fa-f:.]+")
_PORT = re.compile(r"[1-9][0-9]{0,4}")
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@]+")
# Percent-encoded '.', '/' or '\\', once or more often ('%2e', '%252e', '%25252F', any case).
_ENCODED_SEPARATOR = re.compile(r"%(?:25)*(?:2e|2f|5c)", re.IGNORECASE)
# Control characters, space and DEL anywhere in a request path (Envoy's codec refuses most).
_PATH_CONTROL = re.compile(r"[\x00-\x20\x7f]")


class InvalidBaseUri(ValueError):
    """A base URI (requested by an app or listed by the operator) is not one Tollgate accepts."""


class InvalidRequestPath(ValueError):
    """A request path could leave the base URI's path prefix once joined to it."""


def check_request_path(request_path: str) -> None:
    """Raise :class:`InvalidRequestPath` unless ``request_path`` is safe below any prefix.

    ``request_path`` is the request's ``:path`` (origin form, query kept). Its path part must
    start with ``/`` and hold no ``.`` or ``..`` segment, no percent-encoded ``.``, ``/`` or
    ``\\`` (also double-encoded: ``%252e``), no backslash and no control character, so that
    no server behind the base URI can resolve it to a path outside the prefix. The query may
    hold anything but control characters.
    """
    path, _, query = request_path.partition("?")
    if not path.startswith("/"):
        raise InvalidRequestPath("request path must start with '/'")
    if _PATH_CONTROL.search(path) or _PATH_CONTROL.search(query):
        raise InvalidRequestPath("control character or space in request path")
    if "\\" in path:
        raise InvalidRequestPath("backslash in request path")
    if _ENCODED_SEPARATOR.search(path):
        raise InvalidRequestPath("percent-encoded '.', '/' or '\\' in request path")
    if any(segment in (".", "..") for segment in path.split("/")):
        raise InvalidRequestPath("'.' or '..' segment in request path")


@dataclass(frozen=True)
class BaseUri:
    """A parsed, canonical base URI: build it with :func:`parse_base_uri`."""

    scheme: str
    host: str
    port: int
    path: str

    @property
    def authority(self) -> str:
        """``host:port``, always with the port; IPv6 literals in brackets."""
        return f"{self._bracketed_host}:{self.port}"

    def join(self, request_path: str) -> str:
        """The upstream ``:path``: this base URI's path followed by ``request_path``.

        ``request_path`` is the request's own path (starting with ``/``, possibly with a
        query string); one that could escape this base URI's path (see
        :func:`check_request_path`) raises :class:`InvalidRequestPath`.
        """
        check_request_path(request_path)
        return self.path + request_path

    def __str__(self) -> str:
        port = "" if self.port == _DEFAULT_PORTS[self.scheme] else f":{self.port}"
        return f"{self.scheme}://{self._bracketed_host}{port}{self.path}"

    @property
    def _bracketed_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host


def _excerpt(text: str) -> str:
    """The start of ``text`` for an error message, escaped so it cannot forge log lines."""
    if len(text) <= _EXCERPT_LENGTH:
        return repr(text)
    return repr(text[:_EXCERPT_LENGTH]) + "..."


def parse_base_uri(text: str) -> BaseUri:
    """Parse ``text`` strictly into a canonical :class:`BaseUri`; raise :class:`InvalidBaseUri`."""
    if not isinstance(text, str):
        raise InvalidBaseUri(f"base URI must be a string, not {type(text).__name__}")
    try:
        return _parse(text)
    except InvalidBaseUri as exc:
        raise InvalidBaseUri(f"{exc}: {_excerpt(text)}") from None


def _parse(text: str) -> BaseUri:
    if not text:
        raise InvalidBaseUri("empty base URI")
    if len(text) > MAX_BASE_URI_LENGTH:
        raise InvalidBaseUri(f"base URI longer than {MAX_BASE_URI_LENGTH} characters")
    if not _PRINTABLE_ASCII.fullmatch(text):
        raise InvalidBaseUri("whitespace, control or non-ASCII character in base URI")
    for char, what in (("\\", "backslash"), ("?", "query"), ("#", "fragment")):
        if char in text:
            raise InvalidBaseUri(f"{what} not allowed in base URI")

    scheme, separator, rest = text.partition("://")
    scheme = scheme.lower()
    if not separator or scheme not in _DEFAULT_PORTS:
        raise InvalidBaseUri("base URI must start with http:// or https://")

    slash = rest.find("/")
    authority, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    host, port = _parse_authority(authority, scheme)
    return BaseUri(scheme=scheme, host=host, port=port, path=_parse_path(path))


def _parse_authority(authority: str, scheme: str) -> tuple[str, int]:
    if "@" in authority:
        raise InvalidBaseUri("userinfo not allowed in base URI")
    if "%" in authority:
        raise InvalidBaseUri("percent-encoding not allowed in base URI host")
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise InvalidBaseUri("unclosed '[' in base URI host")
        host = _parse_ipv6(authority[1:end])
        after = authority[end + 1 :]
        if after and not after.startswith(":"):
            raise InvalidBaseUri("unexpected characters after IPv6 literal in base URI")
        port_text: str | None = after[1:] if after else None
    else:
        if authority.count(":") > 1:
            raise InvalidBaseUri("more than one ':' in base URI authority (IPv6 needs brackets)")
        host_text, colon, port_part = authority.partition(":")
        host = _parse_host(host_text)
        port_text = port_part if colon else None
    if port_text is None:
        return host, _DEFAULT_PORTS[scheme]
    if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
        raise InvalidBaseUri("base URI port must be 1-65535 in plain decimal")
    return host, int(port_text)


def _parse_ipv6(literal: str) -> str:
    if not _IPV6_LITERAL.fullmatch(literal):
        raise InvalidBaseUri("invalid IPv6 literal in base URI")
    try:
        address = ipaddress.IPv6Address(literal)
    except ValueError:
        raise InvalidBaseUri("invalid IPv6 literal in base URI") from None
    if address.ipv4_mapped is not None:
        raise InvalidBaseUri("IPv4-mapped IPv6 address not allowed in base URI")
    return address.compressed


def _parse_host(host: str) -> str:
    if not host:
        raise InvalidBaseUri("empty host in base URI")
    if "[" in host or "]" in host:
        raise InvalidBaseUri("misplaced bracket in base URI host")
    host = host.lower()
    trailing_dot = host.endswith(".")
    name = host[:-1] if trailing_dot else host
    labels = name.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        # Resolvers read this as an IPv4 address in some spelling: only the canonical one is
        # accepted, so that the allow-list and the resolver agree on what it means.
        if trailing_dot or not _is_dotted_quad(labels):
            raise InvalidBaseUri("IPv4 address in base URI must be a canonical dotted quad")
        return name
    if len(name) > _MAX_DNS_NAME_LENGTH or not all(_DNS_LABEL.fullmatch(x) for x in labels):
        raise InvalidBaseUri("invalid host name in base URI")
    return name


def _is_dotted_quad(labels: list[str]) -> bool:
    return (
        len(labels) == 4
        and all(_DOTTED_QUAD_OCTET.fullmatch(octet) for octet in labels)
        and all(int(octet) <= 255 for octet in labels)
    )


def _parse_path(path: str) -> str:
    if path.endswith("/"):
        path = path[:-1]
    if not path:
        return ""
    if "%" in path:
        raise InvalidBaseUri("percent-encoding not allowed in base URI path")
    for segment in path[1:].split("/"):
        if not segment:
            raise InvalidBaseUri("empty segment ('//') in base URI path")
        if segment in (".", ".."):
            raise InvalidBaseUri("'.' or '..' segment in base URI path")
        if not _PATH_SEGMENT.fullmatch(segment):
            raise InvalidBaseUri("invalid character in base URI path")
    return path


class BaseUriAllowList:
    """The operator's list of base URIs that apps may ask for.

    A requested base URI is allowed when an entry has the same scheme, host and port and
    the requested path is the entry's path or lies below it, segment-wise (``/openai``
    allows ``/openai/v2`` but not ``/openai2``). An entry without a path allows the whole
    origin. Hosts are compared as written: no DNS resolution happens here.
    """

    def __init__(self, entries: Iterable[str]) -> None:
        if isinstance(entries, str):
            raise TypeError("entries must be an iterable of base URIs, not one string")
        parsed: list[BaseUri] = []
        for number, entry in enumerate(entries, start=1):
            try:
                parsed.append(parse_base_uri(entry))
            except InvalidBaseUri as exc:
                raise InvalidBaseUri(f"base-URI allow-list entry #{number}: {exc}") from None
        self._entries = tuple(parsed)
        self._paths_by_origin: dict[tuple[str, str, int], list[str]] = {}
        for uri in self._entries:
            self._paths_by_origin.setdefault((uri.scheme, uri.host, uri.port), []).append(uri.path)

    @property
    def entries(self) -> tuple[BaseUri, ...]:
        """The parsed entries, in the order given."""
        return self._entries

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __repr__(self) -> str:
        return f"BaseUriAllowList({[str(uri) for uri in self._entries]!r})"

    def match(self, text: str) -> BaseUri | None:
        """The parsed base URI ``text`` if it is allowed; ``None`` if not or if unparsable."""
        try:
            requested = parse_base_uri(text)
        except InvalidBaseUri:
            return None
        paths = self._paths_by_origin.get((requested.scheme, requested.host, requested.port))
        if paths is None:
            return None
        for path in paths:
            if requested.path == path or requested.path.startswith(path + "/"):
                return requested
        return None

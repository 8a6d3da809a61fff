"""The attribution values an app sets, checked the way the Tollgate server will read them.

The server never raises on a header value: it trims, truncates and drops what it cannot use
(``tollgate.policy``). An app that sends a 300-character user id or a tag with a comma in it
would see its data quietly changed, or a 422 much later; here the same value is refused at
the call site with a message that says what to change. The rules are the server's, restated
(this package imports nothing of the server); ``tests/unit/test_client.py`` checks that the
two agree.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "MAX_LIST_ITEMS",
    "MAX_TEXT_CHARS",
    "Attribution",
    "InvalidAttribution",
]

#: Longest user id, tag, limit id or use-case value the server keeps (longer ones it truncates).
MAX_TEXT_CHARS = 255
#: Most tags (and, apart, limit ids) the server reads from one request.
MAX_LIST_ITEMS = 64
MAX_BASE_URI_CHARS = 2048

# The server's strict user-id rule (``strict_user_ids``), and what a limit id can look like
# (``tollgate limits create`` refuses anything else, so no such limit can exist).
STRICT_USER_ID = re.compile(r"[A-Za-z0-9._:@-]+")
LIMIT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# C0 and C1 control characters and lone surrogates: not sendable in a header, not storable.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# What the server's base-URI parser accepts at all: printable ASCII, http(s), no userinfo,
# query, fragment, backslash or percent-encoding. The server still checks its allow-list.
_BASE_URI = re.compile(r"(?i:https?)://[\x21-\x7e]+")

# Canonical header names (the server also accepts other proxies' aliases; these are its own).
USER_ID_HEADER = "x-tollgate-user-id"
TAGS_HEADER = "x-tollgate-tags"
LIMIT_IDS_HEADER = "x-tollgate-limit-ids"
USE_CASE_ID_HEADER = "x-tollgate-use-case-id"
USE_CASE_NAME_HEADER = "x-tollgate-use-case-name"
USE_CASE_VERSION_HEADER = "x-tollgate-use-case-version"
LOGGING_DISABLE_HEADER = "x-tollgate-logging-disable"
BASE_URI_HEADER = "x-tollgate-base-uri"


class InvalidAttribution(ValueError):
    """A value given to ``track_context`` or ``@track`` that Tollgate would refuse or alter."""


def _excerpt(value: str) -> str:
    return repr(value) if len(value) <= 40 else repr(value[:40]) + "..."


def _text(field: str, value: object) -> str:
    """A trimmed, non-empty, header-safe text of at most :data:`MAX_TEXT_CHARS` characters."""
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a string, not {type(value).__name__}")
    text = value.strip()
    if not text:
        raise InvalidAttribution(f"{field} is empty")
    if _CONTROL.search(text):
        raise InvalidAttribution(
            f"{field} {_excerpt(text)} holds a control character or a lone surrogate, "
            "which no HTTP header can carry"
        )
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidAttribution(
            f"{field} is {len(text)} characters long; Tollgate keeps at most {MAX_TEXT_CHARS} "
            f"and would truncate {_excerpt(text)}"
        )
    return text


def _version(value: object) -> str:
    """A use-case version: text, or an int (Pay-i's SDK takes one) written in decimal."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return _text("use_case_version", value)


def check_user_id(value: object, *, strict: bool) -> str:
    user_id = _text("user_id", value)
    if strict and not STRICT_USER_ID.fullmatch(user_id):
        raise InvalidAttribution(
            f"user_id {_excerpt(user_id)} breaks the strict rule: only letters, digits and "
            "'.', '_', ':', '@', '-' are allowed (configure(strict_user_ids=False) to lift it)"
        )
    return user_id


def _items(field: str, value: str | Iterable[str] | None) -> tuple[str, ...]:
    """One string (one item) or an iterable of strings; trimmed, each once, in order."""
    if value is None:
        return ()
    if isinstance(value, bytes | bytearray | memoryview) or not isinstance(value, Iterable):
        raise TypeError(
            f"{field} must be a string or an iterable of strings, not {type(value).__name__}"
        )
    values = (value,) if isinstance(value, str) else tuple(value)
    items: dict[str, None] = {}
    for raw in values:
        item = _text(f"each of {field}", raw)
        if "," in item:
            raise InvalidAttribution(
                f"{field} item {_excerpt(item)} holds a ',': the header is a comma-separated "
                "list, so pass the items separately"
            )
        items[item] = None
    return tuple(items)


def _limit_ids(value: str | Iterable[str] | None) -> tuple[str, ...]:
    ids = _items("limit_ids", value)
    for limit_id in ids:
        if not LIMIT_ID.fullmatch(limit_id):
            raise InvalidAttribution(
                f"limit id {_excerpt(limit_id)} cannot exist: limit ids are 1-128 letters, "
                "digits and '.', '_', ':', '-', starting with a letter or digit"
            )
    return ids


def _base_uri(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"base_uri must be a string, not {type(value).__name__}")
    # isascii() first: the case-insensitive scheme would also match U+017F (long s) as "s".
    if len(value) > MAX_BASE_URI_CHARS or not value.isascii() or not _BASE_URI.fullmatch(value):
        raise InvalidAttribution(
            f"base_uri {_excerpt(value)} is not an http:// or https:// URI of at most "
            f"{MAX_BASE_URI_CHARS} printable ASCII characters"
        )
    authority = value.split("://", 1)[1].split("/", 1)[0]
    for char, what in (
        ("@", "userinfo"),
        ("?", "a query"),
        ("#", "a fragment"),
        ("\\", "a backslash"),
        ("%", "percent-encoding"),
    ):
        if char in (authority if char == "@" else value):
            raise InvalidAttribution(f"base_uri {_excerpt(value)} has {what}; Tollgate refuses it")
    return value


def _check_count(field: str, items: tuple[str, ...]) -> None:
    if len(items) > MAX_LIST_ITEMS:
        raise InvalidAttribution(
            f"{len(items)} {field} in effect; Tollgate reads at most {MAX_LIST_ITEMS} per request"
        )


@dataclass(frozen=True)
class Attribution:
    """The attribution of the calls made now: what :func:`~tollgate.client.current` returns.

    ``None`` (or an empty tuple) means "not set here": the enclosing context's value, or no
    header at all.
    """

    user_id: str | None = None
    tags: tuple[str, ...] = ()
    limit_ids: tuple[str, ...] = ()
    use_case_id: str | None = None
    use_case_name: str | None = None
    use_case_version: str | None = None
    logging_disable: bool | None = None
    base_uri: str | None = None

    @classmethod
    def checked(
        cls,
        *,
        strict_user_ids: bool,
        user_id: str | None = None,
        tags: str | Iterable[str] | None = None,
        limit_ids: str | Iterable[str] | None = None,
        use_case_id: str | None = None,
        use_case_name: str | None = None,
        use_case_version: str | int | None = None,
        logging_disable: bool | None = None,
        base_uri: str | None = None,
    ) -> Attribution:
        """The values of one ``track_context``, checked; raises :class:`InvalidAttribution`
        (or :class:`TypeError` for a value of the wrong type)."""
        if logging_disable is not None and not isinstance(logging_disable, bool):
            raise TypeError(
                f"logging_disable must be True, False or None, not {type(logging_disable).__name__}"
            )
        attribution = cls(
            user_id=None if user_id is None else check_user_id(user_id, strict=strict_user_ids),
            tags=_items("tags", tags),
            limit_ids=_limit_ids(limit_ids),
            use_case_id=None if use_case_id is None else _text("use_case_id", use_case_id),
            use_case_name=None if use_case_name is None else _text("use_case_name", use_case_name),
            use_case_version=None if use_case_version is None else _version(use_case_version),
            logging_disable=logging_disable,
            base_uri=None if base_uri is None else _base_uri(base_uri),
        )
        _check_count("tags", attribution.tags)
        _check_count("limit ids", attribution.limit_ids)
        return attribution

    def within(self, outer: Attribution) -> Attribution:
        """These values inside ``outer``: each value set here wins, tags and limit ids add up
        (the outer ones first, each once). Raises :class:`InvalidAttribution` when the sum has
        more items than the server reads."""
        merged = Attribution(
            user_id=self.user_id if self.user_id is not None else outer.user_id,
            tags=tuple(dict.fromkeys((*outer.tags, *self.tags))),
            limit_ids=tuple(dict.fromkeys((*outer.limit_ids, *self.limit_ids))),
            use_case_id=self.use_case_id if self.use_case_id is not None else outer.use_case_id,
            use_case_name=(
                self.use_case_name if self.use_case_name is not None else outer.use_case_name
            ),
            use_case_version=(
                self.use_case_version
                if self.use_case_version is not None
                else outer.use_case_version
            ),
            logging_disable=(
                self.logging_disable if self.logging_disable is not None else outer.logging_disable
            ),
            base_uri=self.base_uri if self.base_uri is not None else outer.base_uri,
        )
        _check_count("tags", merged.tags)
        _check_count("limit ids", merged.limit_ids)
        return merged

    def header_items(self) -> list[tuple[str, str]]:
        """(name, value) of each header these values become, in a fixed order."""
        items: list[tuple[str, str]] = []
        for name, value in (
            (USER_ID_HEADER, self.user_id),
            (TAGS_HEADER, ",".join(self.tags) or None),
            (LIMIT_IDS_HEADER, ",".join(self.limit_ids) or None),
            (USE_CASE_ID_HEADER, self.use_case_id),
            (USE_CASE_NAME_HEADER, self.use_case_name),
            (USE_CASE_VERSION_HEADER, self.use_case_version),
            (
                LOGGING_DISABLE_HEADER,
                None if self.logging_disable is None else str(self.logging_disable).lower(),
            ),
            (BASE_URI_HEADER, self.base_uri),
        ):
            if value is not None:
                items.append((name, value))
        return items

"""Reads a buffered JSON request body: decoded (gzip/deflate), bounded, never trusted.

A body that must be read and cannot be becomes a 400 ``invalid_json`` refusal with a message
that says why; the body's content never appears in that message or in a log line.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

from tollgate.policy.refusal import PolicyRefusal
from tollgate.policy.text import safe_text

__all__ = ["is_json_content_type", "multipart_field", "read_json_body"]

_ZLIB_WBITS = {
    b"gzip": 16 + zlib.MAX_WBITS,
    b"x-gzip": 16 + zlib.MAX_WBITS,
    b"deflate": zlib.MAX_WBITS,
}


def is_json_content_type(content_type: bytes | None) -> bool:
    """``application/json`` and ``…+json`` media types (parameters ignored)."""
    if content_type is None:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


def _decoded(body: bytes, encoding: bytes, limit: int) -> bytes:
    encodings = [e.strip().lower() for e in encoding.split(b",") if e.strip()]
    for coding in reversed(encodings):  # the last one applied is undone first
        if coding == b"identity":
            continue
        wbits = _ZLIB_WBITS.get(coding)
        if wbits is None:
            raise PolicyRefusal.invalid_json(
                f"content-encoding {coding.decode('ascii', 'replace')!r} is not supported "
                "(use gzip, deflate or none)"
            )
        # "deflate" is zlib-wrapped (RFC 9110 section 8.4.1.2).
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(body, limit + 1)
        except zlib.error:
            raise PolicyRefusal.invalid_json(
                f"the body is not valid {coding.decode('ascii', 'replace')}"
            ) from None
        if len(out) > limit or inflater.unconsumed_tail:
            raise PolicyRefusal.body_too_large(limit)
        body = out
    return body


def read_json_body(body: bytes, content_encoding: bytes | None, limit: int) -> dict[str, Any]:
    """The body's top-level JSON object (an empty dict for a JSON value that is not an object).

    Raises :class:`PolicyRefusal` (400 ``invalid_json``) for malformed JSON, invalid UTF-8 or an
    unsupported or corrupt content encoding, and 413 when decompression exceeds ``limit``.
    """
    if content_encoding:
        body = _decoded(body, content_encoding, limit)
    try:
        document = json.loads(body)
    except UnicodeDecodeError:
        raise PolicyRefusal.invalid_json("it is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise PolicyRefusal.invalid_json(
            f"{exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise PolicyRefusal.invalid_json("it is nested too deeply") from None
    except ValueError:  # an integer literal of more digits than Python converts (4300)
        raise PolicyRefusal.invalid_json("it holds a number too long to read") from None
    return document if isinstance(document, dict) else {}


def multipart_field(body: bytes, content_type: bytes | None, name: str) -> str | None:
    """The value of the text field ``name`` of a ``multipart/form-data`` body (RFC 7578), or
    None when it is absent or the body is not what its content type says. Never raises."""
    if content_type is None:
        return None
    media, _, params = content_type.partition(b";")
    if media.strip().lower() != b"multipart/form-data":
        return None
    boundary = None
    for param in params.split(b";"):
        key, _, value = param.strip().partition(b"=")
        if key.lower() == b"boundary":
            boundary = value.strip().strip(b'"')
    if not boundary:
        return None
    wanted = f'name="{name}"'.encode()
    for part in body.split(b"--" + boundary):
        head, sep, value = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        disposition = [
            line for line in head.split(b"\r\n") if line.lower().startswith(b"content-disposition:")
        ]
        if disposition and wanted in disposition[0] and b"filename=" not in disposition[0]:
            text = value.removesuffix(b"\r\n").decode("utf-8", "replace").strip()
            return safe_text(text[:255]) or None
    return None

"""Decompresses a response body for its usage parser while the client gets the bytes as sent.

Tollgate asks upstreams for ``accept-encoding: identity``; one that answers gzip or deflate
anyway is still metered: the parser is fed the decoded bytes, incrementally and bounded (a
compression bomb stops being decoded at ``max_decoded_bytes``, it does not fill memory).
"""

from __future__ import annotations

import zlib

from tollgate.metering.usage import ParsedResponse, UsageParser

__all__ = ["DecodingParser", "decoder_wbits", "sniffed_wbits"]

_STEP = 1024 * 1024
_ZLIB_FIRST = frozenset({0x08, 0x18, 0x28, 0x48, 0x58, 0x68, 0x78})


def decoder_wbits(content_encoding: bytes | None) -> int | None:
    """zlib ``wbits`` for a single gzip/deflate coding; None for identity or unsupported."""
    coding = (content_encoding or b"").strip().lower()
    if coding in (b"gzip", b"x-gzip"):
        return 16 + zlib.MAX_WBITS
    if coding == b"deflate":
        return zlib.MAX_WBITS
    return None


def sniffed_wbits(start: bytes) -> int | None:
    """zlib ``wbits`` for a body that begins like gzip or zlib (deflate) data, when no header
    says how it is encoded (a plan that skips the response headers). A JSON document can
    begin like neither: its first byte is whitespace or one of ``{["-0123456789tfn``."""
    if start[:2] == b"\x1f\x8b":
        return 16 + zlib.MAX_WBITS
    # A zlib header: method 8, a window of at most 32 KiB, a check sum; except its "8" (a
    # 2 KiB window), which is also how a JSON number begins.
    if len(start) >= 2 and start[0] in _ZLIB_FIRST and (start[0] << 8 | start[1]) % 31 == 0:
        return zlib.MAX_WBITS
    return None


class DecodingParser:
    """A :class:`UsageParser` that inflates what it is fed before passing it on."""

    def __init__(
        self, inner: UsageParser, wbits: int, max_decoded_bytes: int = 256 * 1024 * 1024
    ) -> None:
        self._inner = inner
        self._inflater = zlib.decompressobj(wbits)
        self._left = max_decoded_bytes
        self.failed = False

    def feed(self, chunk: bytes) -> None:
        if self.failed or self._left <= 0:
            return
        data = chunk
        try:
            while data and self._left > 0:
                out = self._inflater.decompress(data, min(_STEP, self._left))
                self._left -= len(out)
                if out:
                    self._inner.feed(out)
                data = self._inflater.unconsumed_tail
        except zlib.error:
            self.failed = True

    @property
    def complete(self) -> bool:
        return self._inner.complete

    def result(self) -> ParsedResponse:
        return self._inner.result()

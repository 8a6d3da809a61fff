"""Incremental decoder (and encoder) of AWS's ``application/vnd.amazon.eventstream`` framing.

The binary framing of Bedrock's ``ConverseStream`` and ``InvokeModelWithResponseStream``
bodies. Reference: botocore's ``eventstream.py`` (the SDK's own decoder) and
https://docs.aws.amazon.com/transcribe/latest/dg/streaming-setting-up.html (the message
layout). A stream is a sequence of messages, all integers big-endian::

    total length     u32   the whole message, these 12 prelude bytes and the CRC included
    headers length   u32
    prelude CRC      u32   CRC-32 of the 8 bytes before it
    headers                name length u8, name (UTF-8), type u8, value (see below), ...
    payload                total - headers - 16 bytes
    message CRC      u32   CRC-32 of everything before it, prelude included

Header values by type: 0 true and 1 false (no bytes), 2 byte (i8), 3 short (i16),
4 integer (i32), 5 long (i64), 6 bytes (u16 length + bytes), 7 string (u16 length + UTF-8),
8 timestamp (i64 milliseconds since the epoch, decoded to an aware UTC ``datetime``),
9 uuid (16 bytes).

:class:`EventStreamDecoder` takes bytes split anywhere and hands out whole messages. It never
raises and never holds more than one message (at most ``max_message_bytes``) plus the chunk
being fed:

* A message whose CRC does not match, or whose headers do not parse (unknown type, a value
  running past the headers, a name or string that is not UTF-8, an empty or repeated name,
  a timestamp no ``datetime`` can hold: what botocore would refuse), is skipped whole and
  counted in ``corrupt``. Its prelude CRC matched, so its length is trusted.
* A message longer than ``max_message_bytes`` (or with more than 128 KiB of headers, as
  botocore's limit) behind a valid prelude is skipped over without being kept, counted in
  ``oversized``.
* A prelude whose CRC does not match, or whose lengths contradict each other, means the
  decoder lost its place (garbage, a body that is not an event stream at all). It drops
  bytes up to the next position where a prelude could begin (a zero byte: every message
  under 16 MiB starts with one) and tries again there; each such run counts once in
  ``lost_sync`` and its bytes in ``skipped_bytes``. A false resynchronisation needs both
  CRCs of a made-up message to match by chance. After ``max_skipped_bytes`` of garbage in
  all the decoder stops (``stopped``) and ignores the rest of the stream.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from uuid import UUID

__all__ = [
    "MAX_MESSAGE_BYTES",
    "EventStreamDecoder",
    "EventStreamMessage",
    "HeaderType",
    "HeaderValue",
    "encode_message",
]

# Largest message kept for decoding; longer ones are skipped over unread.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Largest headers section botocore accepts.
_MAX_HEADERS_BYTES = 128 * 1024
# Garbage dropped while looking for a prelude before the decoder gives up on a stream (each
# candidate position costs a prelude check: this bounds the time lost on a body that is not
# an event stream at all).
_MAX_SKIPPED_BYTES = 64 * 1024
_PRELUDE = struct.Struct("!III")
_PRELUDE_BYTES = 12
_CRC_BYTES = 4
_OVERHEAD = _PRELUDE_BYTES + _CRC_BYTES
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

HeaderValue = bool | int | bytes | str | datetime | UUID


class HeaderType(IntEnum):
    """The type byte of a header value."""

    BOOL_TRUE = 0
    BOOL_FALSE = 1
    BYTE = 2
    SHORT = 3
    INTEGER = 4
    LONG = 5
    BYTES = 6
    STRING = 7
    TIMESTAMP = 8
    UUID = 9


_INT_FORMATS: Mapping[HeaderType, struct.Struct] = {
    HeaderType.BYTE: struct.Struct("!b"),
    HeaderType.SHORT: struct.Struct("!h"),
    HeaderType.INTEGER: struct.Struct("!i"),
    HeaderType.LONG: struct.Struct("!q"),
    HeaderType.TIMESTAMP: struct.Struct("!q"),
}
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


@dataclass(frozen=True)
class EventStreamMessage:
    """One decoded message: its headers by name, and its payload bytes."""

    headers: Mapping[str, HeaderValue] = field(default_factory=dict)
    payload: bytes = b""

    def text(self, name: str) -> str | None:
        """The value of header ``name`` when it is a string (``:event-type`` and the like)."""
        value = self.headers.get(name)
        return value if isinstance(value, str) else None


class _BadHeaders(ValueError):
    """A headers section that does not parse."""


def _decode_headers(data: bytes) -> dict[str, HeaderValue]:
    headers: dict[str, HeaderValue] = {}
    i, n = 0, len(data)
    try:
        while i < n:
            name_end = i + 1 + data[i]
            if name_end == i + 1 or name_end >= n:  # an empty name, or no room for the type
                raise _BadHeaders
            name = data[i + 1 : name_end].decode("utf-8")
            if name in headers:
                raise _BadHeaders
            kind = data[name_end]
            i = name_end + 1
            value: HeaderValue
            if kind == HeaderType.BOOL_TRUE:
                value = True
            elif kind == HeaderType.BOOL_FALSE:
                value = False
            elif kind in (HeaderType.BYTES, HeaderType.STRING):
                (length,) = _U16.unpack_from(data, i)
                raw = data[i + 2 : i + 2 + length]
                if len(raw) != length:
                    raise _BadHeaders
                value = raw.decode("utf-8") if kind == HeaderType.STRING else raw
                i += 2 + length
            elif kind == HeaderType.UUID:
                raw = data[i : i + 16]
                if len(raw) != 16:
                    raise _BadHeaders
                value = UUID(bytes=raw)
                i += 16
            elif kind in _INT_FORMATS:
                fmt = _INT_FORMATS[HeaderType(kind)]
                (number,) = fmt.unpack_from(data, i)
                i += fmt.size
                value = (
                    _EPOCH + timedelta(milliseconds=number)
                    if kind == HeaderType.TIMESTAMP
                    else number
                )
            else:
                raise _BadHeaders
            headers[name] = value
    except (struct.error, UnicodeDecodeError, OverflowError) as exc:
        raise _BadHeaders from exc
    return headers


class EventStreamDecoder:
    """Keeps the bytes of an unfinished message between :meth:`feed` calls (see the module
    docstring for what is skipped and counted)."""

    def __init__(
        self,
        *,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_skipped_bytes: int = _MAX_SKIPPED_BYTES,
    ) -> None:
        self._pending = bytearray()
        self._discard = 0  # bytes still to pass over of an oversized message
        self._max_message = max_message_bytes
        self._max_skipped = max_skipped_bytes
        self._in_sync = True
        self.messages = 0
        self.corrupt = 0
        self.oversized = 0
        self.lost_sync = 0
        self.skipped_bytes = 0
        self.stopped = False

    @property
    def buffered(self) -> int:
        """Bytes held of an unfinished message (never more than one message's)."""
        return len(self._pending)

    @property
    def skipped(self) -> int:
        """Messages (or runs of garbage) that were not handed out."""
        return self.corrupt + self.oversized + self.lost_sync

    def feed(self, chunk: bytes) -> list[EventStreamMessage]:
        if self.stopped or not chunk:
            return []
        start = 0
        if self._discard:
            start = min(self._discard, len(chunk))
            self._discard -= start
            if start == len(chunk):
                return []
        self._pending += memoryview(chunk)[start:]
        out: list[EventStreamMessage] = []
        consumed = self._drain(out)
        del self._pending[:consumed]
        return out

    def _drain(self, out: list[EventStreamMessage]) -> int:
        """Decode the whole messages at the start of the pending bytes; how many bytes of
        them are used up."""
        buf = self._pending
        pos, n = 0, len(buf)
        while n - pos >= _PRELUDE_BYTES:
            total, headers_length, prelude_crc = _PRELUDE.unpack_from(buf, pos)
            if (
                total < _OVERHEAD
                or headers_length > total - _OVERHEAD
                or zlib.crc32(buf[pos : pos + 8]) != prelude_crc
            ):
                pos = self._resync(buf, pos)
                if self.stopped:
                    self._pending.clear()
                    return 0
                continue
            self._in_sync = True
            if total > self._max_message or headers_length > _MAX_HEADERS_BYTES:
                self.oversized += 1
                if n - pos >= total:
                    pos += total
                    continue
                self._discard = total - (n - pos)
                return n
            if n - pos < total:
                break
            end = pos + total
            message = bytes(buf[pos:end])
            pos = end
            (message_crc,) = _U32.unpack_from(message, total - _CRC_BYTES)
            if zlib.crc32(memoryview(message)[: total - _CRC_BYTES]) != message_crc:
                self.corrupt += 1
                continue
            headers_end = _PRELUDE_BYTES + headers_length
            try:
                headers = _decode_headers(message[_PRELUDE_BYTES:headers_end])
            except _BadHeaders:
                self.corrupt += 1
                continue
            self.messages += 1
            out.append(EventStreamMessage(headers, message[headers_end : total - _CRC_BYTES]))
        return pos

    def _resync(self, buf: bytearray, pos: int) -> int:
        """Where to look for the next prelude after a bad one at ``pos``."""
        if self._in_sync:
            self._in_sync = False
            self.lost_sync += 1
        found = buf.find(0, pos + 1)
        nxt = len(buf) if found < 0 else found
        self.skipped_bytes += nxt - pos
        if self.skipped_bytes > self._max_skipped:
            self.stopped = True
        return nxt


def _encode_header(name: str, value: HeaderValue | tuple[HeaderType, HeaderValue]) -> bytes:
    raw_name = name.encode("utf-8")
    if not 1 <= len(raw_name) <= 255:
        raise ValueError(f"header name must be 1 to 255 bytes: {name!r}")
    kind: HeaderType | None = None
    if isinstance(value, tuple):
        kind, value = value
    if kind is None:
        if isinstance(value, bool):
            kind = HeaderType.BOOL_TRUE if value else HeaderType.BOOL_FALSE
        elif isinstance(value, int):
            kind = HeaderType.INTEGER if -(2**31) <= value < 2**31 else HeaderType.LONG
        elif isinstance(value, str):
            kind = HeaderType.STRING
        elif isinstance(value, bytes):
            kind = HeaderType.BYTES
        elif isinstance(value, datetime):
            kind = HeaderType.TIMESTAMP
        else:
            kind = HeaderType.UUID
    head = bytes([len(raw_name)]) + raw_name + bytes([kind])
    if kind in (HeaderType.BOOL_TRUE, HeaderType.BOOL_FALSE):
        return head
    if kind in (HeaderType.STRING, HeaderType.BYTES):
        data = value.encode("utf-8") if isinstance(value, str) else value
        if not isinstance(data, bytes) or len(data) > 0xFFFF:
            raise ValueError(f"header {name!r}: bytes or a string of at most 65535 bytes")
        return head + _U16.pack(len(data)) + data
    if kind == HeaderType.UUID:
        if not isinstance(value, UUID):
            raise ValueError(f"header {name!r}: a uuid header needs a UUID")
        return head + value.bytes
    if kind == HeaderType.TIMESTAMP and isinstance(value, datetime):
        value = (value - _EPOCH) // timedelta(milliseconds=1)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"header {name!r}: a {kind.name.lower()} header needs an integer")
    return head + _INT_FORMATS[kind].pack(value)


def encode_message(
    headers: Mapping[str, HeaderValue | tuple[HeaderType, HeaderValue]], payload: bytes
) -> bytes:
    """One event-stream message, CRCs included.

    A header's type follows its value: bool, str (string), bytes, an aware ``datetime``
    (timestamp), ``UUID``, and int (integer, or long beyond 32 bits); a
    ``(HeaderType, value)`` pair names the type (a byte, short or long integer). Raises
    ``ValueError`` (``struct.error`` for an integer too wide for its type) on a header that
    cannot be encoded: this side is for fakes and tests, not the request path.
    """
    raw_headers = b"".join(_encode_header(name, value) for name, value in headers.items())
    total = _OVERHEAD + len(raw_headers) + len(payload)
    prelude = _PRELUDE.pack(total, len(raw_headers), 0)[:8]
    prelude += _U32.pack(zlib.crc32(prelude))
    body = prelude + raw_headers + payload
    return body + _U32.pack(zlib.crc32(body))

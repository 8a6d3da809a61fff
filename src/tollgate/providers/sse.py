"""Incremental Server-Sent Events decoder: bytes in any split, whole events out.

Follows the WHATWG event-stream rules: lines end in CRLF, LF or CR; an empty line ends an
event; ``data:`` lines of one event are joined with LF; a single space after the colon is
dropped; comment lines (starting with ``:``) are ignored. A CR at the end of one chunk and
an LF at the start of the next are one line ending, not two.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SSEDecoder", "SSEEvent"]


@dataclass(frozen=True)
class SSEEvent:
    event: str
    data: bytes


class SSEDecoder:
    """Keeps the bytes of an unfinished line between :meth:`feed` calls."""

    def __init__(self, max_line_bytes: int = 16 * 1024 * 1024) -> None:
        self._pending = bytearray()
        self._skip_lf = False
        self._event = ""
        self._data: list[bytes] = []
        self._max_line = max_line_bytes
        self.oversized_lines = 0

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        start = 0
        n = len(chunk)
        if self._skip_lf and n:
            self._skip_lf = False
            if chunk[0] == 0x0A:
                start = 1
        while start < n:
            cr = chunk.find(b"\r", start)
            lf = chunk.find(b"\n", start)
            if cr < 0 and lf < 0:
                self._append(chunk[start:])
                break
            end = lf if cr < 0 else cr if lf < 0 else min(cr, lf)
            self._append(chunk[start:end])
            line = bytes(self._pending)
            self._pending.clear()
            if chunk[end] == 0x0D:
                if end + 1 < n:
                    start = end + 2 if chunk[end + 1] == 0x0A else end + 1
                else:
                    self._skip_lf = True
                    start = n
            else:
                start = end + 1
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _append(self, data: bytes) -> None:
        if len(self._pending) + len(data) > self._max_line:
            # A line this long is not an event we can use; drop it rather than grow forever.
            self.oversized_lines += 1
            self._pending.clear()
            return
        self._pending += data

    def _line(self, line: bytes) -> SSEEvent | None:
        if not line:
            if not self._data and not self._event:
                return None
            event = SSEEvent(self._event or "message", b"\n".join(self._data))
            self._event = ""
            self._data = []
            return event
        if line.startswith(b":"):
            return None
        name, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        return None

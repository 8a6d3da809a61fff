"""Incremental Server-Sent Events decoder: bytes in any split, whole events out.

Follows the WHATWG event-stream rules: lines end in CRLF, LF or CR; an empty line ends an
event; ``data:`` lines of one event are joined with LF; a single space after the colon is
dropped; comment lines (starting with ``:``) are ignored. A CR at the end of one chunk and
an LF at the start of the next are one line ending, not two.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["SSEDecoder", "SSEEvent", "SSEEventFilter"]


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


class SSEEventFilter:
    """Passes an SSE byte stream on event by event, dropping the events ``drop`` selects.

    Everything else leaves byte for byte as it came (comments and line endings included);
    only bytes of dropped events are removed. An event is held until its terminating empty
    line has arrived, so the output lags the input by at most one unfinished event. An event
    longer than ``max_event_bytes`` is passed on unexamined.
    """

    def __init__(
        self, drop: Callable[[bytes], bool], max_event_bytes: int = 16 * 1024 * 1024
    ) -> None:
        self._drop = drop
        self._max_event = max_event_bytes
        self._raw = bytearray()  # bytes of the unfinished event, as received
        self._line = bytearray()  # the unfinished line, without its ending
        self._data: list[bytes] = []
        self._oversized = False
        # After a CR at the end of a chunk: None (no CR pending), True if that CR completed an
        # event that was emitted, False if it completed a dropped one, "line" otherwise.
        self._after_cr: bool | str | None = None
        self.dropped = 0

    def feed(self, chunk: bytes) -> bytes:
        out = bytearray()
        i, n = 0, len(chunk)
        if self._after_cr is not None and n:
            if chunk[0] == 0x0A:
                if self._after_cr is True:
                    out += b"\n"
                elif self._after_cr == "line":
                    self._raw += b"\n"
                i = 1
            self._after_cr = None
        while i < n:
            cr = chunk.find(b"\r", i)
            lf = chunk.find(b"\n", i)
            if cr < 0 and lf < 0:
                self._line += chunk[i:]
                self._raw += chunk[i:]
                break
            end = lf if cr < 0 else cr if lf < 0 else min(cr, lf)
            self._line += chunk[i:end]
            stop = end + 1
            at_chunk_end_cr = chunk[end] == 0x0D and stop == n
            if chunk[end] == 0x0D and stop < n and chunk[stop] == 0x0A:
                stop += 1
            self._raw += chunk[i:stop]
            i = stop
            completed = self._end_line(out)
            if at_chunk_end_cr:
                self._after_cr = "line" if completed is None else completed
        if len(self._raw) > self._max_event:
            self._oversized = True
            out += self._raw
            self._raw.clear()
        return bytes(out)

    def flush(self) -> bytes:
        """The bytes of an unfinished last event (the stream ended without its empty line)."""
        out = bytes(self._raw)
        self._raw.clear()
        self._line.clear()
        self._data = []
        return out

    def _end_line(self, out: bytearray) -> bool | None:
        """Handle one complete line; at an event's end, True if it was emitted, False if
        dropped; None when the line did not end an event."""
        line = bytes(self._line)
        self._line.clear()
        if line:
            if line.startswith(b"data:") and not self._oversized:
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
            return None
        data, self._data = b"\n".join(self._data), []
        keep = self._oversized or not data or not self._drop(data)
        self._oversized = False
        if keep:
            out += self._raw
        else:
            self.dropped += 1
        self._raw.clear()
        return keep

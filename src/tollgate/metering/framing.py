"""The common shape of usage parsers: a bounded JSON body, or an SSE stream event by event.

Subclasses say what one JSON document means (:meth:`JsonOrSSEParser._document`); this class
does the framing. Usage is merged field by field as it arrives (the latest report of a field
wins, unreported fields stay None), so a parser asked for its result mid-stream reports what
it has seen so far.
"""

from __future__ import annotations

import json
from typing import Any

from tollgate.metering.sse import SSEDecoder, SSEEvent
from tollgate.metering.usage import ParsedResponse, RequestFacts, TokenUsage
from tollgate.policy.text import safe_text

__all__ = ["MAX_JSON_BYTES", "JsonOrSSEParser", "as_int"]

# Largest JSON response body kept for parsing; larger bodies are passed on but not parsed.
MAX_JSON_BYTES = 64 * 1024 * 1024


def as_int(value: Any) -> int | None:
    """``value`` if it is an integer (not a bool), else None. Any size: whether it can be
    stored is the record's concern (a count beyond int64 is left unset and flagged)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class JsonOrSSEParser:
    """Base of the usage parsers: framing, model, usage merging and units."""

    def __init__(
        self,
        *,
        streamed: bool,
        request: RequestFacts | None = None,
        max_json_bytes: int = MAX_JSON_BYTES,
    ) -> None:
        self.streamed = streamed
        self.request = request or RequestFacts()
        self._sse = SSEDecoder() if streamed else None
        self._body = bytearray()
        self._body_dropped = False
        self._max_json = max_json_bytes
        self.usage = TokenUsage()
        self.model: str | None = None
        self.units: dict[str, float] = {}
        self.skipped_events = 0
        # The stream's own end marker was seen (``[DONE]``, or the provider's last event):
        # the answer is whole even if the stream is cut off after it.
        self.complete = False
        self._setup()

    def _setup(self) -> None:
        """State of a subclass, set up at the end of ``__init__`` (a hook, empty here)."""

    def feed(self, chunk: bytes) -> None:
        if self._sse is None:
            if self._body_dropped or len(self._body) + len(chunk) > self._max_json:
                self._body_dropped = True
                self._body = bytearray()
            else:
                self._body += chunk
            return
        for event in self._sse.feed(chunk):
            self._event(event)

    def _event(self, event: SSEEvent) -> None:
        """One SSE event: JSON data goes to :meth:`_document`; ``[DONE]`` is the end marker."""
        if event.data == b"[DONE]":
            self.complete = True
            return
        doc = self._json(event.data)
        if doc is not None:
            self._document(doc, event.event)

    def _json(self, payload: bytes | bytearray) -> dict[str, Any] | None:
        try:
            doc = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            self.skipped_events += 1
            return None
        if not isinstance(doc, dict):
            self.skipped_events += 1
            return None
        return doc

    def _document(self, doc: dict[str, Any], event: str | None) -> None:
        """One JSON document: the whole body (``event`` None) or one SSE event's data."""
        raise NotImplementedError

    def take_usage(self, usage: TokenUsage) -> None:
        self.usage = self.usage.merged(usage)

    def take_model(self, model: Any) -> None:
        """The model the provider named (any string field: ``model``, ``modelVersion``),
        made storable (lone surrogates and NUL replaced)."""
        if isinstance(model, str) and model:
            self.model = safe_text(model)

    def result(self) -> ParsedResponse:
        if self._sse is None and self._body:
            doc = self._json(self._body)
            self._body = bytearray()
            if doc is not None:
                self._document(doc, None)
        return ParsedResponse(
            usage=self.usage, model=self.model or self.request.model, units=dict(self.units)
        )

"""Usage parser for OpenAI chat completions (``/v1/chat/completions``), JSON and SSE.

Non-streaming: the JSON body's ``usage``. Streaming: each ``data:`` chunk may carry
``model`` and, with ``stream_options.include_usage``, a final chunk with ``usage`` (and an
empty ``choices``). A chunk that is not JSON is skipped, never fatal.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from tollgate.providers.sse import SSEDecoder
from tollgate.providers.usage import ParsedResponse, TokenUsage

__all__ = ["OpenAIChatParser", "openai_usage"]

log = logging.getLogger(__name__)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def openai_usage(usage: Any) -> TokenUsage:
    """TokenUsage from an OpenAI ``usage`` object; fields it lacks stay None."""
    if not isinstance(usage, dict):
        return TokenUsage()
    prompt_details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    return TokenUsage(
        input_tokens=_int(usage.get("prompt_tokens")),
        cached_input_tokens=(
            _int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else None
        ),
        output_tokens=_int(usage.get("completion_tokens")),
        reasoning_tokens=(
            _int(completion_details.get("reasoning_tokens"))
            if isinstance(completion_details, dict)
            else None
        ),
        total_tokens=_int(usage.get("total_tokens")),
    )


class OpenAIChatParser:
    """Incremental: JSON bodies are collected (bounded), SSE bodies decoded event by event."""

    def __init__(self, *, streamed: bool, max_json_bytes: int = 64 * 1024 * 1024) -> None:
        self.streamed = streamed
        self._sse = SSEDecoder() if streamed else None
        self._body = bytearray()
        self._max_json = max_json_bytes
        self._usage = TokenUsage()
        self._model: str | None = None
        self.skipped_events = 0

    def feed(self, chunk: bytes) -> None:
        if self._sse is None:
            if len(self._body) + len(chunk) <= self._max_json:
                self._body += chunk
            return
        for event in self._sse.feed(chunk):
            if event.data == b"[DONE]":
                continue
            self._take(event.data)

    def _take(self, payload: bytes | bytearray) -> None:
        try:
            doc = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            self.skipped_events += 1
            return
        if not isinstance(doc, dict):
            self.skipped_events += 1
            return
        model = doc.get("model")
        if isinstance(model, str) and model:
            self._model = model
        if "usage" in doc:
            self._usage = self._usage.merged(openai_usage(doc["usage"]))

    def result(self) -> ParsedResponse:
        if self._sse is None and self._body:
            self._take(self._body)
            self._body = bytearray()
        return ParsedResponse(usage=self._usage, model=self._model)

"""Usage parser for OpenAI embeddings (``/v1/embeddings``), a JSON body only.

The body is a ``list`` of embeddings with ``model`` and ``usage`` {``prompt_tokens``,
``total_tokens``}: embeddings produce no output tokens, so ``output_tokens`` stays None (not
reported), never 0. Reference: https://developers.openai.com/api/docs/api-reference/embeddings

A large batch (2,048 inputs of 3,072 floats) can outgrow the JSON body the base keeps. The
response puts ``model`` and ``usage`` after ``data``, so the last bytes of the body are also
kept, and when the whole body was too large the two are read from there: the embeddings
themselves (numbers, or base64 text) cannot contain a quoted ``"usage"`` key.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tollgate.metering.framing import JsonOrSSEParser
from tollgate.metering.openai_chat import openai_usage
from tollgate.metering.usage import ParsedResponse

__all__ = ["OpenAIEmbeddingsParser"]

# Bytes kept from the end of the body; ``model`` and ``usage`` fit well within this.
_TAIL_BYTES = 64 * 1024
_KEY = re.compile(r'"(model|usage)"\s*:\s*')


class OpenAIEmbeddingsParser(JsonOrSSEParser):
    """``/v1/embeddings``: the body's ``model`` and ``usage`` (input tokens only)."""

    def _setup(self) -> None:
        self._tail = bytearray()

    def feed(self, chunk: bytes) -> None:
        super().feed(chunk)
        if self._sse is None:
            self._tail += chunk
            del self._tail[:-_TAIL_BYTES]

    def _document(self, doc: dict[str, Any], event: str | None) -> None:
        self.take_model(doc.get("model"))
        if "usage" in doc:
            self.take_usage(openai_usage(doc["usage"]))

    def result(self) -> ParsedResponse:
        if self._body_dropped and self._tail:
            self._read_tail(self._tail.decode("utf-8", "replace"))
            self._tail = bytearray()
        return super().result()

    def _read_tail(self, text: str) -> None:
        """``model`` and ``usage`` from the end of a body too large to keep whole."""
        found: dict[str, Any] = {}
        decoder = json.JSONDecoder()
        for match in _KEY.finditer(text):
            try:
                value, _ = decoder.raw_decode(text, match.end())
            except (ValueError, RecursionError):
                continue
            found[match.group(1)] = value
        if "model" in found:
            self.take_model(found["model"])
        if "usage" in found:
            self.take_usage(openai_usage(found["usage"]))

"""Usage parser for Google Gemini ``generateContent`` and ``streamGenerateContent``.

Reference: https://ai.google.dev/api/generate-content (``GenerateContentResponse``,
``UsageMetadata``); field names as in google-genai ``types.py``
(``GenerateContentResponseUsageMetadata``).

Three body shapes, told apart by the body's first non-blank byte (``streamed`` is only a
hint; an error answer to a streaming request, for instance, is a plain JSON object):

* ``generateContent``: one JSON ``GenerateContentResponse`` object.
* ``streamGenerateContent?alt=sse``: SSE, each ``data:`` a ``GenerateContentResponse``
  (there is no ``[DONE]``; the stream just ends).
* ``streamGenerateContent`` without ``alt=sse``: one JSON ARRAY of ``GenerateContentResponse``
  objects, sent piece by piece. Each element is parsed as soon as its closing brace arrives,
  so the body is never held whole and an aborted stream still reports what it carried. An
  element that is not a JSON object is skipped; an element with unbalanced brackets swallows
  the rest of the array (a JSON array has no point to resynchronise on).

``usageMetadata`` maps as: ``promptTokenCount`` -> ``input_tokens``,
``candidatesTokenCount`` -> ``output_tokens``, ``thoughtsTokenCount`` -> ``reasoning_tokens``,
``cachedContentTokenCount`` -> ``cached_input_tokens``, ``totalTokenCount`` ->
``total_tokens``. Stream chunks carry counts for the response so far, so the latest report of
each field wins. The model is ``modelVersion`` (falling back to the request's path model).

Recorded as reported, nothing added up or subtracted; unlike other providers:

* ``promptTokenCount`` INCLUDES the cached tokens (``cachedContentTokenCount`` is a part
  of it), unlike Anthropic's ``input_tokens``.
* ``candidatesTokenCount`` EXCLUDES the thinking tokens (``thoughtsTokenCount`` is counted
  beside it, and ``totalTokenCount`` sums prompt, candidates, thoughts and tool-use prompt),
  unlike OpenAI's ``reasoning_tokens``, which are part of ``completion_tokens``.
* ``toolUsePromptTokenCount`` and the per-modality ``*TokensDetails`` lists have no
  TokenUsage field and are not recorded. Gemini omits zero counts, so they stay None.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from tollgate.metering.framing import JsonOrSSEParser, as_int
from tollgate.metering.sse import SSEDecoder
from tollgate.metering.usage import TokenUsage

__all__ = ["GeminiParser", "gemini_usage"]

# Inside a string only a quote or a backslash matters; outside, quotes and brackets.
_STRING_SPECIAL = re.compile(rb'["\\]')
_STRUCTURE = re.compile(rb'["{}\[\]]')
_QUOTE, _BACKSLASH, _OPEN_BRACE = ord('"'), ord("\\"), ord("{")
_OPENERS = b"{["
# Between the elements of the top-level array: blanks, commas and the array's own brackets.
_BETWEEN = b" \t\r\n,[]"


def gemini_usage(usage: Any) -> TokenUsage:
    """TokenUsage from a Gemini ``usageMetadata`` object; fields it lacks stay None."""
    if not isinstance(usage, dict):
        return TokenUsage()
    return TokenUsage(
        input_tokens=as_int(usage.get("promptTokenCount")),
        cached_input_tokens=as_int(usage.get("cachedContentTokenCount")),
        output_tokens=as_int(usage.get("candidatesTokenCount")),
        reasoning_tokens=as_int(usage.get("thoughtsTokenCount")),
        total_tokens=as_int(usage.get("totalTokenCount")),
    )


class _JsonObjects:
    """The top-level objects of a JSON body (one object, or an array of them) as bytes arrive.

    Tracks only string, escape and bracket state, so each object is handed on whole as soon
    as it closes. Something else where an object belongs (a number, a string) comes out as
    one empty payload, as does an object larger than ``max_object_bytes``; neither parses.
    """

    def __init__(self, max_object_bytes: int) -> None:
        self._max = max_object_bytes
        self._object = bytearray()
        self._oversized = False
        self._depth = 0  # bracket nesting inside the current object; 0 between objects
        self._in_string = False
        self._escaped = False
        self._junk = False

    def feed(self, chunk: bytes) -> list[bytes]:
        done: list[bytes] = []
        pos, n = 0, len(chunk)
        while pos < n:
            start, depth_before = pos, self._depth
            if self._escaped:
                self._escaped = False
                pos += 1
            elif self._in_string:
                match = _STRING_SPECIAL.search(chunk, pos)
                if match is None:
                    pos = n
                else:
                    pos = match.end()
                    if chunk[match.start()] == _BACKSLASH:
                        self._escaped = True
                    else:
                        self._in_string = False
            elif self._depth:
                match = _STRUCTURE.search(chunk, pos)
                if match is None:
                    pos = n
                else:
                    pos = match.end()
                    char = chunk[match.start()]
                    if char == _QUOTE:
                        self._in_string = True
                    elif char in _OPENERS:
                        self._depth += 1
                    else:
                        self._depth -= 1
            else:
                char = chunk[pos]
                pos += 1
                if char == _OPEN_BRACE:
                    self._depth = 1
                    self._junk = False
                elif char in _BETWEEN:
                    self._junk = False
                else:
                    if not self._junk:
                        done.append(b"")
                        self._junk = True
                    self._in_string = char == _QUOTE
            if depth_before or self._depth:
                self._keep(chunk[start:pos])
                if not self._depth:
                    done.append(b"" if self._oversized else bytes(self._object))
                    self._object = bytearray()
                    self._oversized = False
        return done

    def _keep(self, part: bytes) -> None:
        if self._oversized:
            return
        if len(self._object) + len(part) > self._max:
            self._oversized = True
            self._object = bytearray()
            return
        self._object += part


class GeminiParser(JsonOrSSEParser):
    """Gemini ``generateContent`` / ``streamGenerateContent``: ``usageMetadata``, model."""

    def _setup(self) -> None:
        self._framing: Literal["json", "sse"] | None = None
        self._objects = _JsonObjects(self._max_json)

    def feed(self, chunk: bytes) -> None:
        if self._framing is None:
            chunk = chunk.lstrip()
            if not chunk:
                return
            if chunk[:1] in (b"{", b"["):
                self._framing = "json"
            else:
                self._framing = "sse"
                if self._sse is None:
                    self._sse = SSEDecoder()
        if self._framing == "sse":
            super().feed(chunk)
            return
        for payload in self._objects.feed(chunk):
            doc = self._json(payload)
            if doc is not None:
                self._document(doc, None)

    def _document(self, doc: dict[str, Any], event: str | None) -> None:
        self.take_model(doc.get("modelVersion"))
        if "usageMetadata" in doc:
            self.take_usage(gemini_usage(doc["usageMetadata"]))

"""Usage parser for the OpenAI Responses API (``/v1/responses``), JSON and SSE.

Non-streaming: the body is a ``response`` object with ``model`` and ``usage``
(``input_tokens``, ``input_tokens_details.cached_tokens`` and ``.cache_write_tokens``,
``output_tokens``, ``output_tokens_details.reasoning_tokens``, ``total_tokens``).

Streaming: each event's ``type`` names it (the SSE ``event:`` line repeats it). The lifecycle
events ``response.queued``, ``response.created`` and ``response.in_progress`` carry the
``response`` object before any usage (``usage: null``); the terminal events
``response.completed``, ``response.incomplete`` and ``response.failed`` carry it with its
``usage``. Every other event (output deltas, tool calls, ``error``) says nothing about usage.
References: https://developers.openai.com/api/reference/resources/responses/methods/create
and https://developers.openai.com/api/reference/resources/responses/streaming-events
"""

from __future__ import annotations

from typing import Any

from tollgate.metering.framing import JsonOrSSEParser, as_int
from tollgate.metering.usage import TokenUsage

__all__ = ["OpenAIResponsesParser", "responses_usage"]

# Events whose ``response`` object names the model but has no usage yet.
_STARTED_EVENTS = frozenset({"response.queued", "response.created", "response.in_progress"})
# Events that end the stream; their ``response`` object carries the final usage.
_TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


def _detail(details: Any, name: str) -> int | None:
    return as_int(details.get(name)) if isinstance(details, dict) else None


def responses_usage(usage: Any) -> TokenUsage:
    """TokenUsage from an input/output-style OpenAI ``usage`` object; fields it lacks stay None.

    The Responses API's shape; the Images and audio endpoints use the same top-level names
    (``input_tokens``, ``output_tokens``, ``total_tokens``) with other details.
    """
    if not isinstance(usage, dict):
        return TokenUsage()
    input_details = usage.get("input_tokens_details")
    return TokenUsage(
        input_tokens=as_int(usage.get("input_tokens")),
        cached_input_tokens=_detail(input_details, "cached_tokens"),
        cache_write_tokens=_detail(input_details, "cache_write_tokens"),
        output_tokens=as_int(usage.get("output_tokens")),
        reasoning_tokens=_detail(usage.get("output_tokens_details"), "reasoning_tokens"),
        total_tokens=as_int(usage.get("total_tokens")),
    )


class OpenAIResponsesParser(JsonOrSSEParser):
    """``/v1/responses``: the ``response`` object's ``model`` and ``usage``, whole or streamed."""

    def _document(self, doc: dict[str, Any], event: str | None) -> None:
        if event is None:
            self._response(doc, with_usage=True)
            return
        kind = doc.get("type")
        if not isinstance(kind, str):
            kind = event
        if kind in _TERMINAL_EVENTS:
            self._response(doc.get("response"), with_usage=True)
            self.complete = True
        elif kind in _STARTED_EVENTS:
            self._response(doc.get("response"), with_usage=False)

    def _response(self, response: Any, *, with_usage: bool) -> None:
        if not isinstance(response, dict):
            return
        self.take_model(response.get("model"))
        if with_usage and "usage" in response:
            self.take_usage(responses_usage(response["usage"]))

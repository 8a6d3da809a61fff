"""Usage parser for Anthropic Messages (``POST /v1/messages``), JSON and SSE.

Reference: https://docs.anthropic.com/en/api/messages (the ``Message`` object and its
``usage``) and https://docs.anthropic.com/en/docs/build-with-claude/streaming (the event
flow); field names as in anthropic-sdk-python ``types/usage.py`` and
``types/message_delta_usage.py``.

Non-streaming: the body is a ``Message``; its ``model`` and ``usage`` are taken.

Streaming: ``message_start`` carries ``message.model`` and ``message.usage`` (input and cache
counts, and an ``output_tokens`` of a few tokens); each ``message_delta`` carries a
``usage`` whose counts are CUMULATIVE for the whole message (``output_tokens`` always; newer
API versions also repeat ``input_tokens`` and the cache counts). Merging field by field with
the latest report winning is therefore exact. ``ping``, ``content_block_start``,
``content_block_delta``, ``content_block_stop``, ``message_stop``, ``error`` and event types
added later carry no usage and are ignored; an ``error`` event ends the stream with the usage
seen up to then. A ``data:`` payload that is not a JSON object is skipped, never fatal.

What is recorded is exactly what Anthropic reports, nothing added up:

* ``input_tokens`` EXCLUDES cached tokens. Anthropic's total input is
  ``input_tokens + cache_creation_input_tokens + cache_read_input_tokens``; Tollgate stores
  the three separately (``input_tokens``, ``cache_write_tokens``, ``cached_input_tokens``)
  and leaves the sum to pricing.
* ``total_tokens`` stays None: Anthropic does not report a total, and a field the provider
  did not report stays NULL.
* ``output_tokens_details.thinking_tokens`` (reasoning, already inside ``output_tokens``)
  becomes ``reasoning_tokens`` when present.
* Not recorded: ``cache_creation`` (the 5-minute / 1-hour split of cache writes) and
  ``server_tool_use`` (web search / fetch request counts); TokenUsage has no field for them.
"""

from __future__ import annotations

from typing import Any

from tollgate.metering.framing import JsonOrSSEParser, as_int
from tollgate.metering.usage import TokenUsage

__all__ = ["AnthropicMessagesParser", "anthropic_usage"]


def anthropic_usage(usage: Any) -> TokenUsage:
    """TokenUsage from an Anthropic ``usage`` object; fields it lacks stay None."""
    if not isinstance(usage, dict):
        return TokenUsage()
    details = usage.get("output_tokens_details")
    return TokenUsage(
        input_tokens=as_int(usage.get("input_tokens")),
        cached_input_tokens=as_int(usage.get("cache_read_input_tokens")),
        cache_write_tokens=as_int(usage.get("cache_creation_input_tokens")),
        output_tokens=as_int(usage.get("output_tokens")),
        reasoning_tokens=(
            as_int(details.get("thinking_tokens")) if isinstance(details, dict) else None
        ),
    )


class AnthropicMessagesParser(JsonOrSSEParser):
    """``/v1/messages``: the ``Message`` body, or ``message_start`` and ``message_delta``."""

    def _document(self, doc: dict[str, Any], event: str | None) -> None:
        # Every event's data names its own type; the SSE event name is the same string.
        kind = doc.get("type")
        if event is None:
            # The whole JSON body: a Message (an error body has neither model nor usage).
            self._message(doc)
        elif kind == "message_start":
            message = doc.get("message")
            if isinstance(message, dict):
                self._message(message)
        elif kind == "message_delta":
            self.take_usage(anthropic_usage(doc.get("usage")))
        elif kind == "message_stop":
            self.complete = True

    def _message(self, message: dict[str, Any]) -> None:
        self.take_model(message.get("model"))
        self.take_usage(anthropic_usage(message.get("usage")))

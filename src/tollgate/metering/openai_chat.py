"""Usage parser for OpenAI chat completions (``/v1/chat/completions``), JSON and SSE.

Non-streaming: the JSON body's ``usage``. Streaming: each ``data:`` chunk may carry
``model`` and, with ``stream_options.include_usage``, a final chunk with ``usage`` (and an
empty ``choices``). A chunk that is not JSON is skipped, never fatal.
"""

from __future__ import annotations

from typing import Any

from tollgate.metering.framing import JsonOrSSEParser, as_int
from tollgate.metering.usage import TokenUsage

__all__ = ["OpenAIChatParser", "openai_usage"]


def openai_usage(usage: Any) -> TokenUsage:
    """TokenUsage from an OpenAI ``usage`` object; fields it lacks stay None."""
    if not isinstance(usage, dict):
        return TokenUsage()
    prompt_details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    return TokenUsage(
        input_tokens=as_int(usage.get("prompt_tokens")),
        cached_input_tokens=(
            as_int(prompt_details.get("cached_tokens"))
            if isinstance(prompt_details, dict)
            else None
        ),
        output_tokens=as_int(usage.get("completion_tokens")),
        reasoning_tokens=(
            as_int(completion_details.get("reasoning_tokens"))
            if isinstance(completion_details, dict)
            else None
        ),
        total_tokens=as_int(usage.get("total_tokens")),
    )


class OpenAIChatParser(JsonOrSSEParser):
    """``/v1/chat/completions``: the body's or the stream chunks' ``model`` and ``usage``."""

    def _document(self, doc: dict[str, Any], event: str | None) -> None:
        self.take_model(doc.get("model"))
        if "usage" in doc:
            self.take_usage(openai_usage(doc["usage"]))

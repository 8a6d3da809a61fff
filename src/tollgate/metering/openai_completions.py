"""Usage parser for OpenAI legacy text completions (``/v1/completions``), JSON and SSE.

The ``text_completion`` object has the same ``model`` and ``usage`` (``CompletionUsage``)
as a chat completion. Streamed, every ``data:`` chunk is a ``text_completion`` object; with
``stream_options.include_usage`` one more chunk before ``data: [DONE]`` carries ``usage``
(and an empty ``choices``). Reference:
https://developers.openai.com/api/reference/resources/completions/methods/create
"""

from __future__ import annotations

from typing import Any

from tollgate.metering.framing import JsonOrSSEParser
from tollgate.metering.openai_chat import openai_usage

__all__ = ["OpenAICompletionsParser"]


class OpenAICompletionsParser(JsonOrSSEParser):
    """``/v1/completions``: the body's or the stream chunks' ``model`` and ``usage``."""

    def _document(self, doc: dict[str, Any], event: str | None) -> None:
        self.take_model(doc.get("model"))
        if "usage" in doc:
            self.take_usage(openai_usage(doc["usage"]))

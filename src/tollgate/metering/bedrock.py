"""Usage parser for AWS Bedrock Converse (``POST /model/{modelId}/converse``), JSON only.

Reference: https://docs.aws.amazon.com/bedrock/latest/APIReference/API_runtime_Converse.html
and https://docs.aws.amazon.com/bedrock/latest/APIReference/API_runtime_TokenUsage.html
(botocore's ``bedrock-runtime`` service model, shape ``TokenUsage``).

The response's ``usage`` object maps as: ``inputTokens`` -> ``input_tokens``,
``outputTokens`` -> ``output_tokens``, ``totalTokens`` -> ``total_tokens``,
``cacheReadInputTokens`` -> ``cached_input_tokens``, ``cacheWriteInputTokens`` ->
``cache_write_tokens``. Values are recorded as reported, never added up or adjusted.
``cacheDetails`` (cache writes split by TTL) has no TokenUsage field and is not recorded.

The Converse response names no model, so the model is the request's: the caller passes the
path's ``modelId`` (a model id, inference profile id or ARN) as ``RequestFacts.model``.

Not covered:

* ``ConverseStream`` (``/model/{modelId}/converse-stream``): its body is AWS's binary
  ``application/vnd.amazon.eventstream`` framing (length-prefixed, CRC-checked messages, the
  usage in the ``metadata`` event), not JSON or SSE. A parser built with ``streamed=True``
  therefore keeps nothing and reports no usage (only the request's model).
* ``InvokeModel`` / ``InvokeModelWithResponseStream``: the body is the model vendor's own
  format (Anthropic, Meta, Amazon Nova, ...) and is not parsed here.
"""

from __future__ import annotations

from typing import Any

from tollgate.metering.framing import JsonOrSSEParser, as_int
from tollgate.metering.usage import TokenUsage

__all__ = ["BedrockConverseParser", "bedrock_usage"]


def bedrock_usage(usage: Any) -> TokenUsage:
    """TokenUsage from a Bedrock ``TokenUsage`` object; fields it lacks stay None."""
    if not isinstance(usage, dict):
        return TokenUsage()
    return TokenUsage(
        input_tokens=as_int(usage.get("inputTokens")),
        cached_input_tokens=as_int(usage.get("cacheReadInputTokens")),
        cache_write_tokens=as_int(usage.get("cacheWriteInputTokens")),
        output_tokens=as_int(usage.get("outputTokens")),
        total_tokens=as_int(usage.get("totalTokens")),
    )


class BedrockConverseParser(JsonOrSSEParser):
    """``/model/{modelId}/converse``: the JSON body's ``usage``; the model is the request's."""

    def _setup(self) -> None:
        # Converse answers with one JSON document; a streamed body here would be ConverseStream's
        # binary event stream, which is neither kept nor parsed (see the module docstring).
        self._sse = None

    def feed(self, chunk: bytes) -> None:
        if not self.streamed:
            super().feed(chunk)

    def _document(self, doc: dict[str, Any], event: str | None) -> None:
        if "usage" in doc:
            self.take_usage(bedrock_usage(doc["usage"]))

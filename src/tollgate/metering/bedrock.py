"""Usage parsers for AWS Bedrock Runtime: Converse and InvokeModel, JSON and event stream.

Reference: botocore's ``bedrock-runtime`` service model (``service-2.json``: operations
``Converse``, ``ConverseStream``, ``InvokeModel``, ``InvokeModelWithResponseStream``; shapes
``TokenUsage``, ``ConverseStreamOutput``, ``ResponseStream``, ``PayloadPart``),
https://docs.aws.amazon.com/bedrock/latest/APIReference/API_runtime_TokenUsage.html and the
model vendors' request and response formats in the Bedrock user guide ("Inference request
parameters and response fields for foundation models").

Paths (:func:`bedrock_parser_for`): ``/model/{modelId}/converse``, ``/converse-stream``,
``/invoke`` and ``/invoke-with-response-stream``. The ``modelId`` is percent-encoded and may be
a model id, an inference profile id (``us.anthropic…``, ``global.anthropic…``) or an ARN. No
Bedrock response names the model it was asked for, so the model is the path's, whatever the
request body says (AWS bills the path's model): a foundation-model or inference-profile ARN
becomes the id after its last ``/``; any other ARN (an application inference profile, a
provisioned or custom model, a prompt router) is kept whole, its id being opaque. A vendor
body's own ``model`` field (Anthropic's ``claude-…`` name) is not taken.

Converse (JSON) and ConverseStream (``application/vnd.amazon.eventstream``, see
:mod:`tollgate.metering.eventstream`) report a Bedrock ``TokenUsage``, mapped as:
``inputTokens`` -> ``input_tokens``, ``outputTokens`` -> ``output_tokens``, ``totalTokens``
-> ``total_tokens``, ``cacheReadInputTokens`` -> ``cached_input_tokens``,
``cacheWriteInputTokens`` -> ``cache_write_tokens``. ``inputTokens`` EXCLUDES the cache reads
and writes (``totalTokens`` adds all four). ``cacheDetails`` (cache writes split by TTL) and
the ``metrics`` (latency) have no TokenUsage field and are not recorded. In ConverseStream the
usage comes in the last event, ``metadata`` (``:message-type`` ``event``), after
``messageStart``, ``contentBlockStart``/``Delta``/``Stop`` and ``messageStop``, which carry
none and are not parsed; the stream is ``complete`` once ``metadata`` has arrived.

InvokeModel (JSON) and InvokeModelWithResponseStream (event stream of ``chunk`` events whose
JSON payload ``{"bytes": "<base64>"}`` wraps one vendor JSON document) carry the vendor's own
format. Every vendor document, whole body or stream chunk, is read for all of these (their
field names do not overlap, so the vendor need not be known; an application inference
profile hides it anyway):

* Anthropic Claude (Messages): ``usage`` (the body's, or ``message_start``'s
  ``message.usage`` and each ``message_delta``'s cumulative ``usage``) with
  ``input_tokens``, ``output_tokens``, ``cache_read_input_tokens`` ->
  ``cached_input_tokens``, ``cache_creation_input_tokens`` -> ``cache_write_tokens``, as for
  Anthropic's own API (:mod:`tollgate.metering.anthropic_messages`).
* Amazon Nova: ``usage`` (or a stream's ``metadata.usage``) with ``inputTokens``,
  ``outputTokens``, ``totalTokens`` and ``cacheReadInputTokenCount`` /
  ``cacheWriteInputTokenCount`` (Converse's ``cacheReadInputTokens`` /
  ``cacheWriteInputTokens`` spellings are read too).
* Meta Llama: ``prompt_token_count`` -> ``input_tokens``, ``generation_token_count`` ->
  ``output_tokens`` (stream chunks: the prompt count in the first, a cumulative generation
  count in each, ``null`` otherwise).
* Amazon Titan Text: ``inputTextTokenCount`` -> ``input_tokens``, the sum of
  ``results[].tokenCount`` (a stream chunk's cumulative ``totalOutputTextTokenCount``) ->
  ``output_tokens``. Titan Embeddings: ``inputTextTokenCount`` only.
* Cohere: ``meta.billed_units.input_tokens`` / ``output_tokens`` where a model reports them.
* OpenAI-style bodies (Mistral Large, AI21 Jamba, OpenAI gpt-oss): ``usage.prompt_tokens``,
  ``completion_tokens``, ``total_tokens``, ``completion_tokens_details.reasoning_tokens``.
  Their ``prompt_tokens_details.cached_tokens`` is NOT recorded: it is part of
  ``prompt_tokens``, while Bedrock's input counts are priced as excluding cache.
* Mistral 7B / Mixtral text completions, Cohere Command and DeepSeek report nothing in the
  body; streamed, their counts come from the invocation metrics below.

Streamed, Bedrock adds ``amazon-bedrock-invocationMetrics`` to the vendor document of the
last chunk: ``inputTokenCount`` -> ``input_tokens``, ``outputTokenCount`` ->
``output_tokens``, ``cacheReadInputTokenCount`` -> ``cached_input_tokens``,
``cacheWriteInputTokenCount`` -> ``cache_write_tokens`` (``invocationLatency`` and
``firstByteLatency`` are not recorded); that chunk (or Anthropic's ``message_stop``) makes the
stream ``complete``. Vendor counts and invocation metrics are merged separately, each with the
latest report of a field winning; then THE VENDOR'S COUNT OF A FIELD WINS over the metrics',
which only fill the fields the vendor did not report. The vendor's counts are in the terms of
the model's own format (Anthropic's input excluding cache, its reasoning detail), the same
terms the non-streamed InvokeModel body reports, so one request meters the same streamed or
not; the metrics arrive only in the last chunk, so a stream cut short still has the vendor's
counts so far, and they are what a vendor without counts (Mistral, Cohere, DeepSeek) is
metered by. InvokeModel's ``X-Amzn-Bedrock-Input-Token-Count`` / ``-Output-Token-Count``
response headers are not read: parsers see the body only.

All values are recorded as reported, never added up or adjusted. An event-stream message that
does not decode (see :class:`~tollgate.metering.eventstream.EventStreamDecoder`), a payload or
chunk that is not a JSON object, or ``bytes`` that are not base64 are skipped and counted in
``skipped_events``, never fatal. An exception message (``:message-type`` ``exception`` or
``error``: a throttling or model stream error mid-stream) ends the stream with the usage seen
up to then; its ``:exception-type`` (or ``:error-code``) is kept in ``exception``.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import replace
from typing import Any
from urllib.parse import unquote

from tollgate.metering.anthropic_messages import anthropic_usage
from tollgate.metering.eventstream import EventStreamDecoder, EventStreamMessage
from tollgate.metering.framing import JsonOrSSEParser, as_int
from tollgate.metering.openai_chat import openai_usage
from tollgate.metering.usage import RequestFacts, TokenUsage, UsageParser
from tollgate.policy.text import safe_text

__all__ = [
    "BedrockConverseParser",
    "BedrockConverseStreamParser",
    "BedrockInvokeParser",
    "BedrockInvokeStreamParser",
    "bedrock_model_id",
    "bedrock_parser_for",
    "bedrock_usage",
    "invocation_metrics_usage",
    "invoke_usage",
]

_PATH = re.compile(
    r"^/model/(?P<model>.+)/(?P<action>converse|converse-stream|invoke|invoke-with-response-stream)$"
)
# ARN resource types whose id (after the '/') is a model or inference profile id.
_ARN_NAMED_IDS = ("foundation-model", "inference-profile")
_INVOCATION_METRICS = "amazon-bedrock-invocationMetrics"


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


def _nova_usage(usage: dict[str, Any]) -> TokenUsage:
    """A Nova ``usage``: Converse's names, with its own spelling of the cache counts."""
    converse = bedrock_usage(usage)
    return converse.merged(
        TokenUsage(
            cached_input_tokens=as_int(usage.get("cacheReadInputTokenCount")),
            cache_write_tokens=as_int(usage.get("cacheWriteInputTokenCount")),
        )
    )


def _usage_object(usage: Any) -> TokenUsage:
    """A vendor ``usage`` object in any of the Anthropic, Nova or OpenAI spellings."""
    if not isinstance(usage, dict):
        return TokenUsage()
    openai = replace(openai_usage(usage), cached_input_tokens=None)  # see the module docstring
    return anthropic_usage(usage).merged(_nova_usage(usage)).merged(openai)


def invoke_usage(doc: dict[str, Any]) -> TokenUsage:
    """TokenUsage from one vendor JSON document of InvokeModel (a whole body or one stream
    chunk's decoded bytes), whatever the vendor; fields it lacks stay None."""
    message = doc.get("message")
    metadata = doc.get("metadata")
    meta = doc.get("meta")
    billed = meta.get("billed_units") if isinstance(meta, dict) else None
    parts = (
        # Anthropic, Nova and OpenAI-style bodies; Anthropic's message_start; Nova's stream.
        _usage_object(doc.get("usage")),
        _usage_object(message.get("usage") if isinstance(message, dict) else None),
        _usage_object(metadata.get("usage") if isinstance(metadata, dict) else None),
        # Meta Llama.
        TokenUsage(
            input_tokens=as_int(doc.get("prompt_token_count")),
            output_tokens=as_int(doc.get("generation_token_count")),
        ),
        # Amazon Titan.
        TokenUsage(
            input_tokens=as_int(doc.get("inputTextTokenCount")),
            output_tokens=_titan_output_tokens(doc),
        ),
        # Cohere.
        TokenUsage(
            input_tokens=as_int(billed.get("input_tokens")),
            output_tokens=as_int(billed.get("output_tokens")),
        )
        if isinstance(billed, dict)
        else TokenUsage(),
    )
    usage = TokenUsage()
    for part in parts:
        usage = usage.merged(part)
    return usage


def _titan_output_tokens(doc: dict[str, Any]) -> int | None:
    """A Titan stream chunk's ``totalOutputTextTokenCount``, or the sum of a body's
    ``results[].tokenCount``."""
    total = as_int(doc.get("totalOutputTextTokenCount"))
    results = doc.get("results")
    if total is not None or not isinstance(results, list):
        return total
    counts = [as_int(r.get("tokenCount")) for r in results if isinstance(r, dict)]
    reported = [count for count in counts if count is not None]
    return sum(reported) if reported else None


def invocation_metrics_usage(metrics: Any) -> TokenUsage:
    """TokenUsage from an ``amazon-bedrock-invocationMetrics`` object."""
    if not isinstance(metrics, dict):
        return TokenUsage()
    return TokenUsage(
        input_tokens=as_int(metrics.get("inputTokenCount")),
        cached_input_tokens=as_int(metrics.get("cacheReadInputTokenCount")),
        cache_write_tokens=as_int(metrics.get("cacheWriteInputTokenCount")),
        output_tokens=as_int(metrics.get("outputTokenCount")),
    )


def bedrock_model_id(path_model: str) -> str:
    """The model a (decoded) path ``modelId`` names, for the record (see the module
    docstring): ARNs of foundation models and inference profiles give their id."""
    if path_model.startswith("arn:"):
        parts = path_model.split(":", 5)
        kind, slash, _ = parts[-1].partition("/")
        name = path_model.rpartition("/")[2]
        if len(parts) == 6 and slash and kind in _ARN_NAMED_IDS and name:
            return safe_text(name)
    return safe_text(path_model)


class _InvokeCounts:
    """Vendor counts and invocation metrics, each merged as reported; the vendor's win."""

    def __init__(self) -> None:
        self.vendor = TokenUsage()
        self.metrics = TokenUsage()
        self.ended = False  # the last chunk (with the metrics) or message_stop was seen

    def take(self, doc: dict[str, Any]) -> TokenUsage:
        self.vendor = self.vendor.merged(invoke_usage(doc))
        if _INVOCATION_METRICS in doc:
            self.metrics = self.metrics.merged(invocation_metrics_usage(doc[_INVOCATION_METRICS]))
            self.ended = True
        if doc.get("type") == "message_stop":
            self.ended = True
        return self.metrics.merged(self.vendor)


class BedrockConverseParser(JsonOrSSEParser):
    """``/model/{modelId}/converse``: the JSON body's ``usage``; the model is the request's."""

    def _setup(self) -> None:
        # Converse answers with one JSON document; a streamed body here would be ConverseStream's
        # binary event stream, which this parser neither keeps nor parses (that is
        # BedrockConverseStreamParser's).
        self._sse = None

    def feed(self, chunk: bytes) -> None:
        if not self.streamed:
            super().feed(chunk)

    def _document(self, doc: dict[str, Any], event: str | None) -> None:
        if "usage" in doc:
            self.take_usage(bedrock_usage(doc["usage"]))


class BedrockInvokeParser(JsonOrSSEParser):
    """``/model/{modelId}/invoke``: the vendor's JSON body, whatever ``streamed`` says."""

    def _setup(self) -> None:
        self._sse = None
        self._counts = _InvokeCounts()

    def _document(self, doc: dict[str, Any], event: str | None) -> None:
        self.usage = self._counts.take(doc)


class _EventStreamParser(JsonOrSSEParser):
    """Base of the parsers of an ``application/vnd.amazon.eventstream`` body, which is
    decoded as such whatever ``streamed`` says (the framing is self-checking)."""

    def _setup(self) -> None:
        self._sse = None
        self._frames = EventStreamDecoder()
        self.exception: str | None = None

    def feed(self, chunk: bytes) -> None:
        before = self._frames.skipped
        for message in self._frames.feed(chunk):
            kind = message.text(":message-type")
            if kind == "event":
                self._event_message(message)
            elif kind in ("exception", "error"):
                self.exception = (
                    message.text(":exception-type") or message.text(":error-code") or kind
                )
        self.skipped_events += self._frames.skipped - before

    def _event_message(self, message: EventStreamMessage) -> None:
        """One ``event`` message."""
        raise NotImplementedError

    def _document(self, doc: dict[str, Any], event: str | None) -> None:
        """Unused: there is no JSON body (``result`` finds nothing kept)."""


class BedrockConverseStreamParser(_EventStreamParser):
    """``/model/{modelId}/converse-stream``: the ``metadata`` event's ``usage``."""

    def _event_message(self, message: EventStreamMessage) -> None:
        if message.text(":event-type") != "metadata":
            return
        doc = self._json(message.payload)
        if doc is not None:
            self.take_usage(bedrock_usage(doc.get("usage")))
            self.complete = True


class BedrockInvokeStreamParser(_EventStreamParser):
    """``/model/{modelId}/invoke-with-response-stream``: each ``chunk``'s vendor document."""

    def _setup(self) -> None:
        super()._setup()
        self._counts = _InvokeCounts()

    def _event_message(self, message: EventStreamMessage) -> None:
        if message.text(":event-type") != "chunk":
            return
        part = self._json(message.payload)
        if part is None:
            return
        encoded = part.get("bytes")
        try:
            if not isinstance(encoded, str):
                raise ValueError("no bytes")
            raw = base64.b64decode(encoded, validate=True)
        except (ValueError, binascii.Error):
            self.skipped_events += 1
            return
        doc = self._json(raw)
        if doc is None:
            return
        self.usage = self._counts.take(doc)
        self.complete = self.complete or self._counts.ended


_PARSERS: dict[str, type[JsonOrSSEParser]] = {
    "converse": BedrockConverseParser,
    "converse-stream": BedrockConverseStreamParser,
    "invoke": BedrockInvokeParser,
    "invoke-with-response-stream": BedrockInvokeStreamParser,
}


def bedrock_parser_for(
    endpoint: str, *, streamed: bool, request: RequestFacts
) -> UsageParser | None:
    """The parser of a Bedrock Runtime path (``/model/{modelId}/{action}``, a query string
    allowed), with the path's model as the request's; None for any other path."""
    match = _PATH.match(endpoint.partition("?")[0])
    if match is None:
        return None
    facts = replace(request, model=bedrock_model_id(unquote(match["model"])))
    return _PARSERS[match["action"]](streamed=streamed, request=facts)

"""Usage parsers, one per provider and endpoint, each incremental over the response body."""

from __future__ import annotations

import re
from dataclasses import replace

from tollgate.metering.anthropic_messages import AnthropicMessagesParser
from tollgate.metering.bedrock import bedrock_parser_for
from tollgate.metering.gemini import GeminiParser
from tollgate.metering.openai_audio import OpenAISpeechParser, OpenAITranscriptionParser
from tollgate.metering.openai_chat import OpenAIChatParser
from tollgate.metering.openai_completions import OpenAICompletionsParser
from tollgate.metering.openai_embeddings import OpenAIEmbeddingsParser
from tollgate.metering.openai_images import OpenAIImagesParser
from tollgate.metering.openai_responses import OpenAIResponsesParser
from tollgate.metering.usage import ParsedResponse, RequestFacts, TokenUsage, UsageParser
from tollgate.metering.vertex import vertex_parser_for
from tollgate.policy.text import safe_text

__all__ = [
    "OpenAIChatParser",
    "ParsedResponse",
    "RequestFacts",
    "TokenUsage",
    "UsageParser",
    "parser_for",
    "wants_request_body",
]

_GEMINI = re.compile(
    r"/models/(?P<model>[^/:]+):(?P<method>generateContent|streamGenerateContent)$"
)
_IMAGES = ("/images/generations", "/images/edits", "/images/variations")
_TRANSCRIPTION = ("/audio/transcriptions", "/audio/translations")
# Endpoints whose JSON request body says something a parser needs (stream, input, n).
# (Veo's :predictLongRunning: the seconds of video asked for.)
_FACT_ENDPOINTS = (
    "/chat/completions",
    "/completions",
    "/audio/speech",
    *_IMAGES,
    ":predictLongRunning",
)


def wants_request_body(endpoint: str) -> bool:
    """Whether the request body of ``endpoint`` matters for metering (not only routing)."""
    return endpoint.endswith(_FACT_ENDPOINTS)


def parser_for(
    api: str, endpoint: str, *, streamed: bool, request: RequestFacts | None = None
) -> UsageParser | None:
    """The parser for a request path of an API family, or None when it is not metered."""
    facts = request or RequestFacts()
    if api == "vertex":
        return vertex_parser_for(endpoint, streamed=streamed, request=facts)
    gemini = _GEMINI.search(endpoint)
    if gemini is not None:
        facts = _with_model(facts, gemini["model"])
        return GeminiParser(streamed=streamed, request=facts)
    bedrock = bedrock_parser_for(endpoint, streamed=streamed, request=facts)
    if bedrock is not None:
        return bedrock
    if api == "anthropic" or endpoint.endswith("/v1/messages"):
        if endpoint.endswith("/messages"):
            return AnthropicMessagesParser(streamed=streamed, request=facts)
        return None
    if endpoint.endswith("/chat/completions"):
        return OpenAIChatParser(streamed=streamed, request=facts)
    if endpoint.endswith("/completions"):
        return OpenAICompletionsParser(streamed=streamed, request=facts)
    if endpoint.endswith("/responses"):
        return OpenAIResponsesParser(streamed=streamed, request=facts)
    if endpoint.endswith("/embeddings"):
        return OpenAIEmbeddingsParser(streamed=streamed, request=facts)
    if endpoint.endswith(_IMAGES):
        return OpenAIImagesParser(streamed=streamed, request=facts)
    if endpoint.endswith(_TRANSCRIPTION):
        return OpenAITranscriptionParser(streamed=streamed, request=facts)
    if endpoint.endswith("/audio/speech"):
        return OpenAISpeechParser(streamed=streamed, request=facts)
    return None


def _with_model(facts: RequestFacts, model: str) -> RequestFacts:
    # A path's %00 must not reach the record.
    return replace(facts, model=facts.model or safe_text(model))

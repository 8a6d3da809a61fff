"""Usage parsers, one per provider and endpoint, each incremental over the response body."""

from __future__ import annotations

import re
from urllib.parse import unquote

from tollgate.metering.anthropic_messages import AnthropicMessagesParser
from tollgate.metering.bedrock import BedrockConverseParser
from tollgate.metering.gemini import GeminiParser
from tollgate.metering.openai_audio import OpenAISpeechParser, OpenAITranscriptionParser
from tollgate.metering.openai_chat import OpenAIChatParser
from tollgate.metering.openai_completions import OpenAICompletionsParser
from tollgate.metering.openai_embeddings import OpenAIEmbeddingsParser
from tollgate.metering.openai_images import OpenAIImagesParser
from tollgate.metering.openai_responses import OpenAIResponsesParser
from tollgate.metering.usage import ParsedResponse, RequestFacts, TokenUsage, UsageParser
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
_BEDROCK = re.compile(r"^/model/(?P<model>[^/]+)/converse$")
_IMAGES = ("/images/generations", "/images/edits", "/images/variations")
_TRANSCRIPTION = ("/audio/transcriptions", "/audio/translations")
# Endpoints whose JSON request body says something a parser needs (stream, input, n).
_FACT_ENDPOINTS = ("/chat/completions", "/completions", "/audio/speech", *_IMAGES)


def wants_request_body(endpoint: str) -> bool:
    """Whether the request body of ``endpoint`` matters for metering (not only routing)."""
    return endpoint.endswith(_FACT_ENDPOINTS)


def parser_for(
    api: str, endpoint: str, *, streamed: bool, request: RequestFacts | None = None
) -> UsageParser | None:
    """The parser for a request path of an API family, or None when it is not metered."""
    facts = request or RequestFacts()
    gemini = _GEMINI.search(endpoint)
    if gemini is not None:
        facts = _with_model(facts, gemini["model"])
        return GeminiParser(streamed=streamed, request=facts)
    bedrock = _BEDROCK.search(endpoint)
    if bedrock is not None:
        facts = _with_model(facts, unquote(bedrock["model"]))
        return BedrockConverseParser(streamed=streamed, request=facts)
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
    return RequestFacts(
        model=facts.model or safe_text(model),  # a path's %00 must not reach the record
        stream=facts.stream,
        input_chars=facts.input_chars,
        image_count=facts.image_count,
    )

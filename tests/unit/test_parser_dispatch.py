"""Which usage parser a request gets, from its API family and path."""

from __future__ import annotations

import pytest

from tollgate.metering import parser_for, wants_request_body
from tollgate.metering.anthropic_messages import AnthropicMessagesParser
from tollgate.metering.bedrock import BedrockConverseParser
from tollgate.metering.gemini import GeminiParser
from tollgate.metering.openai_audio import OpenAISpeechParser, OpenAITranscriptionParser
from tollgate.metering.openai_chat import OpenAIChatParser
from tollgate.metering.openai_completions import OpenAICompletionsParser
from tollgate.metering.openai_embeddings import OpenAIEmbeddingsParser
from tollgate.metering.openai_images import OpenAIImagesParser
from tollgate.metering.openai_responses import OpenAIResponsesParser
from tollgate.metering.usage import RequestFacts


@pytest.mark.parametrize(
    ("api", "endpoint", "kind"),
    [
        ("openai", "/v1/chat/completions", OpenAIChatParser),
        ("azure", "/openai/deployments/d/chat/completions", OpenAIChatParser),
        ("gemini", "/v1beta/openai/chat/completions", OpenAIChatParser),
        ("openai", "/v1/completions", OpenAICompletionsParser),
        ("openai", "/v1/responses", OpenAIResponsesParser),
        ("openai", "/v1/embeddings", OpenAIEmbeddingsParser),
        ("openai", "/v1/images/generations", OpenAIImagesParser),
        ("openai", "/v1/images/edits", OpenAIImagesParser),
        ("openai", "/v1/audio/transcriptions", OpenAITranscriptionParser),
        ("openai", "/v1/audio/translations", OpenAITranscriptionParser),
        ("openai", "/v1/audio/speech", OpenAISpeechParser),
        ("anthropic", "/v1/messages", AnthropicMessagesParser),
        ("openai", "/v1/messages", AnthropicMessagesParser),
        ("gemini", "/v1beta/models/gemini-2.0-flash:generateContent", GeminiParser),
        ("gemini", "/v1beta/models/gemini-2.0-flash:streamGenerateContent", GeminiParser),
        (
            "bedrock",
            "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse",
            BedrockConverseParser,
        ),
        ("openai", "/v1/models", type(None)),
        ("anthropic", "/v1/messages/count_tokens", type(None)),
    ],
)
def test_dispatch(api: str, endpoint: str, kind: type) -> None:
    assert isinstance(parser_for(api, endpoint, streamed=False), kind)


def test_path_models_are_the_fallback_model() -> None:
    gemini = parser_for("gemini", "/v1beta/models/gemini-2.0-flash:generateContent", streamed=False)
    assert gemini is not None
    assert gemini.result().model == "gemini-2.0-flash"
    bedrock = parser_for(
        "bedrock", "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse", streamed=False
    )
    assert bedrock is not None
    assert bedrock.result().model == "anthropic.claude-3-haiku-20240307-v1:0"
    chat = parser_for("openai", "/v1/chat/completions", streamed=False, request=RequestFacts("m"))
    assert chat is not None
    assert chat.result().model == "m"


def test_request_bodies_that_matter_for_metering() -> None:
    assert wants_request_body("/v1/chat/completions")
    assert wants_request_body("/v1/audio/speech")
    assert not wants_request_body("/v1/embeddings")

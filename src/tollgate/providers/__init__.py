"""Usage parsers, one per provider and endpoint, each incremental over the response body."""

from __future__ import annotations

from tollgate.providers.openai_chat import OpenAIChatParser
from tollgate.providers.usage import ParsedResponse, TokenUsage, UsageParser

__all__ = ["OpenAIChatParser", "ParsedResponse", "TokenUsage", "UsageParser", "parser_for"]


def parser_for(endpoint: str, *, streamed: bool) -> UsageParser | None:
    """The parser for a request path, or None when Tollgate does not meter that endpoint."""
    if endpoint.endswith("/chat/completions"):
        return OpenAIChatParser(streamed=streamed)
    return None

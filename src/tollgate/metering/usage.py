"""TokenUsage: what a provider reported for one request; ``None`` means "not reported", not 0."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Protocol

__all__ = ["TOKEN_FIELDS", "ParsedResponse", "RequestFacts", "TokenUsage", "UsageParser"]


@dataclass(frozen=True)
class TokenUsage:
    input_tokens: int | None = None
    cached_input_tokens: int | None = None
    cache_write_tokens: int | None = None
    output_tokens: int | None = None
    reasoning_tokens: int | None = None
    total_tokens: int | None = None

    def merged(self, newer: TokenUsage) -> TokenUsage:
        """This usage with every field that ``newer`` reports taken from ``newer``."""
        changes = {f.name: getattr(newer, f.name) for f in fields(newer)}
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def reported(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))


TOKEN_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(TokenUsage))


@dataclass(frozen=True)
class ParsedResponse:
    """What a parser learned from a whole response body (or as much of it as it saw)."""

    usage: TokenUsage
    model: str | None
    # Non-token units: "images", "audio_seconds", "characters", "video_seconds"; only what
    # was reported (or, for video, asked for and accepted).
    units: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestFacts:
    """What the request said that a parser may need (the body, when Tollgate read it)."""

    model: str | None = None  # the request's model (path model for Gemini/Bedrock)
    stream: bool = False
    input_chars: int | None = None  # len(body["input"]) when a string (text-to-speech)
    image_count: int | None = None  # body["n"] (image generation)
    # Seconds of video a generation request asks for (Veo: durationSeconds x sampleCount).
    video_seconds: float | None = None
    video_height: float | None = None  # its resolution as a frame height (1080p: 1080)


class UsageParser(Protocol):
    """Fed response body bytes as they pass; asked for the result at the end.

    Parsers never hold a whole stream: SSE is decoded event by event; a JSON body is kept
    (bounded) until the end. A malformed part is skipped, never fatal. ``result()`` may be
    called before the end (client abort) and then reports what was seen so far.
    """

    @property
    def complete(self) -> bool:
        """The response's own end marker was seen: the answer is whole."""
        ...

    def feed(self, chunk: bytes) -> None: ...

    def result(self) -> ParsedResponse: ...

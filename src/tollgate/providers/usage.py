"""TokenUsage: what a provider reported for one request; ``None`` means "not reported", not 0."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Protocol

__all__ = ["TOKEN_FIELDS", "ParsedResponse", "TokenUsage", "UsageParser"]


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
    """What a parser learned from a whole response body."""

    usage: TokenUsage
    model: str | None


class UsageParser(Protocol):
    """Fed response body bytes as they pass; asked for the result at the end."""

    def feed(self, chunk: bytes) -> None: ...

    def result(self) -> ParsedResponse: ...

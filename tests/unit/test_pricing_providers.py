"""Pricing of the issue-17 providers: Vertex AI through genai-prices' `google` prices (Claude
counted as Anthropic counts it), and video seconds through operator overrides."""

from __future__ import annotations

from decimal import Decimal

import pytest
from genai_prices import Usage, calc_price

from tollgate.config import ConfigError
from tollgate.pricing import PriceBook, parse_overrides


def genai(model: str, provider_id: str, **usage: int) -> Decimal:
    return Decimal(
        str(calc_price(Usage(**usage), model_ref=model, provider_id=provider_id).total_price)
    )


def test_vertex_gemini_is_priced_as_google_with_thoughts_as_output() -> None:
    cost = PriceBook().cost(
        "vertex", "gemini-2.5-flash", input_tokens=1000, output_tokens=200, reasoning_tokens=300
    )
    assert cost == genai("gemini-2.5-flash", "google", input_tokens=1000, output_tokens=500)


def test_vertex_claude_counts_cache_tokens_as_input_like_anthropic() -> None:
    cost = PriceBook().cost(
        "vertex",
        "claude-sonnet-4-5@20250929",
        input_tokens=100,
        output_tokens=50,
        cached_input_tokens=1000,
        cache_write_tokens=200,
    )
    want = genai(
        "claude-sonnet-4-5@20250929",
        "google",
        input_tokens=1300,
        output_tokens=50,
        cache_read_tokens=1000,
        cache_write_tokens=200,
    )
    assert cost == want
    assert cost is not None
    assert cost > 0


def test_video_seconds_are_priced_per_resolution_or_in_general() -> None:
    book = PriceBook(
        parse_overrides(
            {
                "vertex/veo-3.0-generate-001": {
                    "per_video_second": "0.40",
                    "per_video_second_1080p": "0.50",
                }
            }
        )
    )

    def cost(units: dict[str, float]) -> Decimal | None:
        return book.cost(
            "vertex", "veo-3.0-generate-001", input_tokens=None, output_tokens=None, units=units
        )

    assert cost({"video_seconds": 8.0}) == Decimal("3.20")
    assert cost({"video_seconds": 8.0, "video_height": 720.0}) == Decimal("3.20")
    assert cost({"video_seconds": 16.0, "video_height": 1080.0}) == Decimal("8.00")
    # Without an override, genai-prices has no video price: unpriced (reprice fills it later).
    assert (
        PriceBook().cost(
            "vertex",
            "veo-3.0-generate-001",
            input_tokens=None,
            output_tokens=None,
            units={"video_seconds": 8.0},
        )
        is None
    )


def test_video_rates_are_checked_like_the_others() -> None:
    with pytest.raises(ConfigError, match="per_video_second_4k: must be a price"):
        parse_overrides({"veo": {"per_video_second_4k": "-1"}})
    with pytest.raises(ConfigError, match="unknown keys"):
        parse_overrides({"veo": {"per_video_second_8k": "1"}})

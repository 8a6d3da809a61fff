"""Cost of one request's usage in USD, from `genai-prices` (Decimal, never float)."""

from __future__ import annotations

import logging
from decimal import Decimal
from functools import lru_cache

from genai_prices import Usage, calc_price

__all__ = ["PriceBook"]

log = logging.getLogger(__name__)


class PriceBook:
    """Prices usage with genai-prices; unknown models give ``None`` and are counted."""

    def __init__(self) -> None:
        self.unknown_models = 0

    def cost(
        self,
        provider: str | None,
        model: str | None,
        *,
        input_tokens: int | None,
        output_tokens: int | None,
        cached_input_tokens: int | None = None,
        cache_write_tokens: int | None = None,
    ) -> Decimal | None:
        if not model or (input_tokens is None and output_tokens is None):
            return None
        usage = Usage(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cache_read_tokens=cached_input_tokens,
            cache_write_tokens=cache_write_tokens,
        )
        try:
            result = calc_price(usage, model_ref=model, provider_id=provider or None)
        except LookupError:
            self.unknown_models += 1
            _warn_unknown(provider or "", model)
            return None
        return Decimal(result.total_price)


@lru_cache(maxsize=1024)
def _warn_unknown(provider: str, model: str) -> None:
    log.warning("no price known for provider=%r model=%r; cost stored as NULL", provider, model)

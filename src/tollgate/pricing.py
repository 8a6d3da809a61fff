"""Cost of one request's usage in USD: operator overrides first, then `genai-prices` (Decimal).

An override is keyed by ``provider/model`` or by ``model`` alone and gives prices per million
tokens (``input_per_mtok``, ``output_per_mtok``, ``cached_input_per_mtok``,
``cache_write_per_mtok``) and per unit (``per_request``, ``per_image``,
``per_audio_second``, ``per_character``). Cached and cache-write tokens are priced at their
own rate when one is given and otherwise as input tokens. Unknown models cost ``None``
(stored as NULL) and are counted.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

from genai_prices import Usage, calc_price

from tollgate.config import ConfigError

__all__ = ["PriceBook", "PriceOverride", "parse_overrides"]

log = logging.getLogger(__name__)

_MTOK = Decimal(1_000_000)
_TOKEN_RATES = (
    "input_per_mtok",
    "output_per_mtok",
    "cached_input_per_mtok",
    "cache_write_per_mtok",
)
_UNIT_RATES = {
    "per_image": "images",
    "per_audio_second": "audio_seconds",
    "per_character": "characters",
}
# genai-prices names some providers differently from Tollgate's provider names.
_PRICING_PROVIDER = {"gemini": "google", "bedrock": "aws"}
# Providers whose reported input excludes cache reads and writes (Anthropic, Bedrock report
# them separately) and whose output excludes reasoning (Gemini's thoughts): pricing counts all
# input and all output, as genai-prices' Usage expects (its own extractors do the same).
_INPUT_EXCLUDES_CACHE = frozenset({"anthropic", "bedrock"})
_OUTPUT_EXCLUDES_REASONING = frozenset({"gemini"})


@dataclass(frozen=True)
class PriceOverride:
    """Operator prices for one model (None: that part is not priced by this override)."""

    input_per_mtok: Decimal | None = None
    output_per_mtok: Decimal | None = None
    cached_input_per_mtok: Decimal | None = None
    cache_write_per_mtok: Decimal | None = None
    per_request: Decimal | None = None
    per_image: Decimal | None = None
    per_audio_second: Decimal | None = None
    per_character: Decimal | None = None

    def cost(
        self,
        input_tokens: int | None,
        output_tokens: int | None,
        cached_input_tokens: int | None,
        cache_write_tokens: int | None,
        units: Mapping[str, float],
    ) -> Decimal:
        total = self.per_request or Decimal(0)
        cached = cached_input_tokens or 0
        written = cache_write_tokens or 0
        if self.input_per_mtok is not None:
            # input_tokens includes cached and cache-write tokens here (see PriceBook.cost).
            plain = (input_tokens or 0) - (cached if self.cached_input_per_mtok is not None else 0)
            plain -= written if self.cache_write_per_mtok is not None else 0
            total += Decimal(max(plain, 0)) * self.input_per_mtok / _MTOK
        if self.cached_input_per_mtok is not None:
            total += Decimal(cached) * self.cached_input_per_mtok / _MTOK
        if self.cache_write_per_mtok is not None:
            total += Decimal(written) * self.cache_write_per_mtok / _MTOK
        if self.output_per_mtok is not None:
            total += Decimal(output_tokens or 0) * self.output_per_mtok / _MTOK
        for rate_name, unit in _UNIT_RATES.items():
            rate = getattr(self, rate_name)
            if rate is not None and unit in units:
                total += Decimal(str(units[unit])) * rate
        return total


def parse_overrides(tables: Mapping[str, Mapping[str, Any]]) -> dict[str, PriceOverride]:
    """Overrides from the ``price_overrides`` setting; raises ConfigError for bad values."""
    known = (*_TOKEN_RATES, "per_request", *_UNIT_RATES)
    out: dict[str, PriceOverride] = {}
    for key, table in tables.items():
        unknown = set(table) - set(known)
        if unknown:
            raise ConfigError(f"price_overrides[{key!r}]: unknown keys {sorted(unknown)}")
        values: dict[str, Decimal] = {}
        for name, raw in table.items():
            try:
                value = Decimal(str(raw))
            except InvalidOperation:
                raise ConfigError(f"price_overrides[{key!r}].{name}: not a number") from None
            if not value.is_finite() or value < 0:
                raise ConfigError(f"price_overrides[{key!r}].{name}: must be a price >= 0")
            values[name] = value
        out[key.lower()] = PriceOverride(**values)
    return out


class PriceBook:
    """Prices usage: an operator override if one matches, else genai-prices, else ``None``."""

    def __init__(self, overrides: Mapping[str, PriceOverride] | None = None) -> None:
        self._overrides = dict(overrides or {})
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
        reasoning_tokens: int | None = None,
        units: Mapping[str, float] | None = None,
    ) -> Decimal | None:
        if not model:
            return None
        if input_tokens is not None and provider in _INPUT_EXCLUDES_CACHE:
            input_tokens += (cached_input_tokens or 0) + (cache_write_tokens or 0)
        if output_tokens is not None and provider in _OUTPUT_EXCLUDES_REASONING:
            output_tokens += reasoning_tokens or 0
        override = self._overrides.get(f"{provider}/{model}".lower()) or self._overrides.get(
            model.lower()
        )
        if override is not None:
            return override.cost(
                input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, units or {}
            )
        if input_tokens is None and output_tokens is None:
            return None
        usage = Usage(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cache_read_tokens=cached_input_tokens,
            cache_write_tokens=cache_write_tokens,
        )
        pricing_provider = _PRICING_PROVIDER.get(provider or "", provider) or None
        try:
            result = calc_price(usage, model_ref=model, provider_id=pricing_provider)
        except LookupError:
            self.unknown_models += 1
            _warn_unknown(provider or "", model)
            return None
        return Decimal(result.total_price)


@lru_cache(maxsize=1024)
def _warn_unknown(provider: str, model: str) -> None:
    log.warning("no price known for provider=%r model=%r; cost stored as NULL", provider, model)

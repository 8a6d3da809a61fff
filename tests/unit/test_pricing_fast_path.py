"""PriceBook's fast path prices exactly as the old path did: genai-prices' calc_price per call.

The reference below is the old ``PriceBook.cost`` (no overrides) written out again: the provider
name mapping and the Anthropic/Bedrock/Gemini adjustments, then ``genai_prices.calc_price``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, time, timedelta
from decimal import Context, Decimal, localcontext
from typing import Any

import pytest
from genai_prices import Usage, calc_price
from genai_prices.data_snapshot import DataSnapshot, get_snapshot, set_custom_snapshot
from genai_prices.types import (
    ClauseContains,
    ClauseEquals,
    ClauseOr,
    ClauseStartsWith,
    ConditionalPrice,
    ModelInfo,
    ModelPrice,
    Provider,
    StartDateConstraint,
    TieredPrices,
    TimeOfDateConstraint,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tollgate import pricing
from tollgate.pricing import PriceBook, parse_overrides

# genai-prices provider id -> the Tollgate provider names that reach it.
TOLLGATE_NAMES = {
    "openai": ("openai",),
    "anthropic": ("anthropic",),
    "google": ("gemini", "google"),
    "aws": ("bedrock", "aws"),
    "azure": ("azure",),
}


def reference(
    provider: str | None,
    model: str,
    *,
    input_tokens: Any,
    output_tokens: Any,
    cached: Any = None,
    written: Any = None,
    reasoning: Any = None,
) -> Decimal | None:
    """The old PriceBook.cost without overrides."""
    if input_tokens is not None and provider in ("anthropic", "bedrock"):
        input_tokens += (cached or 0) + (written or 0)
    if output_tokens is not None and provider == "gemini":
        output_tokens += reasoning or 0
    if input_tokens is None and output_tokens is None:
        return None
    provider_id = {"gemini": "google", "bedrock": "aws"}.get(provider or "", provider) or None
    usage = Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=cached,
        cache_write_tokens=written,
    )
    try:
        return Decimal(calc_price(usage, model_ref=model, provider_id=provider_id).total_price)
    except LookupError:
        return None


def outcome(price: Callable[[], Decimal | None]) -> tuple[str, object]:
    """A price, or the type of the error raised (invalid usage must fail the same way)."""
    try:
        return "price", price()
    except Exception as exc:
        return "raises", type(exc)


def both(provider: str | None, model: str, **usage: Any) -> tuple[tuple[str, object], ...]:
    fast = outcome(
        lambda: PriceBook().cost(
            provider,
            model,
            input_tokens=usage.get("input_tokens"),
            output_tokens=usage.get("output_tokens"),
            cached_input_tokens=usage.get("cached"),
            cache_write_tokens=usage.get("written"),
            reasoning_tokens=usage.get("reasoning"),
        )
    )
    ref = outcome(lambda: reference(provider, model, **usage))
    return fast, ref


def _clause_refs(match: object) -> list[str]:
    if isinstance(match, ClauseOr):
        return [ref for clause in match.or_ for ref in _clause_refs(clause)]
    for cls, attr in (
        (ClauseEquals, "equals"),
        (ClauseStartsWith, "starts_with"),
        (ClauseContains, "contains"),
    ):
        if isinstance(match, cls):
            return [getattr(match, attr)]
    return []


def _pairs() -> list[tuple[str | None, str]]:
    """Every model of the five providers, by id and by its first match string."""
    pairs: set[tuple[str | None, str]] = set()
    for provider in get_snapshot().providers:
        for name in TOLLGATE_NAMES.get(provider.id, ()):
            for model in provider.models:
                for ref in {model.id, *_clause_refs(model.match)[:1]}:
                    pairs.add((name, ref))
    for ref in ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5", "gemini-2.5-flash", "o3"):
        pairs.add((None, ref))  # no provider: genai-prices finds one from the model name
    return sorted(pairs, key=lambda pair: (pair[0] or "", pair[1]))


def _tier_starts() -> set[int]:
    starts = set()
    for provider in get_snapshot().providers:
        if provider.id not in TOLLGATE_NAMES:
            continue
        for model in provider.models:
            for value in vars(model.get_prices(datetime.now(UTC))).values():
                if isinstance(value, TieredPrices):
                    starts.update(tier.start for tier in value.tiers)
    return starts


PAIRS = _pairs()
TIER_STARTS = sorted(_tier_starts())
EDGES = sorted({s + d for s in TIER_STARTS for d in (0, 1)})

FIXED_USAGES: list[dict[str, Any]] = [
    {"input_tokens": 0, "output_tokens": 0},
    {"input_tokens": 1, "output_tokens": None},
    {"input_tokens": None, "output_tokens": 1},
    {"input_tokens": 7, "output_tokens": 3, "cached": 0, "written": 0},
    {"input_tokens": 1234, "output_tokens": 567, "cached": 200, "reasoning": 50},
    {"input_tokens": 54_321, "output_tokens": 999, "written": 12_345},
    {"input_tokens": 150_000, "output_tokens": 3000, "cached": 100_000, "written": 20_000},
    {"input_tokens": 123_457, "output_tokens": 2_000_001, "cached": 123_457},
    *({"input_tokens": e, "output_tokens": 1000, "cached": e // 3} for e in EDGES),
    {"input_tokens": 10**9, "output_tokens": 10**9, "cached": 10**8, "written": 10**8},
    {"input_tokens": 10**12, "output_tokens": 10**12},
    {"input_tokens": 10**12 + 1, "output_tokens": 5},  # above the fast path's bound
    {"input_tokens": 10, "output_tokens": 1, "cached": 11},  # cache > input: genai-prices raises
]


@pytest.fixture
def calc_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Models priced through calc_price (the slow path) while the test runs."""
    calls: list[str] = []

    def counting(usage: Usage, model_ref: str, **kwargs: Any) -> Any:
        calls.append(model_ref)
        return calc_price(usage, model_ref=model_ref, **kwargs)

    monkeypatch.setattr(pricing, "calc_price", counting)
    return calls


@pytest.fixture
def custom_snapshot() -> Iterator[Callable[[DataSnapshot | None], None]]:
    yield set_custom_snapshot
    set_custom_snapshot(None)


def test_every_model_of_the_five_providers_matches_the_old_path(calc_calls: list[str]) -> None:
    assert len(PAIRS) > 400
    mismatches = []
    for provider, model in PAIRS:
        for usage in FIXED_USAGES:
            fast, ref = both(provider, model, **usage)
            if fast != ref:
                mismatches.append((provider, model, usage, fast, ref))
    assert mismatches == []
    # Not vacuous: most pairs take the fast path and most prices are real numbers.
    entries = [pricing._entry(pricing._PRICING_PROVIDER.get(p or "", p), m) for p, m in PAIRS]
    fast = sum(type(e) is pricing._Affine for e in entries)
    assert fast > 0.8 * len(entries)
    assert len(calc_calls) < 0.5 * len(PAIRS) * len(FIXED_USAGES)


counts = st.one_of(
    st.none(),
    st.integers(0, 5_000),
    st.integers(0, 400_000),
    st.integers(0, 2 * 10**12),
    st.sampled_from(EDGES or [0]),
)


@st.composite
def usages(draw: st.DrawFn) -> dict[str, Any]:
    input_tokens = draw(counts)
    shape = draw(st.sampled_from(["no cache", "cache within input", "any cache"]))
    cached = written = None
    if shape == "cache within input" and input_tokens:
        cached = draw(st.one_of(st.none(), st.integers(0, input_tokens)))
        written = draw(st.one_of(st.none(), st.integers(0, input_tokens - (cached or 0))))
    elif shape == "any cache":
        cached, written = draw(counts), draw(counts)
    return {
        "input_tokens": input_tokens,
        "output_tokens": draw(counts),
        "cached": cached,
        "written": written,
        "reasoning": draw(st.one_of(st.none(), st.integers(0, 100_000))),
    }


@settings(
    max_examples=1000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(pair=st.sampled_from(PAIRS), usage=usages())
def test_random_usage_matches_the_old_path(
    pair: tuple[str | None, str], usage: dict[str, Any]
) -> None:
    fast, ref = both(*pair, **usage)
    assert fast == ref


def _tiered(provider_id: str, model_ref: str) -> int:
    _, info = get_snapshot().find_provider_model(model_ref, None, provider_id, None)
    prices = info.get_prices(datetime.now(UTC))
    starts = [
        t.start for v in vars(prices).values() if isinstance(v, TieredPrices) for t in v.tiers
    ]
    assert starts, f"{model_ref} has no price tiers in this genai-prices snapshot"
    return min(starts)


@pytest.mark.parametrize(
    ("provider", "model"),
    [("gemini", "gemini-2.5-pro"), ("anthropic", "claude-sonnet-4-5"), ("openai", "gpt-5.4")],
)
def test_tiered_model_is_exact_across_the_tier_boundary(
    provider: str, model: str, calc_calls: list[str]
) -> None:
    start = _tiered(pricing._PRICING_PROVIDER.get(provider, provider), model)
    entry = pricing._entry(pricing._PRICING_PROVIDER.get(provider, provider), model)
    # Below the first tier the prices are affine and the fast path applies; above it,
    # calc_price decides.
    assert type(entry) is pricing._Affine
    assert entry.max_input == start
    for input_tokens in (start - 1, start, start + 1, start + 1000, 2 * start):
        for cached in (None, 0, input_tokens // 2):
            calc_calls.clear()
            fast, ref = both(
                provider, model, input_tokens=input_tokens, output_tokens=999, cached=cached
            )
            assert fast == ref
            # Anthropic's input excludes cache reads; genai-prices' tiers count them.
            priced_input = input_tokens + (cached or 0 if provider == "anthropic" else 0)
            assert bool(calc_calls) == (priced_input > start)
    below = PriceBook().cost(provider, model, input_tokens=start, output_tokens=0)
    above = PriceBook().cost(provider, model, input_tokens=start + 1, output_tokens=0)
    assert below is not None
    assert above is not None
    assert above / (start + 1) > below / start  # the tier's price really differs


def test_tiered_model_without_the_below_tier_fast_path(
    monkeypatch: pytest.MonkeyPatch, calc_calls: list[str]
) -> None:
    monkeypatch.setattr(pricing, "_FAST_BELOW_FIRST_TIER", False)
    entry = pricing._build(get_snapshot(), "google", "gemini-2.5-pro")
    assert type(entry) is pricing._Fallback
    assert "tiered" in entry.reason


def test_time_of_day_prices_always_go_through_calc_price(calc_calls: list[str]) -> None:
    models = [
        model
        for provider in get_snapshot().providers
        if provider.id == "deepseek"
        for model in provider.models
        if isinstance(model.prices, list)
        and any(isinstance(c.constraint, TimeOfDateConstraint) for c in model.prices)
    ]
    assert models
    for model in models:
        assert type(pricing._entry("deepseek", model.id)) is pricing._Fallback
        calc_calls.clear()
        fast, ref = both("deepseek", model.id, input_tokens=1000, output_tokens=10, cached=100)
        assert fast == ref
        assert calc_calls == [model.id]


def test_unknown_model_is_counted_on_every_call(
    calc_calls: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    book = PriceBook()
    for n in range(1, 4):
        assert book.cost("openai", "no-such-model-7f3e", input_tokens=10, output_tokens=1) is None
        assert book.unknown_models == n
    assert book.cost("acme", "gpt-4o", input_tokens=10, output_tokens=1) is None
    assert book.unknown_models == 4
    assert calc_calls == []  # remembered: genai-prices is not searched again
    assert type(pricing._entry("openai", "no-such-model-7f3e")) is pricing._Unknown
    warnings = [r.getMessage() for r in caplog.records if "no price known" in r.getMessage()]
    assert any("no-such-model-7f3e" in w for w in warnings)


def test_overrides_still_come_first() -> None:
    book = PriceBook(
        parse_overrides({"openai/gpt-4o": {"input_per_mtok": 1, "output_per_mtok": 2}})
    )
    assert book.cost("openai", "gpt-4o", input_tokens=10**6, output_tokens=10**6) == 3
    assert book.cost("azure", "gpt-4o", input_tokens=10**6, output_tokens=10**6) == reference(
        "azure", "gpt-4o", input_tokens=10**6, output_tokens=10**6
    )


@pytest.mark.parametrize(
    "usage",
    [
        {"input_tokens": 1000.5, "output_tokens": 10},  # floats: genai-prices' own arithmetic
        {"input_tokens": Decimal("1000.25"), "output_tokens": 10},
        {"input_tokens": True, "output_tokens": 10},  # genai-prices refuses bools
        {"input_tokens": -1, "output_tokens": 10},
        {"input_tokens": 10, "output_tokens": 1, "written": 11},
        {"input_tokens": None, "output_tokens": 1, "cached": 5},
        {"input_tokens": 10, "output_tokens": 1, "cached": 5, "written": 6},
    ],
)
@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_odd_counts_behave_as_before(provider: str, usage: dict[str, Any]) -> None:
    model = {"openai": "gpt-4o", "anthropic": "claude-haiku-4-5", "gemini": "gemini-2.5-flash"}
    fast, ref = both(provider, model[provider], **usage)
    assert fast == ref


def test_low_decimal_precision_defers_to_calc_price(calc_calls: list[str]) -> None:
    usage = {"input_tokens": 987_654_321_987, "output_tokens": 123_456_789_123, "cached": 77}
    with localcontext(Context(prec=12)):
        fast, ref = both("openai", "gpt-4o", **usage)
    assert fast == ref
    assert calc_calls == ["gpt-4o"]


def _model(ref: str, prices: ModelPrice | list[ConditionalPrice]) -> DataSnapshot:
    provider = Provider(
        id="openai",
        name="OpenAI",
        api_pattern="https://api.openai.com",
        models=[ModelInfo(id=ref, match=ClauseEquals(equals=ref), prices=prices)],
    )
    return DataSnapshot(providers=[provider], from_auto_update=False)


def test_a_new_genai_prices_snapshot_drops_the_cache(
    custom_snapshot: Callable[[DataSnapshot | None], None], calc_calls: list[str]
) -> None:
    usage = {"input_tokens": 10**6, "output_tokens": 10**6}
    custom_snapshot(_model("m1", ModelPrice(input_mtok=Decimal(1), output_mtok=Decimal(2))))
    assert PriceBook().cost("openai", "m1", **usage) == 3
    custom_snapshot(_model("m1", ModelPrice(input_mtok=Decimal(5), output_mtok=Decimal(7))))
    assert PriceBook().cost("openai", "m1", **usage) == 12
    assert PriceBook().cost("openai", "gpt-4o", **usage) is None  # not in this snapshot
    custom_snapshot(None)
    assert PriceBook().cost("openai", "gpt-4o", **usage) == reference("openai", "gpt-4o", **usage)
    assert PriceBook().cost("openai", "m1", **usage) is None
    assert calc_calls == []


def test_dated_prices_are_picked_again_on_a_new_utc_day(
    custom_snapshot: Callable[[DataSnapshot | None], None],
    monkeypatch: pytest.MonkeyPatch,
    calc_calls: list[str],
) -> None:
    today = datetime.now(UTC).date()
    tomorrow = today + timedelta(days=1)
    snapshot = _model(
        "dated",
        [
            ConditionalPrice(prices=ModelPrice(input_mtok=Decimal(1), output_mtok=Decimal(2))),
            ConditionalPrice(
                constraint=StartDateConstraint(start_date=tomorrow),
                prices=ModelPrice(input_mtok=Decimal("1.5"), output_mtok=Decimal(3)),
            ),
        ],
    )
    custom_snapshot(snapshot)
    usage = Usage(input_tokens=2_000_000, output_tokens=10**6)

    def at(day: date, hour: int) -> datetime:
        return datetime.combine(day, time(hour), UTC)

    for when in (at(today, 0), at(today, 23), at(tomorrow, 0), at(tomorrow, 12)):
        monkeypatch.setattr(pricing, "time", when.timestamp)
        got = PriceBook().cost("openai", "dated", input_tokens=2_000_000, output_tokens=10**6)
        assert got == snapshot.calc(usage, "dated", "openai", None, when).total_price
        assert got == (Decimal(4) if when.date() == today else Decimal(6))
    assert calc_calls == []


def test_concurrent_use_while_the_snapshot_changes(
    custom_snapshot: Callable[[DataSnapshot | None], None],
) -> None:
    pairs = PAIRS[:: max(1, len(PAIRS) // 20)]
    usage = {"input_tokens": 4321, "output_tokens": 321, "cached": 21}
    expected = {pair: outcome(lambda pair=pair: reference(*pair, **usage)) for pair in pairs}
    bundled = get_snapshot()
    errors: list[object] = []
    stop = threading.Event()

    def price() -> None:
        book = PriceBook()
        for _ in range(2):
            for pair in pairs:
                got = outcome(
                    lambda pair=pair: book.cost(
                        *pair,
                        input_tokens=usage["input_tokens"],
                        output_tokens=usage["output_tokens"],
                        cached_input_tokens=usage["cached"],
                    )
                )
                if got != expected[pair]:
                    errors.append((pair, got, expected[pair]))

    def flip() -> None:
        while not stop.is_set():
            # Same prices, new snapshot object: every cache entry is dropped and rebuilt.
            custom_snapshot(DataSnapshot(providers=bundled.providers, from_auto_update=False))
            stop.wait(0.02)

    flipper = threading.Thread(target=flip)
    workers = [threading.Thread(target=price) for _ in range(3)]
    flipper.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    flipper.join()
    assert errors == []

"""Price overrides, provider-specific input counting, and `reprice` against a real Postgres."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from genai_prices import Usage, calc_price

from tests.conftest import tollgate_cli
from tests.unit.test_ledger_writer import make_writer, pool, record  # noqa: F401 (fixture)
from tollgate.config import ConfigError
from tollgate.ledger.reprice import reprice
from tollgate.ledger.rollups import mismatch_query
from tollgate.pricing import PriceBook, parse_overrides


def test_override_prices_tokens_and_units() -> None:
    book = PriceBook(
        parse_overrides(
            {
                "acme/house-model": {
                    "input_per_mtok": 1,
                    "cached_input_per_mtok": "0.5",
                    "output_per_mtok": 4,
                    "per_request": "0.001",
                },
                "tts-1": {"per_character": "0.000015"},
            }
        )
    )
    cost = book.cost(
        "acme",
        "house-model",
        input_tokens=1_000_000,
        output_tokens=500_000,
        cached_input_tokens=200_000,
    )
    # 800k plain input at $1, 200k cached at $0.5, 500k output at $4, plus $0.001.
    assert cost == Decimal("0.8") + Decimal("0.1") + Decimal("2") + Decimal("0.001")
    speech = book.cost(
        "openai", "tts-1", input_tokens=None, output_tokens=None, units={"characters": 1000}
    )
    assert speech == Decimal("0.015")
    assert book.cost("other", "house-model", input_tokens=1, output_tokens=1) is None


def test_anthropic_input_is_counted_with_cache_tokens_like_genai_prices() -> None:
    # Anthropic reports input, cache reads and cache writes separately; genai-prices' Usage
    # counts them all as input.
    got = PriceBook().cost(
        "anthropic",
        "claude-3-5-haiku-latest",
        input_tokens=100,
        output_tokens=20,
        cached_input_tokens=40,
        cache_write_tokens=30,
    )
    expected = calc_price(
        Usage(input_tokens=170, output_tokens=20, cache_read_tokens=40, cache_write_tokens=30),
        model_ref="claude-3-5-haiku-latest",
        provider_id="anthropic",
    ).total_price
    assert got == Decimal(expected)


@pytest.mark.parametrize(
    "tables",
    [{"m": {"input_per_mtok": -1}}, {"m": {"input_per_mtok": "lots"}}, {"m": {"per_token": 1}}],
)
def test_bad_overrides_are_refused(tables: dict[str, dict[str, object]]) -> None:
    with pytest.raises(ConfigError):
        parse_overrides(tables)


async def test_reprice_fills_unknown_costs_once(pool, database_url: str) -> None:  # noqa: F811
    writer = make_writer(pool)
    writer.start()
    known = record("u1", 1000, 100, model="gpt-4o-mini")
    unknown = [record("u1", 2000, 200, model="house-model-v1") for _ in range(3)]
    for r in (known, *unknown):
        writer.submit(r)
    await writer.close(timeout_s=5)
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        before = await (
            await conn.execute(
                "SELECT cost_usd, unpriced_requests FROM tollgate.daily_usage"
                " WHERE model = 'house-model-v1'"
            )
        ).fetchone()
        assert before == (Decimal(0), 3)
        book = PriceBook(
            parse_overrides({"house-model-v1": {"input_per_mtok": 1, "output_per_mtok": 2}})
        )
        since = datetime.now(UTC) - timedelta(days=1)
        until = datetime.now(UTC) + timedelta(days=1)
        result = await reprice(conn, book, since=since, until=until)
        assert (result.examined, result.priced) == (3, 3)
        each = Decimal(2000) / 1_000_000 + Decimal(200) * 2 / 1_000_000
        assert result.cost_added == 3 * each
        rows = await (
            await conn.execute(
                "SELECT cost_usd FROM tollgate.requests WHERE model = 'house-model-v1'"
            )
        ).fetchall()
        assert [r[0] for r in rows] == [each] * 3
        after = await (
            await conn.execute(
                "SELECT cost_usd, unpriced_requests FROM tollgate.daily_usage"
                " WHERE model = 'house-model-v1'"
            )
        ).fetchone()
        assert after == (3 * each, 0)
        # A second run finds nothing left; the rollup still equals the sum over requests.
        again = await reprice(conn, book, since=since, until=until)
        assert (again.examined, again.priced) == (0, 0)
        sums = await (
            await conn.execute(
                "SELECT (SELECT sum(cost_usd) FROM tollgate.requests),"
                " (SELECT sum(cost_usd) FROM tollgate.daily_usage)"
            )
        ).fetchone()
        assert sums is not None
        assert sums[0] == sums[1]
        # Every rollup (daily_users, monthly_users and daily_totals too) moved the same cost.
        assert await (await conn.execute(mismatch_query())).fetchone() == (0, 0, 0, 0)


def test_reprice_command(database_url: str, tmp_path: Path) -> None:
    done = tollgate_cli(database_url, tmp_path, "reprice", "--since", "2026-01-01")
    assert done.returncode == 0, done.stderr
    assert "examined 0 unpriced rows, priced 0" in done.stdout


async def test_reprice_clears_pricing_error_only_when_it_prices(pool, database_url: str) -> None:  # noqa: F811
    writer = make_writer(pool)
    refused = [record(f"p{i}", 22, 5, model=m) for i, m in enumerate(("gpt-4o-mini", "gpt-4o"))]
    for r in refused:
        r.cached_input_tokens = 72  # genai-prices refuses: cached above input
    await writer.write_batch(refused)
    since = datetime.now(UTC) - timedelta(days=1)
    until = datetime.now(UTC) + timedelta(days=1)
    query = "SELECT model, cost_usd, pricing_error FROM tollgate.requests ORDER BY model"
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        stored = await (await conn.execute(query)).fetchall()
        assert [(m, c) for m, c, _ in stored] == [("gpt-4o", None), ("gpt-4o-mini", None)]
        assert all(e.startswith("genai-prices: ") for _, _, e in stored)
        # Still refused by genai-prices: nothing changes, the reason stays.
        result = await reprice(conn, PriceBook(), since=since, until=until)
        assert (result.examined, result.priced) == (2, 0)
        assert await (await conn.execute(query)).fetchall() == stored
        # An operator override prices one model: its row gets a cost and loses the reason.
        book = PriceBook(parse_overrides({"gpt-4o-mini": {"input_per_mtok": 1}}))
        result = await reprice(conn, book, since=since, until=until)
        assert result.priced == 1
        after = await (await conn.execute(query)).fetchall()
        assert after[0] == stored[0]
        assert after[1][1] is not None
        assert after[1][2] is None

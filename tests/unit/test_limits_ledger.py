"""Limits in the ledger against a real Postgres: what each limit is charged, and that its
spend for the current period equals the sum of its ledger rows — through batches written
twice (a replayed journal), limits created while batches are in flight, changes of what a
limit charges, and `tollgate reprice`."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from tests.conftest import tollgate_cli
from tests.unit.test_ledger_writer import make_writer, pool, record  # noqa: F401 (fixture)
from tollgate.ledger import limits as store
from tollgate.ledger.records import UsageRecord
from tollgate.ledger.reprice import reprice
from tollgate.pricing import PriceBook, parse_overrides
from tollgate.v1 import usage_pb2

Pool = AsyncConnectionPool[psycopg.AsyncConnection[Any]]


def charged(
    user: str | None,
    inp: int,
    out: int,
    *,
    key: str | None = None,
    limit_ids: tuple[str, ...] = (),
    model: str = "gpt-4o-mini",
    outcome: int = usage_pb2.OUTCOME_OK,
    at: datetime | None = None,
) -> UsageRecord:
    r = record(user, inp, out, model=model)
    if key is not None:
        r.key_id = key
    r.limit_ids.extend(limit_ids)
    r.outcome = outcome  # type: ignore[assignment]
    if at is not None:
        r.created_at.FromDatetime(at)
    return r


async def ledger_sums(conn: psycopg.AsyncConnection[Any], limit: store.Limit) -> dict[str, Any]:
    """What the ledger's own rows say each subject spent under ``limit`` this period."""
    subject = {
        ("user", True): "end_user_id",
        ("key", True): "key_id",
    }.get((limit.scope, limit.subject is None), "''")
    charged_to = {
        "global": "true",
        "user": "end_user_id = coalesce(%(subject)s, end_user_id)",
        "key": "key_id = coalesce(%(subject)s, key_id)",
        "named": "%(limit_id)s = ANY (limit_ids)",
    }[limit.scope]
    cur = await conn.execute(
        f"SELECT {subject} AS subject, coalesce(sum(cost_usd), 0), "
        " coalesce(sum(coalesce(input_tokens, 0) + coalesce(output_tokens, 0)), 0), count(*)"
        " FROM tollgate.requests"
        " WHERE outcome <> 'blocked' AND created_at >="
        "  tollgate.limit_period_start(%(period)s, %(tz)s, now())"
        f" AND {charged_to} GROUP BY 1",
        {
            "subject": limit.subject,
            "limit_id": limit.limit_id,
            "period": limit.period,
            "tz": limit.time_zone,
        },
    )
    return {row[0]: (row[1], row[2], row[3]) for row in await cur.fetchall()}


async def spend_of(conn: psycopg.AsyncConnection[Any], limit_id: str) -> dict[str, Any]:
    limit = await store.get_limit(conn, limit_id)
    assert limit is not None
    _, _, spent = await store.limit_spend(conn, limit)
    return {s.subject: (s.usd, s.tokens, s.requests) for s in spent}


async def assert_spend_is_the_ledger(conn: psycopg.AsyncConnection[Any], limit_id: str) -> None:
    limit = await store.get_limit(conn, limit_id)
    assert limit is not None
    assert await spend_of(conn, limit_id) == await ledger_sums(conn, limit)


@pytest.fixture
def ledger(pool: Pool) -> Pool:  # noqa: F811 (the writer tests' fixture)
    return pool


async def write(ledger: Pool, batch: list[UsageRecord]) -> None:
    await make_writer(ledger).write_batch(batch)


async def test_each_scope_is_charged_its_rows_and_a_replay_charges_nothing(
    ledger: Pool, database_url: str
) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await store.create_limit(
            conn, limit_id="per-user", scope="user", measure="usd", maximum="5", period="day"
        )
        await store.create_limit(
            conn,
            limit_id="u1-tokens",
            scope="user",
            subject="u1",
            measure="tokens",
            maximum=1000,
            period="month",
        )
        await store.create_limit(
            conn, limit_id="all", scope="global", measure="requests", maximum=10, period="hour"
        )
        await store.create_limit(
            conn, limit_id="team-a", scope="named", measure="usd", maximum="1", period="week"
        )
        await store.create_limit(
            conn, limit_id="per-key", scope="key", measure="requests", maximum=3, period="total"
        )
    batch = [
        charged("u1", 100, 10),
        charged("u1", 200, 20, limit_ids=("team-a",)),
        charged("u2", 300, 30, key="key_0123456789ab"),
        charged("u2", 50, 5, key="key_0123456789ab", limit_ids=("team-a", "other")),
        charged(None, 7, 7, key="key_ba9876543210"),
        # Blocked: nothing reached a provider, nothing is charged.
        charged("u1", 0, 0, limit_ids=("team-a",), outcome=usage_pb2.OUTCOME_BLOCKED),
    ]
    await write(ledger, batch)
    await write(ledger, batch)  # the journal replayed: these rows are in already
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        for limit_id in ("per-user", "u1-tokens", "all", "team-a", "per-key"):
            await assert_spend_is_the_ledger(conn, limit_id)
        per_user = await spend_of(conn, "per-user")
        assert sorted(per_user) == ["u1", "u2"]
        assert [v[2] for v in per_user.values()] == [2, 2]
        assert await spend_of(conn, "u1-tokens") == {"": (per_user["u1"][0], 330, 2)}
        assert (await spend_of(conn, "all"))[""][2] == 5
        assert (await spend_of(conn, "team-a"))[""][2] == 2
        assert {s: v[2] for s, v in (await spend_of(conn, "per-key")).items()} == {
            "key_0123456789ab": 2,
            "key_ba9876543210": 1,
        }


async def test_a_new_limit_is_charged_its_periods_rows_so_far(
    ledger: Pool, database_url: str
) -> None:
    yesterday = datetime.now(UTC) - timedelta(days=1, hours=1)
    await write(ledger, [charged("u1", 100, 10), charged("u1", 999, 999, at=yesterday)])
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await store.create_limit(
            conn, limit_id="daily", scope="user", measure="tokens", maximum=500, period="day"
        )
        assert (await spend_of(conn, "daily"))["u1"][1:] == (110, 1)
        # Changing what it charges (the period) fills the new period from the ledger.
        await store.update_limit(conn, "daily", period="total")
        assert (await spend_of(conn, "daily"))["u1"][1:] == (2108, 2)
        # Changing only the maximum keeps the spend.
        await store.update_limit(conn, "daily", maximum="9000")
        assert (await spend_of(conn, "daily"))["u1"][1:] == (2108, 2)
        await assert_spend_is_the_ledger(conn, "daily")


async def test_limits_created_while_batches_commit_count_every_row_once(
    ledger: Pool, database_url: str
) -> None:
    # The create waits for the writers' open transactions and holds new ones until it
    # commits: each row is counted by the backfill or by its batch, never both or neither.
    writer = make_writer(ledger, batch_size=20, concurrency=4)
    writer.start()
    stop = asyncio.Event()

    async def traffic() -> None:
        n = 0
        while not stop.is_set():
            writer.submit(charged(f"u{n % 5}", 10, 1, limit_ids=("named-0", "named-1")))
            n += 1
            if n % 10 == 0:
                await asyncio.sleep(0.001)

    task = asyncio.create_task(traffic())
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        for i in range(2):
            await asyncio.sleep(0.2)
            await store.create_limit(
                conn,
                limit_id=f"named-{i}",
                scope="named",
                measure="tokens",
                maximum=1,
                period="day",
            )
            await store.create_limit(
                conn,
                limit_id=f"users-{i}",
                scope="user",
                measure="requests",
                maximum=1,
                period="minute",
            )
        # Changing what a limit charges and deleting one, while batches charge them: no
        # deadlock (the writers are waited for first), and the spend is the ledger again.
        await asyncio.sleep(0.2)
        await store.update_limit(conn, "named-0", period="total")
        await store.update_limit(conn, "users-0", maximum="5")
        assert await store.delete_limit(conn, "users-1")
        await asyncio.sleep(0.2)
        stop.set()
        await task
        await writer.close(timeout_s=20)
        assert writer.stats.written > 100
        assert writer.stats.failed_attempts == 0  # a deadlock would have failed a batch
        for limit_id in ("named-0", "named-1", "users-0"):
            await assert_spend_is_the_ledger(conn, limit_id)


async def test_reprice_moves_unpriced_spend_to_its_cost(ledger: Pool, database_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await store.create_limit(
            conn, limit_id="house", scope="global", measure="usd", maximum="1", period="day"
        )
    await write(ledger, [charged("u1", 2000, 200, model="house-model-v1") for _ in range(3)])
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        limit = await store.get_limit(conn, "house")
        assert limit is not None
        (before,) = (await store.limit_spend(conn, limit))[2]
        assert (before.usd, before.unpriced, before.requests) == (0, 3, 3)
        book = PriceBook(
            parse_overrides({"house-model-v1": {"input_per_mtok": 1, "output_per_mtok": 2}})
        )
        now = datetime.now(UTC)
        await reprice(conn, book, since=now - timedelta(days=1), until=now + timedelta(days=1))
        (after,) = (await store.limit_spend(conn, limit))[2]
        each = Decimal(2000) / 1_000_000 + Decimal(200) * 2 / 1_000_000
        assert (after.usd, after.unpriced, after.requests) == (3 * each, 0, 3)
        await assert_spend_is_the_ledger(conn, "house")


async def test_periods_follow_the_calendar_of_the_time_zone(database_url: str) -> None:
    from tollgate.app import run_migrations

    await run_migrations(database_url)
    cases = [
        # 16:00 UTC is 01:00 the next day in Tokyo: its day began at 15:00 UTC.
        ("day", "Asia/Tokyo", "2026-12-02T16:00:00Z", "2026-12-02T15:00:00Z"),
        ("day", "UTC", "2026-12-02T16:00:00Z", "2026-12-02T00:00:00Z"),
        # 2026-12-02 is a Wednesday: ISO weeks begin on Monday.
        ("week", "UTC", "2026-12-02T16:00:00Z", "2026-11-30T00:00:00Z"),
        ("month", "America/New_York", "2026-12-01T03:00:00Z", "2026-11-01T04:00:00Z"),
        ("hour", "Asia/Kolkata", "2026-12-02T16:10:00Z", "2026-12-02T15:30:00Z"),
        ("minute", "UTC", "2026-12-02T16:10:59Z", "2026-12-02T16:10:00Z"),
        ("total", "UTC", "2026-12-02T16:10:59Z", "1970-01-01T00:00:00Z"),
    ]
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        for period, tz, at, start in cases:
            cur = await conn.execute(
                "SELECT tollgate.limit_period_start(%s, %s, %s::timestamptz) = %s::timestamptz",
                (period, tz, at, start),
            )
            assert await cur.fetchone() == (True,), (period, tz, at)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"scope": "team"}, "scope must be one of"),
        ({"measure": "euros"}, "measure must be one of"),
        ({"period": "fortnight"}, "period must be one of"),
        ({"maximum": "-1"}, "at least 0"),
        ({"maximum": "NaN"}, "finite"),
        ({"maximum": "lots"}, "not a number"),
        ({"scope": "global", "subject": "u1"}, "only user and key limits have a subject"),
        ({"limit_id": "bad id"}, "a limit id is"),
        ({"time_zone": "Mars/Olympus"}, "unknown time zone"),
        ({"thresholds": ["0"]}, "above 0"),
    ],
)
async def test_a_limit_that_cannot_be_stored_is_refused_clearly(
    database_url: str, fields: dict[str, Any], message: str
) -> None:
    from tollgate.app import run_migrations

    await run_migrations(database_url)
    args: dict[str, Any] = {
        "limit_id": "x",
        "scope": "user",
        "measure": "usd",
        "maximum": "1",
        "period": "day",
        **fields,
    }
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        with pytest.raises(store.LimitError, match=message):
            await store.create_limit(conn, **args)
        assert await store.list_limits(conn) == []


async def test_limits_command_round_trip(ledger: Pool, database_url: str, tmp_path: Path) -> None:
    await write(ledger, [charged("u1", 1000, 100), charged("u2", 10, 1)])

    def cli(*args: str) -> Any:
        done = tollgate_cli(database_url, tmp_path, "limits", *args)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout) if "json" in args else done.stdout

    made = cli(
        "create",
        "u1-daily",
        "--scope",
        "user",
        "--subject",
        "u1",
        "--measure",
        "tokens",
        "--max",
        "5000",
        "--period",
        "day",
        "--time-zone",
        "Europe/Paris",
        "--format",
        "json",
    )
    assert (made["limit_id"], made["maximum"], made["time_zone"]) == (
        "u1-daily",
        "5000",
        "Europe/Paris",
    )
    assert made["spend"] == [
        {
            "subject": None,
            "spent": "1100",
            "remaining": "3900",
            "usd": made["spend"][0]["usd"],
            "tokens": 1100,
            "requests": 1,
            "unpriced_requests": 0,
        }
    ]
    assert made["reset_at"] > made["period_start"]
    shown = cli("show", "u1-daily", "--format", "json")
    assert shown["spend"] == made["spend"]
    cli(
        "create",
        "everyone",
        "--scope",
        "user",
        "--measure",
        "requests",
        "--max",
        "1",
        "--period",
        "month",
    )
    everyone = cli("show", "everyone", "--format", "json")
    assert [(s["subject"], s["spent"], s["remaining"]) for s in everyone["spend"]] == [
        ("u1", "1", "0"),
        ("u2", "1", "0"),
    ]
    listed = cli("list", "--format", "json")
    assert [entry["limit_id"] for entry in listed] == ["everyone", "u1-daily"]
    updated = cli("update", "u1-daily", "--max", "1100", "--mode", "warn", "--format", "json")
    assert (updated["maximum"], updated["mode"], updated["spend"][0]["remaining"]) == (
        "1100",
        "warn",
        "0",
    )
    assert "deleted limit everyone" in cli("delete", "everyone")
    refused = tollgate_cli(database_url, tmp_path, "limits", "show", "everyone")
    assert refused.returncode == 1
    assert "no limit 'everyone'" in refused.stderr
    duplicate = tollgate_cli(
        database_url,
        tmp_path,
        "limits",
        "create",
        "u1-daily",
        "--scope",
        "global",
        "--measure",
        "usd",
        "--max",
        "1",
        "--period",
        "day",
    )
    assert duplicate.returncode == 2
    assert "exists already" in duplicate.stderr


async def test_each_threshold_alerts_once_per_period_through_replays(
    ledger: Pool, database_url: str
) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await store.create_limit(
            conn,
            limit_id="alerting",
            scope="user",
            measure="requests",
            maximum=4,
            period="day",
            thresholds=["0.5", "1"],
        )
    fired: list[dict[str, Any]] = []
    writer = make_writer(ledger, on_alerts=fired.extend)
    first = [charged("u1", 1, 1), charged("u1", 1, 1)]  # 2 of 4: crosses 0.5
    await writer.write_batch(first)
    await writer.write_batch(first)  # replayed: nothing new, no alert again
    await writer.write_batch([charged("u1", 1, 1)])  # 3 of 4: nothing new
    await writer.write_batch([charged("u1", 1, 1), charged("u1", 1, 1)])  # 5: crosses 1
    await writer.write_batch([charged("u1", 1, 1)])  # past both already
    await writer.write_batch([charged("u2", 1, 1)] * 1)  # u2: 1 of 4, nothing
    assert [(a["limit_id"], a["subject"], a["threshold"], a["spent"]) for a in fired] == [
        ("alerting", "u1", 0.5, 2),
        ("alerting", "u1", 1, 5),
    ]
    assert fired[0]["measure"] == "requests"
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT count(*) FROM tollgate.limit_alerts")
        assert await cur.fetchone() == (2,)


async def test_the_configured_default_budget_is_kept_as_configured(database_url: str) -> None:
    from tollgate.app import run_migrations

    await run_migrations(database_url)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        assert await store.sync_default_budget(conn, "") == "unchanged"
        assert await store.sync_default_budget(conn, "5 usd/day") == "created"
        assert await store.sync_default_budget(conn, " 5 USD / day ") == "unchanged"
        assert await store.sync_default_budget(conn, "1000 tokens/month") == "updated"
        made = await store.get_limit(conn, store.DEFAULT_USER_BUDGET_ID)
        assert made is not None
        assert (made.scope, made.subject, made.measure, made.maximum, made.period) == (
            "user",
            None,
            "tokens",
            1000,
            "month",
        )
        assert await store.sync_default_budget(conn, "") == "deleted"
        assert await store.get_limit(conn, store.DEFAULT_USER_BUDGET_ID) is None
        for bad in ("5 euros/day", "5 usd/fortnight", "usd/day", "-1 usd/day"):
            with pytest.raises(store.LimitError, match="not a budget"):
                await store.sync_default_budget(conn, bad)

"""Gateway keys against a real Postgres: storage as hashes only, the cache, `tollgate keys`."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from tests.conftest import tollgate_cli
from tollgate.app import run_migrations
from tollgate.policy.keys import (
    KEY_PREFIX,
    GatewayKey,
    GatewayKeyError,
    KeyCache,
    create_key,
    generate_key,
    hash_key,
    is_well_formed,
    list_keys,
    revoke_key,
)

Conn = psycopg.AsyncConnection[Any]


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[Conn]:
    await run_migrations(database_url)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as c:
        yield c


async def wait_for(condition: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def test_generated_keys_are_well_formed_and_distinct() -> None:
    keys = {generate_key() for _ in range(1000)}
    assert len(keys) == 1000
    for key in keys:
        assert key.startswith(KEY_PREFIX)
        assert len(key) == 46
        assert is_well_formed(key.encode())
    assert hash_key(next(iter(keys))) == hashlib.sha256(next(iter(keys)).encode()).digest()
    assert hash_key(b"tg_x") == hash_key("tg_x")


@pytest.mark.parametrize(
    "token",
    [
        b"",
        b"tg_",
        b"tg_" + b"A" * 42,
        b"tg_" + b"A" * 44,
        b"sk_" + b"A" * 43,
        b"TG_" + b"A" * 43,
        b"tg_" + b"A" * 42 + b"=",
        b"tg_" + b"A" * 42 + b"+",
        b"tg_" + b"A" * 42 + b"\n",
        b" tg_" + b"A" * 43,
        "tg_" + "Ä" * 43,
    ],
    ids=repr,
)
def test_malformed_tokens(token: bytes | str) -> None:
    raw = token.encode() if isinstance(token, str) else token
    assert not is_well_formed(raw)
    assert KeyCache().lookup(raw) is None


async def test_database_holds_only_the_hash(conn: Conn) -> None:
    plaintext, key = await create_key(conn, name="billing app", end_user_id="alice")
    secret_part = plaintext[7:]  # what key_prefix does not reveal
    cur = await conn.execute(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = 'tollgate' AND table_name = 'gateway_keys'"
    )
    columns = [row[0] for row in await cur.fetchall()]
    assert "key_hash" in columns
    assert "key_prefix" in columns
    for column in columns:
        cur = await conn.execute(
            psycopg.sql.SQL("SELECT {}::text FROM tollgate.gateway_keys").format(
                psycopg.sql.Identifier(column)
            )
        )
        row = await cur.fetchone()
        assert row is not None
        text = row[0] or ""
        assert plaintext not in text, column
        assert secret_part not in text, column
        assert plaintext.encode().hex() not in text, column
    cur = await conn.execute(
        "SELECT key_hash, key_prefix, key_id FROM tollgate.gateway_keys t",
    )
    assert await cur.fetchall() == [(hash_key(plaintext), plaintext[:7], key.key_id)]
    cur = await conn.execute("SELECT t::text FROM tollgate.gateway_keys t")
    row = await cur.fetchone()
    assert row is not None
    assert secret_part not in row[0]


async def test_cache_finds_a_created_key_with_its_policy(conn: Conn) -> None:
    plain_a, key_a = await create_key(
        conn,
        name=" app a ",
        end_user_id="alice",
        enforce_user_id=True,
        allowed_providers=["OpenAI", "anthropic", "openai"],
    )
    plain_b, key_b = await create_key(conn, name="app b", enforce_user_id=False)
    plain_c, key_c = await create_key(conn, name="app c")
    assert key_a == GatewayKey(
        key_a.key_id, "app a", "alice", True, frozenset({"openai", "anthropic"})
    )
    assert key_a.key_id.startswith("key_")
    assert len(key_a.key_id) == 16
    assert len({key_a.key_id, key_b.key_id, key_c.key_id}) == 3

    cache = KeyCache()
    assert not cache.loaded
    assert cache.lookup(plain_a.encode()) is None
    assert await cache.refresh(conn) == 3
    assert cache.loaded
    assert cache.size == 3
    assert cache.lookup(plain_a.encode()) == key_a
    assert cache.lookup(plain_b.encode()) == GatewayKey(key_b.key_id, "app b", None, False, None)
    assert cache.lookup(plain_c.encode()) == GatewayKey(key_c.key_id, "app c", None, None, None)
    assert cache.lookup(generate_key().encode()) is None  # well formed, unknown


async def test_revoked_key_is_gone_after_refresh(conn: Conn) -> None:
    plaintext, key = await create_key(conn, name="to revoke")
    kept, _ = await create_key(conn, name="kept")
    cache = KeyCache()
    await cache.refresh(conn)
    assert cache.lookup(plaintext.encode()) == key

    assert await revoke_key(conn, key.key_id)
    assert not await revoke_key(conn, key.key_id)  # already revoked
    assert not await revoke_key(conn, "key_000000000000")  # unknown
    assert cache.lookup(plaintext.encode()) == key  # until the next refresh
    assert await cache.refresh(conn) == 1
    assert cache.lookup(plaintext.encode()) is None
    assert cache.lookup(kept.encode()) is not None

    active = await list_keys(conn)
    assert [row.name for row in active] == ["kept"]
    every = await list_keys(conn, include_revoked=True)
    assert [(row.name, row.revoked_at is not None) for row in every] == [
        ("to revoke", True),
        ("kept", False),
    ]
    assert every[0].key_prefix == plaintext[:7]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "  "},
        {"name": "x" * 201},
        {"name": "ok", "end_user_id": ""},
        {"name": "ok", "end_user_id": "u" * 256},
        {"name": "ok", "allowed_providers": []},
        {"name": "ok", "allowed_providers": ["openai", " "]},
        {"name": "ok", "allowed_providers": "openai"},
    ],
)
async def test_create_rejects_bad_policy(conn: Conn, kwargs: dict[str, Any]) -> None:
    with pytest.raises(GatewayKeyError):
        await create_key(conn, **kwargs)
    cur = await conn.execute("SELECT count(*) FROM tollgate.gateway_keys")
    assert await cur.fetchone() == (0,)


async def test_refresh_on_a_closed_connection_keeps_the_old_cache(
    conn: Conn, database_url: str
) -> None:
    plaintext, key = await create_key(conn, name="app")
    cache = KeyCache()
    await cache.refresh(conn)
    broken = await psycopg.AsyncConnection.connect(database_url)
    await broken.close()
    with pytest.raises(psycopg.OperationalError):
        await cache.refresh(broken)
    assert cache.lookup(plaintext.encode()) == key
    assert cache.loaded
    assert cache.size == 1


async def test_run_picks_up_changes_and_survives_a_lost_database(
    conn: Conn, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    plaintext, key = await create_key(conn, name="app")
    pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
        database_url, min_size=1, max_size=1, timeout=0.5, reconnect_timeout=60, open=False
    )
    await pool.open()
    await pool.wait()
    cache = KeyCache()
    task = asyncio.create_task(cache.run(pool, 0.02))
    try:
        await wait_for(lambda: cache.lookup(plaintext.encode()) == key)
        later, later_key = await create_key(conn, name="later")
        await wait_for(lambda: cache.lookup(later.encode()) == later_key)
        assert cache.refresh_failures == 0

        await conn.close()
        admin = database_url.rpartition("/")[0] + "/postgres"
        name = database_url.rpartition("/")[2]
        async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as a:
            await a.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        with caplog.at_level(logging.WARNING, logger="tollgate.policy.keys"):
            await wait_for(lambda: cache.refresh_failures >= 2)
        assert cache.lookup(plaintext.encode()) == key
        assert cache.lookup(later.encode()) == later_key
        assert cache.size == 2
        assert "gateway key refresh failed" in caplog.text
        assert "keeping 2 cached keys" in caplog.text
        assert plaintext not in caplog.text
        assert later not in caplog.text
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await pool.close()


def cli(database_url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return tollgate_cli(database_url, tmp_path, "keys", *args)


async def test_keys_commands(database_url: str, tmp_path: Path) -> None:
    # A fresh database: the command applies the migrations itself.
    made = cli(database_url, tmp_path, "create", "--name", "web app", "--user", "alice")
    assert made.returncode == 0, made.stderr
    assert "will not be shown again" in made.stdout
    text_key = next(w for w in made.stdout.split() if w.startswith(KEY_PREFIX))
    assert is_well_formed(text_key.encode())
    assert text_key not in made.stderr

    made = cli(
        database_url,
        tmp_path,
        "create",
        "--name",
        "batch",
        "--no-enforce-user-id",
        "--provider",
        "openai",
        "--provider",
        "anthropic",
        "--format",
        "json",
    )
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert created["name"] == "batch"
    assert created["enforce_user_id"] is False
    assert created["allowed_providers"] == ["anthropic", "openai"]
    json_key = created["key"]

    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cache = KeyCache()
        assert await cache.refresh(conn) == 2
    web = cache.lookup(text_key.encode())
    assert web is not None
    assert (web.name, web.end_user_id, web.enforce_user_id) == ("web app", "alice", None)
    batch = cache.lookup(json_key.encode())
    assert batch == GatewayKey(
        created["key_id"], "batch", None, False, frozenset({"openai", "anthropic"})
    )

    table = cli(database_url, tmp_path, "list")
    assert table.returncode == 0, table.stderr
    assert web.key_id in table.stdout
    assert batch.key_id in table.stdout
    assert text_key[:7] in table.stdout
    listed = cli(database_url, tmp_path, "list", "--format", "json")
    assert {row["key_id"] for row in json.loads(listed.stdout)} == {web.key_id, batch.key_id}
    for out in (table, listed):
        for key in (text_key, json_key):
            assert key not in out.stdout + out.stderr
            assert key[7:] not in out.stdout + out.stderr

    revoked = cli(database_url, tmp_path, "revoke", web.key_id)
    assert revoked.returncode == 0, revoked.stderr
    assert web.key_id in revoked.stdout
    again = cli(database_url, tmp_path, "revoke", web.key_id)
    assert again.returncode == 1
    assert web.key_id in again.stderr
    assert "already revoked" in again.stderr
    unknown = cli(database_url, tmp_path, "revoke", "key_ffffffffffff")
    assert unknown.returncode == 1
    assert "key_ffffffffffff" in unknown.stderr

    every = json.loads(cli(database_url, tmp_path, "list", "--all", "--format", "json").stdout)
    assert {row["key_id"]: row["revoked_at"] is not None for row in every} == {
        web.key_id: True,
        batch.key_id: False,
    }
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        assert await cache.refresh(conn) == 1
    assert cache.lookup(text_key.encode()) is None
    assert cache.lookup(json_key.encode()) == batch


async def test_keys_create_rejects_an_empty_name(database_url: str, tmp_path: Path) -> None:
    made = cli(database_url, tmp_path, "create", "--name", " ")
    assert made.returncode == 2
    assert "name" in made.stderr
    assert KEY_PREFIX not in made.stdout

"""Gateway keys: created once, stored as SHA-256 hashes, read on the request path from a cache.

A gateway key (``tg_`` + 43 URL-safe base64 characters, 256 random bits) lets an app hold one
Tollgate key instead of provider keys. The plaintext is returned once by :func:`create_key`
and never stored, logged or put in an error message; ``tollgate.gateway_keys`` keeps only its
SHA-256 hash and a 7-character prefix for people to recognise it.

The request path never awaits Postgres: it calls :meth:`KeyCache.lookup`, a dict lookup by
hash. :meth:`KeyCache.run` reloads the whole table every few seconds in the background, so a
revoked key stops working within one refresh interval.

Errors: :class:`GatewayKeyError` (a ``ValueError``) for a key that cannot be created as asked.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import args_row, class_row
from psycopg_pool import AsyncConnectionPool

from tollgate.policy.identity import MAX_USER_ID_CHARS

__all__ = [
    "KEY_PREFIX",
    "GatewayKey",
    "GatewayKeyError",
    "KeyCache",
    "KeyRow",
    "create_key",
    "generate_key",
    "hash_key",
    "is_well_formed",
    "list_keys",
    "revoke_key",
]

log = logging.getLogger(__name__)

KEY_PREFIX = "tg_"
_RANDOM_BYTES = 32  # 256 bits
_RANDOM_CHARS = 43  # len(secrets.token_urlsafe(32)): base64 without padding
_SHOWN_PREFIX_CHARS = 7  # "tg_" + 4 random characters, stored as key_prefix
_WELL_FORMED = re.compile(re.escape(KEY_PREFIX.encode()) + rb"[A-Za-z0-9_-]{%d}" % _RANDOM_CHARS)
_MAX_NAME_CHARS = 200
_CREATE_ATTEMPTS = 5


class GatewayKeyError(ValueError):
    """Raised when a gateway key cannot be created with the given name or policy."""


@dataclass(frozen=True)
class GatewayKey:
    """An active key's identity and policy, as the request path sees it."""

    key_id: str
    name: str
    end_user_id: str | None  # requests made with the key are attributed to this user
    enforce_user_id: bool | None  # None: inherit the global setting
    allowed_providers: frozenset[str] | None  # None: any provider
    # True: Tollgate injects the provider key it holds; False: the app's own key passes through.
    inject_credentials: bool = True


@dataclass(frozen=True)
class KeyRow:
    """One row of ``tollgate.gateway_keys`` for listing (never the hash, never the plaintext)."""

    key_id: str
    key_prefix: str
    name: str
    end_user_id: str | None
    enforce_user_id: bool | None
    allowed_providers: list[str] | None
    credential_mode: str
    created_at: datetime
    revoked_at: datetime | None


def generate_key() -> str:
    """A new plaintext key: ``tg_`` followed by 256 random bits in URL-safe base64."""
    return KEY_PREFIX + secrets.token_urlsafe(_RANDOM_BYTES)


def hash_key(token: bytes | str) -> bytes:
    """The SHA-256 digest stored for (and looked up by) a key."""
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


def is_well_formed(token: bytes) -> bool:
    """Whether ``token`` has exactly the shape :func:`generate_key` produces."""
    return _WELL_FORMED.fullmatch(token) is not None


def _new_key_id() -> str:
    return f"key_{secrets.token_hex(6)}"


def _cache_entry(
    key_hash: bytes,
    key_id: str,
    name: str,
    end_user_id: str | None,
    enforce_user_id: bool | None,
    allowed_providers: list[str] | None,
    credential_mode: str,
) -> tuple[bytes, GatewayKey]:
    providers = None if allowed_providers is None else frozenset(allowed_providers)
    key = GatewayKey(
        key_id, name, end_user_id, enforce_user_id, providers, credential_mode == "inject"
    )
    return bytes(key_hash), key


class KeyCache:
    """Active gateway keys by hash, reloaded in full from Postgres by a background task."""

    def __init__(self) -> None:
        self._by_hash: dict[bytes, GatewayKey] = {}
        self.loaded = False  # True after the first successful refresh
        self.refresh_failures = 0  # failed refreshes since start

    def lookup(self, token: bytes) -> GatewayKey | None:
        """The active key ``token`` is, or None when it is malformed, unknown or revoked."""
        if not is_well_formed(token):
            return None
        return self._by_hash.get(hash_key(token))

    @property
    def size(self) -> int:
        return len(self._by_hash)

    async def refresh(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """Reload every active key; the cache changes only when the whole load succeeded."""
        async with (
            conn.transaction(),
            conn.cursor(row_factory=args_row(_cache_entry)) as cur,
        ):
            await cur.execute(
                "SELECT key_hash, key_id, name, end_user_id, enforce_user_id, allowed_providers,"
                " credential_mode"
                " FROM tollgate.gateway_keys WHERE revoked_at IS NULL"
            )
            entries = await cur.fetchall()
        self._by_hash = dict(entries)  # one assignment: lookups see the old or the new dict
        self.loaded = True
        return len(entries)

    async def run(
        self, pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]], interval_s: float
    ) -> None:
        """Refresh every ``interval_s`` seconds until cancelled; keep the old keys on failure."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                async with pool.connection() as conn:
                    count = await self.refresh(conn)
            except Exception as exc:
                # Nothing here can hold a plaintext key: the cache only ever sees hashes.
                self.refresh_failures += 1
                log.warning(
                    "gateway key refresh failed (%d so far), keeping %d cached keys: %s: %s",
                    self.refresh_failures,
                    self.size,
                    type(exc).__name__,
                    exc,
                )
            else:
                log.debug("gateway key cache refreshed: %d active keys", count)


def _checked_providers(allowed_providers: Sequence[str] | None) -> list[str] | None:
    if allowed_providers is None:
        return None
    if isinstance(allowed_providers, str):
        raise GatewayKeyError("allowed providers must be a list of names, not one string")
    names = sorted({p.strip().lower() for p in allowed_providers})
    if not names or "" in names:
        raise GatewayKeyError("allowed providers must be non-empty names (leave unset for any)")
    return names


async def create_key(
    conn: psycopg.AsyncConnection[Any],
    *,
    name: str,
    end_user_id: str | None = None,
    enforce_user_id: bool | None = None,
    allowed_providers: Sequence[str] | None = None,
    inject_credentials: bool = True,
) -> tuple[str, GatewayKey]:
    """Store a new key's hash and policy; return ``(plaintext, key)``, the only time the
    plaintext exists outside the app that receives it."""
    name = name.strip()
    if not name or len(name) > _MAX_NAME_CHARS:
        raise GatewayKeyError(f"a key name must be 1 to {_MAX_NAME_CHARS} characters")
    if end_user_id is not None:
        end_user_id = end_user_id.strip()
        if not end_user_id or len(end_user_id) > MAX_USER_ID_CHARS:
            raise GatewayKeyError(f"an end-user id must be 1 to {MAX_USER_ID_CHARS} characters")
    providers = _checked_providers(allowed_providers)
    for _ in range(_CREATE_ATTEMPTS):  # a clash of 48-bit key ids is unlikely: draw again
        plaintext, key_id = generate_key(), _new_key_id()
        async with conn.transaction():
            cur = await conn.execute(
                "INSERT INTO tollgate.gateway_keys (key_id, key_hash, key_prefix, name,"
                " end_user_id, enforce_user_id, allowed_providers, credential_mode)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT DO NOTHING RETURNING key_id",
                (
                    key_id,
                    hash_key(plaintext),
                    plaintext[:_SHOWN_PREFIX_CHARS],
                    name,
                    end_user_id,
                    enforce_user_id,
                    providers,
                    "inject" if inject_credentials else "passthrough",
                ),
            )
            inserted = await cur.fetchone() is not None
        if inserted:
            frozen = None if providers is None else frozenset(providers)
            key = GatewayKey(key_id, name, end_user_id, enforce_user_id, frozen, inject_credentials)
            return plaintext, key
    raise RuntimeError(f"no unused key id after {_CREATE_ATTEMPTS} attempts")


async def list_keys(
    conn: psycopg.AsyncConnection[Any], *, include_revoked: bool = False
) -> list[KeyRow]:
    """Keys oldest first; only active ones unless ``include_revoked``."""
    async with conn.cursor(row_factory=class_row(KeyRow)) as cur:
        await cur.execute(
            "SELECT key_id, key_prefix, name, end_user_id, enforce_user_id, allowed_providers,"
            " credential_mode,"
            " created_at, revoked_at FROM tollgate.gateway_keys"
            " WHERE %s OR revoked_at IS NULL ORDER BY created_at, key_id",
            (include_revoked,),
        )
        return await cur.fetchall()


async def revoke_key(conn: psycopg.AsyncConnection[Any], key_id: str) -> bool:
    """Revoke an active key; False when there is no such key or it is already revoked."""
    async with conn.transaction():
        cur = await conn.execute(
            "UPDATE tollgate.gateway_keys SET revoked_at = now(), updated_at = now()"
            " WHERE key_id = %s AND revoked_at IS NULL RETURNING key_id",
            (key_id,),
        )
        return await cur.fetchone() is not None

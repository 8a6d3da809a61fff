"""Viewer tokens: read-only dashboard and API credentials that see one gateway key's rows.

Made like gateway keys (``tollgate.policy.keys``): ``tgv_`` and 256 random bits, shown once,
stored as the SHA-256 of the plaintext with a short prefix for people to recognise it.
Managed by ``tollgate viewers``; the dashboard reloads the active ones every few seconds
(:class:`ViewerDirectory`), so a revoked token stops working within that time.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import class_row

from tollgate.policy.keys import hash_key

__all__ = [
    "VIEWER_PREFIX",
    "Viewer",
    "ViewerDirectory",
    "ViewerError",
    "ViewerRow",
    "create_viewer",
    "list_viewers",
    "revoke_viewer",
]

log = logging.getLogger(__name__)

VIEWER_PREFIX = "tgv_"
_RANDOM_BYTES = 32
_SHOWN_PREFIX_CHARS = 8  # 'tgv_' + 4 random characters
_MAX_NAME_CHARS = 200
_KEY_ID = re.compile(r"key_[0-9a-f]{12}")
_CREATE_ATTEMPTS = 5


class ViewerError(ValueError):
    """A viewer token cannot be created as asked (unknown key, bad name)."""


@dataclass(frozen=True)
class Viewer:
    """What a valid viewer token grants: the rows of one gateway key."""

    viewer_id: str
    name: str
    key_id: str


@dataclass(frozen=True)
class ViewerRow:
    """One row of ``tollgate.viewer_tokens`` for listing (never the hash)."""

    viewer_id: str
    token_prefix: str
    name: str
    key_id: str
    created_at: datetime
    revoked_at: datetime | None


def generate_token() -> str:
    return VIEWER_PREFIX + secrets.token_urlsafe(_RANDOM_BYTES)


async def create_viewer(
    conn: psycopg.AsyncConnection[Any], *, key_id: str, name: str
) -> tuple[str, Viewer]:
    """Store a new viewer token for ``key_id``; return ``(plaintext, viewer)``: the only
    time the plaintext exists."""
    name = name.strip()
    if not name or len(name) > _MAX_NAME_CHARS:
        raise ViewerError(f"a viewer name must be 1 to {_MAX_NAME_CHARS} characters")
    if not _KEY_ID.fullmatch(key_id):
        raise ViewerError(f"not a gateway key id (key_ and 12 hex digits): {key_id!r}")
    for _ in range(_CREATE_ATTEMPTS):  # a clash of 48-bit ids is unlikely: draw again
        plaintext, viewer_id = generate_token(), f"vwr_{secrets.token_hex(6)}"
        async with conn.transaction():
            cur = await conn.execute(
                "SELECT 1 FROM tollgate.gateway_keys WHERE key_id = %s", (key_id,)
            )
            if await cur.fetchone() is None:
                raise ViewerError(f"no gateway key {key_id!r} (see `tollgate keys list`)")
            cur = await conn.execute(
                "INSERT INTO tollgate.viewer_tokens"
                " (viewer_id, token_hash, token_prefix, name, key_id)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING viewer_id",
                (viewer_id, hash_key(plaintext), plaintext[:_SHOWN_PREFIX_CHARS], name, key_id),
            )
            inserted = await cur.fetchone() is not None
        if inserted:
            return plaintext, Viewer(viewer_id, name, key_id)
    raise RuntimeError(f"no unused viewer id after {_CREATE_ATTEMPTS} attempts")


async def list_viewers(
    conn: psycopg.AsyncConnection[Any], *, include_revoked: bool = False
) -> list[ViewerRow]:
    async with conn.cursor(row_factory=class_row(ViewerRow)) as cur:
        await cur.execute(
            "SELECT viewer_id, token_prefix, name, key_id, created_at, revoked_at"
            " FROM tollgate.viewer_tokens WHERE %s OR revoked_at IS NULL"
            " ORDER BY created_at, viewer_id",
            (include_revoked,),
        )
        return await cur.fetchall()


async def revoke_viewer(conn: psycopg.AsyncConnection[Any], viewer_id: str) -> bool:
    """Revoke an active viewer token; False when unknown or already revoked."""
    async with conn.transaction():
        cur = await conn.execute(
            "UPDATE tollgate.viewer_tokens SET revoked_at = now()"
            " WHERE viewer_id = %s AND revoked_at IS NULL RETURNING viewer_id",
            (viewer_id,),
        )
        return await cur.fetchone() is not None


class ViewerDirectory:
    """The active viewer tokens by hash and by id, reloaded in full in the background.

    Tokens whose gateway key is revoked stay valid: the key's rows stay in the ledger and
    someone may still need to read them; revoke the viewer token to end its access.
    """

    def __init__(self) -> None:
        self._by_hash: dict[bytes, Viewer] = {}
        self._by_id: dict[str, Viewer] = {}
        self.loaded = False

    def by_token(self, token: str) -> Viewer | None:
        if not token.startswith(VIEWER_PREFIX):
            return None
        return self._by_hash.get(hash_key(token))

    def by_id(self, viewer_id: str) -> Viewer | None:
        return self._by_id.get(viewer_id)

    async def refresh(self, conn: psycopg.AsyncConnection[Any]) -> int:
        cur = await conn.execute(
            "SELECT token_hash, viewer_id, name, key_id FROM tollgate.viewer_tokens"
            " WHERE revoked_at IS NULL"
        )
        by_hash: dict[bytes, Viewer] = {}
        for token_hash, viewer_id, name, key_id in await cur.fetchall():
            by_hash[bytes(token_hash)] = Viewer(viewer_id, name, key_id)
        # Two assignments, each atomic; a lookup between them sees a token either way.
        self._by_hash = by_hash
        self._by_id = {v.viewer_id: v for v in by_hash.values()}
        self.loaded = True
        return len(by_hash)

    async def run(
        self,
        connect: Callable[[], Any],
        interval_s: float,
    ) -> None:
        """Reload every ``interval_s`` until cancelled; a failed reload keeps the last set."""
        while True:
            try:
                async with connect() as conn:
                    await self.refresh(conn)
            except (psycopg.Error, OSError) as exc:
                log.warning("viewer tokens: reload failed (%s); keeping the last set", exc)
            await asyncio.sleep(interval_s)

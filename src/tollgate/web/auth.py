"""Who is asking: the admin token, viewer tokens, and the dashboard's signed session cookie.

* The **admin** sees every row. Its token comes from configuration; the login form trades
  it for a session cookie, the API takes it as ``Authorization: Bearer``.
* A **viewer** sees one gateway key's rows only (``tollgate viewers create --key``); the
  scope is in the :class:`Principal`, and every query takes it from there, never from the
  query string.
* The session cookie is ``<payload>.<HMAC-SHA256>`` (URL-safe base64), HttpOnly,
  SameSite=Strict. Its key is derived from the admin token, so every dashboard replica
  with the same token accepts the same sessions and a new admin token ends all of them.
  The payload holds the role, the viewer id (re-checked against the active viewer tokens on
  every request, so revoking a token ends its sessions), the expiry, and the session's CSRF
  token that every state-changing form must echo.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tollgate.config import ConfigError, Settings
from tollgate.ledger.viewers import ViewerDirectory

__all__ = [
    "ADMIN",
    "Principal",
    "SessionSigner",
    "TokenCheck",
    "admin_token",
    "new_csrf_token",
    "same_token",
]

ADMIN = "admin"
VIEWER = "viewer"
_SESSION_LABEL = b"tollgate dashboard session v1"


@dataclass(frozen=True)
class Principal:
    role: str  # ADMIN or VIEWER
    key_id: str | None = None  # a viewer's gateway key; None: every key
    viewer_id: str | None = None
    name: str = "admin"
    csrf: str = ""  # the session's CSRF token ("" for bearer-token API calls)

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN


def new_csrf_token() -> str:
    return secrets.token_urlsafe(24)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenCheck:
    """Turns a presented token into a principal, or None."""

    def __init__(self, admin_token: str, viewers: ViewerDirectory) -> None:
        self._admin_digest = hashlib.sha256(admin_token.encode()).digest()
        self.viewers = viewers

    def principal(self, token: str) -> Principal | None:
        token = token.strip()
        if not token:
            return None
        # Compared as digests: constant time, whatever the lengths.
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        if hmac.compare_digest(digest, self._admin_digest):
            return Principal(ADMIN)
        viewer = self.viewers.by_token(token)
        if viewer is None:
            return None
        return Principal(VIEWER, key_id=viewer.key_id, viewer_id=viewer.viewer_id, name=viewer.name)


class SessionSigner:
    """Issues and checks session cookies."""

    def __init__(self, admin_token: str, viewers: ViewerDirectory, ttl_s: float) -> None:
        self._key = hmac.new(admin_token.encode(), _SESSION_LABEL, hashlib.sha256).digest()
        self._viewers = viewers
        self.ttl_s = ttl_s

    def _sign(self, payload: bytes) -> str:
        return _b64(hmac.new(self._key, payload, hashlib.sha256).digest())

    def issue(self, who: Principal, now: float | None = None) -> tuple[str, Principal]:
        """A cookie value for ``who`` and the principal with its new CSRF token."""
        csrf = new_csrf_token()
        body: dict[str, Any] = {
            "r": who.role,
            "exp": int((time.time() if now is None else now) + self.ttl_s),
            "c": csrf,
        }
        if who.viewer_id is not None:
            body["v"] = who.viewer_id
        payload = json.dumps(body, separators=(",", ":")).encode()
        value = f"{_b64(payload)}.{self._sign(payload)}"
        return value, Principal(who.role, who.key_id, who.viewer_id, who.name, csrf)

    def verify(self, value: str, now: float | None = None) -> Principal | None:
        """The principal of a valid, unexpired cookie whose viewer (if any) is still active."""
        encoded, dot, signature = value.partition(".")
        if not dot:
            return None
        try:
            payload = _unb64(encoded)
        except (binascii.Error, ValueError):
            return None
        if not hmac.compare_digest(self._sign(payload), signature):
            return None
        try:
            body = json.loads(payload)
            role, expires, csrf = str(body["r"]), int(body["exp"]), str(body["c"])
        except (ValueError, KeyError, TypeError):
            return None
        if expires < (time.time() if now is None else now):
            return None
        if role == ADMIN:
            return Principal(ADMIN, csrf=csrf)
        if role != VIEWER:
            return None
        viewer = self._viewers.by_id(str(body.get("v", "")))
        if viewer is None:
            return None
        return Principal(VIEWER, viewer.key_id, viewer.viewer_id, viewer.name, csrf)


def same_token(given: str, expected: str) -> bool:
    """CSRF comparison: constant time, and never true for an empty expectation."""
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def admin_token(settings: Settings) -> tuple[str, Path | None]:
    """The admin token and the file it came from (None: from the setting itself). Without
    either setting, a random token is made in ``state_dir/dashboard-admin-token``."""
    if settings.dashboard_admin_token:
        return settings.dashboard_admin_token.strip(), None
    path = Path(settings.dashboard_admin_token_file or "").expanduser()
    if not settings.dashboard_admin_token_file:
        path = settings.resolved_state_dir() / "dashboard-admin-token"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # Created owner-only; O_EXCL: two starting processes cannot both write it.
            with contextlib.suppress(FileExistsError):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    out.write(f"tga_{secrets.token_urlsafe(32)}\n")
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"dashboard admin token: cannot read {path}: {exc.strerror}") from None
    if len(token) < 16:
        raise ConfigError(f"dashboard admin token in {path} must be at least 16 characters")
    return token, path

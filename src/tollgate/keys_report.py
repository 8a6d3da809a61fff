"""Formats `tollgate keys` and `tollgate viewers` output: a created key or viewer token
(shown once) and the lists."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from tollgate.ledger.viewers import Viewer, ViewerRow
from tollgate.policy.keys import GatewayKey, KeyRow

__all__ = ["format_created_key", "format_created_viewer", "format_key_list", "format_viewer_list"]


def _enforce(value: bool | None) -> str:
    return "inherit" if value is None else "on" if value else "off"


def _providers(names: Sequence[str] | frozenset[str] | None) -> str:
    return "any" if names is None else ",".join(sorted(names))


def _mode(inject: bool) -> str:
    return "inject" if inject else "passthrough"


def _utc(value: datetime) -> str:
    return f"{value.astimezone(UTC):%Y-%m-%d %H:%M}"


def format_created_key(plaintext: str, key: GatewayKey, fmt: str) -> str:
    """The new key and its policy; the one place the plaintext is ever printed."""
    providers = None if key.allowed_providers is None else sorted(key.allowed_providers)
    if fmt == "json":
        record = {
            "key": plaintext,
            "key_id": key.key_id,
            "name": key.name,
            "end_user_id": key.end_user_id,
            "enforce_user_id": key.enforce_user_id,
            "allowed_providers": providers,
            "credential_mode": _mode(key.inject_credentials),
        }
        return json.dumps(record, indent=2) + "\n"
    return (
        f"Created gateway key {key.key_id} ({key.name}):\n\n"
        f"    {plaintext}\n\n"
        "Store it now (e.g. in your app's secret store): it will not be shown again.\n"
        "Tollgate keeps only its SHA-256 hash, so a lost key cannot be recovered.\n\n"
        f"end user:          {key.end_user_id or '-'}\n"
        f"enforce user ids:  {_enforce(key.enforce_user_id)}\n"
        f"allowed providers: {_providers(key.allowed_providers)}\n"
        f"credentials:       {_mode(key.inject_credentials)}\n"
    )


def _json_rows(rows: Sequence[KeyRow] | Sequence[ViewerRow]) -> str:
    records: list[dict[str, Any]] = []
    for row in rows:
        record = dataclasses.asdict(row)
        record["created_at"] = row.created_at.isoformat()
        record["revoked_at"] = row.revoked_at.isoformat() if row.revoked_at else None
        records.append(record)
    return json.dumps(records, indent=2) + "\n"


def _aligned(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def fmt_line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt_line(header), rule, *(fmt_line(line) for line in lines)]) + "\n"


def _status(revoked_at: datetime | None) -> str:
    return f"revoked {_utc(revoked_at)}" if revoked_at else "active"


def format_created_viewer(plaintext: str, viewer: Viewer, fmt: str) -> str:
    """The new viewer token; the one place its plaintext is ever printed."""
    if fmt == "json":
        record = {
            "token": plaintext,
            "viewer_id": viewer.viewer_id,
            "name": viewer.name,
            "key_id": viewer.key_id,
        }
        return json.dumps(record, indent=2) + "\n"
    return (
        f"Created viewer token {viewer.viewer_id} ({viewer.name}):\n\n"
        f"    {plaintext}\n\n"
        f"It signs in to the dashboard and the /api/v1/ API and sees gateway key\n"
        f"{viewer.key_id}'s requests only. Store it now: it will not be shown again.\n"
    )


def format_viewer_list(rows: Sequence[ViewerRow], fmt: str) -> str:
    if fmt == "json":
        return _json_rows(rows)
    if not rows:
        return "no viewer tokens\n"
    header = ["viewer_id", "prefix", "name", "key_id", "created (UTC)", "status"]
    lines = [
        [
            row.viewer_id,
            f"{row.token_prefix}…",
            row.name,
            row.key_id,
            _utc(row.created_at),
            _status(row.revoked_at),
        ]
        for row in rows
    ]
    return _aligned(header, lines)


def format_key_list(rows: Sequence[KeyRow], fmt: str) -> str:
    """Keys as an aligned table or a JSON array (field names = column names)."""
    if fmt == "json":
        return _json_rows(rows)
    if not rows:
        return "no gateway keys\n"
    header = [
        "key_id",
        "prefix",
        "name",
        "end_user",
        "enforce",
        "providers",
        "credentials",
        "created (UTC)",
        "status",
    ]
    lines = [
        [
            row.key_id,
            f"{row.key_prefix}…",
            row.name,
            row.end_user_id or "-",
            _enforce(row.enforce_user_id),
            _providers(row.allowed_providers),
            row.credential_mode,
            _utc(row.created_at),
            _status(row.revoked_at),
        ]
        for row in rows
    ]
    return _aligned(header, lines)

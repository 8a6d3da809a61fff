"""Test doubles for the processor's collaborators: a sink that keeps records, fixed keys."""

from __future__ import annotations

from tollgate.ledger.records import UsageRecord
from tollgate.policy.keys import GatewayKey


class RecordingSink:
    """Takes every record (as the ledger writer would) and keeps it for the test to read."""

    accepting = True

    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def submit(self, record: UsageRecord) -> bool:
        self.records.append(record)
        return True


class FixedKeys:
    """Gateway keys by token, as the key cache would answer."""

    def __init__(self, keys: dict[bytes, GatewayKey] | None = None) -> None:
        self._keys = keys or {}

    def lookup(self, token: bytes) -> GatewayKey | None:
        return self._keys.get(token)

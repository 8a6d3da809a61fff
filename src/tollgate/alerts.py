"""Limit alerts: a threshold crossed fires a log line, a counter and, when configured, a
signed webhook.

The ledger writer finds the crossings in the transaction that charges the rows crossing them
(``ledger.limits.ALERT_CROSSED``), and ``tollgate.limit_alerts``'s primary key makes each
fire once per limit, subject, period and threshold, however many replicas write. After the
commit the writer hands them to :class:`AlertSink`, which logs and counts each at once and
queues it for the webhook.

The webhook gets ``POST`` with a JSON body (:func:`alert_document`), ``content-type:
application/json``, ``x-tollgate-alert-id`` (stable per alert: a receiver can drop a
repeat) and ``x-tollgate-signature: sha256=<hex HMAC-SHA256 of the body under the
configured secret>``. A delivery that fails (no answer, or not 2xx) is retried with
exponential backoff (1 s doubling to 60 s) for ``webhook_attempts`` attempts. The webhook's
URL is configuration only, never request input; delivery is at most once per process: an
alert still queued when the process stops is in ``tollgate.limit_alerts`` but not sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections import Counter
from collections.abc import Mapping
from typing import Any

import aiohttp

__all__ = ["SIGNATURE_HEADER", "AlertSink", "alert_document", "signature"]

log = logging.getLogger("tollgate.alerts")

SIGNATURE_HEADER = "x-tollgate-signature"
ALERT_ID_HEADER = "x-tollgate-alert-id"
_MAX_BACKOFF_S = 60.0


def alert_document(alert: Mapping[str, Any]) -> dict[str, Any]:
    """What an alert says: the limit, whose spend, the period, the threshold crossed."""
    return {
        "type": "limit_threshold_crossed",
        "limit_id": alert["limit_id"],
        "subject": alert["subject"] or None,
        "period_start": alert["period_start"],
        "threshold": str(alert["threshold"]),
        "measure": alert["measure"],
        "spent": str(alert["spent"]),
        "maximum": str(alert["maximum"]),
    }


def alert_id(document: Mapping[str, Any]) -> str:
    return ":".join(
        str(document[k] or "") for k in ("limit_id", "subject", "period_start", "threshold")
    )


def signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class AlertSink:
    """Logs, counts and (with a URL) delivers the alerts the writer reports."""

    def __init__(
        self,
        webhook_url: str = "",
        secret: bytes = b"",
        *,
        attempts: int = 8,
        first_backoff_s: float = 1.0,
        timeout_s: float = 10.0,
    ) -> None:
        self._url = webhook_url
        self._secret = secret
        self._attempts = max(attempts, 1)
        self._first_backoff_s = first_backoff_s
        self._timeout_s = timeout_s
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        # (limit_id, threshold) → alerts fired; and webhook deliveries by result.
        self.fired: Counter[tuple[str, str]] = Counter()
        self.deliveries: Counter[str] = Counter()

    def __call__(self, alerts: list[dict[str, Any]]) -> None:
        """The writer's report of the alerts a committed batch fired (on the event loop)."""
        for alert in alerts:
            document = alert_document(alert)
            self.fired[(document["limit_id"], document["threshold"])] += 1
            log.warning(
                "limit alert: %s crossed %s of its maximum (%s of %s %s) for %s in the period"
                " from %s",
                document["limit_id"],
                document["threshold"],
                document["spent"],
                document["maximum"],
                document["measure"],
                document["subject"] or "all",
                document["period_start"],
                extra={"fields": document},
            )
            if self._url:
                self._queue.put_nowait(document)

    async def run(self) -> None:
        """Deliver queued alerts to the webhook, one at a time, until cancelled."""
        if not self._url:
            return
        timeout = aiohttp.ClientTimeout(total=self._timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                document = await self._queue.get()
                await self._deliver(session, document)

    async def _deliver(self, session: aiohttp.ClientSession, document: dict[str, Any]) -> None:
        body = json.dumps(document, separators=(",", ":")).encode()
        headers = {
            "content-type": "application/json",
            ALERT_ID_HEADER: alert_id(document),
            SIGNATURE_HEADER: signature(self._secret, body),
        }
        backoff = self._first_backoff_s
        for attempt in range(1, self._attempts + 1):
            try:
                async with session.post(self._url, data=body, headers=headers) as response:
                    if 200 <= response.status < 300:
                        self.deliveries["ok"] += 1
                        return
                    why = f"status {response.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                why = type(exc).__name__
            self.deliveries["attempt_failed"] += 1
            if attempt == self._attempts:
                break
            log.info("alert webhook failed (%s); retrying in %.0f s", why, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)
        self.deliveries["gave_up"] += 1
        log.error(
            "alert webhook gave up after %d attempts for %s", self._attempts, alert_id(document)
        )

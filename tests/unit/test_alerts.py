"""The alert sink: the log line, the counter, and the webhook — signed, retried, given up."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from tollgate.alerts import SIGNATURE_HEADER, AlertSink
from tollgate.app import alert_sink
from tollgate.config import ConfigError, load_settings
from tollgate.logs import JsonFormatter

ALERT = {
    "limit_id": "u1-daily",
    "subject": "",
    "period_start": "2026-12-03T00:00:00+00:00",
    "threshold": 0.8,
    "spent": 0.0081,
    "maximum": 0.01,
    "measure": "usd",
}


class Receiver:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.got = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append((dict(request.headers), body))
        if len(self.received) <= self.failures:
            return web.Response(status=503)
        self.got.set()
        return web.Response(status=204)


@pytest.fixture
async def receiver(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Receiver, str]]:
    r = Receiver(getattr(request, "param", 0))
    app = web.Application()
    app.router.add_post("/hook", r.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield r, f"http://127.0.0.1:{port}/hook"
    await runner.cleanup()


@pytest.mark.parametrize("receiver", [2], indirect=True)
async def test_a_webhook_gets_each_alert_signed_after_retries(
    receiver: tuple[Receiver, str], caplog: pytest.LogCaptureFixture
) -> None:
    r, url = receiver
    sink = AlertSink(url, b"s3cret", first_backoff_s=0.01)
    task = asyncio.create_task(sink.run())
    with caplog.at_level(logging.WARNING, logger="tollgate.alerts"):
        sink([ALERT])
    await asyncio.wait_for(r.got.wait(), 5)
    task.cancel()
    assert len(r.received) == 3  # two 503s, then delivered
    headers, body = r.received[-1]
    expected = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert headers[SIGNATURE_HEADER] == expected
    assert headers["x-tollgate-alert-id"] == "u1-daily::2026-12-03T00:00:00+00:00:0.8"
    document = json.loads(body)
    assert document == {
        "type": "limit_threshold_crossed",
        "limit_id": "u1-daily",
        "subject": None,
        "period_start": "2026-12-03T00:00:00+00:00",
        "threshold": "0.8",
        "measure": "usd",
        "spent": "0.0081",
        "maximum": "0.01",
    }
    assert sink.fired == {("u1-daily", "0.8"): 1}
    assert sink.deliveries == {"attempt_failed": 2, "ok": 1}
    assert "limit alert: u1-daily crossed 0.8" in caplog.text
    # Structured: the JSON log line carries the alert's fields as top-level keys.
    (logged,) = [r for r in caplog.records if r.name == "tollgate.alerts"]
    line = json.loads(JsonFormatter().format(logged))
    assert (line["type"], line["limit_id"], line["threshold"]) == (
        "limit_threshold_crossed",
        "u1-daily",
        "0.8",
    )


@pytest.mark.parametrize("receiver", [100], indirect=True)
async def test_a_webhook_that_keeps_failing_is_given_up(receiver: tuple[Receiver, str]) -> None:
    r, url = receiver
    sink = AlertSink(url, b"k", attempts=3, first_backoff_s=0.01)
    task = asyncio.create_task(sink.run())
    sink([ALERT])
    for _ in range(200):
        if sink.deliveries["gave_up"]:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    assert len(r.received) == 3
    assert sink.deliveries == {"attempt_failed": 3, "gave_up": 1}


def test_a_webhook_needs_its_secret(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="needs alert_webhook_secret_file"):
        alert_sink(load_settings(environ={"TOLLGATE_ALERT_WEBHOOK_URL": "https://hooks.test/x"}))
    empty = tmp_path / "secret"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        alert_sink(
            load_settings(
                environ={
                    "TOLLGATE_ALERT_WEBHOOK_URL": "https://hooks.test/x",
                    "TOLLGATE_ALERT_WEBHOOK_SECRET_FILE": str(empty),
                }
            )
        )
    with pytest.raises(ConfigError, match="http"):
        alert_sink(load_settings(environ={"TOLLGATE_ALERT_WEBHOOK_URL": "file:///etc/passwd"}))

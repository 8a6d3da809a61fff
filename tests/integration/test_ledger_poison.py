"""Issue 11's reproduction through real Envoy, Tollgate and Postgres: an OpenAI-compatible
upstream answers with more cached tokens than prompt tokens (which genai-prices refuses to
price). Every request must still reach the ledger, the odd one unpriced with its reason and
flag, and the same after a restart that replays the odd record from the journal."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import openai
import psycopg
import pytest
from aiohttp import web
from psycopg.rows import dict_row

from tests.integration.conftest import TollgateProcess, tollgate_env
from tollgate.localstack import EmbeddedPostgres, free_port

pytestmark = pytest.mark.integration

ODD = "odd usage please"


class OddUpstream:
    """A tiny OpenAI-compatible chat server in a thread: usage with cached (72) > prompt (22)
    when the last message says ``ODD``, ordinary usage otherwise."""

    def __init__(self) -> None:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> OddUpstream:
        self._thread.start()
        assert self._ready.wait(10), "the odd upstream did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())
        self._loop.close()

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        odd = body["messages"][-1]["content"] == ODD
        usage: dict[str, Any] = (
            {
                "prompt_tokens": 22,
                "completion_tokens": 5,
                "total_tokens": 27,
                "prompt_tokens_details": {"cached_tokens": 72},
            }
            if odd
            else {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        )
        return web.json_response(
            {
                "id": "chatcmpl-odd",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "ok"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
        )


def send(client: openai.OpenAI, content: str, user: str) -> str:
    """One chat completion through Envoy; the ledger request id Tollgate answered with."""
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": content}],
        extra_headers={"x-tollgate-user-id": user},
    )
    assert raw.http_response.status_code == 200
    assert raw.parse().usage is not None
    request_id = raw.headers.get("x-tollgate-request-id")
    assert request_id
    return request_id


def ledger(url: str, ids: set[str], timeout_s: float = 60) -> dict[str, dict[str, Any]]:
    """The ledger rows of ``ids`` (waiting until all are there), by request id; fails on a
    request id stored twice."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with psycopg.connect(url, row_factory=dict_row, connect_timeout=3) as conn:
                rows = conn.execute(
                    "SELECT request_id::text AS id, cost_usd, pricing_error, usage_flags,"
                    " input_tokens, cached_input_tokens FROM tollgate.requests"
                    " WHERE request_id::text = ANY(%s)",
                    (list(ids),),
                ).fetchall()
        except psycopg.OperationalError:
            rows = []
        found = {r["id"]: r for r in rows}
        assert len(found) == len(rows), "a request id is in the ledger twice"
        if set(found) == ids or time.monotonic() > deadline:
            return found
        time.sleep(0.25)


def metric(env: dict[str, str], name: str) -> float:
    """One sample of Tollgate's /metrics."""
    url = f"http://{env['TOLLGATE_METRICS_ADDRESS']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def start_up(env: dict[str, str]) -> TollgateProcess:
    process = TollgateProcess(["up"], env)
    process.wait_for_line("tollgate is ready")
    return process


def assert_odd(row: dict[str, Any]) -> None:
    assert (row["input_tokens"], row["cached_input_tokens"]) == (22, 72)  # as reported
    assert row["cost_usd"] is None
    assert row["pricing_error"].startswith("genai-prices: ")
    assert "cannot exceed" in row["pricing_error"]
    assert row["usage_flags"] == ["cached_exceeds_input"]


def test_odd_usage_never_stops_the_ledger_even_after_a_restart(
    tmp_path: Path, own_postgres: EmbeddedPostgres
) -> None:
    with OddUpstream() as upstream:
        env = tollgate_env(
            tmp_path / "state", database_url=own_postgres.url, upstream_url=upstream.url
        )
        port = env["TOLLGATE_ENVOY_LISTEN_PORT"]
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-app", max_retries=0
        )
        process = start_up(env)
        try:
            # 1. The odd answer, then normal traffic: all in the ledger, the odd one unpriced.
            odd = send(client, ODD, "odd-user")
            normal = {send(client, f"hello {i}", f"user-{i % 3}") for i in range(8)}
            rows = ledger(own_postgres.url, {odd, *normal})
            assert set(rows) == {odd, *normal}
            assert_odd(rows[odd])
            assert all(rows[i]["cost_usd"] > 0 for i in normal)
            assert all(rows[i]["pricing_error"] is None for i in normal)
            assert metric(env, "tollgate_ledger_writer_alive") == 1
            assert metric(env, "tollgate_pricing_errors_total") == 1

            # 2. With Postgres away the records stay in the journal; Tollgate is then killed
            # before it could ship them, and restarted once Postgres is back.
            own_postgres.stop()
            odd_again = send(client, ODD, "odd-user")
            later = {send(client, f"later {i}", f"user-{i % 3}") for i in range(5)}
            assert metric(env, "tollgate_ledger_queue_depth") == 6  # kept in the journal
            assert metric(env, "tollgate_ledger_oldest_unshipped_age_seconds") > 0
            assert metric(env, "tollgate_ledger_writer_alive") == 1  # retrying, not stopped
            process.proc.send_signal(signal.SIGKILL)
            process.terminate()  # reaps the killed process
            own_postgres.start()
            process = start_up(env)
            after_restart = send(client, "after the restart", "user-0")
            wanted = {odd, *normal, odd_again, *later, after_restart}
            rows = ledger(own_postgres.url, wanted)
        finally:
            process.terminate()
    assert set(rows) == wanted
    assert_odd(rows[odd_again])
    assert rows[after_restart]["cost_usd"] > 0
    with psycopg.connect(own_postgres.url) as conn:
        total = conn.execute("SELECT count(*) FROM tollgate.requests").fetchone()
        dead = conn.execute("SELECT count(*) FROM tollgate.dead_letters").fetchone()
    assert total == (len(wanted),), "a request is missing or stored twice"
    assert dead == (0,)

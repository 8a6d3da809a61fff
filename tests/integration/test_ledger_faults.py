"""The ledger under faults, through real Envoy, Tollgate and Postgres (issue 6).

A steady load runs while Postgres is stopped and started again, or while Tollgate is killed
with SIGKILL and restarted; afterwards the ledger must hold exactly the request ids that
clients received answers for — refused ones included — each once. Every wait is bounded.
"""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from tests.integration.conftest import FakeUpstream, TollgateProcess, tollgate_env
from tollgate.localstack import EmbeddedPostgres

pytestmark = pytest.mark.integration

BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


@dataclass
class Load:
    """Sequential requests from one thread: most attributed, every fifth with a bad key."""

    port: int
    answered: dict[str, int] = field(default_factory=dict)  # request id → status
    failures: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(30)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            headers = {"content-type": "application/json", "x-tollgate-user-id": f"load{n % 9}"}
            if n % 5 == 0:
                headers["x-tollgate-key"] = "tg_" + "x" * 43  # unknown: refused, still a row
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("POST", "/v1/chat/completions", body=BODY, headers=headers)
                response = conn.getresponse()
                response.read()
                conn.close()
            except OSError:
                self.failures += 1  # Envoy down (Tollgate killed): no answer, no row expected
                time.sleep(0.05)
                continue
            request_id = response.getheader("x-tollgate-request-id")
            if request_id:
                self.answered[request_id] = response.status
            time.sleep(0.005)


def ledger_ids(url: str) -> tuple[set[str], int]:
    with psycopg.connect(url, connect_timeout=3) as conn:
        rows = conn.execute("SELECT request_id::text FROM tollgate.requests").fetchall()
    return {r[0] for r in rows}, len(rows)


def wait_for_ledger(url: str, expected: set[str], timeout_s: float) -> tuple[set[str], int]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ids, count = ledger_ids(url)
        except psycopg.OperationalError:
            ids, count = set(), 0
        if expected <= ids or time.monotonic() > deadline:
            return ids, count
        time.sleep(0.25)


def start_up(env: dict[str, str]) -> TollgateProcess:
    process = TollgateProcess(["up"], env)
    process.wait_for_line("tollgate is ready")
    return process


def test_postgres_away_for_30s_loses_and_doubles_nothing(
    tmp_path: Path, own_postgres: EmbeddedPostgres, fake_upstream: FakeUpstream
) -> None:
    env = tollgate_env(
        tmp_path / "state", database_url=own_postgres.url, upstream_url=fake_upstream.url
    )
    process = start_up(env)
    try:
        load = Load(int(env["TOLLGATE_ENVOY_LISTEN_PORT"])).start()
        time.sleep(3)
        own_postgres.stop()
        time.sleep(30)
        answered_while_away = len(load.answered)
        own_postgres.start()
        time.sleep(5)
        load.stop()
        expected = set(load.answered)
        ids, count = wait_for_ledger(own_postgres.url, expected, timeout_s=60)
    finally:
        process.terminate()
    print(f"Postgres away 30 s: {len(expected)} answered, {len(ids)} ledger rows, {count} total")
    assert answered_while_away > 100, "the load did not run while Postgres was away"
    assert {s for s in load.answered.values()} >= {200, 401}
    assert count == len(ids), "a request id is in the ledger twice"
    assert ids == expected


def test_sigkill_and_restart_loses_and_doubles_nothing(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream
) -> None:
    env = tollgate_env(
        tmp_path / "state", database_url=database_url, upstream_url=fake_upstream.url
    )
    process = start_up(env)
    load = Load(int(env["TOLLGATE_ENVOY_LISTEN_PORT"])).start()
    try:
        time.sleep(4)
        process.proc.send_signal(signal.SIGKILL)
        process.terminate()  # reaps the killed process and closes its output pipe
        before_restart = len(load.answered)
        time.sleep(1)
        process = start_up(env)
        time.sleep(4)
    finally:
        load.stop()
        process.terminate()
    expected = set(load.answered)
    # The restarted Tollgate has stopped too: everything it had must be in Postgres now.
    ids, count = wait_for_ledger(database_url, expected, timeout_s=30)
    print(f"SIGKILL: {len(expected)} answered ({load.failures} failed while down), {count} rows")
    assert before_restart > 50
    assert len(expected) > before_restart, "no answers after the restart"
    assert count == len(ids), "a request id is in the ledger twice"
    assert ids == expected


def test_full_journal_with_reject_answers_503_and_records_every_served_request(
    tmp_path: Path, own_postgres: EmbeddedPostgres, fake_upstream: FakeUpstream
) -> None:
    env = tollgate_env(
        tmp_path / "state",
        database_url=own_postgres.url,
        upstream_url=fake_upstream.url,
        journal_max_bytes="40000",
        journal_full_policy="reject",
    )
    process = start_up(env)
    try:
        own_postgres.stop()
        load = Load(int(env["TOLLGATE_ENVOY_LISTEN_PORT"])).start()
        deadline = time.monotonic() + 60
        while 503 not in load.answered.values():
            assert time.monotonic() < deadline, "the journal cap was never reached"
            time.sleep(0.2)
        time.sleep(2)  # keep knocking at the full journal
        load.stop()
        statuses = list(load.answered.values())
        served = {i for i, status in load.answered.items() if status != 503}
        own_postgres.start()
        ids, count = wait_for_ledger(own_postgres.url, served, timeout_s=60)
        # With the journal shipped, requests are served again.
        port = int(env["TOLLGATE_ENVOY_LISTEN_PORT"])
        recovered = False
        for _ in range(50):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request(
                "POST",
                "/v1/chat/completions",
                body=BODY,
                headers={"content-type": "application/json"},
            )
            recovered = conn.getresponse().status == 200
            conn.close()
            if recovered:
                break
            time.sleep(0.2)
    finally:
        process.terminate()
    print(f"journal cap: {len(served)} served, {statuses.count(503)} refused 503, {count} rows")
    assert statuses.count(503) >= 2
    assert served
    assert ids == served, "a served request is missing from the ledger (or one was refused)"
    assert count == len(ids)
    assert recovered

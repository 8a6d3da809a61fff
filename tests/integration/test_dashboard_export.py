"""The CSV export of a million rows streams from Postgres with flat memory, and a download
the client abandons halfway stops the query instead of running on (real `tollgate
dashboard` process, real Postgres)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest

from tests.integration.conftest import TollgateProcess
from tollgate.app import run_migrations
from tollgate.localstack import free_port

pytestmark = pytest.mark.integration

ADMIN = "admin-token-for-the-export-test"
ROWS = 1_000_000
# What the dashboard may grow by while it streams ~250 MB of CSV: generous, yet far below
# what holding the rows (or the file) would take.
RSS_GROWTH_LIMIT = 120 * 2**20

_FILL = """
INSERT INTO tollgate.requests (request_id, created_at, end_user_id, key_id, provider, model,
    endpoint, streamed, status_code, outcome, input_tokens, output_tokens, total_tokens,
    cost_usd, latency_ms, tags)
SELECT md5(i::text)::uuid,
       now() - make_interval(secs => i * 0.05),
       'user_' || (i %% 997),
       NULL, 'openai', 'gpt-4o-mini', '/v1/chat/completions', i %% 3 = 0, 200, 'ok',
       100 + i %% 50, 20 + i %% 30, 120 + i %% 50 + i %% 30, (i %% 100) * 0.000001,
       40 + i %% 200,
       ARRAY['prod']
FROM generate_series(1, %s) AS i
"""


@pytest.fixture
def filled(database_url: str) -> str:
    asyncio.run(run_migrations(database_url))
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute(_FILL, (ROWS,))
        conn.execute("VACUUM (ANALYZE) tollgate.requests")
    return database_url


def _env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """This environment without TOLLGATE_* settings, plus ``settings`` (names upper-cased)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    env["TOLLGATE_STATE_DIR"] = str(tmp_path / "state")
    env.update({f"TOLLGATE_{k.upper()}": v for k, v in settings.items()})
    return env


def _dashboard_env(url: str, tmp_path: Path, port: int) -> dict[str, str]:
    return _env(
        tmp_path,
        database_url=url,
        dashboard_address=f"127.0.0.1:{port}",
        dashboard_admin_token=ADMIN,
    )


def _run_dashboard(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tollgate", "dashboard"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@contextlib.contextmanager
def dashboard(url: str, tmp_path: Path) -> Iterator[tuple[int, TollgateProcess]]:
    port = free_port()
    process = TollgateProcess(["dashboard"], _dashboard_env(url, tmp_path, port))
    try:
        process.wait_for_line("dashboard: http://")
        yield port, process
    finally:
        assert process.terminate() == 0


class PeakRss:
    """Samples a process's resident memory from a thread until stopped."""

    def __init__(self, pid: int) -> None:
        self._proc = psutil.Process(pid)
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@contextlib.contextmanager
def _get(port: int, path: str) -> Iterator[http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {ADMIN}"})
        yield conn.getresponse()
    finally:
        conn.close()


def _export_queries(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tollgate-dashboard'"
            " AND state = 'active' AND query LIKE 'COPY%%'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_million_row_export_streams_with_flat_memory(filled: str, tmp_path: Path) -> None:
    with dashboard(filled, tmp_path) as (port, process):
        assert process.proc.pid is not None
        # Warm: the pool, the templates, the first query are in memory before the baseline.
        with _get(port, "/api/v1/requests.csv?user=user_1") as small:
            assert small.status == 200
            small.read()
        baseline = psutil.Process(process.proc.pid).memory_info().rss
        lines = size = 0
        began = time.monotonic()
        with PeakRss(process.proc.pid) as rss, _get(port, "/api/v1/requests.csv") as resp:
            assert resp.status == 200
            assert resp.getheader("Content-Type", "").startswith("text/csv")
            header = resp.readline()
            assert header.startswith(b"request_id,created_at,")
            while chunk := resp.read(1 << 16):
                lines += chunk.count(b"\n")
                size += len(chunk)
        seconds = time.monotonic() - began
        assert lines == ROWS
        assert size > 100 * 2**20  # the CSV is far bigger than what memory may grow by
        growth = rss.peak - baseline
        print(
            f"\n{ROWS:,} rows, {size / 2**20:.0f} MiB in {seconds:.1f}s"
            f" ({ROWS / seconds:,.0f} rows/s); dashboard RSS {baseline / 2**20:.0f} MiB,"
            f" peak +{growth / 2**20:.1f} MiB"
        )
        assert growth < RSS_GROWTH_LIMIT

        # A client that goes away halfway: the COPY stops and the dashboard keeps serving.
        with _get(port, "/api/v1/requests.csv") as resp:
            assert resp.status == 200
            assert len(resp.read(4 << 20)) == 4 << 20
        deadline = time.monotonic() + 20
        while _export_queries(filled) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _export_queries(filled) == 0
        with _get(port, "/api/v1/me") as me:
            assert me.status == 200
            assert b'"role":"admin"' in me.read()


def test_the_dashboard_command_needs_an_address_to_listen_on(
    tmp_path: Path,
) -> None:
    done = _run_dashboard(_env(tmp_path, dashboard_address=""))
    assert done.returncode == 2
    assert "dashboard_address is empty" in done.stderr


def test_the_dashboard_runs_as_a_read_only_role(database_url: str, tmp_path: Path) -> None:
    asyncio.run(run_migrations(database_url))
    role = f"dash_ro_{os.getpid()}"
    info = psycopg.conninfo.conninfo_to_dict(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'read-only-pw'")
        conn.execute(f'GRANT CONNECT ON DATABASE "{info["dbname"]}" TO {role}')
        conn.execute(f"GRANT USAGE ON SCHEMA tollgate TO {role}")
        conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA tollgate TO {role}")
    read_only = psycopg.conninfo.make_conninfo(database_url, user=role, password="read-only-pw")
    try:
        with dashboard(read_only, tmp_path) as (port, _), _get(port, "/api/v1/requests") as resp:
            assert resp.status == 200
            assert resp.read().startswith(b'{"data":[]')
        # A migration pending, and a role that may not apply it: a clear refusal, not a crash.
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("DELETE FROM tollgate.schema_migrations WHERE version = 9")
        done = _run_dashboard(_dashboard_env(read_only, tmp_path, free_port()))
        assert done.returncode == 2, done.stderr
        assert "009_dashboard" in done.stderr
        assert "tollgate migrate" in done.stderr
        assert "read-only-pw" not in done.stderr + done.stdout
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")

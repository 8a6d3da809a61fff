"""Integration fixtures: the real `tollgate up` process (Envoy from the wheel, real gRPC) and a
recording fake upstream, both as child processes; the ledger on the session's real Postgres."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from tollgate.localstack import EmbeddedPostgres, FakeProviderProcess, free_port


@dataclass
class FakeUpstream:
    process: FakeProviderProcess

    @property
    def url(self) -> str:
        return self.process.url

    def recorded(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/_fake/requests", timeout=5) as r:
            return json.loads(r.read())

    def clear(self) -> None:
        req = urllib.request.Request(self.url + "/_fake/requests", method="DELETE")
        with urllib.request.urlopen(req, timeout=5):
            pass


@contextlib.contextmanager
def started_fake_upstream(log_path: Path) -> Iterator[FakeUpstream]:
    """The fake provider as a child process on a free port, stopped at the end."""
    fake = FakeProviderProcess(free_port(), log_path=log_path)
    fake.start()
    try:
        yield FakeUpstream(fake)
    finally:
        fake.stop()


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A Postgres server of the test's own, for tests that stop and start it."""
    root = tmp_path / "pg"
    root.mkdir()
    os.chmod(root, 0o755)
    server = EmbeddedPostgres(root / "data", log_path=root / "postgres.log")
    server.start()
    yield server
    server.stop()
    server.remove_data()


@pytest.fixture
def fake_upstream(tmp_path: Path) -> Iterator[FakeUpstream]:
    with started_fake_upstream(tmp_path / "fake.log") as upstream:
        yield upstream


class TollgateProcess:
    """`python -m tollgate <command>` as a child, with its stdout lines readable as they come."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tollgate", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for_line(self, needle: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if needle in self.lines.get(timeout=0.2):
                    return
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
        raise AssertionError(f"never saw {needle!r}; output:\n{''.join(self.output)}")

    def terminate(self, timeout_s: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise
        finally:
            self._reader.join(5)
            assert self.proc.stdout is not None
            self.proc.stdout.close()


@dataclass
class RunningTollgate:
    process: TollgateProcess
    envoy_url: str
    env: dict[str, str]
    state_dir: Path


def tollgate_env(state_dir: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    env.update(
        TOLLGATE_STATE_DIR=str(state_dir),
        TOLLGATE_GRPC_ADDRESS=f"127.0.0.1:{free_port()}",
        TOLLGATE_METRICS_ADDRESS=f"127.0.0.1:{free_port()}",
        TOLLGATE_ENVOY_LISTEN_PORT=str(free_port()),
        TOLLGATE_DASHBOARD_ADDRESS="",  # tests that need the dashboard ask for it
        TOLLGATE_ENVOY_ADMIN_PORT="0",
    )
    env.update({f"TOLLGATE_{k.upper()}": v for k, v in settings.items()})
    return env


def wait_for_rows(
    url: str, where: str, params: tuple[Any, ...], count: int, timeout_s: float
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(url, row_factory=dict_row) as conn:
        while True:
            rows = conn.execute(
                f"SELECT * FROM tollgate.requests WHERE {where} ORDER BY created_at", params
            ).fetchall()
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)


def row_for(database_url: str, request_id: str, timeout_s: float = 5) -> dict[str, Any]:
    """The ledger row of one request, waiting up to ``timeout_s`` for the writer."""
    rows = wait_for_rows(database_url, "request_id = %s", (request_id,), 1, timeout_s=timeout_s)
    assert len(rows) == 1, f"request {request_id}: {len(rows)} rows"
    return rows[0]


@contextlib.contextmanager
def running_tollgate(
    state_dir: Path,
    database_url: str,
    upstream: FakeUpstream,
    extra_env: dict[str, str] | None = None,
    **settings: str,
) -> Iterator[RunningTollgate]:
    """`tollgate up` against ``upstream`` with extra settings (and environment variables),
    stopped at the end."""
    env = tollgate_env(state_dir, database_url=database_url, upstream_url=upstream.url, **settings)
    env.update(extra_env or {})
    process = TollgateProcess(["up"], env)
    try:
        process.wait_for_line("tollgate is ready")
        yield RunningTollgate(
            process, f"http://127.0.0.1:{env['TOLLGATE_ENVOY_LISTEN_PORT']}/v1", env, state_dir
        )
    finally:
        process.terminate()


def tollgate_command(env: dict[str, str], *args: str) -> str:
    """Run a one-shot `tollgate` command with ``env``; its stdout (fails on a non-zero exit)."""
    done = subprocess.run(
        [sys.executable, "-m", "tollgate", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"tollgate {' '.join(args)}: {done.stderr}"
    return done.stdout


def create_key(env: dict[str, str], name: str, *options: str) -> tuple[str, str]:
    """(plaintext, key_id) of a new gateway key made with `tollgate keys create`."""
    made = json.loads(
        tollgate_command(env, "keys", "create", "--name", name, "--format", "json", *options)
    )
    return made["key"], made["key_id"]


@pytest.fixture
def tollgate_up(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream
) -> Iterator[RunningTollgate]:
    """`tollgate up` against the fake upstream, ledger in a fresh database."""
    with running_tollgate(tmp_path / "state", database_url, fake_upstream) as running:
        yield running

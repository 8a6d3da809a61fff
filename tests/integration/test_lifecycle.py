"""Process lifecycle: `up` stops everything on SIGTERM, leaves nothing on SIGKILL; `demo` runs
from nothing to a per-user table and leaves no process behind; Envoy fails closed; a teardown
that fails does not skip the others, and stopping twice is harmless."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.integration.conftest import FakeUpstream, TollgateProcess, tollgate_env
from tollgate.app import Stack, StackOptions
from tollgate.config import load_settings
from tollgate.envoyconf import render_yaml
from tollgate.localstack import EmbeddedPostgres, EnvoyProcess, free_port

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _remove_embedded_data(tmp_path: Path) -> Iterator[None]:
    """As root the embedded Postgres keeps its data outside tmp_path: remove it after each test."""
    yield
    for state in ("state", "demo-state"):
        data = tmp_path / state / "pgdata"
        if data.is_symlink():
            EmbeddedPostgres(data).remove_data()


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    _gone, alive = psutil.wait_procs(procs, timeout=timeout_s)
    return alive


def processes_using(path: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any(str(path) in part for part in cmdline):
            found.append(proc)
    return found


def start_up_with_embedded_postgres(tmp_path: Path, fake: FakeUpstream) -> TollgateProcess:
    env = tollgate_env(tmp_path / "state", upstream_url=fake.url)
    process = TollgateProcess(["up"], env)
    process.wait_for_line("tollgate is ready", timeout_s=90)
    return process


def kinds(procs: list[psutil.Process]) -> set[str]:
    names = set()
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            names.add(p.name())
    return names


def test_sigterm_stops_envoy_postgres_and_extproc_within_10s(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    up = start_up_with_embedded_postgres(tmp_path, fake_upstream)
    children = descendants(up.proc.pid)
    assert {"envoy", "postgres"} <= kinds(children), kinds(children)
    began = time.monotonic()
    up.proc.send_signal(signal.SIGTERM)
    assert up.terminate(timeout_s=10) == 0
    alive = wait_gone(children, timeout_s=max(0.0, 10 - (time.monotonic() - began)))
    elapsed = time.monotonic() - began
    assert alive == [], f"still running after {elapsed:.1f}s: {alive}"
    assert elapsed < 10
    assert processes_using(tmp_path / "state") == []


def test_sigkill_leaves_no_orphans(tmp_path: Path, fake_upstream: FakeUpstream) -> None:
    up = start_up_with_embedded_postgres(tmp_path, fake_upstream)
    children = descendants(up.proc.pid)
    up.proc.kill()
    up.proc.wait(5)
    assert wait_gone(children, timeout_s=10) == []
    up.terminate()


def test_envoy_fails_closed_when_tollgate_is_down(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    dead_port = free_port()  # nothing listens here: Tollgate is "down"
    settings = load_settings(
        environ={},
        grpc_address=f"127.0.0.1:{dead_port}",
        envoy_listen_port=free_port(),
        envoy_admin_port=0,
        upstream_url=fake_upstream.url,
    )
    config = tmp_path / "envoy.yaml"
    config.write_text(render_yaml(settings))
    envoy = EnvoyProcess(config, log_path=tmp_path / "envoy.log")
    envoy.start()
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{settings.envoy_listen_port}/v1/chat/completions",
            data=b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}',
            headers={"content-type": "application/json", "x-tollgate-user-id": "u1"},
        )
        with pytest.raises(urllib.error.HTTPError) as failure:
            urllib.request.urlopen(request, timeout=10)
        assert failure.value.code >= 500
        failure.value.close()
    finally:
        envoy.stop()
    recorded = fake_upstream.recorded()
    assert recorded["requests"] == []
    assert recorded["connections"] == 0


def test_demo_from_nothing(tmp_path: Path) -> None:
    state = tmp_path / "demo-state"
    env = tollgate_env(state, dashboard_address=f"127.0.0.1:{free_port()}")
    result = subprocess.run(  # the 3-minute budget of the quick start is the timeout
        [sys.executable, "-m", "tollgate", "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = {
        m.group(1): (
            int(m.group(2)),
            int(m.group(3).replace(",", "")),
            int(m.group(4).replace(",", "")),
        )
        for m in re.finditer(
            r"^(\w+)\s+(\d+)\s+([\d,]+)\s+([\d,]+)\s+[\d,]+\s+\$[\d.]+$", result.stdout, re.M
        )
    }
    assert set(table) >= {"alice", "bob", "carol"}, result.stdout
    assert all(inp > 0 and out > 0 for _req, inp, out in table.values())
    assert [table[u][0] for u in ("alice", "bob", "carol")] == [3, 2, 1]
    assert re.search(r"^\(none\)\s+1\s", result.stdout, re.M), result.stdout
    # The demo ran the dashboard and said where; not waiting (no terminal), it stopped it.
    shown = re.search(
        r"^Dashboard: (http://127\.0\.0\.1:\d+/) \(the admin token is in (.+)\)$",
        result.stdout,
        re.M,
    )
    assert shown, result.stdout
    assert Path(shown.group(2)).read_text().strip()
    time.sleep(0.5)
    assert processes_using(state) == []
    # The ledger outlives the demo: `tollgate usage` reads it back from the embedded server.
    usage = subprocess.run(
        [sys.executable, "-m", "tollgate", "usage", "--by-user", "--format", "csv"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert usage.returncode == 0, usage.stderr
    lines = usage.stdout.splitlines()
    assert lines[0] == "end_user_id,requests,input_tokens,output_tokens,total_tokens,cost_usd"
    assert {line.split(",")[0] for line in lines[1:]} == {"alice", "bob", "carol", ""}
    assert processes_using(state) == []


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


async def test_a_failing_teardown_does_not_skip_the_rest_and_stop_twice_is_harmless(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage_port = free_port()
    settings = load_settings(
        environ={},
        state_dir=tmp_path / "state",
        database_url=database_url,
        grpc_address="127.0.0.1:0",
        metrics_address="",
        usage_service_address=f"127.0.0.1:{usage_port}",
        usage_service_token="t0ken",
    )
    stack = Stack(settings, StackOptions(run_envoy=False))
    await stack.start()
    pool, grpc_port = stack.pool, stack.grpc_port
    assert port_open(grpc_port)
    assert port_open(usage_port)
    calls: list[str] = []

    async def broken_writer_close(timeout_s: float = 5.0) -> None:
        calls.append("writer")
        raise RuntimeError("injected: the writer failed to drain")

    monkeypatch.setattr(stack.writer, "close", broken_writer_close)
    await stack.stop()
    # The writer's teardown raised; the pool (registered before it) was still closed, and
    # both gRPC listeners (registered after it) are gone.
    assert calls == ["writer"]
    assert pool.closed
    assert not port_open(grpc_port)
    assert not port_open(usage_port)
    await stack.stop()
    assert calls == ["writer"]  # nothing ran twice


async def test_a_start_that_fails_halfway_stops_what_started(
    tmp_path: Path, database_url: str
) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        settings = load_settings(
            environ={},
            state_dir=tmp_path / "state",
            database_url=database_url,
            grpc_address="127.0.0.1:0",
            metrics_address="",
            usage_service_address=f"127.0.0.1:{busy.getsockname()[1]}",
            usage_service_token="t0ken",
        )
        stack = Stack(settings, StackOptions(run_envoy=False))
        with pytest.raises(OSError, match="cannot listen"):
            await stack.start()
        assert stack.grpc_port
        assert not port_open(stack.grpc_port)
    finally:
        busy.close()

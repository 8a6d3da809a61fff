"""Graceful rollout: SIGTERM under steady streaming load loses no stream and no record.

16 streams of about 5 s each run through Envoy when `tollgate serve` (beside an Envoy of its
own, as in a pod) or `tollgate up` (which stops its own Envoy only after the streams drained)
gets SIGTERM. Every stream that started before the signal must finish whole, a stream opened
during ``shutdown_delay_s`` is still served, readiness turns 503 at once, the process exits 0
within its grace, and each request is in the ledger exactly once.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.conftest import FakeUpstream, TollgateProcess, tollgate_env
from tollgate.config import load_settings
from tollgate.envoyconf import render_yaml
from tollgate.localstack import EnvoyProcess, free_port

pytestmark = pytest.mark.integration

STREAMS = 16
CHUNK_DELAY_MS = 400  # the fake provider's reply has 13 events: ~5 s a stream
DELAY_S = 2
GRACE_S = 30


def readyz(metrics_address: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{metrics_address}/readyz", timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def grpc_health(address: str) -> int:
    """The overall status Tollgate's gRPC health service reports (what Envoy or a gRPC
    probe sees)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status)


async def stream_once(client: openai.AsyncOpenAI, user: str) -> str:
    stream = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "tell me a long story"}],
        stream=True,
        extra_headers={"x-tollgate-user-id": user, "x-fake-chunk-delay-ms": str(CHUNK_DELAY_MS)},
    )
    text = []
    finished = None
    async for chunk in stream:
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finished = choice.finish_reason or finished
    assert finished == "stop", f"{user}: stream ended without finish_reason"
    return "".join(text)


async def load_and_signal(
    base_url: str, proc: TollgateProcess, metrics_address: str, grpc_address: str
) -> tuple[list[str | BaseException], str | BaseException, tuple[int, int], float]:
    """Start the streams, SIGTERM ``proc`` mid-way, open one more stream during the delay;
    the results, the late stream's, /readyz and gRPC health right after the signal, and when
    it was sent."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-test", max_retries=0, timeout=60)
    streams = [asyncio.create_task(stream_once(client, f"user-{i}")) for i in range(STREAMS)]
    await asyncio.sleep(1.5)  # all streams are under way (first chunks arrived)
    signalled = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    status = await asyncio.to_thread(readyz, metrics_address)
    health = await asyncio.to_thread(grpc_health, grpc_address)
    late = asyncio.create_task(stream_once(client, "user-late"))
    results = await asyncio.gather(*streams, return_exceptions=True)
    late_result = (await asyncio.gather(late, return_exceptions=True))[0]
    await client.close()
    return results, late_result, (status, health), signalled


def check_rollout(
    proc: TollgateProcess, base_url: str, env: dict[str, str], database_url: str
) -> None:
    results, late, (ready_status, health), signalled = asyncio.run(
        load_and_signal(
            base_url, proc, env["TOLLGATE_METRICS_ADDRESS"], env["TOLLGATE_GRPC_ADDRESS"]
        )
    )
    failed = [r for r in results if isinstance(r, BaseException)]
    assert failed == [], f"{len(failed)} of {STREAMS} streams cut: {failed[:3]}"
    assert all(isinstance(r, str) and len(r) > 20 for r in results)
    assert isinstance(late, str), f"a stream opened during the delay was refused: {late!r}"
    assert ready_status == 503, "readiness did not turn 503 at SIGTERM"
    assert health == health_pb2.HealthCheckResponse.NOT_SERVING
    code = proc.terminate(timeout_s=DELAY_S + GRACE_S + 15)
    elapsed = time.monotonic() - signalled
    assert code == 0, "".join(proc.output[-30:])
    assert elapsed < DELAY_S + GRACE_S + 10, f"exit took {elapsed:.1f}s"
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT end_user_id, count(*), min(outcome), min(output_tokens)"
            " FROM tollgate.requests GROUP BY end_user_id ORDER BY end_user_id"
        ).fetchall()
    users = {f"user-{i}" for i in range(STREAMS)} | {"user-late"}
    assert {r[0] for r in rows} == users
    for user, count, outcome, output_tokens in rows:
        assert count == 1, f"{user} recorded {count} times"
        assert outcome == "ok", f"{user}: {outcome}"
        assert output_tokens is not None, user
        assert output_tokens > 0, user


def rollout_env(tmp_path: Path, database_url: str, fake: FakeUpstream) -> dict[str, str]:
    return tollgate_env(
        tmp_path / "state",
        database_url=database_url,
        upstream_url=fake.url,
        shutdown_delay_s=str(DELAY_S),
        shutdown_grace_s=str(GRACE_S),
    )


@pytest.fixture
def envoy_for(tmp_path: Path) -> Iterator[list[EnvoyProcess]]:
    started: list[EnvoyProcess] = []
    yield started
    for envoy in started:
        envoy.stop()


def test_sigterm_to_serve_drains_streams_and_ledger(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream, envoy_for: list[EnvoyProcess]
) -> None:
    env = rollout_env(tmp_path, database_url, fake_upstream)
    settings = load_settings(environ=env)
    config = tmp_path / "envoy.yaml"
    config.write_text(render_yaml(settings, "local"))
    envoy = EnvoyProcess(config, log_path=tmp_path / "envoy.log")
    envoy_for.append(envoy)
    proc = TollgateProcess(["serve"], env)
    try:
        proc.wait_for_line("tollgate is ready", timeout_s=60)
        envoy.start()  # the pod's Envoy: it stays up while Tollgate drains
        base_url = f"http://127.0.0.1:{settings.envoy_listen_port}/v1"
        check_rollout(proc, base_url, env, database_url)
    finally:
        if proc.proc.poll() is None:
            proc.terminate()


def test_sigterm_to_up_stops_its_envoy_after_the_streams(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream
) -> None:
    env = rollout_env(tmp_path, database_url, fake_upstream)
    proc = TollgateProcess(["up"], env)
    try:
        proc.wait_for_line("tollgate is ready", timeout_s=60)
        base_url = f"http://127.0.0.1:{env['TOLLGATE_ENVOY_LISTEN_PORT']}/v1"
        check_rollout(proc, base_url, env, database_url)
    finally:
        if proc.proc.poll() is None:
            proc.terminate()


def listener_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return False
    return True


def test_envoy_drain_command_drains_a_real_envoy(
    tmp_path: Path, envoy_for: list[EnvoyProcess]
) -> None:
    """`tollgate envoy-drain` (the gateway's preStop hook) against a real, idle Envoy: the
    command exits 0 at once (nothing in flight), and Envoy closes its listener once its drain
    time (1 s here) is over."""
    settings = load_settings(environ={}, envoy_listen_port=free_port(), envoy_admin_port=0)
    config = tmp_path / "envoy.yaml"
    config.write_text(render_yaml(settings, "local"))
    envoy = EnvoyProcess(config, log_path=tmp_path / "envoy.log")
    envoy_for.append(envoy)
    envoy.start(drain_time_s=1)
    assert listener_open(settings.envoy_listen_port)
    admin = envoy.admin_url().removeprefix("http://")
    command = [sys.executable, "-m", "tollgate", "envoy-drain", "--admin-address", admin]
    done = subprocess.run(
        [*command, "--timeout-s", "5"], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "envoy drained" in done.stdout
    deadline = time.monotonic() + 10
    while listener_open(settings.envoy_listen_port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not listener_open(settings.envoy_listen_port), "Envoy never closed its listener"
    assert envoy.running(), "the drain stopped Envoy instead of draining it"

"""Who can reach which gRPC listener of a real `tollgate serve` / `tollgate up`: ext_proc and
health only on the ext_proc listener (owner-only unix socket, or mutual TLS that real Envoy
passes and a client without a certificate does not), UsageService on its own listener behind
a bearer token, and no start at all on a non-loopback address without TLS."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.integration.conftest import FakeUpstream, TollgateProcess, running_tollgate, tollgate_env
from tests.tls_support import make_ca
from tollgate.localstack import free_port
from tollgate.v1 import usage_pb2, usage_pb2_grpc

pytestmark = pytest.mark.integration

TOKEN = "usage-token-for-the-test-0123456789"


def summarize(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> list[str]:
    stub = usage_pb2_grpc.UsageServiceStub(channel)
    reply = stub.SummarizeUsers(usage_pb2.SummarizeUsersRequest(), metadata=metadata, timeout=10)
    return [u.end_user_id for u in reply.users]


def health(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status)


def test_usage_service_is_on_its_own_listener_behind_a_token(
    tmp_path: Path, database_url: str
) -> None:
    socket_dir = tmp_path / "sock"
    socket_dir.mkdir()
    socket_dir.chmod(0o755)  # the socket itself must be owner-only, whatever its directory
    sock = socket_dir / "extproc.sock"
    token_file = tmp_path / "usage-token"
    token_file.write_text(TOKEN + "\n")
    usage_port = free_port()
    # The ledger URL in the keyword form with its password: it must never be printed.
    keyword_dsn = make_conninfo(**conninfo_to_dict(database_url))
    password = str(conninfo_to_dict(database_url)["password"])
    assert "password=" in keyword_dsn
    env = tollgate_env(
        tmp_path / "state",
        database_url=keyword_dsn,
        grpc_address=f"unix:{sock}",
        usage_service_address=f"127.0.0.1:{usage_port}",
        usage_service_token_file=str(token_file),
        log_level="debug",
    )
    serve = TollgateProcess(["serve"], env)
    try:
        serve.wait_for_line("tollgate is ready")
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600

        with grpc.insecure_channel(f"unix:{sock}") as extproc:
            assert health(extproc) == health_pb2.HealthCheckResponse.SERVING
            for metadata in ((), (("authorization", f"Bearer {TOKEN}"),)):
                with pytest.raises(grpc.RpcError) as absent:
                    summarize(extproc, metadata)
                assert absent.value.code() == grpc.StatusCode.UNIMPLEMENTED

        with grpc.insecure_channel(f"127.0.0.1:{usage_port}") as usage:
            for metadata in ((), (("authorization", "Bearer not-the-token"),)):
                with pytest.raises(grpc.RpcError) as refused:
                    summarize(usage, metadata)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert summarize(usage, (("authorization", f"Bearer {TOKEN}"),)) == []
    finally:
        assert serve.terminate() == 0
    output = "".join(serve.output)
    assert "password=***" in output, output
    assert password not in output


def run_serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tollgate", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_serve_refuses_a_non_loopback_address_without_tls(
    tmp_path: Path, database_url: str
) -> None:
    done = run_serve(
        tollgate_env(tmp_path / "state", database_url=database_url, grpc_address="0.0.0.0:0")
    )
    assert done.returncode != 0
    assert "grpc_address '0.0.0.0:0' is reachable from other hosts" in done.stderr
    for name in ("grpc_tls_cert_file", "grpc_tls_key_file", "grpc_tls_client_ca_file"):
        assert name in done.stderr
    assert "tollgate is ready" not in done.stdout


def test_serve_refuses_a_usage_listener_without_a_token(tmp_path: Path, database_url: str) -> None:
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    base = tollgate_env(tmp_path / "state", database_url=database_url)
    no_token = run_serve({**base, "TOLLGATE_USAGE_SERVICE_ADDRESS": f"127.0.0.1:{free_port()}"})
    assert no_token.returncode != 0
    assert "usage_service_token_file" in no_token.stderr
    empty_file = run_serve(
        {
            **base,
            "TOLLGATE_USAGE_SERVICE_ADDRESS": f"127.0.0.1:{free_port()}",
            "TOLLGATE_USAGE_SERVICE_TOKEN_FILE": str(empty),
        }
    )
    assert empty_file.returncode != 0
    assert "usage_service_token_file is empty" in empty_file.stderr


def test_envoy_reaches_tollgate_over_mutual_tls_and_a_client_without_a_certificate_cannot(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream
) -> None:
    ca = make_ca(tmp_path)
    server_cert, server_key = ca.issue(["localhost", "127.0.0.1"], tmp_path)
    client_cert, client_key = ca.issue(["envoy"], tmp_path, client=True)
    grpc_port = free_port()
    settings = {
        "grpc_address": f"127.0.0.1:{grpc_port}",
        "grpc_tls_cert_file": str(server_cert),
        "grpc_tls_key_file": str(server_key),
        "grpc_tls_client_ca_file": str(ca.cert_path),
        "envoy_grpc_client_cert_file": str(client_cert),
        "envoy_grpc_client_key_file": str(client_key),
        "envoy_grpc_ca_file": str(ca.cert_path),
        "envoy_grpc_server_name": "localhost",
    }
    with running_tollgate(tmp_path / "state", database_url, fake_upstream, **settings) as up:
        assert "(mutual TLS)" in "".join(up.process.output)
        request = urllib.request.Request(
            up.envoy_url + "/chat/completions",
            data=json.dumps(
                {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
            ).encode(),
            headers={"content-type": "application/json", "x-tollgate-user-id": "mtls-user"},
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            assert reply.status == 200
            request_id = reply.headers["x-tollgate-request-id"]
        assert len(fake_upstream.recorded()["requests"]) == 1

        ca_pem = ca.cert_path.read_bytes()
        override = (("grpc.ssl_target_name_override", "localhost"),)
        target = f"127.0.0.1:{grpc_port}"
        no_cert = grpc.ssl_channel_credentials(root_certificates=ca_pem)
        with grpc.secure_channel(target, no_cert, options=override) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                health(channel)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(target) as plaintext:
            with pytest.raises(grpc.RpcError) as refused:
                health(plaintext)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=ca_pem,
            private_key=client_key.read_bytes(),
            certificate_chain=client_cert.read_bytes(),
        )
        with grpc.secure_channel(target, with_cert, options=override) as channel:
            assert health(channel) == health_pb2.HealthCheckResponse.SERVING

    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT end_user_id, outcome FROM tollgate.requests WHERE request_id = %s",
            (request_id,),
        ).fetchone()
    assert row == ("mtls-user", "ok")

"""The Kubernetes pod's wiring, run here for real: the Envoy bootstrap and the tollgate.toml
that the manifests put in the `tollgate-config` ConfigMap, with only their paths mapped to a
temporary directory and their ports to free ones (nothing else changed), a real Envoy and a
real `tollgate serve` talking over the unix socket, and SDK traffic (plain and streamed)
through Envoy into the ledger.

What the pod does and this test cannot: two containers with the same UID sharing an
in-memory emptyDir; here both processes run as the test's user in one directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml

from tests.integration.conftest import FakeUpstream, TollgateProcess, wait_for_rows
from tests.integration.test_rollout import readyz
from tollgate.localstack import EnvoyProcess, free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent.parent
BASE = REPO / "deploy" / "kubernetes" / "base"
SIDECAR = REPO / "deploy" / "kubernetes" / "overlays" / "sidecar"

SOCKET_DIR = "/run/tollgate"
STATE_DIR = "/var/lib/tollgate"
ENVOY_PORT = 10000
ADMIN_PORT = 9901
METRICS_ADDRESS = "0.0.0.0:9464"
USER = "k8s-wiring-user"


def manifest_files() -> tuple[str, str, str]:
    """(envoy bootstrap, tollgate.toml, where they came from): from the ConfigMap the sidecar
    overlay renders when kubectl is there, else the base's files (byte-identical to the
    ConfigMap's data, tests/unit/test_kustomize.py checks)."""
    if shutil.which("kubectl"):
        done = subprocess.run(
            ["kubectl", "kustomize", str(SIDECAR)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        (cm,) = [
            d
            for d in yaml.safe_load_all(done.stdout)
            if d
            and d["kind"] == "ConfigMap"
            and d["metadata"]["name"].startswith("tollgate-config")
        ]
        data = cm["data"]
        return data["envoy-kubernetes.yaml"], data["tollgate.toml"], "rendered ConfigMap"
    return (
        (BASE / "envoy-kubernetes.yaml").read_text(encoding="utf-8"),
        (BASE / "tollgate.toml").read_text(encoding="utf-8"),
        "deploy/kubernetes/base",
    )


def mapped(text: str, replacements: dict[str, str]) -> str:
    """``text`` with each key replaced by its value; every key must occur exactly once."""
    for old, new in replacements.items():
        assert text.count(old) == 1, f"expected {old!r} exactly once"
        text = text.replace(old, new)
    return text


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a unix socket path must fit in 108 bytes, which pytest's
    tmp_path does not promise."""
    path = Path(tempfile.mkdtemp(prefix="tg-k8s-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_pod_wiring_serves_sdk_traffic_into_the_ledger(
    tmp_path: Path, short_dir: Path, database_url: str, fake_upstream: FakeUpstream
) -> None:
    envoy_yaml, toml, source = manifest_files()
    assert f"path: {SOCKET_DIR}/extproc.sock" in envoy_yaml, (
        f"the kubernetes bootstrap ({source}) does not reach ext_proc on the unix socket"
    )
    listen_port, admin_port, metrics_port = free_port(), free_port(), free_port()
    socket_dir = short_dir / "run"
    socket_dir.mkdir()
    state_dir = tmp_path / "state"
    envoy_config = tmp_path / "envoy.yaml"
    envoy_config.write_text(
        mapped(
            envoy_yaml,
            {
                f"{SOCKET_DIR}/": f"{socket_dir}/",
                f"port_value: {ENVOY_PORT}\n": f"port_value: {listen_port}\n",
                f"port_value: {ADMIN_PORT}\n": f"port_value: {admin_port}\n",
            },
        ),
        encoding="utf-8",
    )
    metrics_address = f"127.0.0.1:{metrics_port}"
    config = tmp_path / "tollgate.toml"
    config.write_text(
        mapped(
            toml,
            {
                f'"unix:{SOCKET_DIR}/': f'"unix:{socket_dir}/',
                f'"{STATE_DIR}"': f'"{state_dir}"',
                f'"{METRICS_ADDRESS}"': f'"{metrics_address}"',
            },
        ),
        encoding="utf-8",
    )
    # What the container gets besides the TOML: TOLLGATE_CONFIG and, from the Secret, the
    # database URL; the upstream points at the fake provider instead of api.openai.com.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    env.update(
        TOLLGATE_CONFIG=str(config),
        TOLLGATE_DATABASE_URL=database_url,
        TOLLGATE_UPSTREAM_URL=fake_upstream.url,
    )
    socket_path = socket_dir / "extproc.sock"

    # Start order of the native sidecars: Tollgate, then (once it is ready) Envoy.
    tollgate = TollgateProcess(["serve"], env)
    envoy = EnvoyProcess(envoy_config, log_path=tmp_path / "envoy.log")
    try:
        tollgate.wait_for_line("tollgate is ready", timeout_s=60)
        mode = os.stat(socket_path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600, f"socket mode {oct(stat.S_IMODE(mode))}"
        assert http_status(f"http://{metrics_address}/healthz") == 200
        assert readyz(metrics_address) == 200
        envoy.start()

        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{listen_port}/v1",
            api_key="sk-app-own-key",
            default_headers={"x-tollgate-user-id": USER},
            max_retries=0,
            timeout=30,
        )
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello from a pod"}]
        )
        completion = raw.parse()
        assert completion.choices[0].message.content
        plain_id = raw.headers["x-tollgate-request-id"]
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "stream from a pod"}],
            stream=True,
        )
        text = "".join(choice.delta.content or "" for chunk in stream for choice in chunk.choices)
        assert text

        rows = wait_for_rows(database_url, "end_user_id = %s", (USER,), 2, timeout_s=15)
        assert len(rows) == 2, rows
        assert [r["streamed"] for r in rows] == [False, True]
        assert str(rows[0]["request_id"]) == plain_id
        for row in rows:
            assert row["outcome"] == "ok"
            assert row["identity_source"] == "header"
            assert row["output_tokens"]
            assert row["output_tokens"] > 0
        for seen in fake_upstream.recorded()["requests"]:
            names = {name for name, _ in seen["headers"]}
            assert "x-tollgate-user-id" not in names

        # SIGTERM (what the kubelet sends): not ready at once, then a clean exit.
        signalled = time.monotonic()
        tollgate.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert readyz(metrics_address) == 503
        code = tollgate.terminate(timeout_s=45)
        assert code == 0, "".join(tollgate.output[-30:])
        assert time.monotonic() - signalled < 45
    finally:
        envoy.stop()
        if tollgate.proc.poll() is None:
            tollgate.terminate()

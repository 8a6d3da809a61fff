"""HTTPS upstreams through Envoy's dynamic forward proxy: the certificate is verified against
``upstream_ca_file`` for the host Tollgate picked, a wrong one fails closed (never plaintext),
and a client cannot pick the upstream itself."""

from __future__ import annotations

import contextlib
import json
import ssl
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.integration.conftest import (
    FakeUpstream,
    RunningTollgate,
    running_tollgate,
    wait_for_rows,
)
from tests.tls_support import CA, make_ca
from tollgate.localstack import FakeProviderProcess, free_port

pytestmark = pytest.mark.integration

ROUTING_HEADERS = {"x-tollgate-upstream-host", "x-tollgate-upstream-scheme"}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello over TLS."}]}


@dataclass
class TlsFakeUpstream(FakeUpstream):
    """A fake upstream serving HTTPS only; its control endpoints are read over verified TLS."""

    ssl_context: ssl.SSLContext

    def recorded(self) -> dict[str, Any]:
        with urllib.request.urlopen(
            self.url + "/_fake/requests", timeout=5, context=self.ssl_context
        ) as r:
            return json.loads(r.read())

    def clear(self) -> None:
        req = urllib.request.Request(self.url + "/_fake/requests", method="DELETE")
        with urllib.request.urlopen(req, timeout=5, context=self.ssl_context):
            pass


@contextlib.contextmanager
def tls_fake_upstream(tmp_path: Path, ca: CA, names: list[str]) -> Iterator[TlsFakeUpstream]:
    """An HTTPS fake upstream on ``https://localhost:<port>`` with a certificate for ``names``."""
    cert, key = ca.issue(names, tmp_path)
    process = FakeProviderProcess(
        free_port(), log_path=tmp_path / f"fake-{names[0]}.log", tls_cert=cert, tls_key=key
    )
    # The test itself trusts the test CA; it checks the name only when the cert is for localhost.
    context = ssl.create_default_context(cafile=str(ca.cert_path))
    context.check_hostname = "localhost" in names
    process.start()
    try:
        yield TlsFakeUpstream(process, context)
    finally:
        process.stop()


@pytest.fixture
def test_ca(tmp_path: Path) -> CA:
    return make_ca(tmp_path)


def envoy_stats(running: RunningTollgate, prefix: str) -> dict[str, int]:
    """Envoy's counters and gauges whose names start with ``prefix``, from its admin API."""
    admin = (running.state_dir / "envoy-admin-address").read_text().strip()
    with urllib.request.urlopen(f"http://{admin}/stats?format=json", timeout=5) as r:
        stats = json.loads(r.read())["stats"]
    return {
        s["name"]: s["value"]
        for s in stats
        if "value" in s and isinstance(s["value"], int) and s["name"].startswith(prefix)
    }


def client(running: RunningTollgate, user: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=running.envoy_url,
        api_key="sk-app-own-key",
        default_headers={"x-tollgate-user-id": user},
        max_retries=0,
    )


def test_verified_https_upstream_serves_the_sdk(
    tmp_path: Path, database_url: str, test_ca: CA
) -> None:
    with (
        tls_fake_upstream(tmp_path, test_ca, ["localhost"]) as upstream,
        running_tollgate(
            tmp_path / "state", database_url, upstream, upstream_ca_file=str(test_ca.cert_path)
        ) as running,
    ):
        assert upstream.url.startswith("https://localhost:")
        with client(running, "tls-user") as sdk:
            raw = sdk.chat.completions.with_raw_response.create(**CHAT)
        assert raw.status_code == 200
        completion = raw.parse()
        assert completion.choices[0].message.content

        (seen,) = upstream.recorded()["requests"]
        headers = dict(seen["headers"])
        assert seen["path"] == "/v1/chat/completions"
        assert headers["host"] == upstream.url.removeprefix("https://")
        assert not set(headers) & ROUTING_HEADERS, "routing headers reached the upstream"

        (row,) = wait_for_rows(database_url, "end_user_id = %s", ("tls-user",), 1, timeout_s=5)
        assert row["status_code"] == 200
        assert row["outcome"] == "ok"
        assert completion.usage is not None
        assert row["output_tokens"] == completion.usage.completion_tokens


def test_certificate_for_another_name_fails_closed(
    tmp_path: Path, database_url: str, test_ca: CA
) -> None:
    # Same CA, so the chain verifies; only the name (other.example, not localhost) is wrong.
    with (
        tls_fake_upstream(tmp_path, test_ca, ["other.example"]) as upstream,
        running_tollgate(
            tmp_path / "state", database_url, upstream, upstream_ca_file=str(test_ca.cert_path)
        ) as running,
    ):
        with client(running, "tls-user") as sdk, pytest.raises(openai.APIStatusError) as failure:
            sdk.chat.completions.create(**CHAT)
        assert failure.value.status_code >= 500

        # Nothing reached the upstream: not over TLS, and no plain-HTTP request either (the
        # fake records every request it can parse, and a plaintext one would be a request).
        recorded = upstream.recorded()
        assert recorded["requests"] == []
        assert recorded["connections"] == 0
        # Envoy did try TLS and refused the certificate's names; the plaintext cluster was
        # never used.
        https = envoy_stats(running, "cluster.upstream_https.")
        assert https["cluster.upstream_https.ssl.fail_verify_san"] >= 1
        assert https.get("cluster.upstream_https.upstream_rq_2xx", 0) == 0
        http = envoy_stats(running, "cluster.upstream_http.")
        assert http.get("cluster.upstream_http.upstream_cx_total", 0) == 0


def test_client_cannot_steer_the_upstream(
    tmp_path: Path, database_url: str, test_ca: CA, fake_upstream: FakeUpstream
) -> None:
    """Routing headers a client sends are dropped before routing; Tollgate's own win."""
    decoy = fake_upstream.url.removeprefix("http://")
    with (
        tls_fake_upstream(tmp_path, test_ca, ["localhost"]) as upstream,
        running_tollgate(
            tmp_path / "state", database_url, upstream, upstream_ca_file=str(test_ca.cert_path)
        ) as running,
    ):
        with client(running, "steering-user") as sdk:
            completion = sdk.chat.completions.create(
                **CHAT,
                extra_headers={
                    "x-tollgate-upstream-host": decoy,
                    "x-tollgate-upstream-scheme": "http",
                },
            )
        assert completion.choices[0].message.content
        assert len(upstream.recorded()["requests"]) == 1
        assert fake_upstream.recorded()["requests"] == []

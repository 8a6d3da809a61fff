"""Envoy's edge through real Envoy, Tollgate and Postgres (issue 11): local replies, header
limits and request paths.

Requests are written to a raw socket, byte for byte (like ``curl --path-as-is``), so nothing
on the client side normalises a path or refuses a header. Whether a refused request reached
the upstream is checked by the recording upstream and by Envoy's upstream connection counter.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import (
    FakeUpstream,
    RunningTollgate,
    running_tollgate,
    wait_for_rows,
)
from tests.integration.test_routing import envoy_upstream_connections

pytestmark = pytest.mark.integration

MAX_BODY_BYTES = 65536
CHAT = b"/v1/chat/completions"
CHAT_BODY = json.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Edge."}]}
).encode()


def envoy_port(running: RunningTollgate) -> int:
    return int(running.envoy_url.split(":")[2].split("/")[0])


def exchange(
    running: RunningTollgate, head: bytes, body: bytes = CHAT_BODY, *, body_later: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """Send ``head`` (request line and headers, without the blank line) and ``body``; the
    response's (status, headers, body). ``body_later`` sends the body once Envoy has had
    the headers."""
    request = head + b"\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", envoy_port(running)), timeout=15) as sock:
        sock.sendall(request if body_later else request + body)
        if body_later:
            time.sleep(0.3)
            # Envoy may answer and close before taking the whole body.
            with contextlib.suppress(OSError):
                sock.sendall(body)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass  # after the response: Envoy resets a connection it will not read further
    assert data, "empty reply"
    header_block, _, payload = data.partition(b"\r\n\r\n")
    status_line, *lines = header_block.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, payload


def extproc_streams(running: RunningTollgate) -> int:
    """ext_proc streams Envoy has opened to Tollgate so far."""
    admin = (running.state_dir / "envoy-admin-address").read_text().strip()
    url = (
        f"http://{admin}/stats?format=json&filter=^cluster\\.tollgate_extproc\\.upstream_rq_total$"
    )
    with urllib.request.urlopen(url, timeout=5) as r:
        (stat,) = json.loads(r.read())["stats"]
    return int(stat["value"])


def post(path: bytes, *extra: bytes, body: bytes = CHAT_BODY) -> bytes:
    lines = [
        b"POST " + path + b" HTTP/1.1",
        b"Host: edge.test",
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        b"x-tollgate-user-id: edge-user",
        *extra,
    ]
    return b"\r\n".join(lines)


def error_code(payload: bytes) -> str:
    error = json.loads(payload)["error"]
    assert error["type"] == "invalid_request_error"
    return str(error["code"])


def newest_row(database_url: str, count: int) -> dict[str, Any]:
    rows = wait_for_rows(database_url, "true", (), count, timeout_s=10)
    assert len(rows) == count, rows
    return rows[-1]


def test_envoy_local_replies_reach_the_client_and_are_recorded(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream
) -> None:
    with running_tollgate(
        tmp_path / "state", database_url, fake_upstream, max_body_bytes=str(MAX_BODY_BYTES)
    ) as running:
        rows = 0
        cases: list[tuple[str, bytes, bytes, bool, int, str]] = [
            (
                "HTTP/1.0",
                b"GET /v1/models HTTP/1.0\r\nHost: edge.test",
                b"",
                False,
                426,
                "upgrade_required",
            ),
            (
                "control byte",
                b"GET /v1/mo\x01dels HTTP/1.1\r\nHost: edge.test",
                b"",
                False,
                400,
                "bad_request",
            ),
            (
                "one huge header",
                post(CHAT, b"x-big: " + b"a" * 70_000),
                CHAT_BODY,
                False,
                431,
                "headers_too_large",
            ),
            (
                "headers past the codec's limit",
                post(CHAT, *(b"x-h%d: v" % i for i in range(140))),
                CHAT_BODY,
                False,
                431,
                "headers_too_large",
            ),
            (
                "101 headers",  # with the three post() sends; Host is not counted
                post(CHAT, *(b"x-h%d: v" % i for i in range(98))),
                CHAT_BODY,
                False,
                431,
                "headers_too_large",
            ),
            (
                "61 KiB of headers",
                post(CHAT, *(b"x-h%d: " % i + b"a" * 6200 for i in range(10))),
                CHAT_BODY,
                False,
                431,
                "headers_too_large",
            ),
            (
                "declared body over the limit",
                post(CHAT, body=b"x" * (MAX_BODY_BYTES + 1)),
                b"x" * (MAX_BODY_BYTES + 1),
                False,
                413,
                "body_too_large",
            ),
        ]
        for name, head, body, later, status, code in cases:
            got, headers, payload = exchange(running, head, body, body_later=later)
            assert (got, error_code(payload)) == (status, code), name
            assert headers["content-type"] == "application/json", name
            rows += 1
            row = newest_row(database_url, rows)
            assert (row["outcome"], row["block_reason"], row["status_code"]) == (
                "blocked",
                code,
                status,
            ), name
            if code != "upgrade_required" and name != "control byte":
                # Tollgate saw these (or the codec refused them before anything did).
                assert row["endpoint"] in (None, "/v1/chat/completions"), name

        # A chunked body (no length declared) over the limit: Envoy's own 413, which
        # Tollgate's ext_proc sees (it asked for the body) and records with what it knew.
        chunked = b"x" * (MAX_BODY_BYTES * 2)
        head = b"\r\n".join(
            [
                b"POST /v1/chat/completions HTTP/1.1",
                b"Host: edge.test",
                b"Content-Type: application/json",
                b"Transfer-Encoding: chunked",
                b"x-tollgate-user-id: edge-user",
            ]
        )
        got, headers, payload = exchange(
            running, head, b"%x\r\n" % len(chunked) + chunked + b"\r\n0\r\n\r\n", body_later=True
        )
        assert (got, error_code(payload)) == (413, "body_too_large")
        rows += 1
        row = newest_row(database_url, rows)
        assert (row["outcome"], row["block_reason"]) == ("blocked", "body_too_large")
        assert (row["endpoint"], row["end_user_id"]) == ("/v1/chat/completions", "edge-user")
        assert fake_upstream.recorded() == {"requests": [], "connections": 0}

        # Up to Tollgate's limits, its own header edits never push a request over Envoy's.
        # And a request Tollgate's ext_proc saw opens one ext_proc stream: the observer of
        # Envoy's own replies stays off for it.
        streams_before = extproc_streams(running)
        for count in (92, 97):  # 95 and 100 headers
            got, _, payload = exchange(
                running, post(CHAT, *(b"x-h%d: v" % i for i in range(count)))
            )
            assert got == 200, (count, payload)
        near = post(CHAT, *(b"x-h%d: " % i + b"a" * 6000 for i in range(10)))
        got, _, payload = exchange(running, near)
        assert got == 200, payload
        assert len(fake_upstream.recorded()["requests"]) == 3
        assert extproc_streams(running) - streams_before == 3


ALLOWED_PREFIX = "/team-a"

# Sent as is; Envoy or Tollgate refuses each with 400 invalid_path.
REFUSED_PATHS = [
    b"/v1%2fchat/completions",
    b"/v1%2Fchat%2fcompletions",
    b"/v1%5cchat/completions",
    b"/%5C..%5Cteam-b/v1/chat/completions",
    b"/%252e%252e/team-b/v1/chat/completions",
    b"/v1/%252E%252e/%252e%252e/team-b/v1/chat/completions",
    b"/v1%252fchat/completions",
    b"/v1/chat/completions%255c",
]

# Dot segments, raw or percent-encoded, and backslashes reach Tollgate as sent (Envoy does
# not resolve them) and are refused too.
REFUSED_PATHS += [
    b"/../team-b/v1/chat/completions",
    b"/v1/../../team-b/v1/chat/completions",
    b"/./v1/chat/completions",
    b"/%2e%2e/team-b/v1/chat/completions",
    b"/%2E%2e/%2e%2E/v1/chat/completions",
    b"/v1/chat/..\\..\\..\\team-b/completions",
]

# Envoy merges slashes before Tollgate sees the path; the prefix is joined afterwards, so the
# upstream gets a path below it: (as sent, as the upstream received it).
NORMALISED_PATHS = [
    (b"//v1//chat/completions", "/team-a/v1/chat/completions"),
]


def test_request_paths_never_leave_the_allowed_prefix(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream
) -> None:
    base = fake_upstream.url + ALLOWED_PREFIX
    with running_tollgate(
        tmp_path / "state", database_url, fake_upstream, base_uri_allow_list=base
    ) as running:
        via_base = b"x-tollgate-base-uri: " + base.encode()
        before = envoy_upstream_connections(running)
        for rows, path in enumerate(REFUSED_PATHS, start=1):
            got, _, payload = exchange(running, post(path, via_base))
            assert (got, error_code(payload)) == (400, "invalid_path"), path
            row = newest_row(database_url, rows)
            assert (row["outcome"], row["block_reason"]) == ("blocked", "invalid_path"), path
        assert envoy_upstream_connections(running) == before
        assert fake_upstream.recorded() == {"requests": [], "connections": 0}

        for path, received in NORMALISED_PATHS:
            fake_upstream.clear()
            # The upstream answers as it likes (404 for a path it does not serve).
            exchange(running, post(path, via_base))
            (seen,) = fake_upstream.recorded()["requests"]
            assert seen["path"] == received, path

        # A legitimate path below the prefix works and is metered.
        fake_upstream.clear()
        got, headers, payload = exchange(running, post(CHAT, via_base))
        assert got == 200, payload
        (seen,) = fake_upstream.recorded()["requests"]
        assert seen["path"] == "/team-a/v1/chat/completions"
        (row,) = wait_for_rows(
            database_url, "request_id = %s", (headers["x-tollgate-request-id"],), 1, timeout_s=10
        )
        assert (row["outcome"], row["upstream_base_uri"], row["end_user_id"]) == (
            "ok",
            base,
            "edge-user",
        )

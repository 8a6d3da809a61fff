"""The request path cannot be tricked or crashed (issue 11), through real Envoy, a real
in-process Tollgate stack and real Postgres.

Each test starts a :class:`~tollgate.app.Stack` in this process (Envoy is its child), with
the processor factory's class replaced by :class:`~tests.unit.doubles.FaultyProcessor`: it
behaves exactly like the real one unless a request names a phase in ``x-test-fault``, so the
same stack serves the ordinary reproductions and the injected faults. Clients send exact
bytes with ``http.client`` (in a thread: the event loop serves ext_proc meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import http.server
import json
import threading
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

import tollgate.app
from tests.integration.conftest import FakeUpstream, wait_for_rows
from tests.unit.doubles import FAULT_HEADER, FaultyProcessor
from tollgate.app import Stack, StackOptions
from tollgate.config import load_settings
from tollgate.localstack import free_port
from tollgate.policy.keys import create_key

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Harden me."}]
PROVIDER_KEY = "sk-provider-held-by-gateway-h2a"
SURROGATE = '"a\\ud800b"'  # a lone surrogate, as a JSON escape: what a client can send


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]

    @property
    def request_id(self) -> str:
        return self.headers.get("x-tollgate-request-id", "")


def send(
    port: int,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes | None = None,
) -> Reply:
    """One request with exactly these headers (repeats kept); a broken response raises."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        data = response.read()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        conn.close()


def chat_body(*, stream: bool = False, **fields: Any) -> bytes:
    return json.dumps(
        {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": stream, **fields}
    ).encode()


JSON = ("Content-Type", "application/json")


class CannedUpstream:
    """An OpenAI-compatible upstream that answers every chat completion with the usage the
    test sets (JSON, or SSE when the request streams): a provider that reports nonsense."""

    def __init__(self) -> None:
        self.usage: dict[str, Any] = {}
        self.model = "gpt-4o-mini"
        self.requests = 0
        canned = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                request = json.loads(self.rfile.read(length) or b"{}")
                canned.requests += 1
                usage = json.dumps(canned.usage)
                if request.get("stream"):
                    body = (
                        f'data: {{"model": "{canned.model}", "choices": [{{"index": 0,'
                        ' "delta": {"content": "hi"}}]}\n\n'
                        f'data: {{"model": "{canned.model}", "choices": [], "usage": {usage}}}\n\n'
                        "data: [DONE]\n\n"
                    ).encode()
                    kind = "text/event-stream"
                else:
                    body = (
                        f'{{"model": "{canned.model}", "choices": [{{"index": 0, "message":'
                        f' {{"role": "assistant", "content": "hi"}}}}], "usage": {usage}}}'
                    ).encode()
                    kind = "application/json"
                self.send_response(200)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> CannedUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@dataclass
class Running:
    stack: Stack
    port: int
    database_url: str
    metrics_address: str

    async def metric(self, sample: str) -> float | None:
        """One sample of /metrics by its name with labels, or None when absent."""

        def scrape() -> str:
            with urllib.request.urlopen(f"http://{self.metrics_address}/metrics", timeout=5) as r:
                return r.read().decode()

        for line in (await asyncio.to_thread(scrape)).splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
        return None

    async def send(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes | None = None
    ) -> Reply:
        return await asyncio.to_thread(send, self.port, method, path, headers, body)

    async def row(self, request_id: str) -> dict[str, Any]:
        assert request_id, "no x-tollgate-request-id"
        rows = await asyncio.to_thread(
            wait_for_rows, self.database_url, "request_id = %s", (request_id,), 1, 10
        )
        (row,) = rows
        return row

    async def rows_where(self, where: str, params: tuple[Any, ...], count: int) -> list[Any]:
        return await asyncio.to_thread(wait_for_rows, self.database_url, where, params, count, 10)

    async def gateway_key(self, name: str, **options: Any) -> tuple[str, str]:
        async with await psycopg.AsyncConnection.connect(self.database_url) as conn:
            plaintext, key = await create_key(conn, name=name, **options)
            await self.stack.keys.refresh(conn)
        return plaintext, key.key_id


@contextlib.asynccontextmanager
async def running_stack(
    tmp_path: Path, database_url: str, upstream_url: str, **settings: Any
) -> AsyncIterator[Running]:
    port = free_port()
    metrics = f"127.0.0.1:{free_port()}"
    s = load_settings(
        environ={},
        database_url=database_url,
        upstream_url=upstream_url,
        state_dir=tmp_path / "state",
        grpc_address=f"127.0.0.1:{free_port()}",
        envoy_listen_port=port,
        envoy_admin_port=0,
        metrics_address=metrics,
        **settings,
    )
    stack = Stack(s, StackOptions(run_envoy=True))
    await stack.start()
    try:
        yield Running(stack, port, database_url, metrics)
    finally:
        await stack.stop()


@pytest.fixture(autouse=True)
def faulty_processors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stack's processor factory builds FaultyProcessor (a real processor unless told)."""
    monkeypatch.setattr(tollgate.app, "RequestProcessor", FaultyProcessor)


@pytest.fixture
def canned() -> Iterator[CannedUpstream]:
    with CannedUpstream() as upstream:
        yield upstream


# -- lone surrogates and numbers beyond int64 --------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True], ids=["json", "sse"])
async def test_lone_surrogates_are_metered(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream, streamed: bool
) -> None:
    async with running_stack(tmp_path, database_url, fake_upstream.url) as tg:
        cases = [
            ("user", f'"user": {SURROGATE}', "body_user"),
            (
                "metadata.user_id",
                f'"metadata": {{"user_id": {SURROGATE}}}',
                "body_metadata_user_id",
            ),
        ]
        for label, field, source in cases:
            body = (
                f'{{"model": "gpt-4o-mini", "stream": {json.dumps(streamed)}, {field},'
                f' "messages": [{{"role": "user", "content": {SURROGATE}}}]}}'
            ).encode()
            reply = await tg.send("POST", "/v1/chat/completions", [JSON], body)
            assert reply.status == 200, (label, reply.body[:300])
            row = await tg.row(reply.request_id)
            assert (row["end_user_id"], row["identity_source"]) == ("a\ufffdb", source), label
            assert row["outcome"] == "ok", label
            assert row["input_tokens"], label

        # The model itself (echoed by the provider, so the answer carries one too).
        body = f'{{"model": {SURROGATE}, "stream": {json.dumps(streamed)}, "messages": []}}'
        reply = await tg.send("POST", "/v1/chat/completions", [JSON], body.encode())
        row = await tg.row(reply.request_id)
        assert row["model"] == "a\ufffdb"
        assert row["outcome"] in ("ok", "upstream_error", "usage_missing")
        assert tg.stack.extproc is not None
        assert sum(tg.stack.extproc.internal_errors.values()) == 0


@pytest.mark.parametrize("streamed", [False, True], ids=["json", "sse"])
async def test_token_counts_beyond_int64_are_null_and_flagged(
    tmp_path: Path, database_url: str, canned: CannedUpstream, streamed: bool
) -> None:
    canned.usage = {
        "prompt_tokens": 1000000000000000000000000,
        "completion_tokens": 5,
        "total_tokens": 1000000000000000000000005,
    }
    canned.model = "gpt-4o-mini\\ud800"
    async with running_stack(tmp_path, database_url, canned.url) as tg:
        reply = await tg.send(
            "POST",
            "/v1/chat/completions",
            [JSON, ("x-tollgate-user-id", "big-numbers")],
            chat_body(stream=streamed),
        )
        assert reply.status == 200
        row = await tg.row(reply.request_id)
        assert row["outcome"] == "ok"
        assert (row["input_tokens"], row["output_tokens"], row["total_tokens"]) == (None, 5, None)
        assert "out_of_range_tokens" in row["usage_flags"]
        assert row["model"] == "gpt-4o-mini\ufffd"
        # and the ledger goes on
        canned.usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        reply = await tg.send("POST", "/v1/chat/completions", [JSON], chat_body(stream=streamed))
        row = await tg.row(reply.request_id)
        assert (row["input_tokens"], row["usage_flags"]) == (3, [])


# -- credentials -------------------------------------------------------------------------------


async def test_repeated_or_misplaced_credentials_never_send_a_gateway_key_upstream(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream
) -> None:
    async with running_stack(tmp_path, database_url, fake_upstream.url) as tg:
        token, key_id = await tg.gateway_key("dup-test", inject_credentials=False)
        user = ("x-tollgate-user-id", "dup-user")
        layouts: list[tuple[str, list[tuple[str, str]], str]] = [
            (
                "two authorization headers",
                [("Authorization", "Bearer sk-app-own"), ("Authorization", f"Bearer {token}")],
                "authorization",
            ),
            (
                "gateway key second",
                [("Authorization", f"Bearer {token}"), ("Authorization", "Bearer sk-app-own")],
                "authorization",
            ),
            ("two x-api-key", [("x-api-key", "sk-a"), ("x-api-key", "sk-b")], "x-api-key"),
            (
                "two gateway keys",
                [("x-tollgate-key", token), ("x-tollgate-key", token[:-1] + "Z")],
                "x-tollgate-key",
            ),
            ("key in x-api-key", [("x-api-key", token)], "x-api-key"),
            ("key in a list", [("x-custom-list", f"a, Bearer {token}, b")], "x-custom-list"),
            (
                "key in a forward",
                [("x-tollgate-forward-x-custom", token)],
                "x-tollgate-forward-x-custom",
            ),
            ("key in a look-alike", [("x_api_key", token)], "x_api_key"),
        ]
        for label, pairs, param in layouts:
            fake_upstream.clear()
            reply = await tg.send("POST", "/v1/chat/completions", [JSON, user, *pairs], chat_body())
            assert reply.status == 400, (label, reply.body)
            error = reply.json()["error"]
            assert (error["code"], error["param"]) == ("ambiguous_credentials", param), label
            assert token not in reply.body.decode()
            assert fake_upstream.recorded() == {"requests": [], "connections": 0}, label
            row = await tg.row(reply.request_id)
            assert (row["outcome"], row["block_reason"], row["status_code"]) == (
                "blocked",
                "ambiguous_credentials",
                400,
            ), label
            assert row["end_user_id"] == "dup-user", label

        # One gateway key, sent once (or twice alike), still works and never goes upstream.
        for pairs in (
            [("x-tollgate-key", token)],
            [("x-tollgate-key", token), ("x-tollgate-key", token)],
        ):
            fake_upstream.clear()
            reply = await tg.send("POST", "/v1/chat/completions", [JSON, user, *pairs], chat_body())
            assert reply.status == 200, reply.body
            (seen,) = fake_upstream.recorded()["requests"]
            assert token not in json.dumps(seen)
            assert (await tg.row(reply.request_id))["key_id"] == key_id


async def test_forwards_and_look_alikes_add_no_credentials(
    tmp_path: Path,
    database_url: str,
    fake_upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("H2A_OPENAI_KEY", PROVIDER_KEY)
    providers = {"openai": {"api_key_env": "H2A_OPENAI_KEY"}}
    async with running_stack(tmp_path, database_url, fake_upstream.url, providers=providers) as tg:
        token, _ = await tg.gateway_key("injecting")
        forwarded = [
            "x-api-key",
            "api-key",
            "authorization",
            "proxy-authorization",
            "x-goog-api-key",
            "cookie",
            "x_api_key",
            "accept-encoding",
            "x-tollgate-request-id",
            "x-tollgate-upstream-host",
        ]
        pairs = [("Authorization", f"Bearer {token}")]
        pairs += [
            (f"X-Tollgate-Forward-{name}", f"forwarded-{i}") for i, name in enumerate(forwarded)
        ]
        pairs += [(f"Xproxy-Forward-{name}", f"forwarded-x{i}") for i, name in enumerate(forwarded)]
        pairs += [
            ("X-Tollgate-Forward-X-Trace-Id", "trace-ok"),
            ("x_tollgate_user_id", "smuggled"),
            ("xproxy_user_id", "smuggled"),
            ("x-tollgate_user-id", "smuggled"),
            ("x_api_key", "sk-app-look-alike"),
            ("x-tollgate-user-id", "real-user"),
        ]
        reply = await tg.send("POST", "/v1/chat/completions", [JSON, *pairs], chat_body())
        assert reply.status == 200, reply.body
        (seen,) = fake_upstream.recorded()["requests"]
        received = [(n.lower(), v) for n, v in seen["headers"]]
        assert [v for n, v in received if n == "authorization"] == [f"Bearer {PROVIDER_KEY}"]
        assert ("x-trace-id", "trace-ok") in received
        assert not [v for _, v in received if v.startswith("forwarded-")], received
        assert not [n for n, _ in received if n.replace("_", "-").startswith("x-tollgate-")]
        assert not [v for _, v in received if v in ("smuggled", "sk-app-look-alike")], received
        assert token not in json.dumps(seen)
        row = await tg.row(reply.request_id)
        assert (row["end_user_id"], row["identity_source"]) == ("real-user", "header")


# -- refusals keep what they know --------------------------------------------------------------


async def test_refusals_keep_user_key_and_tags(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream
) -> None:
    async with running_stack(tmp_path, database_url, fake_upstream.url) as tg:
        token, key_id = await tg.gateway_key("refused", inject_credentials=False)
        known = [JSON, ("x-tollgate-user-id", "named-user"), ("x-tollgate-tags", "a,b")]
        cases = [
            ("invalid_gateway_key", 401, [("x-tollgate-key", "tg_" + "x" * 43)], None),
            (
                "base_uri_not_allowed",
                403,
                [("x-tollgate-key", token), ("x-tollgate-base-uri", "http://evil.example")],
                key_id,
            ),
            ("invalid_header_value", 400, [("x-tollgate-enforce-user-id", "maybe")], None),
        ]
        for code, status, pairs, expected_key in cases:
            reply = await tg.send("POST", "/v1/chat/completions", [*known, *pairs], chat_body())
            assert (reply.status, reply.json()["error"]["code"]) == (status, code)
            row = await tg.row(reply.request_id)
            assert (row["outcome"], row["block_reason"]) == ("blocked", code)
            assert (row["end_user_id"], row["identity_source"]) == ("named-user", "header"), code
            assert (row["tags"], row["key_id"]) == (["a", "b"], expected_key), code

        # A user named only in the body, refused after the body was read: kept with the model.
        async with running_stack(
            tmp_path / "strict", database_url, fake_upstream.url, strict_user_ids=True
        ) as strict:
            reply = await strict.send(
                "POST", "/v1/chat/completions", [JSON], chat_body(user="not ok!")
            )
            assert reply.status == 422
            row = await strict.row(reply.request_id)
            assert (row["end_user_id"], row["identity_source"], row["model"]) == (
                "not ok!",
                "body_user",
                "gpt-4o-mini",
            )


# -- the phase error boundary ------------------------------------------------------------------


FAULTY_NUMBER = 424242


async def _fault(
    tg: Running, phase: str, *, streamed: bool, reads_body: bool
) -> tuple[Reply | None, str]:
    """A request whose handler of ``phase`` raises; (the reply, or None when the response
    broke off, and the request id from the ledger).

    ``reads_body``: the user is a number in the body, which Envoy's reading cannot settle (it
    reads numbers as doubles), so Tollgate reads the body. Otherwise the user is in a header.
    With ``skip_json_response_headers`` on (the stack's setting), a non-streaming call whose
    body Tollgate does not read skips the response headers: its answer has left Envoy before
    the body phase (ADR 011).
    """
    tag = f"fault-{phase}-{streamed}-{reads_body}-{uuid.uuid4().hex[:6]}".replace(":", "-")
    headers = [JSON, (FAULT_HEADER, phase), ("x-tollgate-tags", tag)]
    if phase.startswith("response_body:"):
        headers.append(("x-fake-chunk-delay-ms", "200"))  # events one by one, under way
    if not reads_body:
        headers.append(("x-tollgate-user-id", "faulty"))
    body = chat_body(stream=streamed, user=FAULTY_NUMBER if reads_body else "faulty")
    try:
        reply: Reply | None = await tg.send("POST", "/v1/chat/completions", headers, body)
    except (http.client.HTTPException, ConnectionError):
        reply = None
    (row,) = await tg.rows_where("%s = ANY(tags)", (tag,), 1)
    return reply, str(row["request_id"])


@pytest.mark.parametrize(
    ("phase", "streamed", "reads_body", "lean"),
    [
        ("request_headers", False, False, False),
        ("request_body", False, True, False),
        ("response_headers", False, True, False),
        ("response_headers", False, False, False),
        ("response_body", False, True, False),
        ("response_body", False, False, False),
        ("response_body", False, False, True),
        ("response_body", True, False, False),
        ("response_body:2", True, False, False),
    ],
)
async def test_a_raising_handler_fails_closed_and_tollgate_keeps_serving(
    tmp_path: Path,
    database_url: str,
    fake_upstream: FakeUpstream,
    phase: str,
    streamed: bool,
    reads_body: bool,
    lean: bool,
) -> None:
    settings = {"skip_json_response_headers": True} if lean else {}
    async with running_stack(tmp_path, database_url, fake_upstream.url, **settings) as tg:
        fake_upstream.clear()
        reply, request_id = await _fault(tg, phase, streamed=streamed, reads_body=reads_body)
        if streamed and reply is not None:
            # Streamed: a 500 if Envoy had not sent the headers yet, else a reset (reply None).
            assert reply.status == 500, reply.body[:300]
        if not streamed and not lean:
            # Envoy still holds the response: Tollgate's own answer reaches the client.
            assert reply is not None
            assert reply.status == 500
            assert reply.json()["error"]["code"] == "internal_error"
            assert reply.request_id == request_id
        if lean:
            # The JSON-answer plan: the headers went out before the body phase, the body never.
            assert reply is None
        if phase in ("request_headers", "request_body"):
            # Failed before the upstream: nothing went out.
            assert fake_upstream.recorded()["requests"] == []
        row = await tg.row(request_id)
        assert row["outcome"] == "internal_error"
        assert row["end_user_id"] == (str(FAULTY_NUMBER) if reads_body else "faulty")
        async with await psycopg.AsyncConnection.connect(
            database_url, row_factory=dict_row
        ) as conn:
            cur = await conn.execute(
                "SELECT count(*) AS n FROM tollgate.requests WHERE request_id = %s", (request_id,)
            )
            assert (await cur.fetchone()) == {"n": 1}
        assert tg.stack.extproc is not None
        counted = phase.partition(":")[0]
        assert tg.stack.extproc.internal_errors == {counted: 1}
        assert await tg.metric(f'tollgate_internal_errors_total{{phase="{counted}"}}') == 1

        # The next request is served as usual.
        reply = await tg.send(
            "POST",
            "/v1/chat/completions",
            [JSON, ("x-tollgate-user-id", "after")],
            chat_body(stream=streamed),
        )
        assert reply.status == 200
        assert (await tg.row(reply.request_id))["outcome"] == "ok"

"""Fake OpenAI-compatible LLM upstream for ``tollgate demo``, integration tests and benchmarks.

Not part of Tollgate's request path. It answers ``POST /v1/chat/completions`` (plain and
SSE streaming) and ``GET /v1/models`` with replies that depend only on the request body, and
records every ``/v1/`` request it receives so tests can prove what reached the upstream.

Token counts, which tests compare with what Tollgate records:

* ``prompt_tokens`` = 3 per message + ceil(characters of all text content / 4), where text
  content is a message's ``content`` string or the ``text`` strings of its content parts;
* the reply is N words (N from 5 to 40, picked by a hash of model + messages, capped by
  ``max_completion_tokens`` / ``max_tokens``), joined by single spaces, and
  ``completion_tokens`` = N (one token per word);
* ``total_tokens`` = prompt + completion.

Control endpoints (never recorded): ``GET /_fake/requests`` returns
``{"requests": [...], "connections": N}``, where ``connections`` counts the distinct TCP
connections that carried at least one recorded request; ``DELETE /_fake/requests`` clears both;
``GET /_fake/health`` answers ``ok``.

With ``--tls-cert`` and ``--tls-key`` (PEM files) it serves HTTPS only, on the same port, so
tests can prove that a verified TLS upstream works and a wrongly named one is refused.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import signal
import socket
import ssl
import sys
import time
import weakref
from collections import deque
from typing import Any, Final

from aiohttp import web

__all__ = ["build_app", "main", "serve", "server_tls_context"]

DEFAULT_MODEL: Final = "gpt-4o-mini"
MAX_RECORDED: Final = 10_000
SYSTEM_FINGERPRINT: Final = "fp_tollgate_fake"
_MIN_WORDS: Final = 5
_MAX_WORDS: Final = 40
_CLIENT_MAX_SIZE: Final = 64 * 1024 * 1024
_SHUTDOWN_TIMEOUT_S: Final = 1.0

# 64 plain words, so one byte of the hash (masked to 6 bits) picks one word.
_WORDS: Final = (
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "small",
    "birds",
    "sing",
    "near",
    "river",
    "stone",
    "bridge",
    "under",
    "bright",
    "morning",
    "light",
    "and",
    "green",
    "hills",
    "roll",
    "toward",
    "distant",
    "blue",
    "mountains",
    "where",
    "old",
    "pine",
    "trees",
    "stand",
    "quiet",
    "beside",
    "clear",
    "cold",
    "lakes",
    "full",
    "of",
    "silver",
    "fish",
    "that",
    "swim",
    "slowly",
    "past",
    "tall",
    "reeds",
    "wind",
    "moves",
    "soft",
    "clouds",
    "across",
    "open",
    "sky",
    "warm",
    "field",
    "road",
    "house",
    "paper",
    "story",
    "night",
)
assert len(_WORDS) == 64

_MODELS: Final = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-4.1")
_MODEL_CREATED: Final = 1_700_000_000

_JSON_TYPE: Final = "application/json"


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _error(status: int, message: str, code: str, param: str | None = None) -> web.Response:
    body = {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "code": code,
            "param": param,
        }
    }
    return web.Response(status=status, body=_dumps(body), content_type=_JSON_TYPE)


def _text_chars(messages: list[Any]) -> int:
    chars = 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict):
                    text = part.get("text")
                    if isinstance(text, str):
                        chars += len(text)
    return chars


def _model_of(body: bytes) -> str | None:
    """The ``model`` a JSON request body names, for the record (None when there is none)."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    model = document.get("model") if isinstance(document, dict) else None
    return model if isinstance(model, str) else None


def _token_cap(body: dict[str, Any]) -> int | None:
    caps = [
        value
        for value in (body.get("max_completion_tokens"), body.get("max_tokens"))
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1
    ]
    return min(caps) if caps else None


class _Reply:
    """The deterministic answer to one chat completion request."""

    __slots__ = ("completion_id", "finish_reason", "model", "usage", "words")

    def __init__(self, model: str, messages: list[Any], cap: int | None) -> None:
        digest = hashlib.blake2b(
            model.encode("utf-8", "surrogatepass")
            + b"\x00"
            + json.dumps(messages, sort_keys=True, separators=(",", ":")).encode()
        ).digest()
        n_words = _MIN_WORDS + digest[0] % (_MAX_WORDS - _MIN_WORDS + 1)
        self.finish_reason = "stop"
        if cap is not None and cap < n_words:
            n_words = cap
            self.finish_reason = "length"
        self.words = [_WORDS[b & 63] for b in digest[1 : 1 + n_words]]
        self.completion_id = "chatcmpl-" + digest[44:64].hex()
        self.model = model
        prompt = 3 * len(messages) + (_text_chars(messages) + 3) // 4
        self.usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "completion_tokens": n_words,
            "total_tokens": prompt + n_words,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    @property
    def content(self) -> str:
        return " ".join(self.words)


class _FakeProvider:
    """Request handlers plus the in-memory record of what was received."""

    def __init__(self, latency_ms: int, chunk_delay_ms: int) -> None:
        self._latency_s = max(latency_ms, 0) / 1000
        self._chunk_delay_s = max(chunk_delay_ms, 0) / 1000
        self._requests: deque[dict[str, Any]] = deque(maxlen=MAX_RECORDED)
        self._seen_transports: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()
        self._seen_ids: set[int] = set()  # for transports that cannot be weakly referenced
        self._connections = 0
        self._models_body = _dumps(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": _MODEL_CREATED, "owned_by": "system"}
                    for m in _MODELS
                ],
            }
        )

    # -- recording -------------------------------------------------------------------------

    def _record(self, request: web.BaseRequest, body: bytes) -> None:
        self._requests.append(
            {
                "method": request.method,
                "path": request.raw_path,
                "headers": [
                    [name.decode("latin-1").lower(), value.decode("latin-1")]
                    for name, value in request.raw_headers
                ],
                "body_length": len(body),
                "model": _model_of(body),
            }
        )
        transport = request.transport
        if transport is None:
            return
        try:
            if transport in self._seen_transports:
                return
            self._seen_transports.add(transport)
        except TypeError:
            if id(transport) in self._seen_ids:
                return
            self._seen_ids.add(id(transport))
        self._connections += 1

    async def _received(self, request: web.Request) -> bytes:
        """Read and record a /v1/ request, then wait out the configured latency."""
        body = await request.read()
        self._record(request, body)
        if self._latency_s:
            await asyncio.sleep(self._latency_s)
        return body

    # -- control endpoints -----------------------------------------------------------------

    async def list_requests(self, request: web.Request) -> web.Response:
        body = {"requests": list(self._requests), "connections": self._connections}
        return web.Response(body=_dumps(body), content_type=_JSON_TYPE)

    async def clear_requests(self, request: web.Request) -> web.Response:
        self._requests.clear()
        self._seen_transports = weakref.WeakSet()
        self._seen_ids.clear()
        self._connections = 0
        return web.Response(body=_dumps({"cleared": True}), content_type=_JSON_TYPE)

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    # -- OpenAI endpoints ------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        await self._received(request)
        return web.Response(body=self._models_body, content_type=_JSON_TYPE)

    async def not_found(self, request: web.Request) -> web.Response:
        if request.path.startswith("/v1/"):
            await self._received(request)
        return _error(
            404, f"Invalid URL ({request.method} {request.path})", "not_found", param=None
        )

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        raw = await self._received(request)
        try:
            body = json.loads(raw)
        except ValueError:  # includes JSONDecodeError and UnicodeDecodeError
            body = None
        if not isinstance(body, dict):
            return _error(
                400,
                "We could not parse the JSON body of your request. The OpenAI API expects a"
                " JSON object as the payload.",
                "invalid_json",
            )
        messages = body.get("messages")
        if not isinstance(messages, list):
            return _error(
                400,
                "Missing required parameter: 'messages'.",
                "missing_required_parameter",
                param="messages",
            )
        model = body.get("model")
        if not isinstance(model, str) or not model:
            model = DEFAULT_MODEL
        reply = _Reply(model, messages, _token_cap(body))
        if body.get("stream") is True:
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            return await self._stream(request, reply, include_usage)
        completion = {
            "id": reply.completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": reply.model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": reply.content,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": reply.finish_reason,
                }
            ],
            "usage": reply.usage,
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        return web.Response(body=_dumps(completion), content_type=_JSON_TYPE)

    async def _stream(
        self, request: web.Request, reply: _Reply, include_usage: bool
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            }
        )
        if request.version >= (1, 1):
            response.enable_chunked_encoding()
        await response.prepare(request)

        created = int(time.time())

        def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
            obj: dict[str, Any] = {
                "id": reply.completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": reply.model,
                "service_tier": "default",
                "system_fingerprint": SYSTEM_FINGERPRINT,
                "choices": choices,
            }
            if include_usage:
                obj["usage"] = usage
            return b"data: " + _dumps(obj) + b"\n\n"

        def choice(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

        events = [chunk([choice({"role": "assistant", "content": "", "refusal": None})])]
        events.extend(
            chunk([choice({"content": word if i == 0 else " " + word})])
            for i, word in enumerate(reply.words)
        )
        events.append(chunk([choice({}, reply.finish_reason)]))
        if include_usage:
            events.append(chunk([], reply.usage))
        events.append(b"data: [DONE]\n\n")

        try:
            for i, event in enumerate(events):
                if i and self._chunk_delay_s:
                    await asyncio.sleep(self._chunk_delay_s)
                await response.write(event)
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away mid-stream; nothing left to do
        return response


def build_app(*, latency_ms: int = 0, chunk_delay_ms: int = 0) -> web.Application:
    """The fake provider as an aiohttp application (see the module docstring)."""
    provider = _FakeProvider(latency_ms, chunk_delay_ms)
    app = web.Application(client_max_size=_CLIENT_MAX_SIZE)
    app.router.add_get("/_fake/requests", provider.list_requests)
    app.router.add_delete("/_fake/requests", provider.clear_requests)
    app.router.add_get("/_fake/health", provider.health)
    # Any path prefix: a base URI with a path (`https://host/team-a`) or an Azure deployment
    # (`/openai/deployments/{name}/chat/completions?api-version=…`) reaches the same handlers.
    app.router.add_post("/{prefix:.*}/chat/completions", provider.chat_completions)
    app.router.add_get("/{prefix:.*}/models", provider.models)
    app.router.add_route("*", "/{tail:.*}", provider.not_found)
    return app


def _listening_socket(host: str, port: int) -> socket.socket:
    """One listening socket on the first address of ``host``, so port 0 means one port."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def server_tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server-side TLS context presenting the PEM certificate chain and key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


async def serve(
    host: str,
    port: int,
    *,
    latency_ms: int = 0,
    chunk_delay_ms: int = 0,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[web.AppRunner, int]:
    """Start the fake provider on ``host:port`` (0 picks a free port), HTTPS with ``ssl_context``.

    Returns the runner (call ``await runner.cleanup()`` to stop) and the bound port.
    """
    app = build_app(latency_ms=latency_ms, chunk_delay_ms=chunk_delay_ms)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        sock = _listening_socket(host, port)
        bound_port: int = sock.getsockname()[1]
        site = web.SockSite(runner, sock, backlog=1024, ssl_context=ssl_context)
        try:
            await site.start()
        except BaseException:
            sock.close()
            raise
    except BaseException:
        await runner.cleanup()
        raise
    return runner, bound_port


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tollgate.fakeprovider",
        description="Fake OpenAI-compatible upstream for demos, tests and benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8090, help="port (default 8090; 0 = any free)")
    parser.add_argument(
        "--latency-ms", type=int, default=0, help="delay before the response headers"
    )
    parser.add_argument(
        "--chunk-delay-ms", type=int, default=0, help="delay between streamed chunks"
    )
    parser.add_argument("--tls-cert", help="PEM certificate chain: serve HTTPS (needs --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    return parser


async def _run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    tls = server_tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    runner, port = await serve(
        args.host,
        args.port,
        latency_ms=args.latency_ms,
        chunk_delay_ms=args.chunk_delay_ms,
        ssl_context=tls,
    )
    try:
        host = f"[{args.host}]" if ":" in args.host else args.host
        scheme = "https" if tls else "http"
        sys.stdout.write(f"fake provider listening on {scheme}://{host}:{port}\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then exit cleanly."""
    parser = _parser()
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    asyncio.run(_run(args))


if __name__ == "__main__":
    main()

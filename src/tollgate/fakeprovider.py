"""Fake LLM provider upstream for ``tollgate demo``, integration tests and benchmarks.

Not part of Tollgate's request path. It speaks every wire format Tollgate meters (OpenAI,
Anthropic, Gemini, Vertex AI, Bedrock with its event streams), streaming included, with replies
that depend only on the request, and records every provider request it receives so tests can
prove what reached the upstream.

Endpoints (``…`` is any path prefix: ``/v1``, ``/team-a/v1``, an Azure
``/openai/deployments/{name}``, a Vertex ``/v1/projects/…/publishers/google``)::

    OpenAI      POST …/chat/completions        JSON; SSE with "stream" (+ usage chunk with
                                               stream_options.include_usage)
                POST …/completions             legacy completions, same streaming rules
                POST …/responses               Response object; SSE with "event:" lines
                POST …/embeddings              float or base64 vectors
                POST …/images/generations      gpt-image-* report token usage, DALL-E does not
                POST …/audio/transcriptions    multipart; json, text, verbose_json, srt, vtt;
                                               SSE with stream=true (not whisper-1)
                POST …/audio/speech            audio bytes; SSE with stream_format "sse"
                GET  …/models
    Anthropic   POST …/messages                Message; SSE with "stream": true
    Gemini      POST …/models/{model}:generateContent
                POST …/models/{model}:streamGenerateContent    JSON array; SSE with ?alt=sse
    Vertex AI   (…: /v1 or /v1beta1, then projects/{p}/locations/{l}, or nothing in express
                mode; Gemini models are the Gemini entries above, under publishers/google)
                POST …/publishers/anthropic/models/{model}:rawPredict        Message
                POST …/publishers/anthropic/models/{model}:streamRawPredict  SSE ("stream")
                POST …/publishers/anthropic/models/count-tokens:rawPredict   input_tokens
                POST …/publishers/google/models/{model}:predict         embedding models
                POST …/publishers/google/models/{model}:embedContent    also batchEmbedContents
                POST …/publishers/google/models/{model}:predictLongRunning      Veo operation
                POST …/publishers/google/models/{model}:fetchPredictOperation   poll it
                GET  …/operations/{id}                                          poll it
    Bedrock     POST /model/{modelId}/converse
                POST /model/{modelId}/converse-stream          AWS event stream
                POST /model/{modelId}/invoke                   the vendor's JSON (Anthropic,
                                                               Meta Llama, Amazon Nova)
                POST /model/{modelId}/invoke-with-response-stream    event stream of chunks

Streams are framed as each provider frames them: OpenAI chat and legacy completions send
``data:`` lines ending with ``data: [DONE]``; Responses and Anthropic name each event on an
``event:`` line; transcription and speech streams send ``data:`` lines only, without
``[DONE]``; Gemini separates its ``data:`` events with CRLF pairs, or without ``alt=sse``
streams one JSON array (``application/json``), element by element.

Token counts, which tests compare with what Tollgate records. ``T(n)`` = ceil(n / 4) for n
characters of text. A *reply* is N words (N from 5 to 40, picked by a hash of the model and
the request's content, then capped by the request's output limit), one token per word.
A message's *text* is its ``content`` string or the ``text`` strings of its content parts;
"T(a + b)" counts the characters of a and b together, "T(a) + T(b)" separately.

* Chat completions: prompt = 3 per message + T(all messages' text); completion = N + R,
  where R (reasoning) = 4 * N for models named ``o1…``, ``o3…``, ``o4…`` or ``gpt-5…``
  (after any ``vendor/``), else 0; ``prompt_tokens_details.cached_tokens`` = prompt // 2
  when the request has a non-empty ``prompt_cache_key``, else 0. Limit:
  ``max_completion_tokens`` / ``max_tokens``, the smaller; a cut reply ends with "length".
* Legacy completions: prompt = T(prompt) per string prompt, or the length of a token array,
  summed; one choice per prompt, completion = the sum of their N; limit ``max_tokens``,
  which defaults to 16 as in OpenAI's API.
* Responses: input = 3 per input item (a string ``input`` is one item, ``instructions``
  one more) + T(input's text + instructions); output = N + R as for chat, in
  ``output_tokens_details.reasoning_tokens`` (reasoning models also get a reasoning output
  item); ``input_tokens_details.cached_tokens`` as for chat, ``cache_write_tokens`` 0.
  Limit ``max_output_tokens``: a cut reply has status "incomplete" and its stream ends with
  ``response.incomplete`` instead of ``response.completed``.
* Embeddings: prompt_tokens = total_tokens = the sum of T(input) per string input (a token
  array counts its length). Vectors have ``dimensions`` floats (default 1536, 3072 for
  ``*-3-large``), as JSON floats or base64 float32 per ``encoding_format``.
* Images: ``gpt-image-*``: input_tokens = text_tokens = T(prompt), image_tokens 0;
  output_tokens = n * OpenAI's per-image table (low 272/408/400, medium 1056/1584/1568,
  high 4160/6240/6208 for 1024x1024 / 1024x1536 / 1536x1024; ``auto`` or no quality counts as
  medium, other sizes as 1024x1024). Other models (DALL-E): no usage.
* Transcriptions: S = max(1, ceil(file bytes / 16000)) seconds of audio. ``whisper*``:
  ``{"type": "duration", "seconds": S}`` (``stream`` is ignored). Others: ``{"type":
  "tokens"}`` with audio_tokens = 10 * S, text_tokens = T(``prompt`` field), input = their
  sum, output = N words of transcript.
* Speech: 64 bytes of (fake) audio per input character, typed by ``response_format``
  (mp3 is ``audio/mpeg``). Usage only in the SSE ``speech.audio.done``: input =
  T(input) + T(instructions), output = characters of input.
* Anthropic: input_tokens = 3 per message + T(all messages' text) + T(system text) when no
  system block has ``cache_control``. When one has, the C = max(3, T(system text)) system
  tokens are split instead: cache_creation_input_tokens = C // 3 (in
  ``cache_creation.ephemeral_1h_input_tokens`` if a block asks for ttl "1h", else in the 5m
  bucket), cache_read_input_tokens = C - C // 3; otherwise both are 0. output_tokens = N
  (limit ``max_tokens``, required). Streamed: message_start carries the input and cache
  counts with output_tokens 1, message_delta ``{"output_tokens": N}``.
* Gemini: promptTokenCount = 3 per content + T(contents' text + systemInstruction's text);
  candidatesTokenCount = N; thoughtsTokenCount = 4 * N, present only when the model name
  contains "thinking" or "2.5"; totalTokenCount = the sum. Streamed chunks carry one word
  each and cumulative counts, the last one equal to the whole reply's. Limit
  ``generationConfig.maxOutputTokens`` (finishReason MAX_TOKENS).
* Vertex AI Claude (``rawPredict``, ``streamRawPredict``): counted and streamed as for
  Anthropic (``stream`` in the body decides), the model is the path's (``@`` shown as ``-``
  in the reply's ``model``), ``id`` "msg_vrtx_…", no request-id header; ``anthropic_version``
  is required. ``count-tokens``: input_tokens = 3 per message + T(messages' text) + T(system
  text), whatever the cache.
* Vertex AI embeddings: ``:predict`` (models named ``*embedding*``): per instance
  ``statistics.token_count`` = T(content); ``metadata.billableCharacterCount`` = the contents'
  characters other than whitespace. ``:embedContent``: promptTokenCount = totalTokenCount =
  T(the content's text parts); ``:batchEmbedContents``: their sum over the requests. Vectors
  have ``outputDimensionality`` floats (default 768, 3072 for ``gemini-*``).
* Veo (``veo-*``): ``durationSeconds`` (default 8; 5 to 8 for ``veo-2*``, else 4, 6 or 8) and
  ``sampleCount`` (default 1, at most 4) are checked; the operation is running at its first
  poll and done from the second, its ``response.videos`` one per sample: ``gcsUri`` under
  ``storageUri`` when given, else ``bytesBase64Encoded``, 64 bytes per second.
* Bedrock Converse: inputTokens = 3 per message + T(all messages' text) + T(system text);
  with a ``cachePoint`` block in ``system`` the system tokens are split as for Anthropic
  into cacheWriteInputTokens (C // 3) and cacheReadInputTokens instead; outputTokens = N;
  totalTokens = input + output + cache read + cache write. Limit ``inferenceConfig.maxTokens``.
  ConverseStream counts the same; its body is ``application/vnd.amazon.eventstream`` (binary
  messages with CRCs, one per event: ``:message-type`` event, ``:event-type``,
  ``:content-type`` application/json; each JSON padded with a "p" member as AWS pads it):
  messageStart, one contentBlockDelta per word, contentBlockStop, messageStop, then metadata
  with the usage and ``metrics.latencyMs``.
* Bedrock InvokeModel, in the format of the vendor the model ID names (any other is a 400):
  ``anthropic.``: Anthropic's Messages body without ``model`` (``anthropic_version`` and
  ``max_tokens`` required), counted as for Anthropic, ``id`` "msg_bdrk_…", ``model`` the ID
  without region prefix, vendor and version; ``meta.``: Llama's ``prompt``, ``max_gen_len``
  (default 512), prompt_token_count = T(prompt), generation_token_count = N, stop_reason
  "stop" or "length"; ``amazon.nova``: Converse's messages and counts (limit
  ``inferenceConfig.max_new_tokens`` or ``maxTokens``), the cache counts named
  ``cacheRead/WriteInputTokenCount``. Headers ``X-Amzn-Bedrock-Input-Token-Count`` (the
  input without cache) and ``X-Amzn-Bedrock-Output-Token-Count`` (N), with a cache also
  ``X-Amzn-Bedrock-Cache-Read-Input-Token-Count`` and ``…-Cache-Write-…``.
  InvokeModelWithResponseStream sends the vendor's stream events
  (Anthropic's as its SSE events, without ping; Llama one per word with a cumulative
  generation_token_count, the prompt count in the first only, then a last one with the
  stop_reason; Nova messageStart, contentBlockDelta…, messageStop, metadata with its usage)
  as ``chunk`` events, each ``{"bytes": base64 of the JSON}``; the last chunk's JSON adds
  ``amazon-bedrock-invocationMetrics``: inputTokenCount, outputTokenCount (as the headers),
  invocationLatency, firstByteLatency, and cacheRead/WriteInputTokenCount with a cache.

Test knobs are request headers, never part of a provider API: ``x-fake-chunk-delay-ms: N``
sleeps N ms between the events of a streamed reply (instead of ``--chunk-delay-ms``), so a
client can abort mid-stream; ``x-fake-words: N`` (1 to 100000) makes a chat completion's
reply N words instead of 5 to 40 (still capped by the output limit), so a stream has N
content events; ``x-fake-content-encoding: gzip`` gzips the response body (and sets
``content-encoding: gzip``) whatever the client's ``accept-encoding`` says, like an
upstream that ignores it; streams are compressed event by event. A malformed knob is a 400.
``--latency-ms`` delays every provider reply before its headers.

Control endpoints (never recorded): ``GET /_fake/requests`` returns
``{"requests": [...], "connections": N}``, where each request has method, raw path, headers,
body length and model, and ``connections`` counts the distinct TCP connections that carried at
least one recorded request; ``DELETE /_fake/requests`` clears both; ``GET /_fake/health``
answers ``ok``. Unknown paths answer 404 (recorded under ``/v1/``, ``/v1beta/``,
``/v1beta1/`` and ``/model/``).

With ``--tls-cert`` and ``--tls-key`` (PEM files) it serves HTTPS only, on the same port, so
tests can prove that a verified TLS upstream works and a wrongly named one is refused.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import email.message
import gzip
import hashlib
import json
import signal
import socket
import ssl
import struct
import sys
import time
import weakref
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from tollgate.metering.eventstream import encode_message

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
_SSE_TYPE: Final = "text/event-stream; charset=utf-8"
_SSE_DONE: Final = b"data: [DONE]\n\n"

_TOKENS_PER_MESSAGE: Final = 3
_REASONING_TOKENS_PER_WORD: Final = 4
_REASONING_MODEL_PREFIXES: Final = ("o1", "o3", "o4", "gpt-5")
_LEGACY_COMPLETION_MAX_TOKENS: Final = 16

_EMBEDDING_MODEL: Final = "text-embedding-3-small"
_EMBEDDING_DIMENSIONS: Final = 1536
_EMBEDDING_DIMENSIONS_LARGE: Final = 3072

_IMAGE_MODEL: Final = "dall-e-2"
# Output tokens per image of gpt-image-1, from OpenAI's image generation guide.
_IMAGE_OUTPUT_TOKENS: Final[Mapping[str, Mapping[str, int]]] = {
    "low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
    "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
    "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208},
}
# A valid 1x1 PNG, small enough to repeat n times.
_PNG_B64: Final = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)

_AUDIO_BYTES_PER_SECOND: Final = 16_000
_AUDIO_TOKENS_PER_SECOND: Final = 10
_SPEECH_BYTES_PER_CHAR: Final = 64
_SPEECH_SSE_CHUNK: Final = 1024
_SPEECH_CONTENT_TYPES: Final[Mapping[str, str]] = {
    "mp3": "audio/mpeg",
    "opus": "audio/opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
_SPEECH_MODELS_WITHOUT_SSE: Final = ("tts-1", "tts-1-hd")

_CHUNK_DELAY_HEADER: Final = "x-fake-chunk-delay-ms"
_CONTENT_ENCODING_HEADER: Final = "x-fake-content-encoding"
_WORDS_HEADER: Final = "x-fake-words"
_MAX_KNOB_WORDS: Final = 100_000

# -- deterministic content -----------------------------------------------------------------


def _digest(model: str, seed: object) -> bytes:
    return hashlib.blake2b(
        model.encode("utf-8", "surrogatepass")
        + b"\x00"
        + json.dumps(seed, sort_keys=True, separators=(",", ":")).encode()
    ).digest()


@dataclass(frozen=True, slots=True)
class _Generation:
    """The deterministic reply to one request: words picked by a hash of model and content."""

    words: tuple[str, ...]
    truncated: bool  # the request's output limit cut the reply short
    digest: bytes

    @classmethod
    def of(cls, model: str, seed: object, cap: int | None, words: int | None = None) -> _Generation:
        """``words`` (the ``x-fake-words`` knob) replaces the hashed length of the reply."""
        digest = _digest(model, seed)
        n_words = _MIN_WORDS + digest[0] % (_MAX_WORDS - _MIN_WORDS + 1) if words is None else words
        truncated = cap is not None and cap < n_words
        if cap is not None and truncated:
            n_words = cap
        picks = digest[1 : 1 + n_words]
        if len(picks) < n_words:  # more words than the digest has bytes: extend it
            picks += hashlib.shake_256(digest).digest(n_words - len(picks))
        return cls(tuple(_WORDS[b & 63] for b in picks), truncated, digest)

    @property
    def tokens(self) -> int:
        return len(self.words)

    @property
    def text(self) -> str:
        return " ".join(self.words)

    @property
    def pieces(self) -> list[str]:
        """The words as streamed: the first bare, the others after one space."""
        return [word if i == 0 else " " + word for i, word in enumerate(self.words)]

    def ident(self, prefix: str) -> str:
        return prefix + self.digest[44:64].hex()


def _text_tokens(chars: int) -> int:
    """T(chars): one token per started group of four characters."""
    return (chars + 3) // 4


def _content_chars(content: object) -> int:
    """Characters of a content string, or of the ``text`` strings of a list of parts."""
    if isinstance(content, str):
        return len(content)
    chars = 0
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    chars += len(text)
    return chars


def _text_chars(messages: list[Any]) -> int:
    return sum(_content_chars(m.get("content")) for m in messages if isinstance(m, dict))


def _positive_int(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return None


def _token_cap(*values: object) -> int | None:
    """The smallest of the output limits a request sets (None when it sets none)."""
    caps = [cap for cap in map(_positive_int, values) if cap is not None]
    return min(caps) if caps else None


def _reasoning_tokens(model: str, words: int) -> int:
    name = model.rsplit("/", 1)[-1].lower()
    return _REASONING_TOKENS_PER_WORD * words if name.startswith(_REASONING_MODEL_PREFIXES) else 0


def _cache_split(tokens: int) -> tuple[int, int]:
    """A cached prompt part as (read, written): both non-zero and never equal."""
    cached = max(3, tokens)
    return cached - cached // 3, cached // 3


def _openai_cached_tokens(body: Mapping[str, Any], prompt_tokens: int) -> int:
    key = body.get("prompt_cache_key")
    return prompt_tokens // 2 if isinstance(key, str) and key else 0


# -- wire helpers --------------------------------------------------------------------------


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _json(obj: object, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=_dumps(obj), content_type=_JSON_TYPE, headers=headers)


def _json_object(raw: bytes) -> dict[str, Any] | None:
    """The request body as a JSON object, or None when it is anything else."""
    try:
        body = json.loads(raw)
    except ValueError:  # includes JSONDecodeError and UnicodeDecodeError
        return None
    return body if isinstance(body, dict) else None


def _json_model(body: bytes) -> str | None:
    """The ``model`` a JSON request body names, for the record (None when there is none)."""
    document = _json_object(body)
    model = document.get("model") if document is not None else None
    return model if isinstance(model, str) else None


def _sse(obj: object, *, event: str | None = None, end: bytes = b"\n\n") -> bytes:
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + _dumps(obj) + end


def _multipart_fields(content_type: str, body: bytes) -> dict[str, bytes]:
    """The named parts of a ``multipart/form-data`` body, byte for byte (empty if not one)."""
    header = email.message.Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str):
        return {}
    fields: dict[str, bytes] = {}
    for chunk in body.split(b"--" + boundary.encode("latin-1"))[1:]:
        if chunk.startswith(b"--"):
            break
        head, separator, content = chunk.partition(b"\r\n\r\n")
        if not separator:
            continue
        disposition = email.message.Message()
        for line in head.split(b"\r\n"):
            name, colon, value = line.partition(b":")
            if colon and name.strip().lower() == b"content-disposition":
                disposition["content-disposition"] = value.strip().decode("latin-1")
        field = disposition.get_param("name", header="content-disposition")
        if isinstance(field, str):
            fields[field] = content.removesuffix(b"\r\n")
    return fields


# -- test knobs ----------------------------------------------------------------------------


class _InvalidKnob(ValueError):
    """A test-knob request header has a value the fake does not understand."""


@dataclass(frozen=True, slots=True)
class _Knobs:
    """The test knobs one request set (see the module docstring)."""

    chunk_delay_s: float | None
    gzip: bool
    words: int | None = None  # chat completions only

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> _Knobs:
        delay_s: float | None = None
        delay = headers.get(_CHUNK_DELAY_HEADER)
        if delay is not None:
            if not delay.strip().isdigit():
                raise _InvalidKnob(f"{_CHUNK_DELAY_HEADER} must be a whole number of ms")
            delay_s = int(delay) / 1000
        encoding = headers.get(_CONTENT_ENCODING_HEADER, "identity").strip().lower()
        if encoding not in ("gzip", "identity"):
            raise _InvalidKnob(f"{_CONTENT_ENCODING_HEADER} must be gzip or identity")
        words: int | None = None
        raw_words = headers.get(_WORDS_HEADER)
        if raw_words is not None:
            raw_words = raw_words.strip()
            if not (raw_words.isascii() and raw_words.isdigit()) or not (
                1 <= int(raw_words) <= _MAX_KNOB_WORDS
            ):
                raise _InvalidKnob(
                    f"{_WORDS_HEADER} must be a whole number, 1 to {_MAX_KNOB_WORDS}"
                )
            words = int(raw_words)
        return cls(delay_s, encoding == "gzip", words)


_KNOBS: Final = web.RequestKey("fake_knobs", _Knobs)


@web.middleware
async def _apply_knobs(
    request: web.Request, handler: Callable[[web.Request], Any]
) -> web.StreamResponse:
    try:
        knobs = _Knobs.from_headers(request.headers)
    except _InvalidKnob as exc:
        return _openai_error(400, str(exc), "invalid_fake_knob")
    request[_KNOBS] = knobs
    response: web.StreamResponse = await handler(request)
    # Streamed replies compress themselves (_EventStream); whole bodies are compressed here.
    if knobs.gzip and isinstance(response, web.Response) and not response.prepared:
        body = response.body
        if isinstance(body, bytes):
            response.body = gzip.compress(body)
            response.headers["Content-Encoding"] = "gzip"
    return response


class _EventStream:
    """One streamed reply, written event by event with the chunk delay between events."""

    def __init__(self, response: web.StreamResponse, delay_s: float, gzip: bool) -> None:
        self.response = response
        self._delay_s = delay_s
        self._compressor = zlib.compressobj(wbits=31) if gzip else None  # 31: gzip framing

    @classmethod
    async def open(
        cls,
        request: web.Request,
        content_type: str,
        default_delay_s: float,
        extra_headers: Mapping[str, str],
    ) -> _EventStream:
        knobs = request[_KNOBS]
        headers = {"Content-Type": content_type, "Cache-Control": "no-cache", **extra_headers}
        if knobs.gzip:
            headers["Content-Encoding"] = "gzip"
        response = web.StreamResponse(headers=headers)
        if request.version >= (1, 1):
            response.enable_chunked_encoding()
        await response.prepare(request)
        delay_s = default_delay_s if knobs.chunk_delay_s is None else knobs.chunk_delay_s
        return cls(response, delay_s, knobs.gzip)

    def _encode(self, data: bytes) -> bytes:
        if self._compressor is None:
            return data
        return self._compressor.compress(data) + self._compressor.flush(zlib.Z_SYNC_FLUSH)

    async def send(self, events: Iterable[bytes]) -> web.StreamResponse:
        try:
            for i, event in enumerate(events):
                if i and self._delay_s:
                    await asyncio.sleep(self._delay_s)
                await self.response.write(self._encode(event))
            tail = self._compressor.flush() if self._compressor is not None else b""
            await self.response.write_eof(tail)
        except ConnectionResetError:
            pass  # the client went away mid-stream; nothing left to do
        return self.response


# -- recording -----------------------------------------------------------------------------


class _RequestLog:
    """The in-memory record of provider requests and of the connections that carried them."""

    def __init__(self) -> None:
        self._requests: deque[dict[str, Any]] = deque(maxlen=MAX_RECORDED)
        self._seen_transports: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()
        self._seen_ids: set[int] = set()  # for transports that cannot be weakly referenced
        self._connections = 0

    def record(self, request: web.BaseRequest, body: bytes, model: str | None) -> None:
        self._requests.append(
            {
                "method": request.method,
                "path": request.raw_path,
                "headers": [
                    [name.decode("latin-1").lower(), value.decode("latin-1")]
                    for name, value in request.raw_headers
                ],
                "body_length": len(body),
                "model": model,
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

    def snapshot(self) -> dict[str, Any]:
        return {"requests": list(self._requests), "connections": self._connections}

    def clear(self) -> None:
        self._requests.clear()
        self._seen_transports = weakref.WeakSet()
        self._seen_ids.clear()
        self._connections = 0


class _Upstream:
    """What every provider's handlers share: the request log and the configured delays."""

    def __init__(self, log: _RequestLog, latency_ms: int, chunk_delay_ms: int) -> None:
        self.log = log
        self._latency_s = max(latency_ms, 0) / 1000
        self._chunk_delay_s = max(chunk_delay_ms, 0) / 1000

    async def received(
        self, request: web.Request, model_of: Callable[[bytes], str | None] = _json_model
    ) -> bytes:
        """Read and record a provider request, then wait out the configured latency."""
        body = await request.read()
        self.log.record(request, body, model_of(body))
        if self._latency_s:
            await asyncio.sleep(self._latency_s)
        return body

    async def stream(
        self,
        request: web.Request,
        content_type: str,
        extra_headers: Mapping[str, str] | None = None,
    ) -> _EventStream:
        """Start a streamed reply (see _EventStream)."""
        return await _EventStream.open(
            request, content_type, self._chunk_delay_s, extra_headers or {}
        )


class _Control:
    """The fake's own endpoints: the request record, health, and the 404 for the rest."""

    _RECORDED_PREFIXES: Final = ("/v1/", "/v1beta/", "/v1beta1/", "/model/")

    def __init__(self, upstream: _Upstream) -> None:
        self._upstream = upstream

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/_fake/requests", self.list_requests)
        router.add_delete("/_fake/requests", self.clear_requests)
        router.add_get("/_fake/health", self.health)

    async def list_requests(self, request: web.Request) -> web.Response:
        return _json(self._upstream.log.snapshot())

    async def clear_requests(self, request: web.Request) -> web.Response:
        self._upstream.log.clear()
        return _json({"cleared": True})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def not_found(self, request: web.Request) -> web.Response:
        if request.path.startswith(self._RECORDED_PREFIXES):
            await self._upstream.received(request)
        return _openai_error(404, f"Invalid URL ({request.method} {request.path})", "not_found")


# -- OpenAI --------------------------------------------------------------------------------


def _openai_error(status: int, message: str, code: str, param: str | None = None) -> web.Response:
    return _json(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "code": code,
                "param": param,
            }
        },
        status,
    )


def _openai_invalid_json() -> web.Response:
    return _openai_error(
        400,
        "We could not parse the JSON body of your request. The OpenAI API expects a"
        " JSON object as the payload.",
        "invalid_json",
    )


def _openai_missing(param: str) -> web.Response:
    return _openai_error(
        400, f"Missing required parameter: '{param}'.", "missing_required_parameter", param
    )


def _openai_invalid(param: str, message: str) -> web.Response:
    return _openai_error(400, message, "invalid_value", param)


def _model_or(body: Mapping[str, Any], default: str) -> str:
    model = body.get("model")
    return model if isinstance(model, str) and model else default


def _completion_prompts(prompt: object) -> list[str | list[int]] | None:
    """A legacy completion ``prompt`` as a list of prompts (string or token array)."""
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        return None
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
        return list(prompt)
    return None


def _prompt_tokens(prompt: str | list[int]) -> int:
    """T(characters) of a text prompt; a token array counts its length."""
    return len(prompt) if isinstance(prompt, list) else _text_tokens(len(prompt))


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _embedding_vector(model: str, item: str | list[int], dimensions: int) -> bytes:
    """``dimensions`` little-endian float32 values in [-1, 1), exact in float32."""
    raw = hashlib.shake_256(_digest(model, item)).digest(2 * dimensions)
    values = struct.unpack(f"<{dimensions}h", raw)
    return struct.pack(f"<{dimensions}f", *(v / 32768 for v in values))


class _OpenAIChat:
    """OpenAI chat completions, legacy completions and the model list."""

    def __init__(self, upstream: _Upstream) -> None:
        self._upstream = upstream
        self._models_body = _dumps(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": _MODEL_CREATED, "owned_by": "system"}
                    for m in _MODELS
                ],
            }
        )

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/{prefix:.*}/chat/completions", self.chat_completions)
        # Registered after chat, which it would also match: the first matching route wins.
        router.add_post("/{prefix:.*}/completions", self.completions)
        router.add_get("/{prefix:.*}/models", self.models)

    async def models(self, request: web.Request) -> web.Response:
        await self._upstream.received(request)
        return web.Response(body=self._models_body, content_type=_JSON_TYPE)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = _json_object(await self._upstream.received(request))
        if body is None:
            return _openai_invalid_json()
        messages = body.get("messages")
        if not isinstance(messages, list):
            return _openai_missing("messages")
        model = _model_or(body, DEFAULT_MODEL)
        cap = _token_cap(body.get("max_completion_tokens"), body.get("max_tokens"))
        reply = _Generation.of(model, messages, cap, request[_KNOBS].words)
        prompt = _TOKENS_PER_MESSAGE * len(messages) + _text_tokens(_text_chars(messages))
        reasoning = _reasoning_tokens(model, reply.tokens)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": reply.tokens + reasoning,
            "total_tokens": prompt + reply.tokens + reasoning,
            "prompt_tokens_details": {
                "cached_tokens": _openai_cached_tokens(body, prompt),
                "audio_tokens": 0,
            },
            "completion_tokens_details": {
                "reasoning_tokens": reasoning,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        finish_reason = "length" if reply.truncated else "stop"
        if body.get("stream") is True:
            include_usage = _include_usage(body)
            return await self._chat_stream(
                request, model, reply, finish_reason, usage if include_usage else None
            )
        completion = {
            "id": reply.ident("chatcmpl-"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": reply.text,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": usage,
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        return _json(completion)

    async def _chat_stream(
        self,
        request: web.Request,
        model: str,
        reply: _Generation,
        finish_reason: str,
        usage: dict[str, Any] | None,
    ) -> web.StreamResponse:
        created = int(time.time())

        def chunk(choices: list[dict[str, Any]], final_usage: object = None) -> bytes:
            obj: dict[str, Any] = {
                "id": reply.ident("chatcmpl-"),
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "service_tier": "default",
                "system_fingerprint": SYSTEM_FINGERPRINT,
                "choices": choices,
            }
            if usage is not None:
                obj["usage"] = final_usage
            return _sse(obj)

        def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        events = [chunk([choice({"role": "assistant", "content": "", "refusal": None})])]
        events.extend(chunk([choice({"content": piece})]) for piece in reply.pieces)
        events.append(chunk([choice({}, finish_reason)]))
        if usage is not None:
            events.append(chunk([], usage))
        events.append(_SSE_DONE)
        stream = await self._upstream.stream(request, _SSE_TYPE)
        return await stream.send(events)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = _json_object(await self._upstream.received(request))
        if body is None:
            return _openai_invalid_json()
        prompts = _completion_prompts(body.get("prompt"))
        if prompts is None:
            return _openai_missing("prompt")
        model = _model_or(body, "gpt-3.5-turbo-instruct")
        cap = _token_cap(body.get("max_tokens")) or _LEGACY_COMPLETION_MAX_TOKENS
        replies = [_Generation.of(model, p, cap) for p in prompts]
        prompt_tokens = sum(_prompt_tokens(p) for p in prompts)
        completion_tokens = sum(r.tokens for r in replies)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        completion_id = _Generation.of(model, prompts, None).ident("cmpl-")
        created = int(time.time())

        def completion(choices: list[dict[str, Any]]) -> dict[str, Any]:
            return {
                "id": completion_id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": SYSTEM_FINGERPRINT,
                "choices": choices,
            }

        def choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
            return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}

        def finish(reply: _Generation) -> str:
            return "length" if reply.truncated else "stop"

        if body.get("stream") is not True:
            whole = completion([choice(i, r.text, finish(r)) for i, r in enumerate(replies)])
            return _json({**whole, "usage": usage})
        include_usage = _include_usage(body)

        def chunk(choices: list[dict[str, Any]], final_usage: object = None) -> bytes:
            obj = completion(choices)
            if include_usage:
                obj["usage"] = final_usage
            return _sse(obj)

        events: list[bytes] = []
        for i, reply in enumerate(replies):
            events.extend(chunk([choice(i, piece, None)]) for piece in reply.pieces)
            events.append(chunk([choice(i, "", finish(reply))]))
        if include_usage:
            events.append(chunk([], usage))
        events.append(_SSE_DONE)
        stream = await self._upstream.stream(request, _SSE_TYPE)
        return await stream.send(events)


class _ResponsesReply:
    """The reply to one Responses API request: a Response object, whole or as SSE events."""

    def __init__(self, body: Mapping[str, Any], model: str, given: str | list[Any]) -> None:
        instructions = body.get("instructions")
        self._instructions = instructions if isinstance(instructions, str) else None
        items = 1 if isinstance(given, str) else len(given)
        chars = len(given) if isinstance(given, str) else _text_chars(given)
        if self._instructions is not None:
            items += 1
            chars += len(self._instructions)
        input_tokens = _TOKENS_PER_MESSAGE * items + _text_tokens(chars)
        self._cap = _token_cap(body.get("max_output_tokens"))
        self._reply = _Generation.of(
            model, {"instructions": instructions, "input": given}, self._cap
        )
        self._reasoning = _reasoning_tokens(model, self._reply.tokens)
        output_tokens = self._reply.tokens + self._reasoning
        self._usage = {
            "input_tokens": input_tokens,
            "input_tokens_details": {
                "cached_tokens": _openai_cached_tokens(body, input_tokens),
                "cache_write_tokens": 0,
            },
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": self._reasoning},
            "total_tokens": input_tokens + output_tokens,
        }
        self._body = body
        self._model = model
        self._status = "incomplete" if self._reply.truncated else "completed"
        self._created_at = int(time.time())
        self._text_part = {
            "type": "output_text",
            "annotations": [],
            "logprobs": [],
            "text": self._reply.text,
        }
        self._message = {
            "id": self._reply.ident("msg_"),
            "type": "message",
            "status": self._status,
            "role": "assistant",
            "content": [self._text_part],
        }
        self._output: list[dict[str, Any]] = [self._message]
        if self._reasoning:
            reasoning_item = {"id": self._reply.ident("rs_"), "type": "reasoning", "summary": []}
            self._output.insert(0, reasoning_item)

    def _response(self, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        final = status != "in_progress"
        prompt_cache_key = self._body.get("prompt_cache_key")
        previous = self._body.get("previous_response_id")
        return {
            "id": self._reply.ident("resp_"),
            "object": "response",
            "created_at": self._created_at,
            "status": status,
            "background": False,
            "completed_at": self._created_at if status == "completed" else None,
            "error": None,
            "incomplete_details": (
                {"reason": "max_output_tokens"} if status == "incomplete" else None
            ),
            "instructions": self._instructions,
            "max_output_tokens": self._cap,
            "max_tool_calls": None,
            "model": self._model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": previous if isinstance(previous, str) else None,
            "prompt_cache_key": prompt_cache_key if isinstance(prompt_cache_key, str) else None,
            "reasoning": {"effort": "medium" if self._reasoning else None, "summary": None},
            "safety_identifier": None,
            "service_tier": "default",
            "store": self._body.get("store") is not False,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": "auto",
            "tools": [],
            "top_logprobs": 0,
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": self._usage if final else None,
            "user": None,
            "metadata": {},
        }

    def whole(self) -> dict[str, Any]:
        return self._response(self._status, self._output)

    def events(self) -> list[bytes]:
        """The stream: created, in_progress, items and parts, text deltas, completed."""
        started = self._response("in_progress", [])
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": started},
            {"type": "response.in_progress", "response": started},
        ]
        if self._reasoning:
            for kind in ("added", "done"):
                item = {"output_index": 0, "item": self._output[0]}
                events.append({"type": f"response.output_item.{kind}", **item})
        index = len(self._output) - 1
        part = {"item_id": self._message["id"], "output_index": index, "content_index": 0}
        opened = {**self._message, "status": "in_progress", "content": []}
        events.append({"type": "response.output_item.added", "output_index": index, "item": opened})
        empty_part = {**self._text_part, "text": ""}
        events.append({"type": "response.content_part.added", **part, "part": empty_part})
        events.extend(
            {"type": "response.output_text.delta", **part, "delta": piece, "logprobs": []}
            for piece in self._reply.pieces
        )
        text = self._reply.text
        events.append({"type": "response.output_text.done", **part, "text": text, "logprobs": []})
        events.append({"type": "response.content_part.done", **part, "part": self._text_part})
        done = {"output_index": index, "item": self._message}
        events.append({"type": "response.output_item.done", **done})
        events.append({"type": f"response.{self._status}", "response": self.whole()})
        return [
            _sse({**event, "sequence_number": n}, event=event["type"])
            for n, event in enumerate(events)
        ]


class _OpenAIResponses:
    """OpenAI's Responses API."""

    def __init__(self, upstream: _Upstream) -> None:
        self._upstream = upstream

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/{prefix:.*}/responses", self.responses)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = _json_object(await self._upstream.received(request))
        if body is None:
            return _openai_invalid_json()
        given = body.get("input")
        if not isinstance(given, (str, list)):
            return _openai_missing("input")
        reply = _ResponsesReply(body, _model_or(body, DEFAULT_MODEL), given)
        if body.get("stream") is not True:
            return _json(reply.whole())
        stream = await self._upstream.stream(request, _SSE_TYPE)
        return await stream.send(reply.events())


class _OpenAIEmbeddingsAndImages:
    """OpenAI embeddings and image generations."""

    def __init__(self, upstream: _Upstream) -> None:
        self._upstream = upstream

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/{prefix:.*}/embeddings", self.embeddings)
        router.add_post("/{prefix:.*}/images/generations", self.image_generations)

    async def embeddings(self, request: web.Request) -> web.Response:
        body = _json_object(await self._upstream.received(request))
        if body is None:
            return _openai_invalid_json()
        given = body.get("input")
        if given is None:
            return _openai_missing("input")
        inputs = _completion_prompts(given)  # same shapes: string(s) or token array(s)
        if inputs is None or any(len(item) == 0 for item in inputs):
            return _openai_invalid("input", "'input' must be a non-empty string or array.")
        model = _model_or(body, _EMBEDDING_MODEL)
        dimensions = _positive_int(body.get("dimensions")) or (
            _EMBEDDING_DIMENSIONS_LARGE if model.endswith("-3-large") else _EMBEDDING_DIMENSIONS
        )
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            return _openai_invalid("encoding_format", "'encoding_format' must be float or base64.")
        data: list[dict[str, Any]] = []
        for index, item in enumerate(inputs):
            vector = _embedding_vector(model, item, dimensions)
            embedding: object = (
                base64.b64encode(vector).decode()
                if encoding == "base64"
                else list(struct.unpack(f"<{dimensions}f", vector))
            )
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(_prompt_tokens(item) for item in inputs)
        return _json(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def image_generations(self, request: web.Request) -> web.Response:
        body = _json_object(await self._upstream.received(request))
        if body is None:
            return _openai_invalid_json()
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return _openai_missing("prompt")
        model = _model_or(body, _IMAGE_MODEL)
        n = _positive_int(body.get("n")) or 1
        created = int(time.time())
        if not model.startswith("gpt-image"):  # DALL-E: no usage, URLs unless b64_json asked
            as_b64 = body.get("response_format") == "b64_json"
            image_id = _Generation.of(model, prompt, None).ident("img-")
            images: list[dict[str, Any]] = []
            for i in range(n):
                image: dict[str, Any] = (
                    {"b64_json": _PNG_B64}
                    if as_b64
                    else {"url": f"https://fake-provider.invalid/images/{image_id}-{i}.png"}
                )
                if model.startswith("dall-e-3"):
                    image["revised_prompt"] = prompt
                images.append(image)
            return _json({"created": created, "data": images})
        asked_quality, asked_size = body.get("quality"), body.get("size")
        quality = asked_quality if isinstance(asked_quality, str) else "medium"
        quality = quality if quality in _IMAGE_OUTPUT_TOKENS else "medium"
        size = asked_size if isinstance(asked_size, str) else "1024x1024"
        size = size if size in _IMAGE_OUTPUT_TOKENS[quality] else "1024x1024"
        text_tokens = _text_tokens(len(prompt))
        output_tokens = n * _IMAGE_OUTPUT_TOKENS[quality][size]
        return _json(
            {
                "created": created,
                "background": "opaque",
                "data": [{"b64_json": _PNG_B64} for _ in range(n)],
                "output_format": "png",
                "quality": quality,
                "size": size,
                "usage": {
                    "input_tokens": text_tokens,
                    "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": 0},
                    "output_tokens": output_tokens,
                    "total_tokens": text_tokens + output_tokens,
                },
            }
        )


def _transcription_usage(
    model: str, audio_seconds: int, prompt: str, output: int
) -> dict[str, Any]:
    if model.startswith("whisper"):
        return {"type": "duration", "seconds": audio_seconds}
    audio_tokens = _AUDIO_TOKENS_PER_SECOND * audio_seconds
    text_tokens = _text_tokens(len(prompt))
    return {
        "type": "tokens",
        "input_tokens": audio_tokens + text_tokens,
        "input_token_details": {"text_tokens": text_tokens, "audio_tokens": audio_tokens},
        "output_tokens": output,
        "total_tokens": audio_tokens + text_tokens + output,
    }


class _OpenAIAudio:
    """OpenAI transcriptions (multipart upload) and text to speech."""

    def __init__(self, upstream: _Upstream) -> None:
        self._upstream = upstream

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/{prefix:.*}/audio/transcriptions", self.transcriptions)
        router.add_post("/{prefix:.*}/audio/speech", self.speech)

    async def transcriptions(self, request: web.Request) -> web.StreamResponse:
        content_type = request.headers.get("Content-Type", "")

        def model_of(raw: bytes) -> str | None:
            model = _multipart_fields(content_type, raw).get("model")
            return model.decode("utf-8", "replace") if model is not None else None

        fields = _multipart_fields(content_type, await self._upstream.received(request, model_of))
        audio = fields.get("file")
        if audio is None:
            return _openai_missing("file")
        model_field = fields.get("model")
        if model_field is None:
            return _openai_missing("model")
        model = model_field.decode("utf-8", "replace")
        response_format = fields.get("response_format", b"json").decode("utf-8", "replace")
        prompt = fields.get("prompt", b"").decode("utf-8", "replace")
        transcript = _Generation.of(model, hashlib.sha256(audio).hexdigest(), None)
        seconds = max(1, -(-len(audio) // _AUDIO_BYTES_PER_SECOND))
        usage = _transcription_usage(model, seconds, prompt, transcript.tokens)
        stream = fields.get("stream", b"false").strip().lower() == b"true"
        if stream and not model.startswith("whisper"):  # whisper-1 ignores "stream"
            events = [
                _sse({"type": "transcript.text.delta", "delta": piece})
                for piece in transcript.pieces
            ]
            done = {"type": "transcript.text.done", "text": transcript.text, "usage": usage}
            events.append(_sse(done))
            sse = await self._upstream.stream(request, _SSE_TYPE)
            return await sse.send(events)
        text = transcript.text
        end = f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if response_format == "json":
            return _json({"text": text, "usage": usage})
        if response_format == "text":
            return web.Response(text=text, content_type="text/plain")
        if response_format == "srt":
            return web.Response(text=f"1\n00:00:00,000 --> {end},000\n{text}\n\n")
        if response_format == "vtt":
            return web.Response(text=f"WEBVTT\n\n00:00:00.000 --> {end}.000\n{text}\n\n")
        if response_format == "verbose_json":
            segment = {
                "id": 0,
                "seek": 0,
                "start": 0.0,
                "end": float(seconds),
                "text": " " + text,
                "tokens": [50364 + i for i in range(transcript.tokens)],
                "temperature": 0.0,
                "avg_logprob": -0.25,
                "compression_ratio": 1.0,
                "no_speech_prob": 0.0,
            }
            return _json(
                {
                    "task": "transcribe",
                    "language": "english",
                    "duration": float(seconds),
                    "text": text,
                    "segments": [segment],
                    "usage": usage,
                }
            )
        return _openai_invalid("response_format", f"Invalid response_format: {response_format!r}.")

    async def speech(self, request: web.Request) -> web.StreamResponse:
        body = _json_object(await self._upstream.received(request))
        if body is None:
            return _openai_invalid_json()
        for required in ("model", "input", "voice"):
            if not body.get(required):
                return _openai_missing(required)
        model, text, voice = body["model"], body["input"], body["voice"]
        if not isinstance(model, str) or not isinstance(text, str):
            return _openai_invalid("input", "'model' and 'input' must be strings.")
        response_format = body.get("response_format", "mp3")
        if response_format not in _SPEECH_CONTENT_TYPES:
            return _openai_invalid("response_format", "Unsupported response_format.")
        stream_format = body.get("stream_format", "audio")
        if stream_format not in ("audio", "sse"):
            return _openai_invalid("stream_format", "stream_format must be audio or sse.")
        if stream_format == "sse" and model in _SPEECH_MODELS_WITHOUT_SSE:
            message = f"stream_format 'sse' is not supported for {model}."
            return _openai_invalid("stream_format", message)
        audio = hashlib.shake_256(_digest(model, [voice, text])).digest(
            _SPEECH_BYTES_PER_CHAR * len(text)
        )
        if stream_format == "audio":
            return web.Response(body=audio, content_type=_SPEECH_CONTENT_TYPES[response_format])
        instructions = body.get("instructions")
        input_tokens = _text_tokens(len(text)) + _text_tokens(
            len(instructions) if isinstance(instructions, str) else 0
        )
        events = [
            _sse(
                {
                    "type": "speech.audio.delta",
                    "audio": base64.b64encode(audio[i : i + _SPEECH_SSE_CHUNK]).decode(),
                }
            )
            for i in range(0, len(audio), _SPEECH_SSE_CHUNK)
        ]
        usage = {
            "input_tokens": input_tokens,
            "output_tokens": len(text),
            "total_tokens": input_tokens + len(text),
        }
        events.append(_sse({"type": "speech.audio.done", "usage": usage}))
        stream = await self._upstream.stream(request, _SSE_TYPE)
        return await stream.send(events)


# -- Anthropic -----------------------------------------------------------------------------


def _anthropic_error(status: int, kind: str, message: str) -> web.Response:
    return _json({"type": "error", "error": {"type": kind, "message": message}}, status)


def _anthropic_cache_ttl(system: object) -> str | None:
    """The cache TTL a system prompt's ``cache_control`` blocks ask for; None if none do."""
    ttls = [
        block["cache_control"].get("ttl", "5m")
        for block in (system if isinstance(system, list) else [])
        if isinstance(block, dict) and isinstance(block.get("cache_control"), dict)
    ]
    if not ttls:
        return None
    return "1h" if "1h" in ttls else "5m"


class _Anthropic:
    """Anthropic's Messages API (credentials and anthropic-version are recorded, not checked)."""

    def __init__(self, upstream: _Upstream) -> None:
        self._upstream = upstream

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/{prefix:.*}/messages", self.messages)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = _json_object(await self._upstream.received(request))
        if body is None:
            return _anthropic_error(400, "invalid_request_error", "Invalid JSON body.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return _anthropic_error(400, "invalid_request_error", "model: Field required")
        return await self.reply(request, body, model)

    async def reply(
        self, request: web.Request, body: dict[str, Any], model: str, *, vertex: bool = False
    ) -> web.StreamResponse:
        """The Message (or its stream) for a Messages request body naming ``model``; on Vertex
        AI (``vertex``) without a request-id header, and its ``@`` version as ``-``."""
        messages = body.get("messages")
        max_tokens = _token_cap(body.get("max_tokens"))
        if not isinstance(messages, list):
            return _anthropic_error(400, "invalid_request_error", "messages: Field required")
        if max_tokens is None:
            return _anthropic_error(400, "invalid_request_error", "max_tokens: Field required")
        system = body.get("system")
        system_tokens = _text_tokens(_content_chars(system))
        input_tokens = _TOKENS_PER_MESSAGE * len(messages) + _text_tokens(_text_chars(messages))
        ttl = _anthropic_cache_ttl(system)
        read = written = 0
        if ttl is None:
            input_tokens += system_tokens
        else:
            read, written = _cache_split(system_tokens)
        reply = _Generation.of(model, {"system": system, "messages": messages}, max_tokens)
        stop_reason = "max_tokens" if reply.truncated else "end_turn"

        def usage(output_tokens: int) -> dict[str, Any]:
            return {
                "input_tokens": input_tokens,
                "cache_creation_input_tokens": written,
                "cache_read_input_tokens": read,
                "cache_creation": {
                    "ephemeral_5m_input_tokens": written if ttl == "5m" else 0,
                    "ephemeral_1h_input_tokens": written if ttl == "1h" else 0,
                },
                "output_tokens": output_tokens,
                "service_tier": "standard",
            }

        def message(
            content: list[dict[str, Any]], done: bool, output_tokens: int
        ) -> dict[str, Any]:
            return {
                "id": reply.ident("msg_vrtx_" if vertex else "msg_"),
                "type": "message",
                "role": "assistant",
                "model": model.replace("@", "-") if vertex else model,
                "content": content,
                "stop_reason": stop_reason if done else None,
                "stop_sequence": None,
                "usage": usage(output_tokens),
            }

        headers = {} if vertex else {"request-id": reply.ident("req_")}
        if body.get("stream") is not True:
            text_block = {"type": "text", "text": reply.text}
            return _json(message([text_block], True, reply.tokens), headers=headers)

        def event(obj: dict[str, Any]) -> bytes:
            return _sse(obj, event=obj["type"])

        events = [
            event({"type": "message_start", "message": message([], False, 1)}),
            event(
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                }
            ),
            event({"type": "ping"}),
        ]
        events.extend(
            event(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": piece},
                }
            )
            for piece in reply.pieces
        )
        events.append(event({"type": "content_block_stop", "index": 0}))
        events.append(
            event(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": reply.tokens},
                }
            )
        )
        events.append(event({"type": "message_stop"}))
        stream = await self._upstream.stream(request, _SSE_TYPE, headers)
        return await stream.send(events)


# -- Gemini --------------------------------------------------------------------------------


def _google_error(status: int, state: str, message: str) -> web.Response:
    return _json({"error": {"code": status, "message": message, "status": state}}, status)


def _gemini_chars(content: object) -> int:
    """Characters of the ``text`` parts of a Gemini ``Content`` (or of a plain string)."""
    if isinstance(content, str):
        return len(content)
    return _content_chars(content.get("parts")) if isinstance(content, dict) else 0


class _Gemini:
    """Google's Gemini API: generateContent and streamGenerateContent (Google AI and Vertex)."""

    _METHODS: Final = ("generateContent", "streamGenerateContent")

    def __init__(self, upstream: _Upstream) -> None:
        self._upstream = upstream

    def add_routes(self, router: web.UrlDispatcher) -> None:
        # `{model}:{method}` in one path segment; the model name may not contain ':' or '/'.
        router.add_post("/{prefix:.*}/models/{model:[^/:]+}:{method:[A-Za-z]+}", self.generate)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        model = request.match_info["model"]
        method = request.match_info["method"]
        body = _json_object(await self._upstream.received(request, lambda _: model))
        if method not in self._METHODS:
            return _google_error(404, "NOT_FOUND", f"Method {method} is not found for {model}.")
        if body is None:
            return _google_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            return _google_error(400, "INVALID_ARGUMENT", "* contents: contents is not specified")
        system = body.get("systemInstruction", body.get("system_instruction"))
        chars = sum(_gemini_chars(c) for c in contents) + _gemini_chars(system)
        prompt = _TOKENS_PER_MESSAGE * len(contents) + _text_tokens(chars)
        config = body.get("generationConfig", body.get("generation_config"))
        cap = _token_cap(config.get("maxOutputTokens")) if isinstance(config, dict) else None
        reply = _Generation.of(model, {"system": system, "contents": contents}, cap)
        thinks = "thinking" in model or "2.5" in model
        thoughts = _REASONING_TOKENS_PER_WORD * reply.tokens if thinks else 0
        finish_reason = "MAX_TOKENS" if reply.truncated else "STOP"

        def response(text: str, candidates_tokens: int, finish: bool) -> dict[str, Any]:
            candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
            if finish:
                candidate["finishReason"] = finish_reason
            candidate["index"] = 0
            usage: dict[str, Any] = {
                "promptTokenCount": prompt,
                "candidatesTokenCount": candidates_tokens,
                "totalTokenCount": prompt + candidates_tokens + thoughts,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
            }
            if thinks:
                usage["thoughtsTokenCount"] = thoughts
            return {
                "candidates": [candidate],
                "usageMetadata": usage,
                "modelVersion": model,
                "responseId": reply.ident("")[:22],
            }

        if method == "generateContent":
            return _json(response(reply.text, reply.tokens, True))
        chunks = [
            response(piece, i + 1, i + 1 == reply.tokens) for i, piece in enumerate(reply.pieces)
        ]
        if request.query.get("alt") == "sse":
            stream = await self._upstream.stream(request, "text/event-stream")
            # Google separates its SSE events with CRLF pairs.
            return await stream.send(_sse(chunk, end=b"\r\n\r\n") for chunk in chunks)
        # Without alt=sse the reply is one JSON array, sent element by element.
        elements = [(b"[" if i == 0 else b",\r\n") + _dumps(c) for i, c in enumerate(chunks)]
        elements[-1] += b"]"
        stream = await self._upstream.stream(request, _JSON_TYPE)
        return await stream.send(elements)


# -- Vertex AI -----------------------------------------------------------------------------

# Methods of `publishers/google` models that _Vertex answers; Gemini's go on to _Gemini.
_VERTEX_GOOGLE_METHODS: Final = (
    "predict",
    "embedContent",
    "batchEmbedContents",
    "predictLongRunning",
    "fetchPredictOperation",
)
_VERTEX_VERSIONS: Final = ("v1", "v1beta1")
_VERTEX_EMBEDDING_DIMENSIONS: Final = 768  # text-embedding-005, text-multilingual-embedding-002
_GEMINI_EMBEDDING_DIMENSIONS: Final = 3072  # gemini-embedding-001
_VEO_VIDEO_TYPE: Final = "type.googleapis.com/cloud.ai.large_models.vision.GenerateVideoResponse"
_VEO_DEFAULT_SECONDS: Final = 8
_VEO_MAX_SAMPLES: Final = 4
_VEO_BYTES_PER_SECOND: Final = 64


def _vertex_resource(prefix: str, model: str) -> str:
    """``projects/{p}/locations/{l}/publishers/google/models/{model}`` from a route's path
    prefix (``v1beta1/projects/{p}/locations/{l}``, the API version dropped)."""
    head, _, rest = prefix.partition("/")
    parent = rest if head in _VERTEX_VERSIONS else prefix
    return f"{parent}/publishers/google/models/{model}".lstrip("/")


def _each(items: object, key: str) -> list[Any] | None:
    """``item[key]`` of each object of a non-empty JSON list; None if it is anything else."""
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        return None
    return [item.get(key) for item in items]


def _vertex_vector(model: str, seed: object, dimensions: int) -> list[float]:
    vector = _embedding_vector(model, json.dumps(seed, sort_keys=True), dimensions)
    return list(struct.unpack(f"<{dimensions}f", vector))


@dataclass(slots=True)
class _VeoOperation:
    """One accepted Veo generation: running at its first poll, done from the second on."""

    name: str
    model: str
    videos: list[dict[str, Any]]
    polls: int = 0

    def poll(self) -> dict[str, Any]:
        self.polls += 1
        if self.polls == 1:
            return {"name": self.name}  # a running operation: JSON leaves "done": false out
        response = {"@type": _VEO_VIDEO_TYPE, "raiMediaFilteredCount": 0, "videos": self.videos}
        return {"name": self.name, "done": True, "response": response}


class _Vertex:
    """Vertex AI beyond Gemini's generateContent (which _Gemini answers): Claude's rawPredict
    and streamRawPredict, embeddings, Veo's predictLongRunning and its operations."""

    def __init__(self, upstream: _Upstream, anthropic: _Anthropic) -> None:
        self._upstream = upstream
        self._anthropic = anthropic
        self._operations: dict[str, _VeoOperation] = {}  # oldest first, at most MAX_RECORDED
        self._started = 0

    def add_routes(self, router: web.UrlDispatcher) -> None:
        # Registered before _Gemini, whose `…/models/{model}:{method}` matches these paths too;
        # a Google method not listed here (generateContent, countTokens) goes on to it.
        models = "/{prefix:.*}/publishers/{publisher}/models/{model:[^/:]+}"
        google_methods = "|".join(_VERTEX_GOOGLE_METHODS)
        router.add_post(
            models.replace("{publisher}", "anthropic") + ":{method:[A-Za-z]+}", self.anthropic
        )
        router.add_post(
            models.replace("{publisher}", "google") + f":{{method:{google_methods}}}", self.google
        )
        router.add_get("/{prefix:.*}/operations/{operation_id:[^/:]+}", self.get_operation)

    async def anthropic(self, request: web.Request) -> web.StreamResponse:
        model = request.match_info["model"]
        counting = model == "count-tokens"
        body = _json_object(
            await self._upstream.received(request, _json_model if counting else lambda _: model)
        )
        method = request.match_info["method"]
        if method not in ("rawPredict", "streamRawPredict"):
            return _google_error(404, "NOT_FOUND", f"Method {method} is not found for {model}.")
        if body is None:
            return _anthropic_error(400, "invalid_request_error", "Invalid JSON body.")
        if not isinstance(body.get("anthropic_version"), str):
            return _anthropic_error(
                400, "invalid_request_error", "anthropic_version: Field required"
            )
        if not counting:
            return await self._anthropic.reply(request, body, model, vertex=True)
        messages = body.get("messages")
        if not isinstance(messages, list):
            return _anthropic_error(400, "invalid_request_error", "messages: Field required")
        chars = _text_chars(messages) + _content_chars(body.get("system"))
        return _json({"input_tokens": _TOKENS_PER_MESSAGE * len(messages) + _text_tokens(chars)})

    async def google(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        body = _json_object(await self._upstream.received(request, lambda _: model))
        if body is None:
            return _google_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        method = request.match_info["method"]
        if method == "predict" and "embedding" in model:
            return self._predict_embeddings(model, body)
        if method == "embedContent":
            return self._embed_content(model, body)
        if method == "batchEmbedContents":
            return self._batch_embed_contents(model, body)
        if method == "predictLongRunning" and model.startswith("veo-"):
            return self._generate_videos(request.match_info["prefix"], model, body)
        if method == "fetchPredictOperation":
            name = body.get("operationName")
            operation = self._operations.get(name) if isinstance(name, str) else None
            if operation is None or operation.model != model:
                return _google_error(404, "NOT_FOUND", f"Operation {name} is not found.")
            return _json(operation.poll())
        return _google_error(404, "NOT_FOUND", f"Method {method} is not found for {model}.")

    async def get_operation(self, request: web.Request) -> web.Response:
        head, _, rest = request.match_info["prefix"].partition("/")
        parent = rest if head in _VERTEX_VERSIONS else request.match_info["prefix"]
        name = f"{parent}/operations/{request.match_info['operation_id']}"
        operation = self._operations.get(name)
        await self._upstream.received(request, lambda _: operation.model if operation else None)
        if operation is None:
            return _google_error(404, "NOT_FOUND", f"Operation {name} is not found.")
        return _json(operation.poll())

    @staticmethod
    def _dimensions(model: str, config: object) -> int:
        asked = config.get("outputDimensionality") if isinstance(config, dict) else None
        return _positive_int(asked) or (
            _GEMINI_EMBEDDING_DIMENSIONS
            if model.startswith("gemini-")
            else _VERTEX_EMBEDDING_DIMENSIONS
        )

    def _predict_embeddings(self, model: str, body: dict[str, Any]) -> web.Response:
        texts = _each(body.get("instances"), "content")
        if texts is None or not all(isinstance(text, str) for text in texts):
            return _google_error(400, "INVALID_ARGUMENT", "instances[].content is required.")
        dimensions = self._dimensions(model, body.get("parameters"))
        predictions = [
            {
                "embeddings": {
                    "statistics": {"truncated": False, "token_count": _text_tokens(len(text))},
                    "values": _vertex_vector(model, text, dimensions),
                }
            }
            for text in texts
        ]
        characters = sum(len("".join(text.split())) for text in texts)
        return _json(
            {"predictions": predictions, "metadata": {"billableCharacterCount": characters}}
        )

    def _embed_content(self, model: str, body: dict[str, Any]) -> web.Response:
        content = body.get("content")
        if not isinstance(content, dict):
            return _google_error(400, "INVALID_ARGUMENT", "content is required.")
        tokens = _text_tokens(_gemini_chars(content))
        dimensions = self._dimensions(model, body.get("embedContentConfig"))
        return _json(
            {
                "embedding": {"values": _vertex_vector(model, content, dimensions)},
                "usageMetadata": {"promptTokenCount": tokens, "totalTokenCount": tokens},
                "truncated": False,
            }
        )

    def _batch_embed_contents(self, model: str, body: dict[str, Any]) -> web.Response:
        contents = _each(body.get("requests"), "content")
        configs = _each(body.get("requests"), "embedContentConfig")
        if contents is None or configs is None or not all(isinstance(c, dict) for c in contents):
            return _google_error(400, "INVALID_ARGUMENT", "requests[].content is required.")
        embeddings = [
            {"values": _vertex_vector(model, content, self._dimensions(model, config))}
            for content, config in zip(contents, configs, strict=True)
        ]
        tokens = sum(_text_tokens(_gemini_chars(c)) for c in contents)
        usage = {"promptTokenCount": tokens, "totalTokenCount": tokens}
        return _json({"embeddings": embeddings, "usageMetadata": usage})

    def _generate_videos(self, prefix: str, model: str, body: dict[str, Any]) -> web.Response:
        instances = body.get("instances")
        first = instances[0] if isinstance(instances, list) and instances else None
        if not isinstance(first, dict) or not (
            isinstance(first.get("prompt"), str) or isinstance(first.get("image"), dict)
        ):
            return _google_error(400, "INVALID_ARGUMENT", "instances[0].prompt is required.")
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            return _google_error(400, "INVALID_ARGUMENT", "parameters must be an object.")
        seconds = parameters.get("durationSeconds", _VEO_DEFAULT_SECONDS)
        accepted = range(5, 9) if model.startswith("veo-2") else (4, 6, 8)
        if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds not in accepted:
            message = f"durationSeconds must be one of {', '.join(map(str, accepted))}."
            return _google_error(400, "INVALID_ARGUMENT", message)
        samples = parameters.get("sampleCount", 1)
        if _positive_int(samples) is None or samples > _VEO_MAX_SAMPLES:
            message = f"sampleCount must be from 1 to {_VEO_MAX_SAMPLES}."
            return _google_error(400, "INVALID_ARGUMENT", message)
        digest = _digest(model, [self._started, body]).hex()
        self._started += 1
        operation_id = "-".join(
            (digest[:8], digest[8:12], digest[12:16], digest[16:20], digest[20:32])
        )
        name = f"{_vertex_resource(prefix, model)}/operations/{operation_id}"
        storage = parameters.get("storageUri")
        videos: list[dict[str, Any]] = []
        for i in range(samples):
            if isinstance(storage, str) and storage:
                uri = f"{storage.rstrip('/')}/{operation_id}/sample_{i}.mp4"
                videos.append({"gcsUri": uri, "mimeType": "video/mp4"})
            else:
                data = hashlib.shake_256(f"{name}/{i}".encode()).digest(
                    _VEO_BYTES_PER_SECOND * seconds
                )
                videos.append(
                    {"bytesBase64Encoded": base64.b64encode(data).decode(), "mimeType": "video/mp4"}
                )
        self._operations[name] = _VeoOperation(name, model, videos)
        if len(self._operations) > MAX_RECORDED:
            del self._operations[next(iter(self._operations))]
        return _json({"name": name})


# -- Bedrock -------------------------------------------------------------------------------


def _bedrock_error(status: int, message: str) -> web.Response:
    kind = "ValidationException:http://internal.amazon.com/coral/com.amazon.bedrock/"
    return _json({"message": message}, status, headers={"x-amzn-ErrorType": kind})


_EVENT_STREAM_TYPE: Final = "application/vnd.amazon.eventstream"
# AWS pads the JSON of every stream event with a "p" member of varying length, so that event
# sizes do not give the content away; the fake pads deterministically from this alphabet.
_BEDROCK_PADDING: Final = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_BEDROCK_INVOCATION_METRICS: Final = "amazon-bedrock-invocationMetrics"
_LLAMA_MAX_GEN_LEN: Final = 512


def _bedrock_event(event_type: str, payload: Mapping[str, Any]) -> bytes:
    """One message of a Bedrock event stream: an ``event`` with a (padded) JSON payload."""
    padding = _BEDROCK_PADDING[: 1 + len(_dumps(payload)) % len(_BEDROCK_PADDING)]
    headers = {":event-type": event_type, ":content-type": _JSON_TYPE, ":message-type": "event"}
    return encode_message(headers, _dumps({**payload, "p": padding}))


def _bedrock_chunk(document: Mapping[str, Any]) -> bytes:
    """One ``chunk`` of InvokeModelWithResponseStream: the vendor's JSON, base64 in ``bytes``."""
    return _bedrock_event("chunk", {"bytes": base64.b64encode(_dumps(document)).decode("ascii")})


def _bedrock_missing(key: str) -> web.Response:
    """InvokeModel's answer to a vendor body without a required key."""
    return _bedrock_error(400, f"Malformed input request: #: required key [{key}] not found")


def _elapsed_ms(started: float) -> int:
    return max(1, round((time.monotonic() - started) * 1000))


@dataclass(frozen=True, slots=True)
class _BedrockCounts:
    """One Bedrock request's reply and token counts (input excludes cache reads and writes)."""

    reply: _Generation
    input_tokens: int
    cache_read: int = 0
    cache_write: int = 0
    cached: bool = False  # the request asked for a prompt cache

    @property
    def request_id(self) -> str:
        return self.reply.ident("")[:32]

    @property
    def stop_reason(self) -> str:
        return "max_tokens" if self.reply.truncated else "end_turn"

    def converse_usage(self) -> dict[str, int]:
        """Converse's ``TokenUsage``: cache counts only when the request asked for a cache."""
        total = self.input_tokens + self.reply.tokens + self.cache_read + self.cache_write
        usage = {
            "inputTokens": self.input_tokens,
            "outputTokens": self.reply.tokens,
            "totalTokens": total,
        }
        if self.cached:
            usage["cacheReadInputTokens"] = self.cache_read
            usage["cacheWriteInputTokens"] = self.cache_write
        return usage

    def invocation_metrics(self, first_byte_ms: int, latency_ms: int) -> dict[str, int]:
        """The ``amazon-bedrock-invocationMetrics`` of a stream's last chunk."""
        metrics = {
            "inputTokenCount": self.input_tokens,
            "outputTokenCount": self.reply.tokens,
            "invocationLatency": latency_ms,
            "firstByteLatency": first_byte_ms,
        }
        if self.cached:
            metrics["cacheReadInputTokenCount"] = self.cache_read
            metrics["cacheWriteInputTokenCount"] = self.cache_write
        return metrics

    def invoke_headers(self, latency_ms: int) -> dict[str, str]:
        """InvokeModel's response headers."""
        headers = {
            "x-amzn-RequestId": self.request_id,
            "X-Amzn-Bedrock-Invocation-Latency": str(latency_ms),
            "X-Amzn-Bedrock-Input-Token-Count": str(self.input_tokens),
            "X-Amzn-Bedrock-Output-Token-Count": str(self.reply.tokens),
        }
        if self.cached:
            headers["X-Amzn-Bedrock-Cache-Read-Input-Token-Count"] = str(self.cache_read)
            headers["X-Amzn-Bedrock-Cache-Write-Input-Token-Count"] = str(self.cache_write)
        return headers


def _converse_counts(model: str, messages: list[Any], body: Mapping[str, Any]) -> _BedrockCounts:
    """Counts of a Converse-shaped request (Converse, ConverseStream, Nova's InvokeModel)."""
    system = body.get("system")
    system_blocks = system if isinstance(system, list) else []
    system_tokens = _text_tokens(_content_chars(system_blocks))
    input_tokens = _TOKENS_PER_MESSAGE * len(messages) + _text_tokens(_text_chars(messages))
    config = body.get("inferenceConfig")
    cap = (
        _token_cap(config.get("maxTokens"), config.get("max_new_tokens"))
        if isinstance(config, dict)
        else None
    )
    reply = _Generation.of(model, {"system": system, "messages": messages}, cap)
    if any(isinstance(b, dict) and "cachePoint" in b for b in system_blocks):
        read, written = _cache_split(system_tokens)
        return _BedrockCounts(reply, input_tokens, read, written, cached=True)
    return _BedrockCounts(reply, input_tokens + system_tokens)


@dataclass(frozen=True, slots=True)
class _InvokeAnswer:
    """A vendor's answer to InvokeModel: the JSON body, or the documents of its stream (the
    invocation metrics are added to the last one when it is sent)."""

    counts: _BedrockCounts
    body: dict[str, Any]
    chunks: list[dict[str, Any]]


def _anthropic_model_name(model_id: str) -> str:
    """The ``model`` a Bedrock Claude reply names: the id without region prefix, vendor and
    version (``us.anthropic.claude-3-5-haiku-20241022-v1:0`` -> ``claude-3-5-haiku-20241022``)."""
    name = model_id.rpartition("/")[2]
    name = name[name.find("anthropic.") + len("anthropic.") :]
    head, version, number = name.rpartition("-v")
    return head if version and number.replace(":", "").isdigit() else name


def _anthropic_invoke(model: str, body: Mapping[str, Any]) -> _InvokeAnswer | web.Response:
    """Claude's Messages format on Bedrock: no ``model`` (the path names it), an
    ``anthropic_version``; counted as the Anthropic endpoint counts."""
    messages = body.get("messages")
    max_tokens = _token_cap(body.get("max_tokens"))
    if not isinstance(body.get("anthropic_version"), str):
        return _bedrock_missing("anthropic_version")
    if not isinstance(messages, list):
        return _bedrock_missing("messages")
    if max_tokens is None:
        return _bedrock_missing("max_tokens")
    system = body.get("system")
    system_tokens = _text_tokens(_content_chars(system))
    input_tokens = _TOKENS_PER_MESSAGE * len(messages) + _text_tokens(_text_chars(messages))
    reply = _Generation.of(model, {"system": system, "messages": messages}, max_tokens)
    if _anthropic_cache_ttl(system) is None:
        counts = _BedrockCounts(reply, input_tokens + system_tokens)
    else:
        read, written = _cache_split(system_tokens)
        counts = _BedrockCounts(reply, input_tokens, read, written, cached=True)

    def message(content: list[dict[str, Any]], done: bool, output_tokens: int) -> dict[str, Any]:
        return {
            "id": reply.ident("msg_bdrk_"),
            "type": "message",
            "role": "assistant",
            "model": _anthropic_model_name(model),
            "content": content,
            "stop_reason": counts.stop_reason if done else None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": counts.input_tokens,
                "cache_creation_input_tokens": counts.cache_write,
                "cache_read_input_tokens": counts.cache_read,
                "output_tokens": output_tokens,
            },
        }

    chunks: list[dict[str, Any]] = [
        {"type": "message_start", "message": message([], False, 1)},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        *(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}}
            for p in reply.pieces
        ),
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": counts.stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": reply.tokens},
        },
        {"type": "message_stop"},
    ]
    whole = message([{"type": "text", "text": reply.text}], True, reply.tokens)
    return _InvokeAnswer(counts, whole, chunks)


def _llama_invoke(model: str, body: Mapping[str, Any]) -> _InvokeAnswer | web.Response:
    """Meta Llama's format: a ``prompt`` string, ``max_gen_len``; counts in the body."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        return _bedrock_missing("prompt")
    cap = _token_cap(body.get("max_gen_len")) or _LLAMA_MAX_GEN_LEN
    reply = _Generation.of(model, {"prompt": prompt}, cap)
    counts = _BedrockCounts(reply, _text_tokens(len(prompt)))
    stop_reason = "length" if reply.truncated else "stop"
    whole = {
        "generation": reply.text,
        "prompt_token_count": counts.input_tokens,
        "generation_token_count": reply.tokens,
        "stop_reason": stop_reason,
    }
    chunks: list[dict[str, Any]] = [
        {
            "generation": piece,
            "prompt_token_count": counts.input_tokens if i == 0 else None,
            "generation_token_count": i + 1,
            "stop_reason": None,
        }
        for i, piece in enumerate(reply.pieces)
    ]
    chunks.append(
        {
            "generation": "",
            "prompt_token_count": None,
            "generation_token_count": reply.tokens,
            "stop_reason": stop_reason,
        }
    )
    return _InvokeAnswer(counts, whole, chunks)


def _nova_invoke(model: str, body: Mapping[str, Any]) -> _InvokeAnswer | web.Response:
    """Amazon Nova's format: Converse's messages and counts, its own usage names."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return _bedrock_missing("messages")
    counts = _converse_counts(model, messages, body)
    cache = {
        "cacheReadInputTokenCount": counts.cache_read,
        "cacheWriteInputTokenCount": counts.cache_write,
    }
    usage = {
        "inputTokens": counts.input_tokens,
        "outputTokens": counts.reply.tokens,
        "totalTokens": counts.converse_usage()["totalTokens"],
        **cache,
    }
    whole = {
        "output": {"message": {"content": [{"text": counts.reply.text}], "role": "assistant"}},
        "stopReason": counts.stop_reason,
        "usage": usage,
    }
    chunks: list[dict[str, Any]] = [
        {"messageStart": {"role": "assistant"}},
        *(
            {"contentBlockDelta": {"delta": {"text": piece}, "contentBlockIndex": 0}}
            for piece in counts.reply.pieces
        ),
        {"contentBlockStop": {"contentBlockIndex": 0}},
        {"messageStop": {"stopReason": counts.stop_reason}},
        {
            "metadata": {
                "usage": {
                    "inputTokens": counts.input_tokens,
                    "outputTokens": counts.reply.tokens,
                    **cache,
                },
                "metrics": {},
                "trace": {},
            }
        },
    ]
    return _InvokeAnswer(counts, whole, chunks)


class _Bedrock:
    """AWS Bedrock Runtime: Converse, ConverseStream, InvokeModel and
    InvokeModelWithResponseStream (request signing is not checked)."""

    def __init__(self, upstream: _Upstream) -> None:
        self._upstream = upstream

    def add_routes(self, router: web.UrlDispatcher) -> None:
        # A model ID may be an ARN: its '/' arrives percent-encoded and is decoded in match_info.
        router.add_post("/model/{model_id:.+}/converse", self.converse)
        router.add_post("/model/{model_id:.+}/converse-stream", self.converse_stream)
        router.add_post("/model/{model_id:.+}/invoke", self.invoke)
        router.add_post("/model/{model_id:.+}/invoke-with-response-stream", self.invoke_stream)

    async def _converse_request(self, request: web.Request) -> _BedrockCounts | web.Response:
        model = request.match_info["model_id"]
        body = _json_object(await self._upstream.received(request, lambda _: model))
        if body is None:
            return _bedrock_error(400, "Malformed input request, please reformat your input.")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _bedrock_error(400, "The messages field is required.")
        return _converse_counts(model, messages, body)

    async def converse(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        counts = await self._converse_request(request)
        if isinstance(counts, web.Response):
            return counts
        message = {"role": "assistant", "content": [{"text": counts.reply.text}]}
        return _json(
            {
                "output": {"message": message},
                "stopReason": counts.stop_reason,
                "usage": counts.converse_usage(),
                "metrics": {"latencyMs": _elapsed_ms(started)},
            },
            headers={"x-amzn-RequestId": counts.request_id},
        )

    async def converse_stream(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        counts = await self._converse_request(request)
        if isinstance(counts, web.Response):
            return counts
        events = [_bedrock_event("messageStart", {"role": "assistant"})]
        events.extend(
            _bedrock_event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": piece}})
            for piece in counts.reply.pieces
        )
        events.append(_bedrock_event("contentBlockStop", {"contentBlockIndex": 0}))
        events.append(_bedrock_event("messageStop", {"stopReason": counts.stop_reason}))
        metadata = {
            "usage": counts.converse_usage(),
            "metrics": {"latencyMs": _elapsed_ms(started)},
        }
        events.append(_bedrock_event("metadata", metadata))
        headers = {"x-amzn-RequestId": counts.request_id}
        stream = await self._upstream.stream(request, _EVENT_STREAM_TYPE, headers)
        return await stream.send(events)

    async def _invoke_answer(self, request: web.Request) -> _InvokeAnswer | web.Response:
        """The answer of the vendor the model ID names (``anthropic.``, ``meta.``,
        ``amazon.nova``); any other model is refused."""
        model = request.match_info["model_id"]
        body = _json_object(await self._upstream.received(request, lambda _: model))
        if body is None:
            return _bedrock_error(400, "Malformed input request, please reformat your input.")
        if "anthropic." in model:
            return _anthropic_invoke(model, body)
        if "meta." in model:
            return _llama_invoke(model, body)
        if "amazon.nova" in model:
            return _nova_invoke(model, body)
        return _bedrock_error(400, "The provided model identifier is invalid.")

    async def invoke(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        answer = await self._invoke_answer(request)
        if isinstance(answer, web.Response):
            return answer
        return _json(answer.body, headers=answer.counts.invoke_headers(_elapsed_ms(started)))

    async def invoke_stream(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        answer = await self._invoke_answer(request)
        if isinstance(answer, web.Response):
            return answer
        first_byte_ms = _elapsed_ms(started)
        *head, last = answer.chunks
        metrics = answer.counts.invocation_metrics(first_byte_ms, _elapsed_ms(started))
        chunks = [*head, {**last, _BEDROCK_INVOCATION_METRICS: metrics}]
        headers = {
            "X-Amzn-Bedrock-Content-Type": _JSON_TYPE,
            "x-amzn-RequestId": answer.counts.request_id,
        }
        stream = await self._upstream.stream(request, _EVENT_STREAM_TYPE, headers)
        return await stream.send(_bedrock_chunk(chunk) for chunk in chunks)


# -- application ---------------------------------------------------------------------------


def build_app(*, latency_ms: int = 0, chunk_delay_ms: int = 0) -> web.Application:
    """The fake provider as an aiohttp application (see the module docstring)."""
    upstream = _Upstream(_RequestLog(), latency_ms, chunk_delay_ms)
    control = _Control(upstream)
    app = web.Application(client_max_size=_CLIENT_MAX_SIZE, middlewares=[_apply_knobs])
    control.add_routes(app.router)
    # Any path prefix: a base URI with a path (`https://host/team-a`) or an Azure deployment
    # (`/openai/deployments/{name}/chat/completions?api-version=…`) reaches the same handlers.
    _OpenAIChat(upstream).add_routes(app.router)
    _OpenAIResponses(upstream).add_routes(app.router)
    _OpenAIEmbeddingsAndImages(upstream).add_routes(app.router)
    _OpenAIAudio(upstream).add_routes(app.router)
    anthropic = _Anthropic(upstream)
    anthropic.add_routes(app.router)
    # Before _Gemini, whose route matches every `…/models/{model}:{method}` path.
    _Vertex(upstream, anthropic).add_routes(app.router)
    _Gemini(upstream).add_routes(app.router)
    _Bedrock(upstream).add_routes(app.router)
    app.router.add_route("*", "/{tail:.*}", control.not_found)
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
        description="Fake LLM provider upstream (OpenAI, Anthropic, Gemini, Bedrock) for demos,"
        " tests and benchmarks.",
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

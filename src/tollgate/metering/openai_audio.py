"""Usage parsers for OpenAI audio: transcriptions, translations and text-to-speech.

``/v1/audio/transcriptions`` and ``/v1/audio/translations`` (:class:`OpenAITranscriptionParser`):
a ``json``, ``verbose_json`` or ``diarized_json`` body may carry ``usage``, either
``{"type": "tokens", "input_tokens", "input_token_details": {"audio_tokens", "text_tokens"},
"output_tokens", "total_tokens"}`` (token-billed models) or ``{"type": "duration",
"seconds"}`` (``units["audio_seconds"]``); without ``usage``, the top-level ``duration`` of a
verbose body stands for the audio seconds. A ``text``, ``srt`` or ``vtt`` body is not JSON and
reports nothing. Streamed (``stream: true``), ``transcript.text.delta`` events carry text only
and the final ``transcript.text.done`` event carries ``usage``.

``/v1/audio/speech`` (:class:`OpenAISpeechParser`): the body is the audio file, never read;
the request's input length is ``units["characters"]``. With ``stream_format: "sse"`` the
stream's ``speech.audio.delta`` events carry audio and ``speech.audio.done`` carries ``usage``
{``input_tokens``, ``output_tokens``, ``total_tokens``}.

No audio response names its model; the request's model stands in. References:
https://developers.openai.com/api/reference/resources/audio/subresources/transcriptions/methods/create
and https://developers.openai.com/api/reference/resources/audio/subresources/speech/methods/create
"""

from __future__ import annotations

import math
from typing import Any

from tollgate.metering.framing import JsonOrSSEParser
from tollgate.metering.openai_responses import responses_usage

__all__ = ["OpenAISpeechParser", "OpenAITranscriptionParser"]


def _seconds(value: Any) -> float | None:
    """``value`` as a duration in seconds if it is a finite, non-negative number, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an integer literal beyond any float
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _event_type(doc: dict[str, Any], event: str) -> str:
    """The event's ``type`` field, or its SSE event name when the data has none."""
    kind = doc.get("type")
    return kind if isinstance(kind, str) else event


class OpenAITranscriptionParser(JsonOrSSEParser):
    """Transcriptions and translations: token ``usage``, or the seconds of audio billed."""

    def _document(self, doc: dict[str, Any], event: str | None) -> None:
        if event is None:
            usage = doc.get("usage")
            if isinstance(usage, dict):
                self._take(usage)
            else:
                duration = _seconds(doc.get("duration"))
                if duration is not None:
                    self.units["audio_seconds"] = duration
        elif _event_type(doc, event) == "transcript.text.done":
            usage = doc.get("usage")
            if isinstance(usage, dict):
                self._take(usage)

    def _take(self, usage: dict[str, Any]) -> None:
        seconds = _seconds(usage.get("seconds"))
        if seconds is not None:
            self.units["audio_seconds"] = seconds
        self.take_usage(responses_usage(usage))


class OpenAISpeechParser(JsonOrSSEParser):
    """Text-to-speech: the input's characters, and ``usage`` from an SSE stream.

    Construct with ``streamed=True`` only for ``stream_format: "sse"``; otherwise the body is
    audio and :meth:`feed` drops it unread, so asking Envoy for it costs nothing here.
    """

    def _setup(self) -> None:
        if self.request.input_chars is not None:
            self.units["characters"] = self.request.input_chars

    def feed(self, chunk: bytes) -> None:
        if self._sse is not None:
            super().feed(chunk)

    def _document(self, doc: dict[str, Any], event: str | None) -> None:
        if event is None or _event_type(doc, event) != "speech.audio.done":
            return
        if "usage" in doc:
            self.take_usage(responses_usage(doc["usage"]))

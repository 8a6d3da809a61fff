"""Usage parsers for Google Vertex AI (Gemini, Claude, embeddings, Veo), chosen by request path.

Vertex AI serves publisher models under one path shape, on the location's own host::

    /v1/projects/{project}/locations/{location}/publishers/{publisher}/models/{model}:{method}

``/v1beta1/…`` too (google-genai's default in Vertex mode), and in express mode (an API key,
no project) ``/v1/publishers/{publisher}/models/{model}:{method}``. The model is named by the
path, never by the body: :func:`vertex_parser_for` passes it on as ``RequestFacts.model``.
Paths as the SDKs send them: google-genai ``models.py`` and ``operations.py``; anthropic
``lib/vertex/_client.py``. What each method records:

* ``publishers/google`` ``:generateContent``, ``:streamGenerateContent`` (a JSON array, or SSE
  with ``?alt=sse``): :class:`~tollgate.metering.gemini.GeminiParser`. Vertex answers with
  Gemini's ``GenerateContentResponse`` (``usageMetadata`` with ``thoughtsTokenCount`` and
  ``cachedContentTokenCount``, ``modelVersion``); its extra ``createTime`` and
  ``usageMetadata.trafficType`` have no field and are not recorded.
* ``publishers/anthropic`` ``:rawPredict`` (a Messages ``Message``) and ``:streamRawPredict``
  (Messages SSE): :class:`~tollgate.metering.anthropic_messages.AnthropicMessagesParser`. The
  path's model (``claude-sonnet-4-5@20250929``) stands in until the response names its own,
  which wins as it does for Anthropic. ``count-tokens:rawPredict`` is not metered (None).
* Embeddings, :class:`VertexEmbeddingsParser`. ``:predict`` on a model whose name contains
  ``embedding`` (``text-embedding-005``, ``text-multilingual-embedding-002``,
  ``gemini-embedding-001``): ``input_tokens`` is the sum of the predictions'
  ``embeddings.statistics.token_count`` (None when none reports one), ``units["characters"]``
  the ``metadata.billableCharacterCount`` when present. ``:embedContent`` and
  ``:batchEmbedContents``, which google-genai sends instead for models named ``gemini…`` or
  ``…maas…``: the response's ``usageMetadata``, mapped as for Gemini.
* Veo, :class:`VeoGenerationParser`. ``:predictLongRunning`` answers with an operation
  (``{"name": "projects/…/operations/…"}``), not with the video. A 2xx operation document
  reports ``units["video_seconds"]`` = ``RequestFacts.video_seconds``, the seconds the request
  asked for (:func:`veo_video_seconds`); no tokens.
* Polling, :class:`VertexOperationPollParser`: ``:fetchPredictOperation`` (what google-genai's
  ``operations.get`` sends in Vertex mode) and ``…/operations/{id}``. They record neither
  tokens nor units (the video was counted when it was asked for) and :func:`is_polling_endpoint`
  says so. Their last answer may carry the videos in base64, so nothing of it is kept.
* Anything else (``:countTokens``, ``:computeTokens``, Imagen's ``:predict``, other publishers'
  models, deployed ``endpoints/…``, ``operations/{id}:cancel``): None, not metered.

Each path segment is percent-decoded before it is matched, so ``claude%40x%3ArawPredict`` is
the call ``claude@x:rawPredict`` that a server decoding the path would see.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final
from urllib.parse import unquote

from tollgate.metering.anthropic_messages import AnthropicMessagesParser
from tollgate.metering.framing import JsonOrSSEParser
from tollgate.metering.gemini import GeminiParser, gemini_usage
from tollgate.metering.usage import RequestFacts, TokenUsage, UsageParser
from tollgate.policy.text import safe_text

__all__ = [
    "VEO_DEFAULT_DURATION_SECONDS",
    "VEO_DEFAULT_SAMPLE_COUNT",
    "VeoGenerationParser",
    "VertexEmbeddingsParser",
    "VertexOperationPollParser",
    "is_polling_endpoint",
    "veo_video_seconds",
    "vertex_parser_for",
    "video_request",
]

_GEMINI_METHODS: Final = frozenset({"generateContent", "streamGenerateContent"})
_ANTHROPIC_METHODS: Final = frozenset({"rawPredict", "streamRawPredict"})
_EMBED_METHODS: Final = frozenset({"embedContent", "batchEmbedContents"})
# The model name anthropic's Vertex client puts in the path of messages.count_tokens.
_ANTHROPIC_COUNT_TOKENS: Final = "count-tokens"

# Veo: the defaults Vertex AI applies to a request that leaves a parameter out, and the
# largest values taken at face value (see veo_video_seconds).
VEO_DEFAULT_DURATION_SECONDS: Final = 8
VEO_DEFAULT_SAMPLE_COUNT: Final = 1
_VEO_MAX_DURATION_SECONDS: Final = 60
_VEO_MAX_SAMPLE_COUNT: Final = 8
_MAX_NUMBER_DIGITS: Final = 10


@dataclass(frozen=True, slots=True)
class _VertexCall:
    """What a Vertex AI path names: a publisher model's method, or an operation."""

    publisher: str | None  # None for a project's operation (…/locations/{l}/operations/{id})
    model: str | None
    method: str | None  # None for an operation (…/operations/{id})


def _vertex_call(endpoint: str) -> _VertexCall | None:
    segments = [unquote(s) for s in endpoint.split("?", 1)[0].split("/")]
    if len(segments) >= 6 and segments[-2] == "operations":
        operation, head = segments[-1], segments[:-2]
        if not operation or ":" in operation:
            return None
        if head[-4] == "publishers" and head[-2] == "models" and head[-3] and head[-1]:
            return _VertexCall(head[-3], head[-1], None)
        if head[-4] == "projects" and head[-2] == "locations" and head[-3] and head[-1]:
            return _VertexCall(None, None, None)
        return None
    if len(segments) < 5 or segments[-4] != "publishers" or segments[-2] != "models":
        return None
    model, colon, method = segments[-1].rpartition(":")
    publisher = segments[-3]
    if not (colon and publisher and model and method):
        return None
    return _VertexCall(publisher, model, method)


def _is_embedding_model(model: str) -> bool:
    return "embedding" in model.lower()


def vertex_parser_for(
    endpoint: str, *, streamed: bool, request: RequestFacts
) -> UsageParser | None:
    """The parser for a Vertex AI request path (query string allowed), or None when the path
    is not one Tollgate meters. ``request.model`` becomes the path's model, when it has one."""
    call = _vertex_call(endpoint)
    if call is None:
        return None
    facts = request if call.model is None else replace(request, model=safe_text(call.model))
    method = call.method
    if method is None:
        return VertexOperationPollParser(streamed=streamed, request=facts)
    if call.publisher == "anthropic":
        if method in _ANTHROPIC_METHODS and call.model != _ANTHROPIC_COUNT_TOKENS:
            return AnthropicMessagesParser(streamed=streamed, request=facts)
        return None
    if call.publisher != "google":
        return None
    if method in _GEMINI_METHODS:
        return GeminiParser(streamed=streamed, request=facts)
    if method in _EMBED_METHODS or (
        method == "predict" and call.model is not None and _is_embedding_model(call.model)
    ):
        return VertexEmbeddingsParser(streamed=streamed, request=facts)
    if method == "predictLongRunning":
        return VeoGenerationParser(streamed=streamed, request=facts)
    if method == "fetchPredictOperation":
        return VertexOperationPollParser(streamed=streamed, request=facts)
    return None


def is_polling_endpoint(endpoint: str) -> bool:
    """Whether a Vertex AI path asks after a long-running operation (``:fetchPredictOperation``
    or ``…/operations/{id}``): its row records no usage and is not charged."""
    call = _vertex_call(endpoint)
    if call is None:
        return False
    return call.method is None or (
        call.publisher == "google" and call.method == "fetchPredictOperation"
    )


def _whole_number(value: Any, default: int, maximum: int) -> int | None:
    """A Veo parameter as a whole number from 1 to ``maximum``; ``default`` when it is absent,
    null or 0; None for anything else."""
    if value is None:
        return default
    if isinstance(value, bool):
        return None
    whole_float = isinstance(value, float) and value.is_integer()
    digits = (
        isinstance(value, str)
        and len(value) <= _MAX_NUMBER_DIGITS
        and value.isascii()
        and value.isdigit()
    )
    if not (isinstance(value, int) or whole_float or digits):
        return None
    number = int(value)
    if number == 0:
        return default
    return number if 1 <= number <= maximum else None


def veo_video_seconds(body: Mapping[str, Any], model: str) -> float | None:
    """Seconds of video a Veo ``:predictLongRunning`` request body asks for:
    ``parameters.durationSeconds`` x ``parameters.sampleCount``; None when ``model`` is not a
    Veo model (its name, after any ``…/models/``, starts with ``veo-``) or a value is unusable.

    Defaults, for a parameter left out (absent or null):

    * ``durationSeconds``: 8, for every Veo model: the default that Vertex AI's Veo API
      reference (``generative-ai/docs/model-reference/veo-video-generation``) gives for Veo 2
      (5 to 8 s accepted) and for Veo 3 and 3.1 (4, 6 or 8 s). google-genai's
      ``GenerateVideosConfig.duration_seconds`` documents no default and is sent only when
      set, so the server's default applies.
    * ``sampleCount``: 1 (1 to 4 accepted): the default that the Gemini API documents for
      ``numberOfVideos``, the same parameter; the Vertex reference gives only the range.

    0 counts as left out: ``parameters`` is read into a protobuf message, where 0 cannot be
    told from unset. A value is otherwise taken as a whole number, from a JSON integer, a
    float without a fraction (``8.0``) or a decimal string (``"8"``, which protobuf's JSON
    mapping accepts for integers); anything else (a bool, a fraction, a negative, a duration
    over 60 s or more than 8 samples, far beyond any documented range) gives None. A request
    with such a value is refused by Vertex AI, so there is nothing to charge; the caller
    records None as "unknown", never as 0.
    """
    if not model.rsplit("/", 1)[-1].lower().startswith("veo-"):
        return None
    parameters = body.get("parameters")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, Mapping):
        return None
    duration = _whole_number(
        parameters.get("durationSeconds"), VEO_DEFAULT_DURATION_SECONDS, _VEO_MAX_DURATION_SECONDS
    )
    samples = _whole_number(
        parameters.get("sampleCount"), VEO_DEFAULT_SAMPLE_COUNT, _VEO_MAX_SAMPLE_COUNT
    )
    if duration is None or samples is None:
        return None
    return float(duration * samples)


# Veo's output resolutions (parameters.resolution) as frame heights, for units.video_height.
_RESOLUTION_HEIGHTS: Final = {"720p": 720.0, "1080p": 1080.0, "4k": 2160.0}


def video_request(endpoint: str, body: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """``(seconds, height)`` of video a Vertex AI request asks for: a Veo
    ``:predictLongRunning`` (:func:`veo_video_seconds`; the height from
    ``parameters.resolution``, None when absent or unknown); ``(None, None)`` for any other."""
    call = _vertex_call(endpoint)
    if call is None or call.model is None or call.method != "predictLongRunning":
        return None, None
    seconds = veo_video_seconds(body, call.model)
    parameters = body.get("parameters")
    resolution = parameters.get("resolution") if isinstance(parameters, Mapping) else None
    height = _RESOLUTION_HEIGHTS.get(resolution.lower()) if isinstance(resolution, str) else None
    return seconds, height if seconds is not None else None


def _count(value: Any) -> int | None:
    """A non-negative count: an integer, or a float without a fraction (the numbers of a
    ``:predict`` answer are protobuf ``Value`` doubles); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    return None


def _statistics_tokens(predictions: list[Any]) -> int | None:
    """The sum of ``predictions[].embeddings.statistics.token_count``; None if none has one."""
    total: int | None = None
    for prediction in predictions:
        embeddings = prediction.get("embeddings") if isinstance(prediction, dict) else None
        statistics = embeddings.get("statistics") if isinstance(embeddings, dict) else None
        tokens = _count(statistics.get("token_count")) if isinstance(statistics, dict) else None
        if tokens is not None:
            total = tokens + (total or 0)
    return total


class VertexEmbeddingsParser(JsonOrSSEParser):
    """``:predict``, ``:embedContent``, ``:batchEmbedContents`` on embedding models: input
    tokens and billable characters, as reported."""

    def _setup(self) -> None:
        self._sse = None  # embeddings are one JSON document

    def _document(self, doc: dict[str, Any], event: str | None) -> None:
        predictions = doc.get("predictions")
        if isinstance(predictions, list):
            tokens = _statistics_tokens(predictions)
            if tokens is not None:
                self.take_usage(TokenUsage(input_tokens=tokens))
        metadata = doc.get("metadata")
        if isinstance(metadata, dict):
            characters = _count(metadata.get("billableCharacterCount"))
            if characters is not None:
                self.units["characters"] = characters
        if "usageMetadata" in doc:
            self.take_usage(gemini_usage(doc["usageMetadata"]))


class VeoGenerationParser(JsonOrSSEParser):
    """``:predictLongRunning``: the seconds of video asked for, once Vertex AI accepted the
    request with an operation (a ``name`` and no ``error``); no tokens."""

    def _setup(self) -> None:
        self._sse = None  # an operation is one JSON document

    def _document(self, doc: dict[str, Any], event: str | None) -> None:
        name = doc.get("name")
        if not isinstance(name, str) or not name or doc.get("error") is not None:
            return
        if self.request.video_seconds is not None:
            self.units["video_seconds"] = self.request.video_seconds
            if self.request.video_height is not None:
                self.units["video_height"] = self.request.video_height


class VertexOperationPollParser(JsonOrSSEParser):
    """``:fetchPredictOperation`` and ``…/operations/{id}``: nothing to record (no usage, no
    units; the path's model only). The body, which may hold whole videos, is not kept."""

    def feed(self, chunk: bytes) -> None:
        return

    def _document(self, doc: dict[str, Any], event: str | None) -> None:
        return

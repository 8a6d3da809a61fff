"""Which ext_proc messages a request needs: the endpoint table and the facts Envoy read.

Every ext_proc message costs a gRPC round trip in both processes, so a request's *plan* asks
Envoy only for what its decision and its metering need (see ``docs/adr/011-lean-plans.md``):

* the request headers, always (policy, stripping, routing);
* the request body only when Tollgate must *change* it (``include_usage`` injected, a
  ``provider/model`` prefix rewritten), when a fact cannot come from Envoy, or when bodies
  are logged;
* the response headers, except — with ``skip_json_response_headers``, off by default — when
  the answer is known to be one JSON document (a request Envoy read as not streaming, to an
  endpoint of :data:`JSON_ANSWER_ENDPOINTS`): then the buffered response body is the only
  response message, and its status comes with it from Envoy's attributes
  (:data:`RESPONSE_ATTRIBUTES`);
* the response body buffered for JSON, streamed only for SSE, not at all for endpoints with
  nothing to meter.

The client's ``x-tollgate-request-id`` is set on the response headers, or — when a plan skips
them — by Envoy's virtual host from the dynamic metadata Tollgate returns with the request
headers (:data:`TOLLGATE_NAMESPACE`).

The facts of a JSON request body (model, ``stream``, ``include_usage``, the body's user ids)
come from Envoy's ``json_to_metadata`` filter, which runs before ext_proc and parses the
body in C++: they arrive with the request headers in the stream's metadata. Where that
reading can differ from Tollgate's own (a value that is not a string, a body Envoy could not
parse, a string Envoy drops for its length), Tollgate reads the body itself, as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from tollgate.policy.identity import body_candidates

__all__ = [
    "ENVOY_VALUE_LIMIT",
    "FACT_RULES",
    "INCLUDE_USAGE_ENDPOINTS",
    "JSON_ANSWER_ENDPOINTS",
    "LIMIT_REMAINING_KEY",
    "LIMIT_RESET_KEY",
    "OUTPUT_CAP_FACTS",
    "REQUEST_FACTS_NAMESPACE",
    "REQUEST_ID_KEY",
    "RESPONSE_ATTRIBUTES",
    "TOLLGATE_NAMESPACE",
    "UNSURE",
    "EnvoyFacts",
    "facts_from_envoy",
]

# Where json_to_metadata writes the request body's facts (its default namespace).
REQUEST_FACTS_NAMESPACE: Final = "envoy.filters.http.json_to_metadata"

# Metadata key → the JSON path json_to_metadata reads it from (top-level object keys).
FACT_RULES: Final[Mapping[str, tuple[str, ...]]] = {
    "model": ("model",),
    "stream": ("stream",),
    "include_usage": ("stream_options", "include_usage"),
    "user": ("user",),
    "safety_identifier": ("safety_identifier",),
    "metadata_user_id": ("metadata", "user_id"),
    # The most output a request allows: what a usd or tokens limit reserves for it.
    "max_tokens": ("max_tokens",),
    "max_completion_tokens": ("max_completion_tokens",),
    "max_output_tokens": ("max_output_tokens",),
    "gemini_max_output_tokens": ("generationConfig", "maxOutputTokens"),
}

# The keys of FACT_RULES that cap the output, most specific first.
OUTPUT_CAP_FACTS: Final = (
    "max_completion_tokens",
    "max_output_tokens",
    "gemini_max_output_tokens",
    "max_tokens",
)

# json_to_metadata writes no string longer than this many bytes: it treats the key as
# missing instead. Only a body longer than this can hide such a string.
ENVOY_VALUE_LIMIT: Final = 8192

# Endpoints whose streams report usage only when asked (``stream_options.include_usage``);
# their request facts (model, stream, include_usage) can come from Envoy.
INCLUDE_USAGE_ENDPOINTS: Final = ("/chat/completions", "/completions")


# Endpoints whose answer to a request that does not stream is one JSON document (or an error
# document), so its response headers say nothing Tollgate needs. Not the streaming variants
# (Gemini's :streamGenerateContent, Bedrock's converse-stream), nor audio or transcriptions,
# whose answers may be audio or plain text.
JSON_ANSWER_ENDPOINTS: Final = (
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/responses",
    "/messages",
    ":generateContent",
    "/converse",
)

# What Envoy sends with the first response message Tollgate gets (ext_proc attributes):
# the status and, for Envoy's own local replies, what they were (edge_limits).
RESPONSE_ATTRIBUTES: Final = ("response.code", "response.code_details")

# Dynamic metadata namespace Tollgate's request-headers answers write (ext_proc receiving
# namespace); REQUEST_ID_KEY in it becomes the client's x-tollgate-request-id (the route
# adds the header from it).
TOLLGATE_NAMESPACE: Final = "tollgate"
REQUEST_ID_KEY: Final = "request_id"
# The tightest limit's remainder and reset time, for x-tollgate-limit-remaining/-reset.
LIMIT_REMAINING_KEY: Final = "limit_remaining"
LIMIT_RESET_KEY: Final = "limit_reset"


class _Unsure:
    """A fact Envoy's reading cannot settle: Tollgate must read the body."""

    def __repr__(self) -> str:
        return "UNSURE"


UNSURE: Final = _Unsure()


@dataclass(frozen=True, slots=True)
class EnvoyFacts:
    """The scalars json_to_metadata found in a JSON request body (absent: missing there).

    ``body_bytes`` is the body's declared length (None when chunked), which says whether a
    missing string may be one Envoy dropped for its length.
    """

    values: Mapping[str, str | float | bool]
    body_bytes: int | None

    def _maybe_dropped(self) -> bool:
        return self.body_bytes is None or self.body_bytes > ENVOY_VALUE_LIMIT

    def flag(self, key: str) -> bool:
        """A boolean the body sets to ``true`` (anything else, or missing, is false)."""
        return self.values.get(key) is True

    def output_cap(self) -> int | None:
        """The body's cap on output tokens, when it sets one as a whole positive number."""
        for key in OUTPUT_CAP_FACTS:
            value = self.values.get(key)
            if isinstance(value, float) and value.is_integer() and value > 0:
                return int(value)
        return None

    def model(self) -> str | _Unsure | None:
        """The body's ``model`` string, None when it has none, UNSURE when Envoy cannot say."""
        value = self.values.get("model")
        if isinstance(value, str):
            return value
        if value is None and self._maybe_dropped():
            return UNSURE
        return None  # a number or a boolean: not a model name, as Tollgate reads it too

    def user_ids(self) -> dict[str, str] | _Unsure:
        """The body's user-id candidates by source, as :func:`body_candidates` finds them in
        the parsed body; UNSURE when Envoy's reading could differ from that."""
        document: dict[str, object] = {}
        metadata: dict[str, object] = {}
        for key, target, name in (
            ("user", document, "user"),
            ("safety_identifier", document, "safety_identifier"),
            ("metadata_user_id", metadata, "user_id"),
        ):
            value = self.values.get(key)
            if value is None:
                if self._maybe_dropped():
                    return UNSURE
                continue
            if not isinstance(value, str):
                # Envoy reads every JSON number as a double: 1e3 and 1000 look alike here.
                return UNSURE
            target[name] = value
        if metadata:
            document["metadata"] = metadata
        return body_candidates(document)


def _scalar(value: struct_pb2.Value) -> str | float | bool | _Unsure | None:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "number_value":
        return value.number_value
    if kind == "null_value":
        return None  # the on_missing marker
    return UNSURE  # the on_error marker (a list): Envoy could not parse the body


def facts_from_envoy(
    metadata: base_pb2.Metadata | None, body_bytes: int | None
) -> EnvoyFacts | None:
    """The facts json_to_metadata left in ``metadata``, or None when it did not read this
    body (content type not exactly ``application/json``, an encoded or invalid body, a body
    with none of the keys, which is also how one that is not a JSON object looks): then only
    Tollgate's own reading counts."""
    if metadata is None or REQUEST_FACTS_NAMESPACE not in metadata.filter_metadata:
        return None
    fields = metadata.filter_metadata[REQUEST_FACTS_NAMESPACE].fields
    values: dict[str, str | float | bool] = {}
    for key in FACT_RULES:
        if key not in fields:
            return None  # every rule writes a value or a marker: this is not our reading
        value = _scalar(fields[key])
        if isinstance(value, _Unsure):
            return None
        if value is not None:
            values[key] = value
    if not values:
        # Nothing found: also what a body that is no JSON object looks like to Envoy, which
        # Tollgate's own reading refuses.
        return None
    return EnvoyFacts(values, body_bytes)

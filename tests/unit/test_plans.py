"""Per-request plans: which ext_proc messages a request asks for, from the facts Envoy's
json_to_metadata read out of its body (``tollgate.extproc.plan``), and when Tollgate still
reads the body itself. The same plans are counted through real Envoy in
tests/integration/test_plans.py."""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2

from tests.unit.doubles import FixedKeys, RecordingSink
from tests.unit.test_processor_policy import answer_json
from tollgate.extproc import responses
from tollgate.extproc.edge_limits import declared_length
from tollgate.extproc.plan import (
    ENVOY_VALUE_LIMIT,
    FACT_RULES,
    REQUEST_FACTS_NAMESPACE,
    UNSURE,
    EnvoyFacts,
    facts_from_envoy,
)
from tollgate.extproc.processor import PolicyConfig, ProcessorContext, RequestProcessor
from tollgate.metering import parser_for
from tollgate.policy.identity import IdentityResolver
from tollgate.routing.allowlist import parse_base_uri
from tollgate.routing.providers import Provider
from tollgate.routing.router import Router
from tollgate.v1 import usage_pb2

MISSING = object()
UNPARSED = object()


def envoy_metadata(**facts: Any) -> base_pb2.Metadata:
    """Metadata as json_to_metadata writes it: every rule's key, null when the body lacks it,
    a list when the body could not be parsed."""
    fields: dict[str, Any] = {}
    for key in FACT_RULES:
        value = facts.get(key, MISSING)
        fields[key] = None if value is MISSING else (["unparsed"] if value is UNPARSED else value)
    metadata = base_pb2.Metadata()
    struct = struct_pb2.Struct()
    struct.update(fields)
    metadata.filter_metadata[REQUEST_FACTS_NAMESPACE].CopyFrom(struct)
    return metadata


def test_facts_are_read_only_when_envoy_parsed_the_body() -> None:
    assert facts_from_envoy(None, 10) is None
    assert facts_from_envoy(base_pb2.Metadata(), 10) is None
    # Envoy could not parse it (invalid, encoded, not UTF-8): every key holds the error list.
    assert facts_from_envoy(envoy_metadata(**dict.fromkeys(FACT_RULES, UNPARSED)), 10) is None
    # No key at all: as an empty object or a JSON array looks to Envoy.
    assert facts_from_envoy(envoy_metadata(), 10) is None
    partial = envoy_metadata(model="m")
    del partial.filter_metadata[REQUEST_FACTS_NAMESPACE].fields["user"]
    assert facts_from_envoy(partial, 10) is None
    facts = facts_from_envoy(envoy_metadata(model="m", stream=True, user="u"), 10)
    assert facts == EnvoyFacts({"model": "m", "stream": True, "user": "u"}, 10)


def test_user_ids_are_read_as_tollgate_reads_the_body() -> None:
    facts = EnvoyFacts({"user": " alice ", "metadata_user_id": "m-1"}, 100)
    assert facts.user_ids() == {"body_user": "alice", "body_metadata_user_id": "m-1"}
    assert EnvoyFacts({"model": "m"}, 100).user_ids() == {}
    # Envoy reads numbers as doubles: only Tollgate's own reading turns 12345 into "12345".
    assert EnvoyFacts({"user": 12345.0}, 100).user_ids() is UNSURE
    assert EnvoyFacts({"safety_identifier": True}, 100).user_ids() is UNSURE


@pytest.mark.parametrize("body_bytes", [ENVOY_VALUE_LIMIT + 1, None], ids=["large", "chunked"])
def test_a_missing_string_is_unsure_when_envoy_may_have_dropped_it(body_bytes: int | None) -> None:
    facts = EnvoyFacts({"model": "m"}, body_bytes)
    assert facts.user_ids() is UNSURE
    assert EnvoyFacts({"user": "u", "safety_identifier": "s", "metadata_user_id": "x"}, body_bytes)
    assert EnvoyFacts({"stream": True}, body_bytes).model() is UNSURE
    assert EnvoyFacts({"model": "m"}, ENVOY_VALUE_LIMIT).user_ids() == {}
    assert EnvoyFacts({"model": 3.0}, body_bytes).model() is None


def chat_headers(*pairs: tuple[str, bytes], length: int = 200) -> ep.HttpHeaders:
    base = [
        (":method", b"POST"),
        (":path", b"/v1/chat/completions"),
        ("content-type", b"application/json"),
        ("content-length", str(length).encode()),
    ]
    return ep.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in [*base, *pairs]]
        )
    )


def processor(
    sink: RecordingSink, *, prefix_routing: bool = False, **policy: Any
) -> RequestProcessor:
    resolver = IdentityResolver(("jwt", "key", "header", "body_user", "body_metadata_user_id"))
    # One upstream for every API family the tests' paths belong to (each family's paths go
    # only to a provider of that family).
    up = parse_base_uri("http://up")
    providers = {
        name: Provider(name=name, base=up, api=name, auth="none")
        for name in ("openai", "anthropic", "gemini")
    }
    ctx = ProcessorContext(
        sink=sink,
        router=Router(providers, "openai", model_prefix_routing=prefix_routing),
        policy=PolicyConfig(resolver=resolver, **policy),
        keys=FixedKeys(),
    )
    return RequestProcessor(ctx)


def asks_for_body(answer: ep.ProcessingResponse) -> bool:
    assert answer.HasField("request_headers"), answer
    return answer.mode_override.request_body_mode == responses.BODY_BUFFERED


def finish_json(p: RequestProcessor, doc: dict[str, Any]) -> None:
    answer_json(p, json.dumps(doc))


def test_header_identified_chat_never_sends_its_body() -> None:
    sink = RecordingSink()
    p = processor(sink)
    answer = p.request_headers(
        chat_headers(("x-tollgate-user-id", b"alice")), envoy_metadata(model="gpt-4o", user="u")
    )
    assert not asks_for_body(answer)
    # The route is set at once (there is no body phase to set it in).
    names = {h.header.key for h in answer.request_headers.response.header_mutation.set_headers}
    assert "x-tollgate-upstream-host" in names
    assert answer.request_headers.response.clear_route_cache
    finish_json(p, {"usage": {"prompt_tokens": 3, "completion_tokens": 4}})
    (record,) = sink.records
    assert record.end_user_id == "alice"
    assert record.identity_source == "header"
    # The response named no model: the request's, as Envoy read it, is recorded.
    assert record.model == "gpt-4o"
    assert record.input_tokens == 3


def test_body_user_comes_from_envoy_without_a_body_message() -> None:
    sink = RecordingSink()
    p = processor(sink, enforce_user_id=True)
    answer = p.request_headers(chat_headers(), envoy_metadata(model="m", user="bob"))
    assert not asks_for_body(answer)
    finish_json(p, {"model": "m", "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    (record,) = sink.records
    assert (record.end_user_id, record.identity_source) == ("bob", "body_user")


def test_a_missing_required_user_is_refused_at_the_headers() -> None:
    sink = RecordingSink()
    p = processor(sink, enforce_user_id=True)
    answer = p.request_headers(chat_headers(), envoy_metadata(model="m"))
    assert answer.immediate_response.status.code == 422
    (record,) = sink.records
    assert record.outcome == usage_pb2.OUTCOME_BLOCKED
    assert record.block_reason == "user_id_required"


@pytest.mark.parametrize(
    ("facts", "length"),
    [
        ({"user": 12345.0}, 200),  # a number: Tollgate's reading makes it "12345"
        ({"model": "m"}, ENVOY_VALUE_LIMIT + 100),  # a user id Envoy may have dropped
        (None, 200),  # Envoy did not parse the body
    ],
    ids=["number", "long-body", "unparsed"],
)
def test_the_body_is_read_when_envoy_cannot_settle_the_user(
    facts: dict[str, Any] | None, length: int
) -> None:
    sink = RecordingSink()
    p = processor(sink, enforce_user_id=True)
    metadata = envoy_metadata(**facts) if facts is not None else None
    answer = p.request_headers(chat_headers(length=length), metadata)
    assert asks_for_body(answer)
    p.request_body(
        ep.HttpBody(body=json.dumps({"model": "m", "user": 12345}).encode(), end_of_stream=True)
    )
    finish_json(p, {"usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    (record,) = sink.records
    assert record.end_user_id == "12345"


def test_a_stream_reads_its_body_only_to_inject_include_usage() -> None:
    p = processor(RecordingSink())
    user = ("x-tollgate-user-id", b"alice")
    answer = p.request_headers(chat_headers(user), envoy_metadata(model="m", stream=True))
    assert asks_for_body(answer)
    p = processor(RecordingSink())
    asked = envoy_metadata(model="m", stream=True, include_usage=True)
    assert not asks_for_body(p.request_headers(chat_headers(user), asked))


def test_a_model_prefix_is_routed_from_the_body() -> None:
    user = ("x-tollgate-user-id", b"alice")
    p = processor(RecordingSink(), prefix_routing=True)
    answer = p.request_headers(chat_headers(user), envoy_metadata(model="openai/gpt-4o"))
    assert asks_for_body(answer)
    p = processor(RecordingSink(), prefix_routing=True)
    assert not asks_for_body(p.request_headers(chat_headers(user), envoy_metadata(model="gpt-4o")))
    p = processor(RecordingSink(), prefix_routing=True)
    assert not asks_for_body(p.request_headers(chat_headers(user), envoy_metadata(model="other/x")))


def test_a_stream_without_any_message_leaves_no_row() -> None:
    # Envoy reset the stream before the request headers arrived (a client that went away
    # while json_to_metadata still waited for its body): nothing was let through.
    sink = RecordingSink()
    processor(sink).close()
    assert sink.records == []
    p = processor(sink)
    p.request_headers(chat_headers(("x-tollgate-user-id", b"alice")), envoy_metadata(model="m"))
    p.close()
    (record,) = sink.records
    assert record.outcome == usage_pb2.OUTCOME_CLIENT_ABORTED
    assert record.end_user_id == "alice"


def test_the_requests_model_is_kept_for_any_endpoint_envoy_read() -> None:
    sink = RecordingSink()
    p = processor(sink)
    embeddings = ep.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[
                base_pb2.HeaderValue(key=k, raw_value=v)
                for k, v in [
                    (":method", b"POST"),
                    (":path", b"/v1/embeddings"),
                    ("content-type", b"application/json"),
                    ("content-length", b"60"),
                ]
            ]
        )
    )
    answer = p.request_headers(embeddings, envoy_metadata(model="text-embedding-3-small", user="u"))
    assert not asks_for_body(answer)
    finish_json(p, {"usage": {"prompt_tokens": 5, "total_tokens": 5}})
    (record,) = sink.records
    assert record.model == "text-embedding-3-small"
    assert record.end_user_id == "u"


def sse_headers() -> ep.HttpHeaders:
    return ep.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[
                base_pb2.HeaderValue(key=":status", raw_value=b"200"),
                base_pb2.HeaderValue(key="content-type", raw_value=b"text/event-stream"),
            ]
        )
    )


USAGE_EVENT = (
    b'data: {"choices":[],"model":"gpt-4o-mini",'
    b'"usage":{"prompt_tokens":7,"completion_tokens":9,"total_tokens":16}}\n\n'
)


@pytest.mark.parametrize("done", [True, False], ids=["after-done", "mid-stream"])
def test_a_stream_cut_off_after_its_end_marker_is_complete(done: bool) -> None:
    # The OpenAI SDK closes the response at [DONE], before the HTTP stream's end reaches
    # Envoy: that client had the whole answer.
    sink = RecordingSink()
    p = processor(sink)
    asked = envoy_metadata(model="gpt-4o-mini", stream=True, include_usage=True)
    p.request_headers(chat_headers(("x-tollgate-user-id", b"alice")), asked)
    p.response_headers(sse_headers())
    p.response_body(ep.HttpBody(body=b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'))
    p.response_body(ep.HttpBody(body=USAGE_EVENT + (b"data: [DONE]\n\n" if done else b"")))
    p.close()
    (record,) = sink.records
    assert record.outcome == (usage_pb2.OUTCOME_OK if done else usage_pb2.OUTCOME_CLIENT_ABORTED)
    assert (record.input_tokens, record.output_tokens) == (7, 9)


@pytest.mark.parametrize(
    ("api", "endpoint", "events", "last"),
    [
        ("openai", "/v1/chat/completions", [USAGE_EVENT], b"data: [DONE]\n\n"),
        (
            "anthropic",
            "/v1/messages",
            [
                b"event: message_delta\n"
                b'data: {"type":"message_delta","usage":{"output_tokens":3}}\n\n'
            ],
            b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
        ),
        (
            "openai",
            "/v1/responses",
            [b'event: response.created\ndata: {"type":"response.created","response":{}}\n\n'],
            b'event: response.completed\ndata: {"type":"response.completed","response":'
            b'{"model":"gpt-4o","usage":{"input_tokens":1,"output_tokens":2}}}\n\n',
        ),
    ],
    ids=["openai-done", "anthropic-message-stop", "responses-completed"],
)
def test_each_api_end_marker_makes_a_stream_complete(
    api: str, endpoint: str, events: list[bytes], last: bytes
) -> None:
    parser = parser_for(api, endpoint, streamed=True)
    assert parser is not None
    for event in events:
        parser.feed(event)
    assert not parser.complete
    parser.feed(last)
    assert parser.complete


def test_only_a_plain_declared_length_counts_as_small() -> None:
    assert declared_length(b"1024") == 1024
    assert declared_length(b" 12 ") == 12
    # Python's int() would take these; a declared length is digits only.
    for value in (b"-5", b"+5", b"1_000", b"", b"0x10", None):
        assert declared_length(value) is None
    # An unreadable length counts as a large body: a missing user id means "read the body".
    sink = RecordingSink()
    p = processor(sink, enforce_user_id=True)
    headers = chat_headers(length=1)
    del headers.headers.headers[3]
    headers.headers.headers.append(base_pb2.HeaderValue(key="content-length", raw_value=b"-5"))
    assert asks_for_body(p.request_headers(headers, envoy_metadata(model="m")))


# -- the JSON-answer plan: no response-headers message -----------------------------------------

ALICE = ("x-tollgate-user-id", b"alice")
ANSWER = {
    "model": "gpt-4o-2024-08-06",
    "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16},
}


def lean(sink: RecordingSink) -> RequestProcessor:
    """A processor with the JSON-answer plan on (``skip_json_response_headers``)."""
    return processor(sink, skip_json_response_headers=True)


def attributes(code: int | None, details: str = "via_upstream") -> dict[str, struct_pb2.Struct]:
    """What Envoy sends with the first response message (ext_proc response_attributes)."""
    struct = struct_pb2.Struct()
    if code is not None:
        struct.update({"response.code": float(code), "response.code_details": details})
    return {"envoy.filters.http.ext_proc": struct}


def skips_response_headers(answer: ep.ProcessingResponse) -> bool:
    mode = answer.mode_override
    skip = mode.response_header_mode == responses.ProcessingMode.SKIP
    assert not skip or mode.response_body_mode == responses.BODY_BUFFERED
    return skip


def json_answer(
    p: RequestProcessor, body: bytes, code: int | None = 200, details: str = "via_upstream"
) -> ep.ProcessingResponse:
    return p.response_body(ep.HttpBody(body=body, end_of_stream=True), attributes(code, details))


def test_the_json_answer_plan_is_off_by_default() -> None:
    # Off, Envoy holds the response headers until the usage is journaled.
    answer = processor(RecordingSink()).request_headers(
        chat_headers(ALICE), envoy_metadata(model="gpt-4o")
    )
    assert not asks_for_body(answer)
    assert not skips_response_headers(answer)


def test_a_json_answer_is_one_buffered_body_message_with_its_status() -> None:
    sink = RecordingSink()
    p = lean(sink)
    answer = p.request_headers(chat_headers(ALICE), envoy_metadata(model="gpt-4o"))
    assert not asks_for_body(answer)
    assert skips_response_headers(answer)
    out = json_answer(p, json.dumps(ANSWER).encode())
    assert out.HasField("response_body")
    assert not out.response_body.response.HasField("body_mutation")
    (record,) = sink.records
    assert record.outcome == usage_pb2.OUTCOME_OK
    assert record.status_code == 200
    assert (record.input_tokens, record.output_tokens) == (11, 5)
    assert record.model == "gpt-4o-2024-08-06"
    assert not record.streamed
    # The client's x-tollgate-request-id comes from the metadata every answer writes.
    fields = answer.dynamic_metadata.fields["tollgate"].struct_value.fields
    assert fields["request_id"].string_value == record.request_id


@pytest.mark.parametrize(
    ("path", "facts"),
    [
        (b"/v1/chat/completions", {"model": "m", "stream": True, "include_usage": True}),
        (b"/v1/messages", {"model": "claude", "stream": True}),
        (b"/v1/images/generations", {"model": "dall-e-3"}),  # its facts come from the body
        (b"/v1/audio/speech", {"model": "tts-1"}),  # audio, not JSON
        (b"/v1/models/x:streamGenerateContent", {"model": "g"}),
        (b"/v1/chat/completions", None),  # Envoy did not read the body: stream is unknown
    ],
    ids=["stream", "anthropic-stream", "images", "speech", "gemini-stream", "unread"],
)
def test_other_plans_keep_the_response_headers(path: bytes, facts: dict[str, Any] | None) -> None:
    p = lean(RecordingSink())
    headers = chat_headers(ALICE)
    headers.headers.headers[1].raw_value = path
    answer = p.request_headers(headers, envoy_metadata(**facts) if facts is not None else None)
    assert not skips_response_headers(answer)


@pytest.mark.parametrize(
    ("path", "facts"),
    [
        (b"/v1/embeddings", {"model": "text-embedding-3-small"}),
        (b"/v1/messages", {"model": "claude", "stream": False}),
        (b"/v1/responses", {"model": "gpt-4o"}),
        (b"/v1beta/models/gemini-2.0-flash:generateContent", {"model": "g"}),
    ],
    ids=["embeddings", "anthropic", "responses", "gemini"],
)
def test_every_json_endpoint_skips_them(path: bytes, facts: dict[str, Any]) -> None:
    p = lean(RecordingSink())
    headers = chat_headers(ALICE)
    headers.headers.headers[1].raw_value = path
    assert skips_response_headers(p.request_headers(headers, envoy_metadata(**facts)))


def test_an_upstream_error_is_recorded_with_its_status() -> None:
    sink = RecordingSink()
    p = lean(sink)
    p.request_headers(chat_headers(ALICE), envoy_metadata(model="gpt-4o"))
    out = json_answer(p, b'{"error":{"message":"overloaded"}}', 529)
    assert out.HasField("response_body")
    (record,) = sink.records
    assert record.outcome == usage_pb2.OUTCOME_UPSTREAM_ERROR
    assert record.status_code == 529
    assert record.model == "gpt-4o"


def test_an_envoy_local_reply_is_named_from_its_details() -> None:
    sink = RecordingSink()
    p = lean(sink)
    p.request_headers(chat_headers(ALICE), envoy_metadata(model="gpt-4o"))
    json_answer(p, b'{"error":{"code":"body_too_large"}}', 413, "request_payload_too_large")
    (record,) = sink.records
    assert (record.outcome, record.block_reason) == (usage_pb2.OUTCOME_BLOCKED, "body_too_large")
    # An upstream's own 413 is its error, not Envoy's.
    sink = RecordingSink()
    p = lean(sink)
    p.request_headers(chat_headers(ALICE), envoy_metadata(model="gpt-4o"))
    json_answer(p, b'{"error":{}}', 413, "via_upstream")
    (record,) = sink.records
    assert (record.outcome, record.block_reason) == (usage_pb2.OUTCOME_UPSTREAM_ERROR, "")


@pytest.mark.parametrize("encode", [gzip.compress, zlib.compress], ids=["gzip", "deflate"])
def test_an_encoded_answer_is_metered_from_its_bytes(encode: Any) -> None:
    # No header says how it is encoded (an upstream that ignored accept-encoding: identity).
    sink = RecordingSink()
    p = lean(sink)
    p.request_headers(chat_headers(ALICE), envoy_metadata(model="gpt-4o"))
    out = json_answer(p, encode(json.dumps(ANSWER).encode()))
    assert not out.response_body.response.HasField("body_mutation")
    (record,) = sink.records
    assert (record.outcome, record.input_tokens, record.output_tokens) == (
        usage_pb2.OUTCOME_OK,
        11,
        5,
    )


def test_an_answer_that_streams_anyway_is_metered_as_a_stream() -> None:
    sink = RecordingSink()
    p = lean(sink)
    p.request_headers(chat_headers(ALICE), envoy_metadata(model="gpt-4o-mini"))
    json_answer(p, USAGE_EVENT + b"data: [DONE]\n\n")
    (record,) = sink.records
    assert (record.outcome, record.streamed, record.input_tokens) == (
        usage_pb2.OUTCOME_OK,
        True,
        7,
    )


def test_an_answer_without_status_or_body() -> None:
    # No attributes (an Envoy that sends none): not an answer Tollgate can read as a success.
    sink = RecordingSink()
    p = lean(sink)
    p.request_headers(chat_headers(ALICE), envoy_metadata(model="gpt-4o"))
    json_answer(p, json.dumps(ANSWER).encode(), None)
    (record,) = sink.records
    assert (record.outcome, record.status_code) == (usage_pb2.OUTCOME_UPSTREAM_ERROR, 0)
    # An answer with no body sends this plan no message at all: it looks like a client that
    # went away (docs/adr/011-lean-plans.md); no provider answers these endpoints so.
    sink = RecordingSink()
    p = lean(sink)
    p.request_headers(chat_headers(ALICE), envoy_metadata(model="gpt-4o"))
    p.close()
    (record,) = sink.records
    assert record.outcome == usage_pb2.OUTCOME_CLIENT_ABORTED

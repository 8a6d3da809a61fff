"""The request-side policy of RequestProcessor: which phase decides, what is refused, what the
blocked ledger record holds. Fed ext_proc messages directly (the gRPC path is covered in
test_extproc_grpc.py and, through real Envoy, in the integration tests)."""

from __future__ import annotations

import itertools
import json

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2

from tests.unit.doubles import FixedKeys, RecordingSink
from tollgate.extproc import responses
from tollgate.extproc.processor import PolicyConfig, ProcessorContext, RequestProcessor
from tollgate.policy.identity import JWT_METADATA_NAMESPACE, JWT_PAYLOAD_KEY, IdentityResolver
from tollgate.policy.keys import GatewayKey
from tollgate.routing.allowlist import parse_base_uri
from tollgate.routing.providers import Provider
from tollgate.routing.router import Router
from tollgate.v1 import usage_pb2

ALL = ("jwt", "key", "header", "body_user", "body_safety_identifier", "body_metadata_user_id")


def key(key_id: str, *, user: str | None = None, enforce: bool | None = None) -> GatewayKey:
    return GatewayKey(key_id, key_id, user, enforce, None)


def processor(
    sink: RecordingSink, *, keys: FixedKeys | None = None, **policy: object
) -> RequestProcessor:
    config = PolicyConfig(**{"resolver": IdentityResolver(ALL), **policy})  # type: ignore[arg-type]
    ctx = ProcessorContext(
        sink=sink,
        router=Router.single("openai", "http://up", model_prefix_routing=False),
        policy=config,
        keys=keys or FixedKeys(),
    )
    return RequestProcessor(ctx)


def headers(*pairs: tuple[str, bytes], end: bool = False) -> ep.HttpHeaders:
    base = [(":method", b"POST"), (":path", b"/v1/embeddings")]
    return ep.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in [*base, *pairs]]
        ),
        end_of_stream=end,
    )


JSON = ("content-type", b"application/json")


def body(doc: object) -> ep.HttpBody:
    return ep.HttpBody(body=json.dumps(doc).encode(), end_of_stream=True)


def error_of(answer: ep.ProcessingResponse) -> tuple[int, str]:
    assert answer.HasField("immediate_response"), answer
    payload = json.loads(answer.immediate_response.body)
    return answer.immediate_response.status.code, payload["error"]["code"]


def test_header_identity_decides_at_headers_without_reading_the_body() -> None:
    sink = RecordingSink()
    p = processor(sink, enforce_user_id=True)
    answer = p.request_headers(headers(JSON, ("x-tollgate-user-id", b"alice")))
    assert answer.HasField("request_headers")
    assert not answer.HasField("mode_override")


def test_body_user_is_read_when_the_headers_have_no_identity() -> None:
    sink = RecordingSink()
    p = processor(sink, enforce_user_id=True)
    first = p.request_headers(headers(JSON))
    assert first.mode_override.request_body_mode == responses.BODY_BUFFERED
    second = p.request_body(body({"model": "m", "user": "bob"}))
    assert second.HasField("request_body")
    p.close()
    (record,) = sink.records
    assert (record.end_user_id, record.identity_source) == ("bob", "body_user")


def test_missing_identity_is_refused_at_the_body_phase_and_recorded() -> None:
    sink = RecordingSink()
    p = processor(sink, enforce_user_id=True)
    p.request_headers(headers(JSON, ("x-tollgate-tags", b"a,b"), ("xproxy-usecase-id", b"uc")))
    answer = p.request_body(body({"model": "m"}))
    assert error_of(answer) == (422, "user_id_required")
    mutation = answer.immediate_response.headers.set_headers
    assert any(h.header.key == "x-tollgate-request-id" for h in mutation)
    (record,) = sink.records
    assert record.outcome == usage_pb2.OUTCOME_BLOCKED
    assert record.block_reason == "user_id_required"
    assert record.status_code == 422
    assert list(record.tags) == ["a", "b"]
    assert record.use_case_id == "uc"
    assert not record.HasField("end_user_id")
    p.close()  # the stream ends: still exactly one record
    assert len(sink.records) == 1


def test_get_without_body_decides_at_headers() -> None:
    sink = RecordingSink()
    p = processor(sink, enforce_user_id=True)
    get = ep.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[
                base_pb2.HeaderValue(key=":method", raw_value=b"GET"),
                base_pb2.HeaderValue(key=":path", raw_value=b"/v1/models"),
            ]
        ),
        end_of_stream=True,
    )
    assert error_of(p.request_headers(get)) == (422, "user_id_required")


def test_malformed_json_is_refused_with_invalid_json() -> None:
    sink = RecordingSink()
    p = processor(sink)
    p.request_headers(headers(JSON))
    answer = p.request_body(ep.HttpBody(body=b'{"model": "m", ', end_of_stream=True))
    assert error_of(answer) == (400, "invalid_json")
    assert sink.records[0].block_reason == "invalid_json"


def test_gateway_keys() -> None:
    sink = RecordingSink()
    keys = FixedKeys({b"tg_good": key("key_1", user="bound-user")})
    p = processor(sink, keys=keys)
    answer = p.request_headers(headers(("authorization", b"Bearer tg_good"), end=True))
    assert "authorization" in answer.request_headers.response.header_mutation.remove_headers
    p.close()
    assert (sink.records[0].end_user_id, sink.records[0].identity_source) == ("bound-user", "key")
    assert sink.records[0].key_id == "key_1"

    p = processor(sink, keys=keys)
    answer = p.request_headers(headers(("x-tollgate-key", b"tg_unknown"), end=True))
    assert error_of(answer) == (401, "invalid_gateway_key")
    assert sink.records[-1].block_reason == "invalid_gateway_key"
    assert not sink.records[-1].HasField("key_id")


def test_key_provider_allow_list() -> None:
    sink = RecordingSink()
    keys = FixedKeys({b"tg_a": GatewayKey("key_a", "a", None, None, frozenset({"anthropic"}))})
    answer = processor(sink, keys=keys).request_headers(headers(("x-tollgate-key", b"tg_a")))
    assert error_of(answer) == (403, "provider_not_allowed")


def jwt_metadata(claims: dict[str, object]) -> base_pb2.Metadata:
    payload = struct_pb2.Struct()
    payload.update(claims)
    meta = base_pb2.Metadata()
    meta.filter_metadata[JWT_METADATA_NAMESPACE].fields[JWT_PAYLOAD_KEY].struct_value.CopyFrom(
        payload
    )
    return meta


@pytest.mark.parametrize("refuse", [False, True])
def test_jwt_identity_cannot_be_spoofed(refuse: bool) -> None:
    sink = RecordingSink()
    p = processor(sink, resolver=IdentityResolver(ALL, refuse_spoofing=refuse))
    answer = p.request_headers(
        headers(("x-tollgate-user-id", b"mallory"), end=True), jwt_metadata({"sub": "alice"})
    )
    if refuse:
        assert error_of(answer) == (403, "user_id_mismatch")
    else:
        assert answer.HasField("request_headers")
        p.close()
    record = sink.records[0]
    assert (record.end_user_id, record.identity_source) == ("alice", "jwt")


def test_spoofing_through_the_body_is_refused_when_configured() -> None:
    sink = RecordingSink()
    p = processor(sink, resolver=IdentityResolver(ALL, refuse_spoofing=True))
    first = p.request_headers(headers(JSON), jwt_metadata({"sub": "alice"}))
    assert first.mode_override.request_body_mode == responses.BODY_BUFFERED
    assert error_of(p.request_body(body({"user": "mallory"}))) == (403, "user_id_mismatch")


def test_strict_mode_refuses_and_records_the_offending_id() -> None:
    sink = RecordingSink()
    p = processor(sink, resolver=IdentityResolver(ALL, strict=True))
    answer = p.request_headers(headers(("x-tollgate-user-id", b"a b"), end=True))
    assert error_of(answer) == (422, "invalid_user_id")
    assert sink.records[0].end_user_id == "a b"


# The enforcement matrix: global, key setting, override header, identity, opt-out policy.
MATRIX = list(
    itertools.product(
        [False, True],  # global default
        [None, False, True],  # key: none / key with enforcement off / on
        [None, b"false", b"true"],  # override header
        [False, True],  # identity present
        [False, True],  # overrides may switch enforcement off
    )
)


def expected_refused(
    global_on: bool,
    key_setting: bool | None,
    override: bytes | None,
    has_identity: bool,
    may_disable: bool,
) -> bool:
    if has_identity:
        return False
    enforce = global_on if key_setting is None else key_setting
    if override == b"true":
        enforce = True
    elif override == b"false" and may_disable:
        enforce = False
    return enforce


@pytest.mark.parametrize(
    ("global_on", "key_setting", "override", "has_identity", "may_disable"), MATRIX
)
def test_enforcement_matrix(
    global_on: bool,
    key_setting: bool | None,
    override: bytes | None,
    has_identity: bool,
    may_disable: bool,
) -> None:
    sink = RecordingSink()
    pairs: list[tuple[str, bytes]] = []
    keys = FixedKeys()
    if key_setting is not None:
        keys = FixedKeys({b"tg_k": key("key_k", enforce=key_setting)})
        pairs.append(("x-tollgate-key", b"tg_k"))
    if override is not None:
        pairs.append(("x-tollgate-enforce-user-id", override))
    if has_identity:
        pairs.append(("x-tollgate-user-id", b"someone"))
    p = processor(
        sink, keys=keys, enforce_user_id=global_on, enforce_override_may_disable=may_disable
    )
    answer = p.request_headers(headers(*pairs, end=True))
    refused = answer.HasField("immediate_response")
    assert refused == expected_refused(global_on, key_setting, override, has_identity, may_disable)
    if refused:
        assert error_of(answer) == (422, "user_id_required")


def test_body_read_only_for_logging_never_refuses(caplog: pytest.LogCaptureFixture) -> None:
    sink = RecordingSink()
    p = processor(sink, log_bodies=True, enforce_user_id=True)
    first = p.request_headers(headers(JSON, ("x-tollgate-user-id", b"alice")))
    assert first.mode_override.request_body_mode == responses.BODY_BUFFERED
    with caplog.at_level("INFO", logger="tollgate.bodies"):
        answer = p.request_body(ep.HttpBody(body=b'{"not json": marker-7', end_of_stream=True))
    assert answer.HasField("request_body")
    assert "marker-7" in caplog.text


def test_logging_disabled_request_body_is_neither_read_nor_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = RecordingSink()
    p = processor(sink, log_bodies=True)
    with caplog.at_level("INFO", logger="tollgate.bodies"):
        first = p.request_headers(
            headers(JSON, ("x-tollgate-user-id", b"alice"), ("x-tollgate-logging-disable", b"1"))
        )
        assert not first.HasField("mode_override")
        p.response_headers(
            ep.HttpHeaders(
                headers=base_pb2.HeaderMap(
                    headers=[
                        base_pb2.HeaderValue(key=":status", raw_value=b"200"),
                        base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"),
                    ]
                )
            )
        )
        p.response_body(ep.HttpBody(body=b'{"secret": "reply-marker"}', end_of_stream=True))
    assert caplog.text == ""
    assert sink.records[0].logging_disabled


# -- hardening (issue 11): text, numbers, credentials, refusals, the error boundary -------------

SURROGATE_JSON = '"a\\ud800b"'  # the JSON escape of a lone surrogate, as a client can send it


def request_at(
    path: bytes, *pairs: tuple[str, bytes], method: bytes = b"POST", end: bool = False
) -> ep.HttpHeaders:
    base = [(":method", method), (":path", path)]
    return ep.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in [*base, *pairs]]
        ),
        end_of_stream=end,
    )


def raw_body(text: str) -> ep.HttpBody:
    return ep.HttpBody(body=text.encode(), end_of_stream=True)


def answer_json(p: RequestProcessor, payload: str, *, streamed: bool = False) -> None:
    content_type = b"text/event-stream" if streamed else b"application/json"
    p.response_headers(
        ep.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[
                    base_pb2.HeaderValue(key=":status", raw_value=b"200"),
                    base_pb2.HeaderValue(key="content-type", raw_value=content_type),
                ]
            )
        )
    )
    p.response_body(ep.HttpBody(body=payload.encode(), end_of_stream=True))


def chat_processor(sink: RecordingSink, **policy: object) -> RequestProcessor:
    p = processor(sink, **policy)
    p.request_headers(request_at(b"/v1/chat/completions", JSON))
    return p


@pytest.mark.parametrize("streamed", [False, True], ids=["json", "sse"])
def test_lone_surrogates_from_client_and_provider_are_metered(streamed: bool) -> None:
    sink = RecordingSink()
    p = chat_processor(sink)
    stream = "true" if streamed else "false"
    answer = p.request_body(
        raw_body(
            f'{{"model": {SURROGATE_JSON}, "user": {SURROGATE_JSON}, "stream": {stream},'
            f' "messages": [{{"role": "user", "content": {SURROGATE_JSON}}}]}}'
        )
    )
    assert answer.HasField("request_body")
    if streamed:
        # include_usage was injected: the body was re-encoded, the surrogate kept as sent.
        sent = answer.request_body.response.body_mutation.body
        assert b"\\ud800" in sent
        assert json.loads(sent)["stream_options"] == {"include_usage": True}
        payload = (
            f'data: {{"model": {SURROGATE_JSON}, "choices": []}}\n\n'
            'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n'
            "data: [DONE]\n\n"
        )
    else:
        payload = f'{{"model": {SURROGATE_JSON}, "usage": {{"prompt_tokens": 3}}}}'
    answer_json(p, payload, streamed=streamed)
    (record,) = sink.records
    assert record.outcome == usage_pb2.OUTCOME_OK
    assert (record.end_user_id, record.identity_source) == ("a\ufffdb", "body_user")
    assert record.model == "a\ufffdb"
    assert record.input_tokens == 3
    record.SerializeToString()  # storable as it is


@pytest.mark.parametrize("streamed", [False, True], ids=["json", "sse"])
def test_token_counts_beyond_int64_are_left_unset_and_flagged(streamed: bool) -> None:
    sink = RecordingSink()
    p = chat_processor(sink)
    p.request_body(body({"model": "m", "stream": streamed, "messages": []}))
    usage = (
        '{"prompt_tokens": 1000000000000000000000000, "completion_tokens": 7,'
        ' "total_tokens": -99999999999999999999}'
    )
    if streamed:
        payload = f'data: {{"choices": [], "usage": {usage}}}\n\ndata: [DONE]\n\n'
    else:
        payload = f'{{"model": "m", "usage": {usage}}}'
    answer_json(p, payload, streamed=streamed)
    (record,) = sink.records
    assert record.outcome == usage_pb2.OUTCOME_OK
    assert not record.HasField("input_tokens")
    assert not record.HasField("total_tokens")
    assert record.output_tokens == 7
    assert list(record.usage_flags) == ["out_of_range_tokens"]


def test_an_integer_beyond_any_float_is_not_a_unit() -> None:
    sink = RecordingSink()
    p = processor(sink)
    p.request_headers(request_at(b"/v1/audio/transcriptions", end=True))
    answer_json(p, '{"text": "hi", "duration": 1' + "0" * 400 + "}")
    (record,) = sink.records
    assert dict(record.units) == {}
    assert list(record.usage_flags) == []  # the parser refused it: nothing left to flag


def test_numbers_too_long_to_read_are_invalid_json() -> None:
    sink = RecordingSink()
    p = chat_processor(sink)
    answer = p.request_body(raw_body('{"model": "m", "n": ' + "9" * 5000 + "}"))
    assert error_of(answer) == (400, "invalid_json")


def auth_headers(*pairs: tuple[str, bytes]) -> ep.HttpHeaders:
    return headers(("x-tollgate-user-id", b"carol"), ("x-tollgate-tags", b"t1"), *pairs)


GATEWAY_TOKEN = b"tg_" + b"G" * 43


@pytest.mark.parametrize(
    ("pairs", "param"),
    [
        # how Envoy hands ext_proc two authorization headers: one value joined with ","
        ((("authorization", b"Bearer sk-app-own,Bearer " + GATEWAY_TOKEN),), "authorization"),
        ((("x-api-key", b"k1"), ("x-api-key", b"k2")), "x-api-key"),
        ((("x-tollgate-key", GATEWAY_TOKEN), ("x-tollgate-key", b"tg_other")), "x-tollgate-key"),
        ((("x-api-key", GATEWAY_TOKEN),), "x-api-key"),
        ((("x-goog-api-key", b"a"), ("x-goog-api-key", b"b")), "x-goog-api-key"),
        ((("api-key", b"a"), ("api-key", b"b")), "api-key"),
        ((("x-trace", b"list, Bearer " + GATEWAY_TOKEN),), "x-trace"),
        ((("x-tollgate-forward-x-custom", GATEWAY_TOKEN),), "x-tollgate-forward-x-custom"),
        ((("x_api_key", GATEWAY_TOKEN),), "x_api_key"),
    ],
)
def test_ambiguous_or_misplaced_credentials_are_refused(
    pairs: tuple[tuple[str, bytes], ...], param: str
) -> None:
    sink = RecordingSink()
    keys = FixedKeys({GATEWAY_TOKEN: key("key_g")})
    answer = processor(sink, keys=keys).request_headers(auth_headers(*pairs))
    assert error_of(answer) == (400, "ambiguous_credentials")
    assert json.loads(answer.immediate_response.body)["error"]["param"] == param
    assert GATEWAY_TOKEN not in answer.immediate_response.body
    (record,) = sink.records
    assert (record.outcome, record.block_reason) == (
        usage_pb2.OUTCOME_BLOCKED,
        "ambiguous_credentials",
    )
    assert (record.end_user_id, record.identity_source, list(record.tags)) == (
        "carol",
        "header",
        ["t1"],
    )


def test_identical_repeats_of_a_credential_are_one_credential() -> None:
    sink = RecordingSink()
    keys = FixedKeys({GATEWAY_TOKEN: key("key_g")})
    answer = processor(sink, keys=keys).request_headers(
        auth_headers(("x-tollgate-key", GATEWAY_TOKEN), ("x-tollgate-key", GATEWAY_TOKEN))
    )
    assert answer.HasField("request_headers")


def test_gateway_key_in_the_query_string_is_refused() -> None:
    sink = RecordingSink()
    answer = processor(sink).request_headers(
        request_at(b"/v1/models?key=" + GATEWAY_TOKEN, method=b"GET", end=True)
    )
    assert error_of(answer) == (400, "ambiguous_credentials")


def test_refusals_keep_the_user_key_and_tags_they_know() -> None:
    sink = RecordingSink()
    keys = FixedKeys({b"tg_good": key("key_1")})
    # an unknown gateway key
    processor(sink, keys=keys).request_headers(auth_headers(("x-tollgate-key", b"tg_unknown")))
    # a base URI off the allow-list (none is allowed here)
    processor(sink, keys=keys).request_headers(
        auth_headers(("x-tollgate-key", b"tg_good"), ("x-tollgate-base-uri", b"http://evil"))
    )
    # an unusable switch
    processor(sink).request_headers(auth_headers(("x-tollgate-enforce-user-id", b"maybe")))
    reasons = [r.block_reason for r in sink.records]
    assert reasons == ["invalid_gateway_key", "base_uri_not_allowed", "invalid_header_value"]
    for record in sink.records:
        assert (record.end_user_id, record.identity_source) == ("carol", "header")
        assert list(record.tags) == ["t1"]
    assert sink.records[1].key_id == "key_1"


def test_refusal_after_the_body_keeps_the_body_user_and_model() -> None:
    sink = RecordingSink()
    p = processor(sink, enforce_user_id=True, resolver=IdentityResolver(ALL, strict=True))
    p.request_headers(headers(JSON))
    answer = p.request_body(body({"model": "gpt-x", "user": "not ok!"}))
    assert error_of(answer) == (422, "invalid_user_id")
    (record,) = sink.records
    assert (record.end_user_id, record.identity_source, record.model) == (
        "not ok!",
        "body_user",
        "gpt-x",
    )


def test_fail_records_internal_error_once_and_answers_500() -> None:
    sink = RecordingSink()
    p = processor(sink)
    p.request_headers(auth_headers(JSON))
    answer = p.fail("request_body")
    assert answer is not None
    assert error_of(answer) == (500, "internal_error")
    p.close()
    (record,) = sink.records
    assert record.outcome == usage_pb2.OUTCOME_INTERNAL_ERROR
    assert (record.end_user_id, record.status_code) == ("carol", 500)
    # a buffered response body is still held by Envoy: answered too
    sink = RecordingSink()
    p = chat_processor(sink)
    p.request_body(body({"model": "m"}))
    p.response_headers(headers((":status", b"200"), JSON))
    answer = p.fail("response_body")
    assert answer is not None
    assert error_of(answer) == (500, "internal_error")
    # a streamed one may be under way: no answer, the stream is aborted
    sink = RecordingSink()
    p = chat_processor(sink)
    p.request_body(body({"model": "m", "stream": True}))
    p.response_headers(headers((":status", b"200"), ("content-type", b"text/event-stream")))
    assert p.fail("response_body") is None
    (record,) = sink.records
    assert record.outcome == usage_pb2.OUTCOME_INTERNAL_ERROR


def test_a_record_that_cannot_be_built_is_still_submitted() -> None:
    class BrokenFill(RequestProcessor):
        def _fill(self, record, parsed):  # type: ignore[no-untyped-def]
            record.end_user_id = "partial"
            raise RuntimeError("boom")

    sink = RecordingSink()
    p = BrokenFill(ProcessorContext(sink=sink, router=Router.single("openai", "http://up")))
    p.request_headers(headers(end=True))
    with pytest.raises(RuntimeError):
        p.close()
    assert p.fail("close") is None
    (record,) = sink.records
    assert (record.outcome, record.end_user_id) == (usage_pb2.OUTCOME_INTERNAL_ERROR, "partial")


def test_forwards_never_add_credentials_next_to_injected_ones() -> None:
    anthropic = Provider(
        name="anthropic",
        base=parse_base_uri("https://api.anthropic.com"),
        api="anthropic",
        auth="x-api-key",
        api_key="sk-ant-injected",
        headers=(("anthropic-version", "2023-06-01"),),
    )
    sink = RecordingSink()
    injecting = GatewayKey("key_i", "inject", None, None, None, True)
    p = RequestProcessor(
        ProcessorContext(
            sink=sink,
            router=Router({"anthropic": anthropic}, "anthropic"),
            keys=FixedKeys({b"tg_k": injecting}),
        )
    )
    forwards = [
        (f"{prefix}{name}", b"forwarded-" + name.encode())
        for prefix in ("x-tollgate-forward-", "xproxy-forward-")
        for name in (
            "x-api-key",
            "x_api_key",
            "api-key",
            "authorization",
            "proxy-authorization",
            "cookie",
            "anthropic-version",
            "accept-encoding",
            "content-encoding",
            "x-tollgate-request-id",
            "x-trace",
        )
    ]
    answer = p.request_headers(
        request_at(
            b"/v1/messages",
            ("x-tollgate-key", b"tg_k"),
            ("x_api_key", b"sk-own-look-alike"),
            *forwards,
            end=True,
        )
    )
    mutation = answer.request_headers.response.header_mutation
    sent = [(h.header.key, h.header.raw_value) for h in mutation.set_headers]
    names = [name for name, _ in sent]
    assert dict(sent)["x-api-key"] == b"sk-ant-injected"
    assert dict(sent)["anthropic-version"] == b"2023-06-01"
    assert names.count("x-api-key") == 1
    assert names.count("anthropic-version") == 1
    assert ("x-trace", b"forwarded-x-trace") in sent
    assert not [v for _, v in sent if v.startswith(b"forwarded-") and v != b"forwarded-x-trace"]
    assert "x_api_key" in mutation.remove_headers
    assert {n for n, _ in forwards} <= set(mutation.remove_headers)

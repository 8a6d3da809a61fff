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

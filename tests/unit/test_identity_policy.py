"""Identity resolution, attribution headers and request-body reading, as pure functions."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest
from google.protobuf import struct_pb2
from hypothesis import given
from hypothesis import strategies as st

from tollgate.extproc.request_body import is_json_content_type, multipart_field, read_json_body
from tollgate.policy.attribution import (
    ambiguous_credential,
    forwardable,
    holds_gateway_key,
    parse_attribution,
    parse_bool,
)
from tollgate.policy.identity import (
    Identity,
    IdentityResolver,
    body_candidates,
    header_candidate,
    jwt_claim,
    normalise_user_id,
)
from tollgate.policy.refusal import PolicyRefusal
from tollgate.policy.text import safe_text

ALL = ("jwt", "key", "header", "body_user", "body_safety_identifier", "body_metadata_user_id")


# -- normalisation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"user_7a3f", "user_7a3f"),
        (b"  padded  ", "padded"),
        (b"", None),
        (b"   \t ", None),
        (b"x" * 300, "x" * 255),
        (b"caf\xc3\xa9", "caf\u00e9"),
        (b"bad\xff\xfebytes", "bad\ufffd\ufffdbytes"),
        ("nul\x00inside", "nul\ufffdinside"),
        ("a\ud800b", "a\ufffdb"),
        ("\udfff", "\ufffd"),
    ],
)
def test_normalise_user_id(raw: bytes | str, expected: str | None) -> None:
    assert normalise_user_id(raw) == expected


@given(st.binary(max_size=600))
def test_normalise_never_raises_and_bounds_length(raw: bytes) -> None:
    user_id = normalise_user_id(raw)
    if user_id is not None:
        assert 0 < len(user_id) <= 255
        assert "\x00" not in user_id
        assert user_id == user_id.strip()


def test_header_candidate_prefers_canonical_then_aliases_and_skips_blank() -> None:
    assert header_candidate({"xproxy-user-id": b"c", "x-proxyify-user-id": b"b"}) == "b"
    assert header_candidate({"x-tollgate-user-id": b" ", "xproxy-user-id": b"c"}) == "c"
    assert header_candidate({"x-other": b"a"}) is None


def test_body_candidates() -> None:
    body = {"user": "u1", "safety_identifier": "s1", "metadata": {"user_id": "m1"}}
    assert body_candidates(body) == {
        "body_user": "u1",
        "body_safety_identifier": "s1",
        "body_metadata_user_id": "m1",
    }
    assert body_candidates({"user": 42, "metadata": {"user_id": ["x"]}}) == {"body_user": "42"}
    assert body_candidates({"user": "", "metadata": "nope", "safety_identifier": None}) == {}


def test_jwt_claim_paths() -> None:
    payload = struct_pb2.Struct()
    payload.update({"sub": "auth0|42", "user": {"id": "nested"}, "num": 7, "flag": True})
    assert jwt_claim(payload, "sub") == "auth0|42"
    assert jwt_claim(payload, "user.id") == "nested"
    assert jwt_claim(payload, "num") == "7"
    assert jwt_claim(payload, "flag") is None
    assert jwt_claim(payload, "user") is None
    assert jwt_claim(payload, "missing.path") is None


# -- resolution order and anti-spoofing ------------------------------------------------------------

CANDIDATES = {
    "jwt": "from-jwt",
    "key": "from-key",
    "header": "from-header",
    "body_user": "from-user",
    "body_safety_identifier": "from-safety",
    "body_metadata_user_id": "from-metadata",
}


@pytest.mark.parametrize(
    ("order", "present", "expected"),
    [
        (ALL, ALL, "jwt"),
        (ALL, ALL[1:], "key"),
        (ALL, ALL[2:], "header"),
        (ALL, ALL[3:], "body_user"),
        (ALL, ALL[4:], "body_safety_identifier"),
        (ALL, ALL[5:], "body_metadata_user_id"),
        (ALL, (), None),
        # Configured order among client-sent sources.
        (("body_user", "header"), ("header", "body_user"), "body_user"),
        # Trusted sources come first whatever the order says.
        (("header", "key", "jwt"), ("header", "jwt", "key"), "key"),
        # A source left out of the order is never used.
        (("header",), ("body_user",), None),
    ],
)
def test_pick_order(order: tuple[str, ...], present: tuple[str, ...], expected: str | None) -> None:
    resolver = IdentityResolver(order)
    identity = resolver.pick({s: CANDIDATES[s] for s in present})
    if expected is None:
        assert identity is None
    else:
        assert identity == Identity(CANDIDATES[expected], expected)


def test_spoofing_is_ignored_or_refused() -> None:
    candidates = {"jwt": "alice", "header": "mallory"}
    ignore = IdentityResolver(ALL)
    identity = ignore.pick(candidates)
    assert identity == Identity("alice", "jwt")
    ignore.check(identity, candidates)  # no refusal
    refuse = IdentityResolver(ALL, refuse_spoofing=True)
    with pytest.raises(PolicyRefusal) as caught:
        refuse.check(identity, candidates)
    assert (caught.value.status, caught.value.code) == (403, "user_id_mismatch")
    # The same id in a header is not a conflict.
    refuse.check(identity, {"jwt": "alice", "header": "alice"})


def test_strict_mode() -> None:
    strict = IdentityResolver(ALL, strict=True)
    strict.check(Identity("alice@example.com:42_a-b.c", "header"), {})
    for bad in ("a b", "caf\u00e9", "x/y", "\ufffd"):
        with pytest.raises(PolicyRefusal) as caught:
            strict.check(Identity(bad, "header"), {})
        assert (caught.value.status, caught.value.code) == (422, "invalid_user_id")


def test_wants_body() -> None:
    resolver = IdentityResolver(ALL)
    assert resolver.wants_body({})
    assert not resolver.wants_body({"header": "h"})
    assert not resolver.wants_body({"jwt": "j"})
    assert IdentityResolver(ALL, refuse_spoofing=True).wants_body({"jwt": "j"})
    assert not IdentityResolver(("jwt", "header")).wants_body({})
    assert IdentityResolver(("body_user", "header")).wants_body({"header": "h"})


# -- attribution headers ---------------------------------------------------------------------------


def test_attribution_headers_are_parsed_and_stripped() -> None:
    att = parse_attribution(
        {
            ":path": b"/v1/chat/completions",
            "authorization": b"Bearer sk-provider",
            "x-tollgate-tags": b"checkout, beta,,checkout",
            "xproxy-limit-ids": b"team-a,daily",
            "xproxy-usecase-id": b"uc-1",
            "x-tollgate-use-case-name": b"Support bot",
            "x-tollgate-use-case-version": b"3",
            "xproxy-logging-disable": b"TRUE",
            "x-usagepanda-enforce-user-ids": b"true",
            "x-tollgate-forward-x-trace": b"abc",
            "xproxy-forward-openai-organization": b"org-1",
            "x-tollgate-forward-host": b"evil.example",
            "x-tollgate-forward-x-tollgate-user-id": b"sneaky",
        }
    )
    assert att.tags == ("checkout", "beta")
    assert att.limit_ids == ("team-a", "daily")
    assert (att.use_case_id, att.use_case_name, att.use_case_version) == (
        "uc-1",
        "Support bot",
        "3",
    )
    assert att.logging_disabled
    assert att.enforce_override is True
    assert att.gateway_token is None
    assert dict(att.forwards) == {"x-trace": b"abc", "openai-organization": b"org-1"}
    assert "authorization" not in att.strip
    assert set(att.strip) == {
        "x-tollgate-tags",
        "xproxy-limit-ids",
        "xproxy-usecase-id",
        "x-tollgate-use-case-name",
        "x-tollgate-use-case-version",
        "xproxy-logging-disable",
        "x-usagepanda-enforce-user-ids",
        "x-tollgate-forward-x-trace",
        "xproxy-forward-openai-organization",
        "x-tollgate-forward-host",
        "x-tollgate-forward-x-tollgate-user-id",
    }


def test_gateway_key_from_bearer_or_header() -> None:
    bearer = parse_attribution({"authorization": b"Bearer tg_abc"})
    assert bearer.gateway_token == b"tg_abc"
    assert "authorization" in bearer.strip
    both = parse_attribution({"authorization": b"Bearer sk-own", "x-tollgate-key": b" tg_k "})
    assert both.gateway_token == b"tg_k"
    assert "authorization" not in both.strip
    assert "x-tollgate-key" in both.strip


def test_enforce_header_values() -> None:
    assert parse_attribution({"x-tollgate-enforce-user-id": b"False"}).enforce_override is False
    assert parse_attribution({}).enforce_override is None
    # An unusable switch is noted, not raised, so the refusal keeps what else was read.
    att = parse_attribution({"x-tollgate-enforce-user-id": b"sure", "x-tollgate-tags": b"t"})
    assert att.tags == ("t",)
    with pytest.raises(PolicyRefusal) as caught:
        att.refuse_if_invalid()
    assert (caught.value.status, caught.value.code) == (400, "invalid_header_value")
    parse_attribution({"x-tollgate-enforce-user-id": b"true"}).refuse_if_invalid()
    assert parse_bool(b" yes ") is True
    assert parse_bool(b"\xff") is None


def test_logging_disable_is_on_unless_explicitly_false() -> None:
    assert parse_attribution({"x-tollgate-logging-disable": b"1"}).logging_disabled
    assert parse_attribution({"x-tollgate-logging-disable": b"whatever"}).logging_disabled
    assert not parse_attribution({"x-tollgate-logging-disable": b"false"}).logging_disabled
    assert not parse_attribution({}).logging_disabled


# -- request bodies -------------------------------------------------------------------------------


def test_json_content_types() -> None:
    assert is_json_content_type(b"application/json; charset=utf-8")
    assert is_json_content_type(b"Application/Vnd.Api+JSON")
    assert not is_json_content_type(b"multipart/form-data; boundary=x")
    assert not is_json_content_type(None)


def test_read_json_body_plain_gzip_deflate() -> None:
    doc = {"model": "m", "user": "u"}
    raw = json.dumps(doc).encode()
    assert read_json_body(raw, None, 1000) == doc
    assert read_json_body(gzip.compress(raw), b"gzip", 1000) == doc
    assert read_json_body(zlib.compress(raw), b"deflate", 1000) == doc
    assert read_json_body(b"[1, 2]", None, 1000) == {}


@pytest.mark.parametrize(
    ("body", "encoding", "status", "needle"),
    [
        (b'{"model": ', None, 400, "Expecting value"),
        (b'{"user": "\xff"}', None, 400, "UTF-8"),
        (b"not gzip", b"gzip", 400, "not valid gzip"),
        (b"{}", b"br", 400, "'br' is not supported"),
        (gzip.compress(b" " * 5000), b"gzip", 413, "larger than"),
    ],
)
def test_read_json_body_refusals(
    body: bytes, encoding: bytes | None, status: int, needle: str
) -> None:
    with pytest.raises(PolicyRefusal) as caught:
        read_json_body(body, encoding, 1000)
    assert caught.value.status == status
    assert needle in caught.value.message


def test_refusal_message_never_echoes_the_body() -> None:
    secret = b'{"messages": "top-secret-prompt", '
    with pytest.raises(PolicyRefusal) as caught:
        read_json_body(secret, None, 1000)
    assert "top-secret" not in caught.value.message


def test_multipart_field() -> None:
    boundary = b"----tg123"
    body = (
        b"------tg123\r\n"
        b'Content-Disposition: form-data; name="file"; filename="model.mp3"\r\n'
        b"Content-Type: audio/mpeg\r\n\r\n"
        b'ID3\x00\xff name="model"\r\n'
        b"------tg123\r\n"
        b'Content-Disposition: form-data; name="model"\r\n\r\n'
        b"whisper-1\r\n"
        b"------tg123--\r\n"
    )
    content_type = b"multipart/form-data; boundary=" + boundary
    assert multipart_field(body, content_type, "model") == "whisper-1"
    assert multipart_field(body, content_type, "language") is None
    assert multipart_field(body, b"application/json", "model") is None
    assert multipart_field(b"garbage", content_type, "model") is None
    assert multipart_field(body, b"multipart/form-data", "model") is None


# -- hardening: text, look-alikes, forwards, credentials -----------------------------------------


def test_safe_text_replaces_only_what_cannot_be_stored() -> None:
    plain = "gpt-4o-mini"
    assert safe_text(plain) is plain
    assert safe_text("caf\u00e9 \U0001f600") == "caf\u00e9 \U0001f600"
    assert safe_text("a\ud800b\x00c\udc00") == "a\ufffdb\ufffdc\ufffd"
    safe_text("x\ud83d").encode("utf-8")  # must not raise


@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0xFFFF)))
def test_safe_text_output_always_encodes(text: str) -> None:
    out = safe_text(text)
    out.encode("utf-8")
    assert "\x00" not in out
    assert len(out) == len(text)


def test_body_user_ids_with_lone_surrogates_are_storable() -> None:
    found = body_candidates({"user": "a\ud800b", "metadata": {"user_id": "\udc00m"}})
    assert found == {"body_user": "a\ufffdb", "body_metadata_user_id": "\ufffdm"}
    assert body_candidates({"user": 10**300})["body_user"] == str(10**300)[:255]


def test_look_alike_names_are_stripped_and_never_read() -> None:
    att = parse_attribution(
        {
            "x_tollgate_user_id": b"smuggled",
            "xproxy_user_id": b"smuggled",
            "x-tollgate_user-id": b"smuggled",
            "x_tollgate_key": b"tg_" + b"a" * 43,
            "x_tollgate_forward_x_api_key": b"sk-extra",
            "x_tollgate_tags": b"t",
            "x_request_id": b"kept",
        }
    )
    assert set(att.strip) == {
        "x_tollgate_user_id",
        "xproxy_user_id",
        "x-tollgate_user-id",
        "x_tollgate_key",
        "x_tollgate_forward_x_api_key",
        "x_tollgate_tags",
    }
    assert header_candidate({"x_tollgate_user_id": b"smuggled"}) is None
    assert att.gateway_token is None
    assert att.tags == ()
    assert att.forwards == ()


@pytest.mark.parametrize(
    "target",
    [
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "x_api_key",
        "api-key",
        "api_key",
        "x-goog-api-key",
        "cookie",
        "ocp-apim-subscription-key",
        "x-amz-security-token",
        "x-amz-date",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "transfer_encoding",
        "upgrade",
        "host",
        "content-length",
        "content-encoding",
        "accept-encoding",
        ":authority",
        ":path",
        "x-tollgate-upstream-host",
        "x-tollgate-upstream-scheme",
        "x-tollgate-request-id",
        "x_tollgate_user_id",
        "xproxy-user-id",
        "",
    ],
)
def test_forward_prefix_cannot_produce(target: str) -> None:
    assert not forwardable(target)
    att = parse_attribution(
        {f"x-tollgate-forward-{target}": b"v", f"xproxy-forward-{target}": b"v"}
    )
    assert att.forwards == ()


def test_forward_prefix_passes_application_headers() -> None:
    assert forwardable("openai-organization")
    assert forwardable("x-trace-id")
    assert forwardable("anthropic-beta")


@pytest.mark.parametrize(
    ("value", "held"),
    [
        (b"Bearer tg_" + b"A" * 43, True),
        (b"tg_" + b"A" * 43, True),
        (b"Bearer sk-own, Bearer tg_" + b"x" * 43, True),
        (b"/v1/models?key=tg_" + b"x" * 43, True),
        (b"Bearer tg_abc", False),  # too short to be a key
        (b"sk-proj-abcdtg_" + b"x" * 43, False),  # inside another token
        (b"session=1; tg_pref=dark", False),
        (b"Bearer sk-own", False),
    ],
)
def test_holds_gateway_key(value: bytes, held: bool) -> None:
    assert holds_gateway_key(value) is held


@pytest.mark.parametrize(
    ("headers", "repeated", "ambiguous"),
    [
        ({"authorization": b"Bearer sk-own,Bearer tg_k"}, set(), "authorization"),
        ({"authorization": b"Bearer a, Bearer a"}, set(), "authorization"),
        ({"authorization": b"Basic YQ==,Bearer b"}, set(), "authorization"),
        ({"x-api-key": b"k1"}, {"x-api-key"}, "x-api-key"),
        ({"x-tollgate-key": b"tg_1"}, {"x-tollgate-key"}, "x-tollgate-key"),
        ({"api-key": b"k"}, {"api-key"}, "api-key"),
        ({"x-goog-api-key": b"k"}, {"x-goog-api-key"}, "x-goog-api-key"),
        ({"authorization": b"Bearer sk-own"}, set(), None),
        ({"x-trace": b"a"}, {"x-trace"}, None),
        # SigV4 is one credential with auth-params after its commas.
        (
            {
                "authorization": b"AWS4-HMAC-SHA256 Credential=AKIA/20250101/us-east-1/bedrock/"
                b"aws4_request, SignedHeaders=host;x-amz-date, Signature=abc123"
            },
            set(),
            None,
        ),
    ],
)
def test_ambiguous_credentials(
    headers: dict[str, bytes], repeated: set[str], ambiguous: str | None
) -> None:
    assert ambiguous_credential(headers, repeated) == ambiguous

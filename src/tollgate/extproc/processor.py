"""One RequestProcessor per ext_proc stream (= per HTTP request), with a handler per phase.

The processor decides, from what it has seen so far, what Envoy should do next, and at the
end of the exchange builds exactly one UsageRecord and hands it to the ledger sink. It does
no I/O and never waits: the sink's ``submit`` only enqueues.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2

from tollgate.config import Settings
from tollgate.extproc import responses
from tollgate.extproc.edge_limits import (
    ENVOY_ERROR_CODES,
    ENVOY_ERROR_HEADER,
    check_client_headers,
    check_content_length,
    declared_length,
    envoy_error_code,
)
from tollgate.extproc.plan import (
    INCLUDE_USAGE_ENDPOINTS,
    JSON_ANSWER_ENDPOINTS,
    LIMIT_REMAINING_KEY,
    LIMIT_RESET_KEY,
    UNSURE,
    facts_from_envoy,
)
from tollgate.extproc.request_body import (
    is_json_content_type,
    multipart_field,
    read_json_body,
)
from tollgate.ledger.build import fill_attribution, fill_usage, traceparent
from tollgate.ledger.records import UsageRecord, new_request_id
from tollgate.ledger.writer import record_cost
from tollgate.metering import ParsedResponse, UsageParser, parser_for, wants_request_body
from tollgate.metering.decoding import DecodingParser, decoder_wbits, sniffed_wbits
from tollgate.metering.sse import SSEEventFilter
from tollgate.metering.usage import RequestFacts
from tollgate.metering.vertex import is_polling_endpoint, video_request
from tollgate.policy.attribution import (
    RequestAttribution,
    ambiguous_credential,
    holds_gateway_key,
    parse_attribution,
)
from tollgate.policy.headers import FORWARD_PREFIXES, LIST_HEADERS, REQUEST_ID_HEADER
from tollgate.policy.identity import (
    JWT_METADATA_NAMESPACE,
    JWT_PAYLOAD_KEY,
    Identity,
    IdentityResolver,
    body_candidates,
    header_candidate,
    jwt_claim,
)
from tollgate.policy.keys import GatewayKey
from tollgate.policy.limits import LimitBook, LimitState
from tollgate.policy.refusal import PolicyRefusal
from tollgate.policy.text import safe_text
from tollgate.pricing import PriceBook
from tollgate.routing.mutation import route_mutation, signing_headers
from tollgate.routing.router import Route, Router
from tollgate.v1 import usage_pb2

__all__ = [
    "KeyLookup",
    "PolicyConfig",
    "ProcessorContext",
    "RecordSink",
    "RequestProcessor",
    "header_map",
]

log = logging.getLogger(__name__)
body_log = logging.getLogger("tollgate.bodies")

# How much of a request or response body ``log_bodies`` writes to the log.
BODY_LOG_BYTES = 4096


# Endpoints whose multipart/form-data request names the model in a form field.
_FORM_MODEL_ENDPOINTS = ("/audio/transcriptions", "/audio/translations")
# Response media types metered as they pass (never buffered): SSE, and AWS's binary event
# stream (Bedrock's ConverseStream and InvokeModelWithResponseStream).
_STREAM_TYPES = (b"text/event-stream", b"application/vnd.amazon.eventstream")
# The answer to a request Tollgate failed on while the client has had no response yet.
_INTERNAL_ERROR_MESSAGE = (
    "Tollgate failed while processing this request; its operator can find it by the "
    "x-tollgate-request-id header."
)


# Bytes of a request body per token, to estimate its input from its size (an upper bound for
# chat bodies: JSON keys and quotes are bytes that are not tokens).
_BYTES_PER_TOKEN = 4


def output_cap(document: dict[str, Any]) -> int | None:
    """A request body's cap on output tokens (OpenAI, Anthropic, Responses, Gemini)."""
    config = document.get("generationConfig")
    for value in (
        document.get("max_completion_tokens"),
        document.get("max_output_tokens"),
        config.get("maxOutputTokens") if isinstance(config, dict) else None,
        document.get("max_tokens"),
    ):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _is_usage_only_chunk(data: bytes) -> bool:
    """The chunk ``include_usage`` adds: empty ``choices`` and a ``usage`` object."""
    if b'"usage"' not in data:
        return False
    try:
        doc = json.loads(data)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("choices") == [] and isinstance(doc.get("usage"), dict)


class RecordSink(Protocol):
    def submit(self, record: UsageRecord) -> bool: ...

    @property
    def accepting(self) -> bool:
        """False when records cannot be kept and new requests must be refused."""
        ...


class KeyLookup(Protocol):
    def lookup(self, token: bytes) -> GatewayKey | None: ...


class _NoKeys:
    def lookup(self, token: bytes) -> GatewayKey | None:
        return None


@dataclass(frozen=True)
class PolicyConfig:
    """The identity and enforcement policy every request is held to."""

    resolver: IdentityResolver = field(
        default_factory=lambda: IdentityResolver(("jwt", "key", "header"))
    )
    enforce_user_id: bool = False
    enforce_override_may_disable: bool = False
    jwt_user_claim: str = "sub"
    max_body_bytes: int = 32 * 1024 * 1024
    log_bodies: bool = False
    # The JSON-answer plan: no response headers for a non-streaming JSON call (ADR 011).
    skip_json_response_headers: bool = False
    # Keep the request's W3C traceparent in its record (for the OpenTelemetry span).
    keep_traceparent: bool = False

    @classmethod
    def from_settings(cls, s: Settings) -> PolicyConfig:
        return cls(
            resolver=IdentityResolver(
                s.identity_sources,
                strict=s.strict_user_ids,
                refuse_spoofing=s.spoofed_user_id == "refuse",
            ),
            enforce_user_id=s.enforce_user_id,
            enforce_override_may_disable=s.enforce_override_may_disable,
            jwt_user_claim=s.jwt_user_claim,
            max_body_bytes=s.max_body_bytes,
            log_bodies=s.log_bodies,
            skip_json_response_headers=s.skip_json_response_headers,
            keep_traceparent=bool(s.otel_endpoint),
        )


@dataclass(frozen=True)
class ProcessorContext:
    """What every processor shares: where records go, the policy, the router."""

    sink: RecordSink
    router: Router
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    keys: KeyLookup = field(default_factory=_NoKeys)
    # Limits to enforce (none: no limits), and the prices a usd limit's local spend needs.
    limits: LimitBook | None = None
    prices: PriceBook | None = None
    monotonic_ns: Callable[[], int] = field(default=time.monotonic_ns)
    wall_ns: Callable[[], int] = field(default=time.time_ns)


def header_map(headers: ep.HttpHeaders, repeated: set[str] | None = None) -> dict[str, bytes]:
    """Header name → value bytes (``raw_value``; values are not always UTF-8).

    A repeated list header (tags, limit ids) keeps its values joined with ``,``; for any other
    repeated header the first value counts, and its name is added to ``repeated`` when a later
    value differs from the first.
    """
    out: dict[str, bytes] = {}
    for h in headers.headers.headers:
        value = h.raw_value if h.raw_value else h.value.encode("utf-8")
        key = h.key.lower()
        if key not in out:
            out[key] = value
        elif key in LIST_HEADERS:
            out[key] += b"," + value
        elif repeated is not None and out[key] != value:
            repeated.add(key)
    return out


class RequestProcessor:
    """State of one request through its phases; ``close`` ends it exactly once."""

    def __init__(self, ctx: ProcessorContext) -> None:
        self._ctx = ctx
        self._started_ns = ctx.monotonic_ns()
        wall_ns = ctx.wall_ns()
        self._request_id = new_request_id(wall_ns // 1_000_000)
        self._created_us = wall_ns // 1000
        self._identity: Identity | None = None
        self._attribution = RequestAttribution()
        self._key: GatewayKey | None = None
        self._candidates: dict[str, str] = {}
        self._content_encoding: bytes | None = None
        self._awaiting_body = False
        self._body_decides = False
        self._body_routes = False
        self._body_facts = False
        self._body_form = False
        # The plan skips the response headers: the answer is one buffered JSON document.
        self._json_answer = False
        # Envoy holds the response headers until the buffered body is answered (they came to
        # Tollgate): a failure in the body phase can still be answered with a 500.
        self._headers_held = False
        self._content_type: bytes | None = None
        self._headers: dict[str, bytes] = {}
        self._path = "/"
        self._route: Route | None = None
        self._request_model: str | None = None
        self._body_decoded = False
        self._facts = RequestFacts()
        self._usage_injected = False
        self._filter: SSEEventFilter | None = None
        self._block_reason: str | None = None
        self._response_sample: bytearray | None = None
        self._endpoint: str | None = None
        self._status: int | None = None
        self._streamed = False
        self._parser: UsageParser | None = None
        self._first_byte_ns: int | None = None
        self._finished = False
        # The limits the request is charged to, and what the client's answer says of them.
        self._charged: list[tuple[LimitState, str]] = []
        self._limit_metadata: dict[str, str] = {}
        self._refused_limit: str | None = None
        # What a usd or tokens limit reserves: the body's output cap and its declared size.
        self._output_cap: int | None = None
        self._body_length: int | None = None

    @property
    def request_id(self) -> str:
        return self._request_id

    # -- phases -----------------------------------------------------------------------------

    def request_headers(
        self, msg: ep.HttpHeaders, metadata: base_pb2.Metadata | None = None
    ) -> ep.ProcessingResponse:
        if not self._ctx.sink.accepting:
            # The journal is full (Postgres away too long): serve nothing that could not be
            # recorded. This answer itself cannot be recorded either.
            self._finished = True
            return responses.immediate_error(
                503,
                "ledger_unavailable",
                "The usage ledger is unavailable; retry shortly.",
                extra_headers=[
                    (REQUEST_ID_HEADER, self._request_id.encode()),
                    ("retry-after", b"5"),
                ],
            )
        repeated: set[str] = set()
        self._headers = headers = header_map(msg, repeated)
        self._path = headers.get(":path", b"/").decode("utf-8", "replace")
        self._endpoint = self._path.split("?", 1)[0]
        policy = self._ctx.policy
        router = self._ctx.router
        # Each step keeps what it learnt before it may refuse, so a refusal's row says who
        # asked, with which key, tags and use case.
        self._attribution = att = parse_attribution(headers)
        try:
            check_client_headers(msg)
            self._header_candidates(headers, metadata)
            att.refuse_if_invalid()
            self._check_credentials(headers, repeated)
            self._lookup_key()
            self._set_route(router.route(self._path, att.base_uri))
        except PolicyRefusal as refusal:
            return self._refuse(refusal)
        self._content_encoding = headers.get("content-encoding")
        body_readable = not msg.end_of_stream and is_json_content_type(headers.get("content-type"))
        if body_readable:
            try:
                self._plan_body(metadata, headers.get("content-length"))
            except PolicyRefusal as refusal:
                return self._refuse(refusal)
        # Transcriptions name their model in a multipart form field.
        self._content_type = headers.get("content-type")
        self._body_form = (
            not msg.end_of_stream
            and self._endpoint.endswith(_FORM_MODEL_ENDPOINTS)
            and (self._content_type or b"").lower().startswith(b"multipart/form-data")
        )
        log_body = body_readable and policy.log_bodies and not att.logging_disabled
        remove = list(att.strip)
        set_headers = [("accept-encoding", b"identity")]
        # A request Tollgate signs (Bedrock, a gateway key's credentials): the signature
        # covers the body's hash.
        signs = self._signs()
        wanted = (
            self._body_decides
            or self._body_routes
            or self._body_facts
            or self._body_form
            or (signs and not msg.end_of_stream)
        )
        if not self._body_decides:
            try:
                self._decide()
                if not (wanted or log_body):
                    self._apply_limits()  # else once the body is read (its output cap)
            except PolicyRefusal as refusal:
                return self._refuse(refusal)
        if wanted or log_body:
            try:
                check_content_length(headers.get("content-length"), policy.max_body_bytes)
            except PolicyRefusal as refusal:
                return self._refuse(refusal)
            # Envoy holds the request (no upstream connection) until the body is answered;
            # the route's headers are set then.
            self._awaiting_body = True
            self._json_answer = False
            return responses.continue_request_headers(
                request_id=self._request_id,
                metadata=self._limit_metadata,
                remove=remove,
                set_headers=set_headers,
                request_body_mode=responses.BODY_BUFFERED,
            )
        try:
            route_remove, route_set = self._route_mutation()
        except PolicyRefusal as refusal:
            return self._refuse(refusal)
        if signs:
            route_remove, route_set = self._signed(route_remove, route_set, b"")
        return responses.continue_request_headers(
            request_id=self._request_id,
            metadata=self._limit_metadata,
            remove=[*remove, *route_remove],
            set_headers=[*set_headers, *route_set],
            json_answer=self._json_answer,
            clear_route_cache=True,
        )

    def request_body(self, msg: ep.HttpBody) -> ep.ProcessingResponse:
        if not self._awaiting_body:
            return responses.continue_request_body()
        self._awaiting_body = False
        policy = self._ctx.policy
        if policy.log_bodies and not self._attribution.logging_disabled:
            body_log.info("request %s body: %r", self._request_id, msg.body[:BODY_LOG_BYTES])
        body_out: bytes | None = None
        if self._body_form:
            model = multipart_field(msg.body, self._content_type, "model")
            self._request_model = model
            self._facts = RequestFacts(model=model)
        try:
            if self._body_decides or self._body_routes or self._body_facts:
                document = read_json_body(msg.body, self._content_encoding, policy.max_body_bytes)
                changed = self._read_document(document)
                if self._body_decides:
                    for source, user_id in body_candidates(document).items():
                        if policy.resolver.uses(source):
                            self._candidates[source] = user_id
                    self._decide()
                if changed:
                    text = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
                    try:
                        body_out = text.encode()
                    except UnicodeEncodeError:
                        # A lone surrogate in the body (a "\ud800" escape): send it on as
                        # the escape the client wrote (rare, so the compact form comes first).
                        body_out = json.dumps(document, separators=(",", ":")).encode()
                    # The new body is sent uncompressed, whatever encoding the client used.
                    self._body_decoded = bool(self._content_encoding)
            if self._body_length is None:
                self._body_length = len(msg.body)
            self._apply_limits()
            route_remove, route_set = self._route_mutation()
        except PolicyRefusal as refusal:
            return self._refuse(refusal)
        if body_out is not None:
            route_set.append(("content-length", str(len(body_out)).encode()))
        if self._signs():
            body = msg.body if body_out is None else body_out
            route_remove, route_set = self._signed(route_remove, route_set, body)
        return responses.continue_request_body(
            remove=route_remove,
            set_headers=route_set,
            body=body_out,
            clear_route_cache=True,
            metadata=self._limit_metadata,
        )

    def _plan_body(self, metadata: base_pb2.Metadata | None, length: bytes | None) -> None:
        """Whether Tollgate must read the JSON request body: for the user ids, a model prefix
        to route by, or the facts metering needs — each only when Envoy's reading of the body
        (:mod:`tollgate.extproc.plan`) cannot settle it — or to inject ``include_usage``."""
        policy = self._ctx.policy
        router = self._ctx.router
        endpoint = self._endpoint or ""
        self._body_length = declared_length(length)
        facts = facts_from_envoy(metadata, self._body_length)
        if facts is not None:
            self._output_cap = facts.output_cap()
        if policy.resolver.wants_body(self._candidates):
            found = facts.user_ids() if facts is not None else UNSURE
            if isinstance(found, dict):
                uses = policy.resolver.uses
                self._candidates.update((k, v) for k, v in found.items() if uses(k))
            else:
                self._body_decides = True
        # A model prefix can only re-route when no base URI was asked for.
        if router.model_prefix_routing and not self._attribution.base_uri:
            model = facts.model() if facts is not None else UNSURE
            self._body_routes = model is UNSURE or (
                isinstance(model, str) and router.for_model(self._path, model) is not None
            )
        model = facts.model() if facts is not None else None
        if isinstance(model, str) and model:
            # The fallback when the response names no model (as when the body was read).
            self._request_model = safe_text(model)
        # Known not to stream: the answer is one JSON document, its headers are not needed.
        self._json_answer = (
            policy.skip_json_response_headers
            and facts is not None
            and not facts.flag("stream")
            and endpoint.endswith(JSON_ANSWER_ENDPOINTS)
        )
        if not wants_request_body(endpoint):
            return
        if facts is None or not endpoint.endswith(INCLUDE_USAGE_ENDPOINTS):
            self._body_facts = True
            return
        stream = facts.flag("stream")
        self._facts = RequestFacts(model=self._request_model, stream=stream)
        # Usage is only in the stream if asked for: then the body must say so.
        self._body_facts = stream and not facts.flag("include_usage")

    def _read_document(self, document: dict[str, Any]) -> bool:
        """Route by model prefix, note what parsers need, inject ``include_usage``; True when
        the document was changed and must be sent re-encoded."""
        changed = False
        model = document.get("model")
        if isinstance(model, str) and model:
            self._request_model = model = safe_text(model)
            if self._body_routes:
                changed = self._route_by_model(document, model)
        self._output_cap = output_cap(document)
        stream = document.get("stream") is True
        text = document.get("input")
        count = document.get("n")
        video_seconds, video_height = video_request(self._endpoint or "", document)
        self._facts = RequestFacts(
            model=self._request_model,
            stream=stream,
            input_chars=len(text) if isinstance(text, str) else None,
            image_count=count if isinstance(count, int) and not isinstance(count, bool) else None,
            video_seconds=video_seconds,
            video_height=video_height,
        )
        if stream and self._endpoint and self._endpoint.endswith(INCLUDE_USAGE_ENDPOINTS):
            options = document.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                # Usage arrives only if asked for; the client did not ask, so it will not see
                # the usage-only chunk either (removed on the way back).
                document["stream_options"] = {
                    **(options if isinstance(options, dict) else {}),
                    "include_usage": True,
                }
                self._usage_injected = changed = True
        return changed

    def _route_by_model(self, document: dict[str, Any], model: str) -> bool:
        """Re-route by a ``provider/model`` prefix; True when the model was rewritten."""
        routed = self._ctx.router.for_model(self._path, model)
        if routed is None:
            return False
        route, bare = routed
        self._set_route(route)
        self._request_model = bare
        document["model"] = bare
        return True

    def _set_route(self, route: Route) -> None:
        """Take ``route``; a gateway key limited to other providers refuses it."""
        key = self._key
        allowed = key.allowed_providers if key is not None else None
        if allowed is not None and route.provider not in allowed:
            raise PolicyRefusal.provider_not_allowed(route.provider)
        self._route = route

    def _signs(self) -> bool:
        """Whether Tollgate signs this request itself (SigV4 with the credentials it holds)."""
        route, key = self._route, self._key
        return (
            key is not None
            and key.inject_credentials
            and route is not None
            and route.credentials is not None
            and route.credentials.signer is not None
        )

    def _signed(
        self, remove: list[str], set_headers: list[tuple[str, bytes]], body: bytes
    ) -> tuple[list[str], list[tuple[str, bytes]]]:
        """The mutation with Tollgate's signature of ``body`` added: the app's signature
        headers are removed, except those the new signature sets (Envoy would apply the
        removal after the set)."""
        assert self._route is not None
        signature = signing_headers(
            self._route,
            method=self._headers.get(":method", b"POST").decode("ascii", "replace"),
            content_type=self._headers.get("content-type"),
            body=body,
        )
        signed = {name for name, _ in signature}
        return [n for n in remove if n not in signed], [*set_headers, *signature]

    def _route_mutation(self) -> tuple[list[str], list[tuple[str, bytes]]]:
        assert self._route is not None
        return route_mutation(
            self._route,
            path=self._path,
            headers=self._headers,
            key=self._key,
            attribution=self._attribution,
            body_decoded=self._body_decoded,
        )

    def _header_candidates(
        self, headers: dict[str, bytes], metadata: base_pb2.Metadata | None
    ) -> None:
        """Identity candidates known from the headers and the JWT Envoy verified."""
        policy = self._ctx.policy
        uses = policy.resolver.uses
        candidates = self._candidates
        if metadata is not None and JWT_METADATA_NAMESPACE in metadata.filter_metadata:
            jwt_fields = metadata.filter_metadata[JWT_METADATA_NAMESPACE].fields
            if JWT_PAYLOAD_KEY in jwt_fields:
                claim = jwt_claim(jwt_fields[JWT_PAYLOAD_KEY].struct_value, policy.jwt_user_claim)
                if claim is not None and uses("jwt"):
                    candidates["jwt"] = claim
        header_id = header_candidate(headers)
        if header_id is not None and uses("header"):
            candidates["header"] = header_id

    def _check_credentials(self, headers: dict[str, bytes], repeated: set[str]) -> None:
        """Refuses a request whose credentials are ambiguous, and any request that would
        carry a gateway key upstream, wherever it was put (``ambiguous_credentials``)."""
        name = ambiguous_credential(headers, repeated)
        if name is not None:
            raise PolicyRefusal.ambiguous_credentials(name)
        if b"tg_" not in b"\n".join(headers.values()):
            return  # one scan in C for the common case; the forwards' values are among these
        strip = self._attribution.strip
        for name, value in headers.items():
            if holds_gateway_key(value) and name not in strip:
                raise PolicyRefusal.misplaced_gateway_key(name)
        for name, value in self._attribution.forwards:
            if holds_gateway_key(value):
                raise PolicyRefusal.misplaced_gateway_key(FORWARD_PREFIXES[0] + name)

    def _lookup_key(self) -> None:
        """The gateway key the request names, if any; an unknown one refuses the request."""
        token = self._attribution.gateway_token
        if token is None:
            return
        self._key = key = self._ctx.keys.lookup(token)
        if key is None:
            raise PolicyRefusal.invalid_gateway_key()
        if key.end_user_id and self._ctx.policy.resolver.uses("key"):
            self._candidates["key"] = key.end_user_id

    def _decide(self) -> None:
        """Settle the end user and enforcement; raises :class:`PolicyRefusal` to refuse."""
        resolver = self._ctx.policy.resolver
        self._identity = resolver.pick(self._candidates)
        if self._identity is not None:
            resolver.check(self._identity, self._candidates)
        elif self._enforced():
            raise PolicyRefusal.user_id_required()

    def _apply_limits(self) -> None:
        """Refuse a request charged to a spent block limit (429) or naming an unknown one
        (422); count an admitted one in its limits, and note the tightest for the client."""
        book = self._ctx.limits
        if book is None:
            return
        named = self._attribution.limit_ids
        for limit_id in named:
            if not book.known(limit_id):
                raise PolicyRefusal.unknown_limit_id(limit_id)
        if book.empty:
            return
        user = self._identity.user_id if self._identity is not None else None
        key = self._key.key_id if self._key is not None else None
        charged = book.limits_of(user, key, named)
        if not charged:
            return
        tokens, usd = self._reservation(charged)
        verdict = book.verdict(charged, tokens=tokens, usd=usd)
        if verdict.refused is not None:
            limit = verdict.refused
            raise PolicyRefusal.budget_exceeded(
                limit.limit_id, limit.measure, verdict.reset_at, book.clock()
            )
        book.admit(self._request_id, charged, tokens=tokens, usd=usd)
        self._charged = charged
        if verdict.remaining is not None:
            self._limit_metadata[LIMIT_REMAINING_KEY] = format(verdict.remaining.normalize(), "f")
        if verdict.reset_at is not None:
            stamp = verdict.reset_at.strftime("%Y-%m-%dT%H:%M:%SZ")
            self._limit_metadata[LIMIT_RESET_KEY] = stamp

    def _reservation(self, charged: list[tuple[LimitState, str]]) -> tuple[int, Decimal]:
        """The most the request may cost, as a tokens and a usd limit count it until it is
        finished: its output cap (``max_tokens`` and the like) plus its body's size in
        tokens as an upper estimate of its input (about 4 bytes a token; JSON adds more).
        Without an output cap only the input is reserved (docs/limits.md: the bound)."""
        measures = {state.measure for state, _ in charged}
        if not measures & {"tokens", "usd"}:
            return 0, Decimal(0)
        tokens_in = (self._body_length or 0) // _BYTES_PER_TOKEN
        tokens_out = self._output_cap or 0
        usd = Decimal(0)
        prices, route = self._ctx.prices, self._route
        if "usd" in measures and prices is not None and route is not None:
            cost = prices.cost(
                route.provider,
                self._request_model,
                input_tokens=tokens_in,
                output_tokens=tokens_out,
            )
            usd = cost if isinstance(cost, Decimal) else Decimal(0)
        return tokens_in + tokens_out, usd

    def _enforced(self) -> bool:
        """Global default, then the key's setting, then the request's override header."""
        policy = self._ctx.policy
        enforce = policy.enforce_user_id
        if self._key is not None and self._key.enforce_user_id is not None:
            enforce = self._key.enforce_user_id
        override = self._attribution.enforce_override
        if override is True or (override is False and policy.enforce_override_may_disable):
            return override
        return enforce

    def _refuse(self, refusal: PolicyRefusal) -> ep.ProcessingResponse:
        """Answer the client with the refusal's error; the ledger gets a ``blocked`` row that
        keeps the best identity candidate known, even one that policy refused."""
        self._status = refusal.status
        self._block_reason = refusal.code
        self._refused_limit = refusal.limit_id
        if self._identity is None:
            self._identity = self._ctx.policy.resolver.pick(self._candidates)
        self._finish(usage_pb2.OUTCOME_BLOCKED)
        return responses.immediate_error(
            refusal.status,
            refusal.code,
            refusal.message,
            param=refusal.param,
            extra_headers=[(REQUEST_ID_HEADER, self._request_id.encode()), *refusal.headers],
        )

    def response_headers(self, msg: ep.HttpHeaders) -> ep.ProcessingResponse:
        self._json_answer = False  # the headers came after all: they say what follows
        headers = header_map(msg)
        try:
            self._status = int(headers.get(":status", b"0"))
        except ValueError:
            self._status = None
        # Envoy's own local replies name their error (the route removes the header from
        # upstream answers, so an upstream cannot pass its errors off as Envoy's).
        envoy_error = headers.get(ENVOY_ERROR_HEADER, b"").decode("ascii", "replace")
        if envoy_error in ENVOY_ERROR_CODES:
            self._block_reason = envoy_error
        # The route sets it too, from the request's metadata; but a request Tollgate's
        # ext_proc never saw (refused by jwt_authn, seen by the observer) has none there.
        set_headers = [(REQUEST_ID_HEADER, self._request_id.encode())]
        ok = self._status is not None and 200 <= self._status < 300
        content_type = headers.get("content-type", b"").split(b";", 1)[0].strip().lower()
        self._streamed = content_type in _STREAM_TYPES
        route = self._route
        if ok and self._endpoint is not None and route is not None:
            self._parser = parser_for(
                route.api, self._endpoint, streamed=self._streamed, request=self._facts
            )
        readable = self._streamed or is_json_content_type(content_type)
        if self._parser is not None and (msg.end_of_stream or not readable):
            # Nothing Tollgate reads follows (audio, plain text): the request said it all.
            self._finish(self._outcome_from_usage())
            return responses.continue_response_headers(set_headers=set_headers)
        if self._parser is None:
            self._finish(self._outcome_without_body())
            return responses.continue_response_headers(set_headers=set_headers)
        remove: list[str] = []
        wbits = decoder_wbits(headers.get("content-encoding"))
        if wbits is not None:
            # The upstream ignored accept-encoding: identity. Meter the decoded bytes, pass the
            # client the encoded ones untouched (so no usage chunk can be removed then).
            self._parser = DecodingParser(self._parser, wbits)
        elif self._streamed and self._usage_injected:
            self._filter = SSEEventFilter(_is_usage_only_chunk)
            remove.append("content-length")
        if self._ctx.policy.log_bodies and not self._attribution.logging_disabled:
            self._response_sample = bytearray()
        mode = responses.BODY_STREAMED if self._streamed else responses.BODY_BUFFERED
        self._headers_held = not self._streamed
        return responses.continue_response_headers(
            set_headers=set_headers, remove=remove, response_body_mode=mode
        )

    def response_body(
        self, msg: ep.HttpBody, attributes: Mapping[str, struct_pb2.Struct] | None = None
    ) -> ep.ProcessingResponse:
        if self._json_answer:
            self._json_answer = False
            self._begin_json_answer(attributes or {}, msg.body)
            if self._parser is None:
                self._finish(self._outcome_without_body())
                return responses.continue_response_body()
        if msg.body and self._first_byte_ns is None:
            self._first_byte_ns = self._ctx.monotonic_ns()
        if self._parser is not None:
            self._parser.feed(msg.body)
        sample = self._response_sample
        if sample is not None and len(sample) < BODY_LOG_BYTES:
            sample += msg.body[: BODY_LOG_BYTES - len(sample)]
        if self._filter is None:
            response = responses.continue_response_body()
        else:
            passed = self._filter.feed(msg.body)
            if msg.end_of_stream:
                passed += self._filter.flush()
            response = responses.continue_response_body(body=None if passed == msg.body else passed)
        if msg.end_of_stream and self._parser is not None:
            # Last, so that a failure in this phase is recorded as Tollgate's (see ``fail``).
            self._finish(self._outcome_from_usage())
        return response

    def _begin_json_answer(self, attributes: Mapping[str, struct_pb2.Struct], start: bytes) -> None:
        """The first message of an answer whose headers were skipped: its status (and what an
        Envoy local reply was) from the message's attributes, its coding from its bytes."""
        details = ""
        for struct in attributes.values():
            fields = struct.fields
            if "response.code" in fields:
                self._status = int(fields["response.code"].number_value) or None
            if "response.code_details" in fields:
                details = fields["response.code_details"].string_value
        self._block_reason = envoy_error_code(self._status, details) or self._block_reason
        route = self._route
        ok = self._status is not None and 200 <= self._status < 300
        if not ok or self._endpoint is None or route is None:
            return
        # A server that streams although the request did not ask is still metered.
        self._streamed = start.lstrip()[:5] in (b"data:", b"event")
        self._parser = parser_for(
            route.api, self._endpoint, streamed=self._streamed, request=self._facts
        )
        wbits = sniffed_wbits(start)
        if self._parser is not None and wbits is not None:
            self._parser = DecodingParser(self._parser, wbits)

    def close(self) -> None:
        """The ext_proc stream ended. If the exchange did not complete, the client went away.

        A stream that carried no message at all (Envoy reset it before the request headers
        arrived) leaves no row: Tollgate never let that request go anywhere.
        """
        if self._finished:
            return
        if self._endpoint is None and self._status is None:
            self._finished = True
            return
        if self._parser is not None and self._parser.complete:
            # The stream's end marker had passed: the client had the whole answer and went
            # away before the end of the HTTP stream (the OpenAI SDK closes at [DONE]).
            self._finish(self._outcome_from_usage())
            return
        self._finish(usage_pb2.OUTCOME_CLIENT_ABORTED)

    def fail(self, phase: str) -> ep.ProcessingResponse | None:
        """A phase handler raised: record the request as Tollgate's own failure (unless its row
        is already on its way) and say how to fail it closed.

        Returns an immediate 500 ``internal_error`` while the client has had no response
        headers (request headers, request body, response headers, a buffered response body
        whose headers Envoy holds), or None once the response may be under way (streamed, or
        a JSON-answer plan, whose headers went out unseen): the caller then aborts the gRPC
        stream and Envoy answers 500 or resets the response (whichever it still can).
        """
        immediate = phase in ("request_headers", "request_body", "response_headers") or (
            phase == "response_body" and self._headers_held
        )
        if immediate:
            self._status = 500
        if not self._finished:
            # _finish submits a row even when building it fails, then re-raises.
            with contextlib.suppress(Exception):
                self._finish(usage_pb2.OUTCOME_INTERNAL_ERROR)
        if not immediate:
            return None
        return responses.immediate_error(
            500,
            "internal_error",
            _INTERNAL_ERROR_MESSAGE,
            extra_headers=[(REQUEST_ID_HEADER, self._request_id.encode())],
        )

    # -- outcome and record -----------------------------------------------------------------

    def _outcome_without_body(self) -> int:
        if self._block_reason in ENVOY_ERROR_CODES:
            # Envoy answered itself (its local reply names the error): HTTP/1.0, headers its
            # codec refuses, a body over its buffer limit, an encoded slash in the path.
            return usage_pb2.OUTCOME_BLOCKED
        if self._endpoint is None:
            # Envoy answered before Tollgate saw the request: a filter ahead of ext_proc
            # refused it. In Tollgate's chain that is jwt_authn (401 bad token, 403 audience).
            self._block_reason = "invalid_jwt" if self._status in (401, 403) else "envoy_refused"
            return usage_pb2.OUTCOME_BLOCKED
        if self._status is None or self._status >= 400:
            return usage_pb2.OUTCOME_UPSTREAM_ERROR
        return usage_pb2.OUTCOME_OK

    def _outcome_from_usage(self) -> int:
        assert self._parser is not None
        result = self._parser.result()
        if result.usage.reported or result.units or self._is_free():
            return usage_pb2.OUTCOME_OK
        return usage_pb2.OUTCOME_USAGE_MISSING

    def _is_free(self) -> bool:
        """A request that uses nothing by itself: asking after a Vertex AI operation (the
        video was charged when it was asked for)."""
        route = self._route
        return (
            route is not None
            and route.api == "vertex"
            and self._endpoint is not None
            and is_polling_endpoint(self._endpoint)
        )

    def _finish(self, outcome: int) -> None:
        """Submit the request's one record. If building it fails, what was filled in so far
        is submitted as ``internal_error`` and the error re-raised (the phase fails closed)."""
        if self._finished:
            return
        self._finished = True
        now = self._ctx.monotonic_ns()
        record = UsageRecord(
            request_id=self._request_id,
            outcome=outcome,  # type: ignore[arg-type]
            streamed=self._streamed,
            latency_ms=(now - self._started_ns) // 1_000_000,
        )
        record.created_at.FromMicroseconds(self._created_us)
        try:
            parsed = self._parser.result() if self._parser is not None else None
            if self._response_sample is not None:
                sample = bytes(self._response_sample)
                body_log.info("response %s body: %r", self._request_id, sample)
            self._fill(record, parsed)
        except Exception:
            record.outcome = usage_pb2.OUTCOME_INTERNAL_ERROR
            self._ctx.sink.submit(record)
            self._charge(record)
            raise
        # The row first: nothing about the limits may keep it out of the ledger.
        self._ctx.sink.submit(record)
        self._charge(record)

    def _charge(self, record: UsageRecord) -> None:
        """Hand the request's spend to its limits (counted here until its row is shipped)."""
        book = self._ctx.limits
        if book is None or not self._charged:
            return
        usd = None
        prices = self._ctx.prices
        if prices is not None and any(state.measure == "usd" for state, _ in self._charged):
            try:
                cost = record_cost(prices, record)
            except ValueError:
                # Usage the price library refuses: the writer records it unpriced (NULL
                # cost, its reason in pricing_error), so it adds no dollars here either.
                cost = None
            usd = cost if isinstance(cost, Decimal) else None
        book.finish(
            self._request_id,
            tokens=record.input_tokens + record.output_tokens,
            usd=usd,
            charged=record.outcome != usage_pb2.OUTCOME_BLOCKED,
        )

    def _fill(self, record: UsageRecord, parsed: ParsedResponse | None) -> None:
        """Everything the request and the response said, into ``record``. Every string here
        is storable already (made so where it entered); a count or unit that cannot be stored
        is left unset and flagged in ``usage_flags``."""
        if self._endpoint is not None:
            record.endpoint = self._endpoint
        if self._ctx.policy.keep_traceparent:
            parent = traceparent(self._headers.get("traceparent"))
            if parent is not None:
                record.traceparent = parent
        if self._status is not None:
            record.status_code = self._status
        if self._identity is not None:
            record.end_user_id = self._identity.user_id
            record.identity_source = self._identity.source
        if self._key is not None:
            record.key_id = self._key.key_id
        if self._block_reason is not None:
            record.block_reason = self._block_reason
        fill_attribution(record, self._attribution)
        if self._refused_limit is not None and self._refused_limit not in record.limit_ids:
            record.limit_ids.append(self._refused_limit)
        if self._first_byte_ns is not None and self._streamed:
            record.ttft_ms = (self._first_byte_ns - self._started_ns) // 1_000_000
        route = self._route
        if route is not None:
            record.provider = route.provider
            record.upstream_base_uri = route.base_uri
        # The model: what Azure's route-as-resource header names (deployments hide it), else
        # what the provider answered, else what the request asked for.
        model = (
            self._attribution.route_as_resource
            or (parsed.model if parsed else None)
            or self._request_model
        )
        if model:
            record.model = model
        if parsed is not None:
            fill_usage(record, parsed)
            if record.outcome == usage_pb2.OUTCOME_OK and self._is_free():
                record.cost_usd = "0"

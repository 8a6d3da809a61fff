"""Limits on the request path (``tollgate.policy.limits`` in the processor): which limits a
request is charged to, 429 for a spent block limit before any upstream, 422 for an unknown
named limit, in-flight requests counted, this replica's unshipped spend counted until its
rows are in a snapshot, periods rolling over on the limit's calendar."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from tests.unit.doubles import FixedKeys, RecordingSink
from tests.unit.test_processor_policy import answer_json
from tollgate.extproc import responses
from tollgate.extproc.processor import PolicyConfig, ProcessorContext, RequestProcessor
from tollgate.policy.identity import IdentityResolver
from tollgate.policy.keys import GatewayKey
from tollgate.policy.limits import LimitBook, LimitState, period_bounds
from tollgate.pricing import PriceBook
from tollgate.routing.router import Router
from tollgate.v1 import usage_pb2

UTC_ZONE = ZoneInfo("UTC")
KEY = GatewayKey("key_0123456789ab", "app", "keyed-user", None, None, True)
TOKEN = b"tg_" + b"a" * 43


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def limit(limit_id: str, scope: str, measure: str, maximum: str, period: str = "day", **kw: Any):
    return LimitState(
        limit_id,
        scope,
        kw.get("subject"),
        measure,
        Decimal(maximum),
        period,
        kw.get("tz", UTC_ZONE),
        kw.get("mode", "block"),
    )


def book(*limits: LimitState, spend: dict[Any, Any] | None = None, clock: Any = None) -> LimitBook:
    b = LimitBook(clock=clock or (lambda: datetime.now(UTC)))
    b.load(list(limits), spend or {}, time.monotonic())
    return b


def processor(sink: RecordingSink, limits: LimitBook) -> RequestProcessor:
    ctx = ProcessorContext(
        sink=sink,
        router=Router.single("openai", "http://up"),
        policy=PolicyConfig(resolver=IdentityResolver(("key", "header", "body_user"))),
        keys=FixedKeys({TOKEN: KEY}),
        limits=limits,
        prices=PriceBook(),
    )
    return RequestProcessor(ctx)


def request(*pairs: tuple[str, bytes]) -> ep.HttpHeaders:
    base = [
        (":method", b"POST"),
        (":path", b"/v1/chat/completions"),
        ("content-type", b"application/json"),
        ("content-length", b"100"),
    ]
    return ep.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in [*base, *pairs]]
        )
    )


def user(name: str) -> tuple[str, bytes]:
    return ("x-tollgate-user-id", name.encode())


BODY = json.dumps({"model": "gpt-4o", "messages": []}).encode()


def begin(p: RequestProcessor, *pairs: tuple[str, bytes]) -> ep.ProcessingResponse:
    """The request's headers and, when asked for, its body: the answer that let it through
    or refused it (Envoy read no facts here, so Tollgate reads the body and decides there)."""
    first = p.request_headers(request(*pairs))
    if first.mode_override.request_body_mode != responses.BODY_BUFFERED:
        return first
    return p.request_body(ep.HttpBody(body=BODY, end_of_stream=True))


def let_through(answer: ep.ProcessingResponse) -> bool:
    return not answer.HasField("immediate_response")


def call(
    limits: LimitBook, sink: RecordingSink, *pairs: tuple[str, bytes], answer: dict[str, Any]
) -> tuple[ep.ProcessingResponse, RequestProcessor]:
    """A whole chat call (a JSON answer) when let through; the deciding answer."""
    p = processor(sink, limits)
    decided = begin(p, *pairs)
    if let_through(decided):
        answer_json(p, json.dumps(answer))
    return decided, p


ANSWER = {"model": "gpt-4o", "usage": {"prompt_tokens": 1000, "completion_tokens": 1000}}
GPT_4O_COST = Decimal("0.0125")  # 1000 input tokens at $2.50/M, 1000 output at $10/M


def refused(answer: ep.ProcessingResponse) -> tuple[int, dict[str, Any], dict[str, bytes]]:
    immediate = answer.immediate_response
    headers = {h.header.key: h.header.raw_value for h in immediate.headers.set_headers}
    return immediate.status.code, json.loads(immediate.body), headers


def test_a_spent_budget_refuses_its_user_only_with_429_and_retry_after() -> None:
    clock = Clock(datetime(2026, 12, 3, 15, 0, tzinfo=UTC))
    limits = book(limit("u1-daily", "user", "usd", "0.01", subject="u1"), clock=clock)
    sink = RecordingSink()
    first, _ = call(limits, sink, user("u1"), answer=ANSWER)
    assert let_through(first)
    assert sink.records[0].outcome == usage_pb2.OUTCOME_OK
    # This replica's own spend counts at once: the next request is refused, before upstream.
    second, _ = call(limits, sink, user("u1"), answer=ANSWER)
    status, body, headers = refused(second)
    assert status == 429
    assert body["error"]["code"] == "budget_exceeded"
    assert "u1-daily" in body["error"]["message"]
    assert "2026-12-04T00:00:00Z" in body["error"]["message"]
    assert headers["retry-after"] == str(9 * 3600).encode()
    row = sink.records[1]
    assert (row.outcome, row.block_reason, list(row.limit_ids)) == (
        usage_pb2.OUTCOME_BLOCKED,
        "budget_exceeded",
        ["u1-daily"],
    )
    assert row.end_user_id == "u1"
    third, _ = call(limits, sink, user("u2"), answer=ANSWER)
    assert let_through(third)
    # After midnight UTC the limit lets u1 through again.
    clock.now = datetime(2026, 12, 4, 0, 0, 1, tzinfo=UTC)
    fourth, _ = call(limits, sink, user("u1"), answer=ANSWER)
    assert let_through(fourth)


def test_every_identity_source_counts() -> None:
    limits = book(limit("per-user", "user", "requests", "1"))
    sink = RecordingSink()
    keyed = ("authorization", b"Bearer " + TOKEN)
    for pairs in ([user("keyed-user")], [keyed]):
        answer, _ = call(limits, sink, *pairs, answer=ANSWER)
        assert let_through(answer) == (pairs[0][0] == "x-tollgate-user-id")
    assert [r.outcome for r in sink.records] == [
        usage_pb2.OUTCOME_OK,
        usage_pb2.OUTCOME_BLOCKED,
    ]


def test_in_flight_requests_count_against_a_requests_limit() -> None:
    limits = book(limit("burst", "global", "requests", "3"))
    sink = RecordingSink()
    open_ = [processor(sink, limits) for _ in range(5)]
    answers = [begin(p, user(f"u{i}")) for i, p in enumerate(open_)]
    assert [let_through(a) for a in answers] == [True, True, True, False, False]


def test_rows_in_a_snapshot_are_not_counted_twice() -> None:
    limits = book(limit("tokens", "global", "tokens", "5000"))
    sink = RecordingSink()
    call(limits, sink, user("u1"), answer=ANSWER)
    request_id = sink.records[0].request_id
    start = period_bounds("day", UTC_ZONE, datetime.now(UTC))[0]
    verdict = limits.verdict(limits.limits_of("u1", None, ()))
    assert verdict.remaining == 3000
    # The writer committed the row; a refresh that began after that has it in its snapshot.
    limits.committed([request_id])
    limits.load(
        list(limits._limits.values()), {("tokens", "", start): (0, 2000, 1)}, time.monotonic()
    )
    assert limits.verdict(limits.limits_of("u1", None, ())).remaining == 3000


def test_named_limits_are_charged_only_when_named_and_must_exist() -> None:
    limits = book(limit("team-a", "named", "requests", "1"))
    sink = RecordingSink()
    other, _ = call(limits, sink, user("u1"), answer=ANSWER)
    assert let_through(other)
    named = ("xproxy-limit-ids", b"team-a")
    ok, _ = call(limits, sink, user("u1"), named, answer=ANSWER)
    assert let_through(ok)
    spent, _ = call(limits, sink, user("u1"), ("x-tollgate-limit-ids", b"team-a"), answer=ANSWER)
    assert refused(spent)[0] == 429
    unknown, _ = call(limits, sink, user("u1"), ("x-tollgate-limit-ids", b"team-b"), answer=ANSWER)
    status, body, _ = refused(unknown)
    assert (status, body["error"]["code"]) == (422, "unknown_limit_id")
    # Even with no limits defined at all.
    empty, _ = call(book(), RecordingSink(), user("u1"), named, answer=ANSWER)
    assert refused(empty)[0] == 422


def test_warn_limits_let_requests_through_and_the_tightest_is_told() -> None:
    limits = book(
        limit("soft", "user", "requests", "1", mode="warn"),
        limit("hard", "global", "requests", "100"),
    )
    sink = RecordingSink()
    call(limits, sink, user("u1"), answer=ANSWER)
    answer, _ = call(limits, sink, user("u1"), answer=ANSWER)
    assert let_through(answer)
    fields = answer.dynamic_metadata.fields["tollgate"].struct_value.fields
    assert fields["limit_remaining"].string_value == "0"
    assert fields["limit_reset"].string_value.endswith("T00:00:00Z")
    # No limit charged: no header.
    plain, _ = call(book(), RecordingSink(), user("u1"), answer=ANSWER)
    assert "tollgate" not in plain.dynamic_metadata.fields


def test_usd_spend_is_priced_as_the_writer_prices_it() -> None:
    limits = book(limit("usd", "global", "usd", "1"))
    call(limits, RecordingSink(), user("u1"), answer=ANSWER)
    remaining = limits.verdict(limits.limits_of("u1", None, ())).remaining
    assert remaining == Decimal(1) - GPT_4O_COST


def test_a_blocked_request_is_not_charged() -> None:
    limits = book(limit("per-user", "user", "requests", "5"))
    sink = RecordingSink()
    p = processor(sink, limits)
    # Refused before it was admitted (it names a limit that does not exist).
    begin(p, user("u1"), ("x-tollgate-limit-ids", b"nope"))
    assert limits.verdict(limits.limits_of("u1", None, ())).remaining == 5


@pytest.mark.parametrize(
    ("period", "tz", "at", "start", "end"),
    [
        (
            "day",
            "Asia/Tokyo",
            "2026-12-02T16:00:00Z",
            "2026-12-02T15:00:00Z",
            "2026-12-03T15:00:00Z",
        ),
        ("week", "UTC", "2026-12-02T16:00:00Z", "2026-11-30T00:00:00Z", "2026-12-07T00:00:00Z"),
        (
            "month",
            "America/New_York",
            "2026-12-01T03:00:00Z",
            "2026-11-01T04:00:00Z",
            "2026-12-01T05:00:00Z",
        ),
        (
            "hour",
            "Asia/Kolkata",
            "2026-12-02T16:10:00Z",
            "2026-12-02T15:30:00Z",
            "2026-12-02T16:30:00Z",
        ),
        ("minute", "UTC", "2026-12-02T16:10:59Z", "2026-12-02T16:10:00Z", "2026-12-02T16:11:00Z"),
        # Daylight saving ends in Paris on 2026-10-25: that day has 25 hours.
        (
            "day",
            "Europe/Paris",
            "2026-10-25T12:00:00Z",
            "2026-10-24T22:00:00Z",
            "2026-10-25T23:00:00Z",
        ),
        ("total", "UTC", "2026-12-02T16:10:59Z", "1970-01-01T00:00:00Z", None),
    ],
)
def test_periods_follow_the_calendar_as_postgres_computes_them(
    period: str, tz: str, at: str, start: str, end: str | None
) -> None:
    # The same starts as tollgate.limit_period_start (tests/unit/test_limits_ledger.py).
    def parse(text: str) -> datetime:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))

    got = period_bounds(period, ZoneInfo(tz), parse(at))
    assert got == (parse(start), None if end is None else parse(end))


def test_each_of_several_replicas_admits_its_share_of_the_remainder() -> None:
    limits = book(limit("shared", "global", "requests", "10"))
    limits.replicas = 3  # three replicas refreshed lately: each may admit ceil(10 / 3) = 4
    sink = RecordingSink()
    admitted = [let_through(begin(processor(sink, limits), user("u1"))) for _ in range(6)]
    assert admitted == [True] * 4 + [False] * 2
    # Shared spend in the snapshot shrinks the remainder each share is cut from.
    start = period_bounds("day", UTC_ZONE, datetime.now(UTC))[0]
    later = book(
        limit("shared", "global", "requests", "10"), spend={("shared", "", start): (0, 0, 8)}
    )
    later.replicas = 2
    admitted = [let_through(begin(processor(sink, later), user("u1"))) for _ in range(3)]
    assert admitted == [True, False, False]


@pytest.mark.parametrize(("cap", "admitted"), [(2000, False), (100, True), (None, True)])
def test_a_request_whose_output_cap_alone_would_exceed_the_remainder_is_refused(
    cap: int | None, admitted: bool
) -> None:
    # $0.01 left; 2,000 output tokens of gpt-4o may cost $0.02, 100 cost $0.001. Without a
    # cap only the input (the body's size / 4 tokens) is reserved.
    limits = book(limit("u1-daily", "user", "usd", "0.01", subject="u1"))
    sink = RecordingSink()
    p = processor(sink, limits)
    first = p.request_headers(request(user("u1")))
    assert let_through(first)  # the body is read first: the check follows it
    body: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    if cap is not None:
        body["max_tokens"] = cap
    answer = p.request_body(ep.HttpBody(body=json.dumps(body).encode(), end_of_stream=True))
    if admitted:
        assert answer.HasField("request_body")
        fields = answer.dynamic_metadata.fields["tollgate"].struct_value.fields
        assert fields["limit_remaining"].string_value == "0.01"
    else:
        status, error, _ = refused(answer)
        assert (status, error["error"]["code"]) == (429, "budget_exceeded")
        (row,) = sink.records
        assert (row.outcome, row.block_reason) == (usage_pb2.OUTCOME_BLOCKED, "budget_exceeded")


def test_a_reservation_counts_until_the_request_is_finished() -> None:
    limits = book(limit("tokens", "global", "tokens", "3000"))
    sink = RecordingSink()
    held = processor(sink, limits)
    held.request_headers(request(user("u1")))
    held.request_body(
        ep.HttpBody(body=json.dumps({"model": "gpt-4o", "max_tokens": 2500}).encode())
    )
    # 2,500 output tokens plus the input are reserved: a second such request does not fit.
    second = processor(sink, limits)
    second.request_headers(request(user("u2")))
    answer = second.request_body(
        ep.HttpBody(body=json.dumps({"model": "gpt-4o", "max_tokens": 2500}).encode())
    )
    assert refused(answer)[0] == 429
    # Finished: its actual 2,000 tokens replace the reservation.
    answer_json(held, json.dumps(ANSWER))
    assert limits.verdict(limits.limits_of("u1", None, ())).remaining == 1000


def test_a_period_rolls_over_at_the_boundary_of_the_limits_time_zone() -> None:
    # Tokyo's day begins at 15:00 UTC: spent at 14:59:59 UTC, free again at 15:00:01.
    clock = Clock(datetime(2026, 12, 3, 14, 0, tzinfo=UTC))
    tokyo = ZoneInfo("Asia/Tokyo")
    limits = book(limit("daily", "user", "requests", "1", tz=tokyo), clock=clock)
    sink = RecordingSink()
    call(limits, sink, user("u1"), answer=ANSWER)
    clock.now = datetime(2026, 12, 3, 14, 59, 59, tzinfo=UTC)
    late, _ = call(limits, sink, user("u1"), answer=ANSWER)
    status, body, headers = refused(late)
    assert status == 429
    assert headers["retry-after"] == b"1"
    assert "2026-12-03T15:00:00Z" in body["error"]["message"]
    clock.now = datetime(2026, 12, 3, 15, 0, 1, tzinfo=UTC)
    assert let_through(call(limits, sink, user("u1"), answer=ANSWER)[0])


def test_a_refusal_names_the_refusing_limits_reset_not_another_limits() -> None:
    # An overspent warn limit resets later (month) than the spent block limit (day): the 429
    # tells the block limit's reset.
    clock = Clock(datetime(2026, 12, 3, 12, 0, tzinfo=UTC))
    limits = book(
        limit("daily", "user", "requests", "1"),
        limit("monthly-soft", "user", "requests", "0", period="month", mode="warn"),
        clock=clock,
    )
    sink = RecordingSink()
    call(limits, sink, user("u1"), answer=ANSWER)  # let through: the soft limit only warns
    status, body, headers = refused(call(limits, sink, user("u1"), answer=ANSWER)[0])
    assert status == 429
    assert "'daily'" in body["error"]["message"]
    assert headers["retry-after"] == str(12 * 3600).encode()


def test_usage_the_price_library_refuses_is_recorded_and_charges_no_dollars() -> None:
    # More cached than input tokens: genai-prices raises; the writer stores it unpriced.
    limits = book(limit("usd", "global", "usd", "1"), limit("reqs", "global", "requests", "9"))
    sink = RecordingSink()
    odd = {
        "model": "gpt-4o",
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 100},
        },
    }
    answer, _ = call(limits, sink, user("u1"), answer=odd)
    assert let_through(answer)
    (row,) = sink.records
    assert (row.input_tokens, row.cached_input_tokens) == (10, 100)
    assert limits.verdict(limits.limits_of("u1", None, ())).remaining == 1  # usd: nothing
    charged = limits.limits_of("u1", None, ())
    assert limits.verdict([c for c in charged if c[0].limit_id == "reqs"]).remaining == 8

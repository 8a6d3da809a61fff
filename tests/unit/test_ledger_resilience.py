"""The ledger never stops: poison usage, refused and unencodable records, Postgres errors in the
middle of a write, corrupt and short-written journals, and a property test of the whole path
(RequestProcessor → LedgerWriter → Journal → real Postgres) over hostile usage payloads."""

from __future__ import annotations

import asyncio
import json
import os
import random
from pathlib import Path
from typing import Any

import psycopg
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from psycopg_pool import AsyncConnectionPool

from tests.unit.test_ledger_writer import pool, record  # noqa: F401 (fixture)
from tollgate.app import run_migrations
from tollgate.extproc.processor import ProcessorContext, RequestProcessor
from tollgate.ledger import journal as journal_module
from tollgate.ledger.journal import Journal
from tollgate.ledger.records import UsageRecord, new_request_id
from tollgate.ledger.writer import LedgerWriter
from tollgate.routing.allowlist import parse_base_uri
from tollgate.routing.providers import Provider
from tollgate.routing.router import Router

Pool = AsyncConnectionPool[psycopg.AsyncConnection[Any]]


def journal_writer(pool: Pool, journal: Journal, **kw: Any) -> LedgerWriter:  # noqa: F811
    options = {"queue_size": 10, "batch_size": 50, "flush_interval_s": 0.01, **kw}
    return LedgerWriter(pool, journal=journal, **options)


def poison(user: str = "poison") -> UsageRecord:
    """The issue's reproduction: OpenAI usage with cached (72) above prompt tokens (22)."""
    r = record(user, 22, 5)
    r.cached_input_tokens = 72
    r.endpoint = "/v1/chat/completions"
    return r


async def rows(pool: Pool, query: str) -> list[tuple[Any, ...]]:  # noqa: F811
    async with pool.connection() as conn:
        return await (await conn.execute(query)).fetchall()


async def ledger_ids(pool: Pool) -> tuple[list[str], list[str]]:  # noqa: F811
    stored = await rows(pool, "SELECT request_id::text FROM tollgate.requests")
    dead = await rows(pool, "SELECT request_id FROM tollgate.dead_letters")
    return [r[0] for r in stored], [r[0] for r in dead]


# --- pricing errors and flags -------------------------------------------------------------------


async def test_unpriceable_usage_is_stored_unpriced_with_reason_and_flag(
    pool: Pool,  # noqa: F811
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path / "j")
    writer = journal_writer(pool, journal, batch_size=3)
    writer.start()
    bad = poison()
    after = [record(f"after-{i}", 10, 2) for i in range(7)]
    for r in [record("before", 10, 2), bad, *after]:
        assert writer.submit(r)
    await writer.close(timeout_s=10)
    ((inp, cached, out, cost, error, flags),) = await rows(
        pool,
        "SELECT input_tokens, cached_input_tokens, output_tokens, cost_usd, pricing_error,"
        f" usage_flags FROM tollgate.requests WHERE request_id = '{bad.request_id}'",
    )
    assert (inp, cached, out, cost) == (22, 72, 5, None)  # as reported, not "fixed"
    assert error is not None
    assert error.startswith("genai-prices: ")
    assert "cache_read_tokens (72) cannot exceed input_tokens (22)" in error
    assert flags == ["cached_exceeds_input"]
    priced = await rows(
        pool, "SELECT count(*) FROM tollgate.requests WHERE cost_usd > 0 AND pricing_error IS NULL"
    )
    assert priced == [(8,)]  # everything before and after it flowed and was priced
    assert writer.stats.pricing_errors == 1
    assert journal.checkpoint_pos == journal.end_pos
    assert writer.pending == 0
    assert (await rows(pool, "SELECT sum(unpriced_requests) FROM tollgate.daily_usage")) == [(1,)]
    journal.close()


async def test_a_cost_beyond_the_column_is_unpriced_not_refused(pool: Pool) -> None:  # noqa: F811
    r = record("rich", 1, 1)
    r.cost_usd = "123456789012345"  # more than numeric(20, 10) holds
    writer = LedgerWriter(pool, queue_size=10, batch_size=10, flush_interval_s=0.01)
    assert await writer.write_batch([r]) == 1
    ((cost, error),) = await rows(pool, "SELECT cost_usd, pricing_error FROM tollgate.requests")
    assert cost is None
    assert "numeric(20, 10)" in error


# --- dead letters -------------------------------------------------------------------------------


async def test_refused_and_unencodable_records_are_dead_lettered_once(
    pool: Pool,  # noqa: F811
    tmp_path: Path,
) -> None:
    nul = record("nul\x00byte", 1, 1)  # Postgres text cannot hold NUL
    not_uuid = record("u", 1, 1)
    not_uuid.request_id = "not-a-uuid"
    far = record("far", 1, 1)
    far.latency_ms = 2**40  # beyond the integer column
    unknown_outcome = record("u", 1, 1)
    unknown_outcome.outcome = 99  # type: ignore[assignment]  # a newer Tollgate's outcome
    bad = [nul, not_uuid, far, unknown_outcome]
    good = [record(f"g{i}", 3, 1) for i in range(6)]
    for run in range(2):  # the second run replays the same journal: nothing new anywhere
        directory = tmp_path / "j"
        if run:
            (directory / "checkpoint").unlink()
        journal = Journal(directory)
        writer = journal_writer(pool, journal, batch_size=100)
        if not run:
            for r in [good[0], *bad[:2], *good[1:4], *bad[2:], *good[4:]]:
                assert writer.submit(r)
        writer.start()
        await writer.close(timeout_s=10)
        assert journal.checkpoint_pos == journal.end_pos
        journal.close()
    stored, dead = await ledger_ids(pool)
    assert sorted(stored) == sorted(r.request_id for r in good)
    assert sorted(dead) == sorted(r.request_id.replace("\x00", "\\x00") for r in bad)
    errors = dict(await rows(pool, "SELECT request_id, error FROM tollgate.dead_letters"))
    assert "not encodable" in errors[unknown_outcome.request_id]
    assert "out of range" in errors[far.request_id]
    assert "uuid" in errors["not-a-uuid"]
    raw = await rows(
        pool, f"SELECT record FROM tollgate.dead_letters WHERE request_id = '{far.request_id}'"
    )
    assert UsageRecord.FromString(raw[0][0]).latency_ms == 2**40


class FlakyWriter(LedgerWriter):
    """Raises a connection error the first time each named step runs."""

    def __init__(self, *args: Any, fail: set[str], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.fail = set(fail)

    def _maybe_fail(self, step: str) -> None:
        if step in self.fail:
            self.fail.discard(step)
            raise psycopg.OperationalError(f"injected: connection lost in {step}")

    async def _store(self, data: bytes, count: int) -> int:
        self._maybe_fail("store_one" if count == 1 else "store_batch")
        return await super()._store(data, count)

    async def _dead_letter(self, record: UsageRecord, reason: str) -> bool:
        # Fail inside the real insert's retry loop: the pool's connection fails once.
        if "dead_letter" in self.fail:
            self.fail.discard("dead_letter")
            real = self._pool

            class Broken:
                def connection(self) -> Any:
                    raise psycopg.OperationalError("injected: connection lost in dead_letter")

            self._pool = Broken()  # type: ignore[assignment]
            loop = asyncio.get_running_loop()
            loop.call_later(0.02, setattr, self, "_pool", real)
        return await super()._dead_letter(record, reason)

    async def _next_journal_batch(self, journal: Journal) -> tuple[list[UsageRecord], int, int]:
        if "read" in self.fail:
            self.fail.discard("read")
            raise OSError("injected: journal read failed")
        return await super()._next_journal_batch(journal)


@pytest.mark.parametrize(
    "fail",
    [{"store_batch"}, {"store_one"}, {"dead_letter"}, {"read"}, {"store_batch", "store_one"}],
    ids=lambda f: "+".join(sorted(f)),
)
async def test_connection_errors_anywhere_are_retried_and_nothing_is_doubled(
    pool: Pool,  # noqa: F811
    tmp_path: Path,
    fail: set[str],
) -> None:
    journal = Journal(tmp_path / "j")
    writer = FlakyWriter(
        pool, queue_size=10, batch_size=100, flush_interval_s=0.01, journal=journal, fail=fail
    )
    refused = record("refused", 1, 1)
    refused.latency_ms = 2**40
    good = [record(f"g{i}", 5, 1) for i in range(20)]
    for r in [*good[:10], refused, *good[10:]]:
        assert writer.submit(r)
    writer.start()
    await writer.close(timeout_s=20)
    assert not writer.fail, "the injected failure did not happen"
    assert writer.stats.failed_attempts >= 1
    stored, dead = await ledger_ids(pool)
    assert sorted(stored) == sorted(r.request_id for r in good)  # each exactly once
    assert dead == [refused.request_id]
    assert await rows(pool, "SELECT sum(requests) FROM tollgate.daily_usage") == [(20,)]
    assert writer.pending == 0
    assert journal.checkpoint_pos == journal.end_pos
    journal.close()


async def test_writer_alive_and_oldest_age_gauges(pool: Pool, tmp_path: Path) -> None:  # noqa: F811
    journal = Journal(tmp_path / "j")
    writer = journal_writer(pool, journal)
    assert not writer.alive
    assert writer.oldest_unshipped_age_s == 0.0
    old = record("old", 1, 1)
    old.created_at.FromSeconds(old.created_at.seconds - 600)
    writer.submit(old)
    assert writer.oldest_unshipped_age_s >= 600
    writer.start()
    assert writer.alive
    await writer.close(timeout_s=10)
    assert not writer.alive
    assert writer.oldest_unshipped_age_s == 0.0
    journal.close()


# --- the journal --------------------------------------------------------------------------------


def test_short_writes_keep_records_aligned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    rng = random.Random(7)
    calls = {"short": 0, "eintr": 0}

    def short_write(fd: int, data: Any) -> int:
        if rng.random() < 0.1:
            calls["eintr"] += 1
            raise InterruptedError
        n = rng.randint(1, len(data))
        calls["short"] += n < len(data)
        return real_write(fd, bytes(data[:n]))

    monkeypatch.setattr(journal_module.os, "write", short_write)
    journal = Journal(tmp_path / "j", segment_bytes=4000)
    written = [record(f"user-{i}" * (i % 5 + 1), i, i + 1) for i in range(60)]
    for r in written:
        journal.append(r)
    monkeypatch.undo()
    assert calls["short"] > 10
    assert calls["eintr"] > 0
    read = journal.read(0, 1000)
    assert [e.record for e in read.entries] == written
    assert read.skipped == 0
    journal.close()
    reopened = Journal(tmp_path / "j", segment_bytes=4000)
    assert reopened.count_unshipped() == 60
    reopened.close()


def test_a_failed_write_leaves_no_partial_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path / "j")
    first = record("first", 1, 1)
    journal.append(first)
    real_write = os.write
    state = {"n": 0}

    def disk_full_midway(fd: int, data: Any) -> int:
        state["n"] += 1
        if state["n"] == 1:
            return real_write(fd, bytes(data[:5]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal_module.os, "write", disk_full_midway)
    with pytest.raises(OSError, match="No space left"):
        journal.append(record("lost", 1, 1))
    monkeypatch.undo()
    last = record("last", 1, 1)
    journal.append(last)
    assert [e.record for e in journal.read(0, 10).entries] == [first, last]
    journal.close()


def corrupt_frame() -> bytes:
    payload = b"\x0a\x05ab"  # field 1 says 5 bytes, 2 follow: does not decode
    return bytes([len(payload)]) + payload


def journal_with_corrupt_middle(directory: Path) -> tuple[list[UsageRecord], list[UsageRecord]]:
    journal = Journal(directory)
    before = [record(f"b{i}", 1, 1) for i in range(3)]
    after = [record(f"a{i}", 2, 2) for i in range(4)]
    for r in before:
        journal.append(r)
    journal.close()
    (segment,) = directory.glob("*.journal")
    with open(segment, "ab") as f:
        f.write(corrupt_frame())
    journal = Journal(directory)
    for r in after:
        journal.append(r)
    journal.close()
    return before, after


def test_read_reports_skipped_records_and_count_is_exact(tmp_path: Path) -> None:
    before, after = journal_with_corrupt_middle(tmp_path / "j")
    journal = Journal(tmp_path / "j")
    assert journal.count_unshipped() == 8  # the corrupt one too: it leaves when skipped
    everything = journal.read(0, 100)
    assert [e.record for e in everything.entries] == [*before, *after]
    assert everything.skipped == 1
    assert everything.end == journal.end_pos
    # Read in small steps: the skipped record is reported exactly once.
    position, skipped, got = 0, 0, []
    while True:
        step = journal.read(position, 2)
        if not step.entries and not step.skipped:
            break
        got += [e.record for e in step.entries]
        skipped += step.skipped
        position = step.end
    assert (got, skipped) == ([*before, *after], 1)
    journal.commit(everything.entries[2].end)
    assert journal.count_unshipped() == 5
    journal.close()


async def test_corrupt_journal_record_is_skipped_and_pending_reaches_zero(
    pool: Pool,  # noqa: F811
    tmp_path: Path,
) -> None:
    before, after = journal_with_corrupt_middle(tmp_path / "j")
    journal = Journal(tmp_path / "j")
    writer = journal_writer(pool, journal, batch_size=2)
    assert writer.pending == 8
    writer.start()
    await writer.close(timeout_s=10)
    assert writer.pending == 0
    assert writer.stats.skipped == 1
    assert journal.checkpoint_pos == journal.end_pos
    stored, _ = await ledger_ids(pool)
    assert sorted(stored) == sorted(r.request_id for r in [*before, *after])
    journal.close()


async def test_replaying_a_journal_with_a_poison_record_catches_up(
    pool: Pool,  # noqa: F811
    tmp_path: Path,
) -> None:
    # The issue: after a restart the journal replays the poison record and the writer stopped
    # again. Written before any writer ran (as if the process died before shipping).
    journal = Journal(tmp_path / "j")
    refused = record("refused", 1, 1)
    refused.latency_ms = 2**40
    sent = [record("a", 10, 1), poison(), record("b", 10, 1), refused, record("c", 10, 1)]
    for r in sent:
        journal.append(r)
    journal.close()
    journal = Journal(tmp_path / "j")
    writer = journal_writer(pool, journal)
    writer.start()  # start-up succeeds
    late = record("late", 4, 4)
    assert writer.submit(late)
    await writer.close(timeout_s=10)
    stored, dead = await ledger_ids(pool)
    assert sorted(stored) == sorted(r.request_id for r in [*sent, late] if r is not refused)
    assert dead == [refused.request_id]
    assert writer.pending == 0
    assert writer.stats.replayed == 5
    journal.close()


# --- property test: the whole path --------------------------------------------------------------

SURPRISES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 2**64 + 5, 10**30, 10**9 + 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=1),
)


COUNTS = st.integers(min_value=0, max_value=5_000)


def usage_of(names: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """A usage object with ``names`` (the last two may be missing), each any JSON value: mostly
    plausible counts, often negative, huge, inconsistent or not an integer at all."""
    value = st.one_of(COUNTS, COUNTS, SURPRISES)
    return st.fixed_dictionaries(
        {n: value for n in names[:-2]}, optional={n: value for n in names[-2:]}
    )


OPENAI_CHAT = st.builds(
    lambda u, cached, reasoning: {
        **u,
        "prompt_tokens_details": {"cached_tokens": cached},  # may exceed prompt_tokens
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    },
    usage_of(["prompt_tokens", "completion_tokens", "total_tokens"]),
    st.one_of(COUNTS, SURPRISES),
    st.one_of(COUNTS, SURPRISES),
)
RESPONSES = st.builds(
    lambda u, cached, reasoning: {
        **u,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens_details": {"reasoning_tokens": reasoning},
    },
    usage_of(["input_tokens", "output_tokens", "total_tokens"]),
    st.one_of(COUNTS, SURPRISES),
    st.one_of(COUNTS, SURPRISES),
)
ANTHROPIC = usage_of(
    ["input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"]
)
GEMINI = usage_of(
    [
        "promptTokenCount",
        "candidatesTokenCount",
        "thoughtsTokenCount",
        "cachedContentTokenCount",
        "totalTokenCount",
    ]
)
BEDROCK = usage_of(
    ["inputTokens", "outputTokens", "totalTokens", "cacheReadInputTokens", "cacheWriteInputTokens"]
)


def sse(*events: tuple[str | None, object]) -> str:
    out = []
    for name, doc in events:
        head = f"event: {name}\n" if name else ""
        out.append(f"{head}data: {json.dumps(doc)}\n\n")
    return "".join(out)


# (path, request body, streamed, response body) per parser family.
def chat(usage: Any, streamed: bool) -> tuple[str, dict[str, Any], bool, str]:
    request = {"model": "gpt-4o-mini", "messages": [], "stream": streamed}
    if streamed:
        answer = sse(
            (None, {"model": "gpt-4o-mini", "choices": []}), (None, {"choices": [], "usage": usage})
        )
        return "/v1/chat/completions", request, True, answer + "data: [DONE]\n\n"
    return (
        "/v1/chat/completions",
        request,
        False,
        json.dumps({"model": "gpt-4o-mini", "usage": usage}),
    )


def responses(usage: Any, streamed: bool) -> tuple[str, dict[str, Any], bool, str]:
    response = {"model": "o4-mini", "status": "completed", "usage": usage}
    if streamed:
        answer = sse(("response.completed", {"type": "response.completed", "response": response}))
        return "/v1/responses", {"model": "o4-mini", "stream": True}, True, answer
    return "/v1/responses", {"model": "o4-mini"}, False, json.dumps(response)


def embeddings(usage: Any, streamed: bool) -> tuple[str, dict[str, Any], bool, str]:
    body = {"model": "text-embedding-3-small", "usage": usage}
    return "/v1/embeddings", {"model": "text-embedding-3-small"}, False, json.dumps(body)


def anthropic(usage: Any, streamed: bool) -> tuple[str, dict[str, Any], bool, str]:
    model = "claude-3-5-haiku-latest"
    request = {"model": model, "max_tokens": 5, "messages": [], "stream": streamed}
    if streamed:
        out = usage.get("output_tokens") if isinstance(usage, dict) else None
        answer = sse(
            (
                "message_start",
                {"type": "message_start", "message": {"model": model, "usage": usage}},
            ),
            ("message_delta", {"type": "message_delta", "usage": {"output_tokens": out}}),
            ("message_stop", {"type": "message_stop"}),
        )
        return "/v1/messages", request, True, answer
    return "/v1/messages", request, False, json.dumps({"model": model, "usage": usage})


def gemini(usage: Any, streamed: bool) -> tuple[str, dict[str, Any], bool, str]:
    doc = {"modelVersion": "gemini-2.0-flash", "usageMetadata": usage}
    if streamed:
        path = "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"
        return path, {"contents": []}, True, sse((None, doc))
    return (
        "/v1beta/models/gemini-2.0-flash:generateContent",
        {"contents": []},
        False,
        json.dumps(doc),
    )


def bedrock(usage: Any, streamed: bool) -> tuple[str, dict[str, Any], bool, str]:
    path = "/model/anthropic.claude-3-haiku-20240307-v1:0/converse"
    return path, {"messages": []}, False, json.dumps({"usage": usage})


FAMILIES = [
    (chat, OPENAI_CHAT),
    (responses, RESPONSES),
    (embeddings, usage_of(["prompt_tokens", "total_tokens"])),
    (anthropic, ANTHROPIC),
    (gemini, GEMINI),
    (bedrock, BEDROCK),
]
EXCHANGES = st.one_of(
    *[st.builds(build, st.one_of(usage, SURPRISES), st.booleans()) for build, usage in FAMILIES]
)


def router() -> Router:
    def provider(name: str, api: str) -> Provider:
        return Provider(name=name, base=parse_base_uri("http://up"), api=api, auth="none")

    providers = {api: provider(api, api) for api in ("openai", "anthropic", "gemini", "bedrock")}
    return Router(providers, "openai", model_prefix_routing=False)


def header_msg(*pairs: tuple[str, bytes], end: bool = False) -> ep.HttpHeaders:
    return ep.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in pairs]
        ),
        end_of_stream=end,
    )


class ObservedSink:
    """The real writer as the processor's sink, noting which request ids it was given."""

    def __init__(self, writer: LedgerWriter) -> None:
        self.writer = writer
        self.ids: list[str] = []

    @property
    def accepting(self) -> bool:
        return self.writer.accepting

    def submit(self, record: UsageRecord) -> bool:
        self.ids.append(record.request_id)
        return self.writer.submit(record)


def drive(
    ctx: ProcessorContext, exchange: tuple[str, dict[str, Any], bool, str], user: str
) -> None:
    path, request, streamed, answer = exchange
    p = RequestProcessor(ctx)
    p.request_headers(
        header_msg(
            (":method", b"POST"),
            (":path", path.encode()),
            ("content-type", b"application/json"),
            ("x-tollgate-user-id", user.encode()),
        )
    )
    p.request_body(ep.HttpBody(body=json.dumps(request).encode(), end_of_stream=True))
    content_type = b"text/event-stream" if streamed else b"application/json"
    p.response_headers(header_msg((":status", b"200"), ("content-type", content_type)))
    data = answer.encode()
    cut = len(data) // 2 if streamed else 0
    if streamed and cut:
        p.response_body(ep.HttpBody(body=data[:cut], end_of_stream=False))
    p.response_body(ep.HttpBody(body=data[cut:], end_of_stream=True))
    p.close()


async def through_the_ledger(
    url: str, directory: Path, exchanges: list[tuple[str, dict[str, Any], bool, str]]
) -> None:
    await run_migrations(url)
    pool: Pool = AsyncConnectionPool(url, open=False, min_size=1, max_size=2)  # noqa: F811
    await pool.open()
    journal = Journal(directory)
    writer = LedgerWriter(
        pool, queue_size=10, batch_size=4, flush_interval_s=0.005, journal=journal
    )
    sink = ObservedSink(writer)
    ctx = ProcessorContext(sink=sink, router=router())
    writer.start()
    try:
        for i, exchange in enumerate(exchanges):
            drive(ctx, exchange, f"prop-{i}")
        normal = record("after-the-batch", 10, 2)
        normal.request_id = new_request_id()
        normal.model = "gpt-4o-mini-after"  # its own rollup row, whatever the others summed to
        assert writer.submit(normal)
        await writer.close(timeout_s=30)
        assert writer.pending == 0
        assert journal.checkpoint_pos == journal.end_pos
        assert len(sink.ids) == len(exchanges)  # one record per request
        wanted = [*sink.ids, normal.request_id]
        async with pool.connection() as conn:
            stored = await (
                await conn.execute(
                    "SELECT request_id::text FROM tollgate.requests"
                    " WHERE request_id::text = ANY(%s)",
                    (wanted,),
                )
            ).fetchall()
            dead = await (
                await conn.execute(
                    "SELECT request_id FROM tollgate.dead_letters WHERE request_id = ANY(%s)",
                    (wanted,),
                )
            ).fetchall()
        found = [r[0] for r in stored] + [r[0] for r in dead]
        assert sorted(found) == sorted(wanted), "each request is one row or one dead letter"
        assert normal.request_id in {r[0] for r in stored}
        async with pool.connection() as conn:
            odd = await (
                await conn.execute(
                    "SELECT usage_flags, pricing_error IS NOT NULL FROM tollgate.requests"
                    " WHERE request_id::text = ANY(%s)",
                    (wanted,),
                )
            ).fetchall()
        for flags, unpriceable in odd:
            for flag in flags:
                event(f"flag {flag}")
            if unpriceable:
                event("pricing_error")
        if dead:
            event("dead letter")
    finally:
        journal.close()
        await pool.close()


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(exchanges=st.lists(EXCHANGES, min_size=1, max_size=6), run=st.uuids())
def test_any_usage_ends_as_one_row_or_one_dead_letter(
    database_url: str,
    tmp_path: Path,
    exchanges: list[tuple[str, dict[str, Any], bool, str]],
    run: Any,
) -> None:
    # One database for every example of this test (migrations apply once; a fresh database
    # per example would cost more than the examples).
    asyncio.run(through_the_ledger(database_url, tmp_path / run.hex, exchanges))

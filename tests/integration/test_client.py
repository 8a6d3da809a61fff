"""`tollgate.client` through real Envoy, Tollgate and Postgres (issue 16, acceptance 1 and 2).

The official openai and anthropic SDKs are instrumented once; every call's ledger row is found
by the `x-tollgate-request-id` the SDK saw, and must carry exactly the attribution of the
context the call was made in: the user, the tags and limits of every enclosing context, the
use case, and nobody outside any context.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib.util
import json
import random
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.integration.conftest import (
    FakeUpstream,
    RunningTollgate,
    row_for,
    running_tollgate,
    tollgate_command,
)
from tollgate.client import current, instrument, track, track_context

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Count the beans."}]
LIMITS = ("team-a", "team-b", "project-x")


@pytest.fixture
def stack(
    tmp_path: Path, database_url: str, fake_upstream: FakeUpstream
) -> Iterator[RunningTollgate]:
    """`tollgate up` with OpenAI and Anthropic pointed at the fake upstream, and the named
    limits the contexts below charge (a limit id must exist, or the request gets 422)."""
    providers = {"anthropic": {"base_uri": fake_upstream.url}}
    with running_tollgate(
        tmp_path / "state",
        database_url,
        fake_upstream,
        providers=json.dumps(providers),
        limit_cache_refresh_s="1",
    ) as running:
        for limit_id in LIMITS:
            tollgate_command(
                running.env, "limits", "create", limit_id, "--scope", "named",
                "--measure", "requests", "--max", "1000000", "--period", "total",
            )  # fmt: skip
        yield running


def openai_client(stack: RunningTollgate) -> openai.OpenAI:
    return instrument(openai.OpenAI(base_url=stack.envoy_url, api_key="sk-app", max_retries=0))


def anthropic_client(stack: RunningTollgate) -> anthropic.Anthropic:
    return instrument(
        anthropic.Anthropic(
            base_url=stack.envoy_url.removesuffix("/v1"), api_key="sk-ant-app", max_retries=0
        )
    )


def chat(client: openai.OpenAI) -> str:
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    raw.parse()
    return raw.headers["x-tollgate-request-id"]


def message(client: anthropic.Anthropic) -> str:
    raw = client.messages.with_raw_response.create(
        model="claude-haiku-4-5",
        max_tokens=32,
        messages=MESSAGES,  # type: ignore[arg-type]
    )
    raw.parse()
    return raw.headers["x-tollgate-request-id"]


def attribution_of(row: dict[str, Any]) -> dict[str, Any]:
    assert row["outcome"] == "ok", row
    return {
        "user_id": row["end_user_id"],
        "tags": tuple(row["tags"] or ()),
        "limit_ids": tuple(row["limit_ids"] or ()),
        "use_case_id": row["use_case_id"],
        "use_case_name": row["use_case_name"],
        "use_case_version": row["use_case_version"],
        "logging_disabled": row["logging_disabled"],
    }


def expected_now() -> dict[str, Any]:
    """What the ledger must say for a call made here: the current context's values."""
    now = current()
    return {
        "user_id": now.user_id,
        "tags": now.tags,
        "limit_ids": now.limit_ids,
        "use_case_id": now.use_case_id,
        "use_case_name": now.use_case_name,
        "use_case_version": now.use_case_version,
        "logging_disabled": bool(now.logging_disable),
    }


def wait_until_limits_known(client: openai.OpenAI) -> None:
    """The limit cache reloads every second: a request naming the limits is refused with 422
    until it has seen them."""
    for _ in range(100):
        try:
            with track_context(limit_ids=LIMITS):
                chat(client)
            return
        except openai.UnprocessableEntityError:
            time.sleep(0.1)
    raise AssertionError("the new limits never became known")


def test_sdk_calls_inside_and_outside_contexts(
    stack: RunningTollgate, database_url: str, fake_upstream: FakeUpstream
) -> None:
    oa = openai_client(stack)
    an = anthropic_client(stack)
    assert instrument(oa) is oa  # a second instrument() is harmless
    wait_until_limits_known(oa)
    expected: dict[str, dict[str, Any]] = {}

    for call in (chat, message):
        client: Any = oa if call is chat else an
        expected[call(client)] = expected_now()  # outside every context: nobody
        with track_context(
            user_id="org-42:alice",
            tags=["checkout", "eu"],
            limit_ids="team-a",
            use_case_name="support-bot",
            use_case_version=3,
            use_case_id="uc-1",
        ):
            expected[call(client)] = expected_now()
            with track_context(user_id="org-42:bob", tags="beta", limit_ids=["project-x"]):
                expected[call(client)] = expected_now()
                with track_context(logging_disable=True, use_case_name="triage"):
                    expected[call(client)] = expected_now()
            expected[call(client)] = expected_now()  # the outer values are back
        expected[call(client)] = expected_now()

    rows = {
        request_id: attribution_of(row_for(database_url, request_id)) for request_id in expected
    }
    assert rows == expected
    # What the contexts produced, spelled out once (so the test does not only compare the
    # client with itself):
    inner = [v for v in expected.values() if v["use_case_name"] == "triage"]
    assert inner[0] == {
        "user_id": "org-42:bob",
        "tags": ("checkout", "eu", "beta"),
        "limit_ids": ("team-a", "project-x"),
        "use_case_id": "uc-1",
        "use_case_name": "triage",
        "use_case_version": "3",
        "logging_disabled": True,
    }
    nobody = [v for v in expected.values() if v["user_id"] is None]
    assert len(nobody) == 4
    # None of it reached the provider.
    sent = [name for r in fake_upstream.recorded()["requests"] for name, _ in r["headers"]]
    assert sent
    assert not [name for name in sent if name.startswith("x-tollgate-")]


def test_explicit_headers_win_over_the_context(stack: RunningTollgate, database_url: str) -> None:
    oa = openai_client(stack)
    with track_context(user_id="context-user", tags="from-context"):
        raw = oa.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=MESSAGES,  # type: ignore[arg-type]
            extra_headers={"x-tollgate-user-id": "explicit-user"},
        )
    row = row_for(database_url, raw.headers["x-tollgate-request-id"])
    assert row["end_user_id"] == "explicit-user"
    assert row["tags"] == ["from-context"]


def test_threads_each_get_their_own_user(stack: RunningTollgate, database_url: str) -> None:
    oa = openai_client(stack)  # one client shared by every thread
    threads_n, calls_n = 6, 4
    start = threading.Barrier(threads_n)
    seen: dict[str, str | None] = {}
    lock = threading.Lock()

    def worker(n: int) -> None:
        with track_context(user_id=f"thread-{n}", tags=[f"t{n}"]):
            start.wait(10)
            for _ in range(calls_n):
                request_id = chat(oa)
                with lock:
                    seen[request_id] = f"thread-{n}"

    def starts_empty() -> None:
        request_id = chat(oa)
        with lock:
            seen[request_id] = None

    with track_context(user_id="main-thread"):
        # A new thread does not inherit the context; copy_context().run carries it.
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(threads_n)]
        threads.append(threading.Thread(target=starts_empty))
        carried = contextvars.copy_context()

        def carries() -> None:
            request_id = chat(oa)
            with lock:
                seen[request_id] = "main-thread"

        threads.append(threading.Thread(target=carried.run, args=(carries,)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert len(seen) == threads_n * calls_n + 2
    for request_id, user in seen.items():
        row = row_for(database_url, request_id)
        assert row["end_user_id"] == user, (request_id, row["tags"])
        if user is not None and user.startswith("thread-"):
            assert row["tags"] == ["t" + user.removeprefix("thread-")]


async def test_many_interleaved_tasks(stack: RunningTollgate, database_url: str) -> None:
    """120 tasks on one AsyncOpenAI and one AsyncAnthropic client, each in its own nested
    contexts, switching at random points while the others' requests are in flight."""
    async with (
        instrument(
            openai.AsyncOpenAI(base_url=stack.envoy_url, api_key="sk-app", max_retries=0)
        ) as oa,
        instrument(
            anthropic.AsyncAnthropic(
                base_url=stack.envoy_url.removesuffix("/v1"),
                api_key="sk-ant-app",
                max_retries=0,
            )
        ) as an,
    ):
        expected = await interleave(oa, an, tasks=120)
    rows = await asyncio.to_thread(
        lambda: {rid: attribution_of(row_for(database_url, rid, timeout_s=20)) for rid in expected}
    )
    assert rows == expected


async def interleave(
    oa: openai.AsyncOpenAI, an: anthropic.AsyncAnthropic, tasks: int
) -> dict[str, dict[str, Any]]:
    """Run the tasks; the attribution each request must have, by request id."""
    rng = random.Random(16)
    delays = [[rng.random() / 50 for _ in range(3)] for _ in range(tasks)]
    in_flight = asyncio.Semaphore(24)

    async def one(n: int) -> list[tuple[str, dict[str, Any]]]:
        out = []
        async with in_flight, track_context(user_id=f"user-{n}", tags=[f"task-{n}"]):
            await asyncio.sleep(delays[n][0])
            if n % 2:
                raw: Any = await oa.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini",
                    messages=MESSAGES,  # type: ignore[arg-type]
                )
            else:
                raw = await an.messages.with_raw_response.create(
                    model="claude-haiku-4-5",
                    max_tokens=16,
                    messages=MESSAGES,  # type: ignore[arg-type]
                )
            out.append((raw.headers["x-tollgate-request-id"], expected_now()))
            await asyncio.sleep(delays[n][1])
            async with track_context(tags="nested", use_case_name=f"step-{n}"):
                await asyncio.sleep(delays[n][2])
                raw = await oa.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini",
                    messages=MESSAGES,  # type: ignore[arg-type]
                )
                out.append((raw.headers["x-tollgate-request-id"], expected_now()))
        return out

    results = await asyncio.gather(*(one(n) for n in range(tasks)))
    expected = dict(pair for result in results for pair in result)
    assert len(expected) == 2 * tasks
    for n, result in enumerate(results):
        assert result[0][1]["user_id"] == f"user-{n}"
        assert result[1][1]["tags"] == (f"task-{n}", "nested")
    return expected


@track(user_id="nightly-report", tags=["batch"], use_case_name="report")
def nightly_report(client: openai.OpenAI) -> str:
    return chat(client)


@track(user_id="async-bot")
async def async_summary(client: openai.AsyncOpenAI) -> str:
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=MESSAGES,  # type: ignore[arg-type]
    )
    return raw.headers["x-tollgate-request-id"]


async def test_track_attributes_every_call(stack: RunningTollgate, database_url: str) -> None:
    oa = openai_client(stack)
    ids = [nightly_report(oa) for _ in range(3)]
    with track_context(user_id="someone-else", tags="outer"):
        ids.append(nightly_report(oa))  # the decorator's user is the inner one: it wins
    async with instrument(
        openai.AsyncOpenAI(base_url=stack.envoy_url, api_key="sk-app", max_retries=0)
    ) as async_oa:
        async_ids = [await async_summary(async_oa) for _ in range(2)]
    outside = chat(oa)
    rows = [row_for(database_url, rid) for rid in ids]
    assert [r["end_user_id"] for r in rows] == ["nightly-report"] * 4
    assert [r["tags"] for r in rows] == [["batch"]] * 3 + [["outer", "batch"]]
    assert {r["use_case_name"] for r in rows} == {"report"}
    assert [row_for(database_url, rid)["end_user_id"] for rid in async_ids] == ["async-bot"] * 2
    assert row_for(database_url, outside)["end_user_id"] is None


APP_MODULE = '''
"""An app module written the way Pay-i warns against: a call in @track's arguments."""
from tollgate.client import track

CALLS = []
signed_in = "alice"


def current_user():
    CALLS.append(signed_in)
    return signed_in


@track(user_id=current_user())  # evaluated once, when this module is imported
def ask(client, chat):
    return chat(client)
'''


def test_track_arguments_are_evaluated_once_at_import(
    stack: RunningTollgate, database_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "payi_style_app.py"
    path.write_text(APP_MODULE, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("payi_style_app", path)
    assert spec is not None
    assert spec.loader is not None
    app = importlib.util.module_from_spec(spec)
    sys.modules["payi_style_app"] = app
    try:
        spec.loader.exec_module(app)
        assert app.CALLS == ["alice"]  # already called, before any request
        oa = openai_client(stack)
        ids = []
        for user in ("bob", "carol", "dave"):
            app.signed_in = user  # who is signed in now: the decorator never sees it
            ids.append(app.ask(oa, chat))
        assert app.CALLS == ["alice"]
        assert [row_for(database_url, rid)["end_user_id"] for rid in ids] == ["alice"] * 3
    finally:
        del sys.modules["payi_style_app"]

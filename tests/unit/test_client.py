"""tollgate.client: attribution contexts, @track, headers, httpx/SDK instrumentation, and
agreement with the server's header rules.

The client restates the server's rules (it imports nothing of the server); these tests import
both and check that every value the client lets through reaches the server unchanged.
"""

from __future__ import annotations

import ast
import asyncio
import contextvars
import inspect
import json
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from hypothesis import example, given, reject
from hypothesis import strategies as st

import tollgate.client
from tollgate.client import (
    Attribution,
    InvalidAttribution,
    add_headers,
    add_headers_async,
    async_http_client,
    configure,
    current,
    header_bytes,
    headers,
    http_client,
    instrument,
    track,
    track_context,
)
from tollgate.client import _attribution as client_attribution
from tollgate.client import _context as client_context
from tollgate.ledger import limits as server_limits
from tollgate.policy import attribution as server_attribution
from tollgate.policy import headers as server_headers
from tollgate.policy import identity as server_identity
from tollgate.policy.attribution import parse_attribution
from tollgate.policy.identity import IdentityResolver, header_candidate
from tollgate.policy.refusal import PolicyRefusal
from tollgate.routing import allowlist as server_allowlist
from tollgate.routing.allowlist import InvalidBaseUri, parse_base_uri

EMPTY = Attribution()
CLIENT_DIR = Path(tollgate.client.__file__).resolve().parent


@pytest.fixture(autouse=True)
def _clean_client_state() -> Iterator[None]:
    """Every test starts outside any context with the default (lenient) user-id rule, and
    leaves things that way."""
    saved = client_context._strict_user_ids
    configure(strict_user_ids=False)
    assert current() == EMPTY
    yield
    configure(strict_user_ids=saved)
    assert current() == EMPTY


@pytest.fixture
def strict_ids() -> Iterator[None]:
    configure(strict_user_ids=True)
    yield
    configure(strict_user_ids=False)


def _raise_inside(ctx: track_context, exc: BaseException) -> None:
    with ctx:
        raise exc


def _server_view(raw: dict[str, bytes]) -> tuple[Any, str | None]:
    return parse_attribution(raw), header_candidate(raw)


# -- nesting and restore ------------------------------------------------------------------------


def test_current_is_empty_outside_every_context() -> None:
    assert current() == EMPTY
    assert current().user_id is None
    assert current().tags == ()
    assert headers() == {}
    assert header_bytes() == {}


def test_inner_user_wins_and_lists_add_up_in_order() -> None:
    with track_context(user_id="outer", tags=["a", "b"], limit_ids=["l1"]) as outer:
        assert outer == Attribution(user_id="outer", tags=("a", "b"), limit_ids=("l1",))
        with track_context(user_id="inner", tags=["c", "a", "d"], limit_ids=["l2", "l1"]) as inner:
            assert inner == Attribution(
                user_id="inner", tags=("a", "b", "c", "d"), limit_ids=("l1", "l2")
            )
            assert current() is inner
        assert current() is outer
    assert current() == EMPTY


def test_scalars_inherit_when_none_and_false_overrides() -> None:
    outer_values = {
        "user_id": "u",
        "use_case_id": "uc-1",
        "use_case_name": "support",
        "use_case_version": 3,
        "logging_disable": True,
        "base_uri": "http://upstream.example:8080/v1",
    }
    with track_context(**outer_values), track_context(tags="t") as inner:  # type: ignore[arg-type]
        assert inner == Attribution(
            user_id="u",
            tags=("t",),
            use_case_id="uc-1",
            use_case_name="support",
            use_case_version="3",
            logging_disable=True,
            base_uri="http://upstream.example:8080/v1",
        )
        # False is a value, not "unset": it overrides the outer True.
        with track_context(logging_disable=False, use_case_version="4") as innermost:
            assert innermost.logging_disable is False
            assert innermost.use_case_version == "4"
            assert innermost.use_case_name == "support"
        assert current().logging_disable is True
        assert current().use_case_version == "3"


def test_values_are_trimmed_and_lists_deduplicated() -> None:
    with track_context(user_id="  padded\t", tags=[" x ", "x", "y"], limit_ids=" l1 ") as a:
        assert a.user_id == "padded"
        assert a.tags == ("x", "y")
        assert a.limit_ids == ("l1",)


def test_one_string_is_one_item() -> None:
    with track_context(tags="chat-ui", limit_ids="team.a:monthly") as a:
        assert a.tags == ("chat-ui",)
        assert a.limit_ids == ("team.a:monthly",)


def test_values_are_restored_when_the_block_raises() -> None:
    with track_context(user_id="outer", tags=["o"]) as outer:
        with pytest.raises(KeyError, match="boom"):
            _raise_inside(track_context(user_id="inner", tags=["i"]), KeyError("boom"))
        assert current() is outer
    with pytest.raises(RuntimeError, match="boom"):
        _raise_inside(track_context(user_id="solo"), RuntimeError("boom"))
    assert current() == EMPTY


def test_reentering_an_active_context_raises_and_reuse_after_exit_works() -> None:
    ctx = track_context(user_id="u")
    with ctx as first:
        with pytest.raises(RuntimeError, match="already active"):
            ctx.__enter__()
        # The refused entry changed nothing.
        assert current() is first
    assert current() == EMPTY
    with ctx as second:
        assert second.user_id == "u"
    assert current() == EMPTY


async def test_async_with_sets_and_restores() -> None:
    ctx = track_context(user_id="async-user", tags=["t"])
    async with ctx as merged:
        assert current() is merged
        assert merged.user_id == "async-user"
        await asyncio.sleep(0)
        assert current() is merged
        with pytest.raises(RuntimeError, match="already active"):
            await ctx.__aenter__()
        async with track_context(tags=["u"]) as inner:
            assert inner.tags == ("t", "u")
        assert current() is merged
    assert current() == EMPTY


# -- isolation: threads, tasks ------------------------------------------------------------------


def test_threads_see_only_their_own_context_while_overlapping() -> None:
    n = 8
    barrier = threading.Barrier(n, timeout=10)

    def work(i: int) -> tuple[Attribution, Attribution, Attribution]:
        with track_context(user_id=f"user-{i}", tags=[f"t{i}"]):
            barrier.wait()  # every thread is inside its own context now
            inside = current()
            barrier.wait()  # and nobody has left before everyone looked
            still = current()
        return inside, still, current()

    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(work, range(n)))
    for i, (inside, still, after) in enumerate(results):
        assert inside == Attribution(user_id=f"user-{i}", tags=(f"t{i}",))
        assert still == inside
        assert after == EMPTY


def test_a_new_thread_starts_with_an_empty_context() -> None:
    seen: list[Attribution] = []
    with track_context(user_id="parent"):
        thread = threading.Thread(target=lambda: seen.append(current()))
        thread.start()
        thread.join(timeout=10)
    assert seen == [EMPTY]


def test_copy_context_run_carries_the_context() -> None:
    with track_context(user_id="carried", tags=["x"]) as merged:
        ctx = contextvars.copy_context()
    assert current() == EMPTY
    assert ctx.run(current) is merged
    seen: list[Attribution] = []
    thread = threading.Thread(target=ctx.run, args=(lambda: seen.append(current()),))
    thread.start()
    thread.join(timeout=10)
    assert seen == [merged]


async def test_to_thread_carries_the_context() -> None:
    async with track_context(user_id="threaded") as merged:
        assert await asyncio.to_thread(current) is merged
    assert await asyncio.to_thread(current) == EMPTY


async def test_a_task_keeps_the_context_it_was_created_in() -> None:
    async def later() -> Attribution:
        await asyncio.sleep(0)
        return current()

    async with track_context(user_id="creator") as merged:
        task = asyncio.create_task(later())
    assert current() == EMPTY
    assert await task is merged


async def test_many_interleaved_tasks_each_keep_their_own_context() -> None:
    n = 200
    inside = 0
    peak = 0

    async def worker(i: int) -> list[Attribution]:
        nonlocal inside, peak
        seen: list[Attribution] = []
        async with track_context(user_id=f"user-{i}", tags=[f"t{i}"]):
            inside += 1
            peak = max(peak, inside)
            for _ in range(5):
                await asyncio.sleep(0)
                seen.append(current())
            inside -= 1
        seen.append(current())
        return seen

    async with track_context(tags=["batch"]) as batch:
        results = await asyncio.gather(*(worker(i) for i in range(n)))
        assert current() is batch
    assert peak == n  # all the tasks were inside their contexts at once
    for i, seen in enumerate(results):
        expected = Attribution(user_id=f"user-{i}", tags=("batch", f"t{i}"))
        assert seen[:5] == [expected] * 5
        assert seen[5] == batch


# -- validation ---------------------------------------------------------------------------------


def test_invalid_attribution_is_a_value_error() -> None:
    assert issubclass(InvalidAttribution, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"user_id": ""}, "user_id is empty"),
        ({"user_id": "   \t\n"}, "user_id is empty"),
        ({"user_id": "x" * 256}, "user_id is 256 characters long; Tollgate keeps at most 255"),
        ({"user_id": "a\x00b"}, "control character"),
        ({"user_id": "a\nb"}, "control character"),
        ({"user_id": "a\x7fb"}, "control character"),
        ({"user_id": "a\x85b"}, "control character"),
        ({"user_id": "a\ud800b"}, "lone surrogate"),
        ({"use_case_id": ""}, "use_case_id is empty"),
        ({"use_case_name": "n" * 300}, "use_case_name is 300 characters long"),
        ({"use_case_version": "v\x01"}, "use_case_version .* control character"),
        ({"tags": ["ok", ""]}, "each of tags is empty"),
        ({"tags": ["a,b"]}, "tags item 'a,b' holds a ','"),
        ({"tags": "a,b"}, "holds a ','"),
        ({"tags": ["t" * 256]}, "each of tags is 256 characters long"),
        ({"tags": [f"t{i}" for i in range(65)]}, "65 tags in effect; Tollgate reads at most 64"),
        ({"limit_ids": [f"l{i}" for i in range(65)]}, "65 limit ids in effect"),
        ({"limit_ids": ["-starts-with-dash"]}, "limit id '-starts-with-dash' cannot exist"),
        ({"limit_ids": ["has space"]}, "cannot exist"),
        ({"limit_ids": ["a/b"]}, "cannot exist"),
        ({"limit_ids": ["caf\u00e9"]}, "cannot exist"),
        ({"limit_ids": ["x" * 129]}, "cannot exist"),
        ({"limit_ids": ["a,b"]}, "holds a ','"),
        ({"base_uri": "ftp://example.com"}, "not an http:// or https:// URI"),
        ({"base_uri": "example.com/v1"}, "not an http:// or https:// URI"),
        ({"base_uri": "//example.com"}, "not an http:// or https:// URI"),
        ({"base_uri": "http://"}, "not an http:// or https:// URI"),
        ({"base_uri": "http://user:pw@example.com"}, "has userinfo"),
        ({"base_uri": "http://example.com/v1?x=1"}, "has a query"),
        ({"base_uri": "http://example.com/v1#frag"}, "has a fragment"),
        ({"base_uri": "http://example.com/a%2e"}, "has percent-encoding"),
        ({"base_uri": "http://example.com\\v1"}, "has a backslash"),
        ({"base_uri": "http://example.com/ v1"}, "printable ASCII"),
        ({"base_uri": " http://example.com"}, "printable ASCII"),
        ({"base_uri": "http://example.com/\t"}, "printable ASCII"),
        ({"base_uri": "http://ex\u00e4mple.com"}, "printable ASCII"),
        ({"base_uri": "http://example.com/" + "a" * 2048}, "at most 2048"),
    ],
)
def test_invalid_values_are_refused_with_a_useful_message(
    kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(InvalidAttribution, match=match):
        track_context(**kwargs)
    with pytest.raises(InvalidAttribution, match=match):
        track(**kwargs)
    assert current() == EMPTY


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"user_id": b"bytes"}, "user_id must be a string, not bytes"),
        ({"user_id": 1.5}, "user_id must be a string, not float"),
        ({"user_id": True}, "user_id must be a string, not bool"),
        ({"use_case_version": 1.0}, "use_case_version must be a string, not float"),
        ({"use_case_version": False}, "use_case_version must be a string, not bool"),
        ({"use_case_name": ["x"]}, "use_case_name must be a string, not list"),
        ({"tags": ["ok", None]}, "each of tags must be a string, not NoneType"),
        ({"tags": 5}, r"\bint\b"),
        ({"tags": b"chat"}, "tags must be a string or an iterable of strings, not bytes"),
        ({"limit_ids": bytearray(b"ab")}, "limit_ids must be a string or an iterable"),
        ({"limit_ids": [b"x"]}, "each of limit_ids must be a string, not bytes"),
        ({"base_uri": b"http://example.com"}, "base_uri must be a string, not bytes"),
        ({"logging_disable": "yes"}, "logging_disable must be True, False or None, not str"),
        ({"logging_disable": 1}, "logging_disable must be True, False or None, not int"),
    ],
)
def test_wrong_types_raise_type_error(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(TypeError, match=match):
        track_context(**kwargs)


# Only use_case_version takes an int (as Pay-i's SDK does); every other text value is a str.
@pytest.mark.parametrize(
    "kwargs",
    [
        {"user_id": 42},
        {"use_case_id": 7},
        {"use_case_name": 7},
        {"tags": [1, 2]},
        {"limit_ids": [123]},
    ],
    ids=["user_id-int", "use_case_id-int", "use_case_name-int", "tag-int", "limit-id-int"],
)
def test_ints_are_refused_where_text_is_required(kwargs: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match="must be a string"):
        track_context(**kwargs)


@pytest.mark.parametrize(("version", "expected"), [(3, "3"), (0, "0"), (-1, "-1"), ("v2", "v2")])
def test_use_case_version_accepts_ints(version: int | str, expected: str) -> None:
    with track_context(use_case_version=version) as a:
        assert a.use_case_version == expected
        assert headers() == {"x-tollgate-use-case-version": expected}


def test_list_limits_count_across_nested_contexts() -> None:
    outer_tags = [f"o{i}" for i in range(40)]
    inner_tags = [f"i{i}" for i in range(30)]
    with track_context(tags=outer_tags, limit_ids=[f"lo{i}" for i in range(40)]) as outer:
        too_many = track_context(tags=inner_tags)  # fine on its own: 30 tags
        with pytest.raises(InvalidAttribution, match="70 tags in effect"):
            too_many.__enter__()
        assert current() is outer
        # The refused context can still be entered somewhere with room for it.
        too_many_limits = track_context(limit_ids=[f"li{i}" for i in range(25)])
        with pytest.raises(InvalidAttribution, match="65 limit ids in effect"):
            too_many_limits.__enter__()
        assert current() is outer
        # Tags the outer context already has count once.
        with track_context(tags=[*outer_tags[:20], *inner_tags[:24]]) as ok:
            assert len(ok.tags) == 64
    with too_many as alone:
        assert alone.tags == tuple(inner_tags)


def test_at_the_limits_values_are_accepted() -> None:
    with track_context(
        user_id="u" * 255,
        tags=[f"t{i}" for i in range(64)],
        limit_ids=["L" * 128],
        base_uri="http://example.com/" + "p" * (2048 - len("http://example.com/")),
    ) as a:
        assert len(a.user_id or "") == 255
        assert len(a.tags) == 64
        assert a.limit_ids == ("L" * 128,)


def test_strict_user_ids_refuse_what_default_accepts() -> None:
    for user_id in ("a b", "jose\u0301", "caf\u00e9"):
        with track_context(user_id=user_id) as a:
            assert a.user_id == user_id
    configure(strict_user_ids=True)
    for user_id in ("a b", "jose\u0301", "caf\u00e9", "x/y"):
        with pytest.raises(InvalidAttribution, match="breaks the strict rule"):
            track_context(user_id=user_id)
        with pytest.raises(InvalidAttribution, match="breaks the strict rule"):
            track(user_id=user_id)
    with track_context(user_id="alice@example.com:42_a-b.c") as a:
        assert a.user_id == "alice@example.com:42_a-b.c"


def test_strict_rule_applies_to_contexts_created_afterwards() -> None:
    made_before = track_context(user_id="a b")
    configure(strict_user_ids=True)
    with made_before as a:
        assert a.user_id == "a b"
    configure(strict_user_ids=False)
    with track_context(user_id="a b") as a:
        assert a.user_id == "a b"


def test_strict_ids_fixture_sets_the_rule(strict_ids: None) -> None:
    with pytest.raises(InvalidAttribution, match="strict rule"):
        track_context(user_id="a b")


# -- agreement with the server ------------------------------------------------------------------


def test_header_names_are_the_servers_canonical_names() -> None:
    pairs = [
        (client_attribution.USER_ID_HEADER, server_headers.USER_ID_HEADERS),
        (client_attribution.TAGS_HEADER, server_headers.TAGS_HEADERS),
        (client_attribution.LIMIT_IDS_HEADER, server_headers.LIMIT_IDS_HEADERS),
        (client_attribution.USE_CASE_ID_HEADER, server_headers.USE_CASE_ID_HEADERS),
        (client_attribution.USE_CASE_NAME_HEADER, server_headers.USE_CASE_NAME_HEADERS),
        (client_attribution.USE_CASE_VERSION_HEADER, server_headers.USE_CASE_VERSION_HEADERS),
        (client_attribution.LOGGING_DISABLE_HEADER, server_headers.LOGGING_DISABLE_HEADERS),
        (client_attribution.BASE_URI_HEADER, server_headers.BASE_URI_HEADERS),
    ]
    for client_name, server_names in pairs:
        assert client_name == server_names[0]
    full = Attribution(
        user_id="u",
        tags=("t",),
        limit_ids=("l",),
        use_case_id="i",
        use_case_name="n",
        use_case_version="1",
        logging_disable=True,
        base_uri="http://x.example",
    )
    emitted = [name for name, _ in full.header_items()]
    assert emitted == [client_name for client_name, _ in pairs]
    for name in emitted:
        assert server_headers.is_attribution_header(name)  # stripped before the upstream


def test_limits_and_rules_equal_the_servers() -> None:
    assert client_attribution.MAX_TEXT_CHARS == server_attribution.MAX_TEXT_CHARS
    assert client_attribution.MAX_TEXT_CHARS == server_identity.MAX_USER_ID_CHARS
    assert client_attribution.MAX_LIST_ITEMS == server_attribution.MAX_LIST_ITEMS
    assert client_attribution.MAX_BASE_URI_CHARS == server_allowlist.MAX_BASE_URI_LENGTH
    assert client_attribution.LIMIT_ID.pattern == server_limits._LIMIT_ID.pattern
    assert client_attribution.STRICT_USER_ID.pattern == server_identity._STRICT.pattern


_TRICKY_TEXT = st.sampled_from(
    [
        " padded ",
        "a\u3000",
        "\u00a0x\u00a0",
        "jos\u00e9",
        "jose\u0301",
        "\U0001f600",
        "x" * 255,
        " " + "y" * 255 + " ",
        "a b",
        "\ufeffbom",
        "\x1cfs-is-whitespace",
        "1,2",
        "",
        " ",
        "\x00",
        "\ud800",
    ]
)
_TEXT = st.one_of(
    _TRICKY_TEXT,
    st.text(st.characters(codec="utf-8", exclude_categories=("Cc",)), min_size=1, max_size=30),
    st.text(max_size=300),
)
_LIMIT_ID_TEXT = st.one_of(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,20}", fullmatch=True), _TEXT
)
_DNS_LABEL = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_HOST = st.one_of(
    st.lists(_DNS_LABEL, min_size=1, max_size=4)
    .map(".".join)
    .flatmap(lambda h: st.sampled_from([h, h.upper(), h + "."])),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6)
    .filter(lambda a: a.ipv4_mapped is None)
    .flatmap(lambda a: st.sampled_from([a.compressed, a.exploded, a.exploded.upper()]))
    .map(lambda text: f"[{text}]"),
)
_SEGMENT = st.from_regex(r"[A-Za-z0-9\-._~!$&'()*+,;=:@]{1,12}", fullmatch=True).filter(
    lambda s: s not in (".", "..")
)
_BASE_URI = st.builds(
    lambda scheme, host, port, segments, slash: (
        f"{scheme}://{host}{'' if port is None else f':{port}'}"
        + "".join(f"/{s}" for s in segments)
        + ("/" if slash else "")
    ),
    st.sampled_from(["http", "https", "HTTP", "HttpS"]),
    _HOST,
    st.none() | st.integers(1, 65535),
    st.lists(_SEGMENT, max_size=4),
    st.booleans(),
)


def _server_accepts(uri: str) -> bool:
    try:
        parse_base_uri(uri)
    except InvalidBaseUri:
        return False
    return True


_SERVER_BASE_URI = _BASE_URI.filter(_server_accepts)
_ATTRIBUTION_KWARGS = st.fixed_dictionaries(
    {},
    optional={
        "user_id": _TEXT,
        "tags": st.one_of(_TEXT, st.lists(_TEXT, max_size=6)),
        "limit_ids": st.one_of(_LIMIT_ID_TEXT, st.lists(_LIMIT_ID_TEXT, max_size=4)),
        "use_case_id": _TEXT,
        "use_case_name": _TEXT,
        "use_case_version": st.one_of(_TEXT, st.integers(-(10**9), 10**9)),
        "logging_disable": st.booleans(),
        "base_uri": _SERVER_BASE_URI,
    },
)


def _as_items(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


@given(_ATTRIBUTION_KWARGS, _ATTRIBUTION_KWARGS)
@example(
    {"user_id": "outer", "tags": ["a", "b"], "logging_disable": True},
    {"user_id": " jos\u00e9 ", "tags": ["b", "c"], "logging_disable": False},
)
@example({}, {})
def test_what_the_client_accepts_the_server_reads_unchanged(
    outer_kwargs: dict[str, Any], inner_kwargs: dict[str, Any]
) -> None:
    try:
        outer_ctx = track_context(**outer_kwargs)
        inner_ctx = track_context(**inner_kwargs)
        with outer_ctx, inner_ctx as merged:
            raw = header_bytes()
    except InvalidAttribution:
        reject()

    # The client's values are the ones given, trimmed (inner scalars win, lists add up).
    def scalar(name: str) -> Any:
        for kwargs in (inner_kwargs, outer_kwargs):
            if kwargs.get(name) is not None:
                value = kwargs[name]
                return value if isinstance(value, bool) else str(value).strip()
        return None

    for name in ("user_id", "use_case_id", "use_case_name", "use_case_version", "base_uri"):
        assert getattr(merged, name) == scalar(name)
    assert merged.logging_disable == scalar("logging_disable")
    for name in ("tags", "limit_ids"):
        items = [
            item.strip()
            for kwargs in (outer_kwargs, inner_kwargs)
            for item in _as_items(kwargs.get(name, []))
        ]
        assert getattr(merged, name) == tuple(dict.fromkeys(items))

    # And the server reads exactly those values from the headers.
    server, user_id = _server_view(raw)
    assert user_id == merged.user_id
    assert server.tags == merged.tags
    assert server.limit_ids == merged.limit_ids
    assert server.use_case_id == merged.use_case_id
    assert server.use_case_name == merged.use_case_name
    assert server.use_case_version == merged.use_case_version
    assert server.logging_disabled is bool(merged.logging_disable)
    assert server.base_uri == merged.base_uri
    assert server.invalid_header is None
    assert set(raw) <= set(server.strip)


@given(
    st.one_of(
        st.from_regex(r"[A-Za-z0-9._:@-]{1,30}", fullmatch=True),
        st.from_regex(r"[ \t]?[A-Za-z0-9._:@-]{1,10}[ \t]?", fullmatch=True),
        # Near misses: strict text with one other character (any printable ASCII, or any).
        st.builds(
            lambda head, char, tail: head + char + tail,
            st.from_regex(r"[A-Za-z0-9._:@-]{0,6}", fullmatch=True),
            st.characters(min_codepoint=0x21, max_codepoint=0x7E) | st.characters(),
            st.from_regex(r"[A-Za-z0-9._:@-]{0,6}", fullmatch=True),
        ),
        _TEXT,
    )
)
@example("a b")
@example("jose\u0301")
@example("  alice  ")
@example("x" * 256)
def test_strict_user_ids_agree_with_the_server(raw: str) -> None:
    try:
        with track_context(user_id=raw):
            sent = header_bytes()
    except InvalidAttribution:
        sent = None
    configure(strict_user_ids=True)
    try:
        track_context(user_id=raw)
    except InvalidAttribution:
        strict_ok = False
    else:
        strict_ok = True
    finally:
        configure(strict_user_ids=False)
    if sent is None:
        assert not strict_ok  # strict only ever refuses more
        return
    candidate = header_candidate(sent)
    assert candidate is not None
    candidates = {"header": candidate}
    resolver = IdentityResolver(("jwt", "key", "header"), strict=True)
    identity = resolver.pick(candidates)
    assert identity is not None
    assert identity.source == "header"
    refused: str | None = None
    try:
        resolver.check(identity, candidates)
    except PolicyRefusal as refusal:
        refused = refusal.code
    assert refused in (None, "invalid_user_id")
    assert strict_ok == (refused is None)


@pytest.mark.parametrize(
    "char", [chr(c) for c in range(0x20, 0x7F)] + ["\u00e9", "\u0301", "\u00a0", "\uff21"]
)
def test_strict_user_ids_agree_with_the_server_char_by_char(char: str) -> None:
    raw = f"a{char}b"
    configure(strict_user_ids=True)
    try:
        track_context(user_id=raw)
    except InvalidAttribution:
        client_ok = False
    else:
        client_ok = True
    resolver = IdentityResolver(("header",), strict=True)
    identity = resolver.pick({"header": raw})
    assert identity is not None
    try:
        resolver.check(identity, {"header": raw})
    except PolicyRefusal:
        server_ok = False
    else:
        server_ok = True
    assert client_ok == server_ok


@given(
    st.one_of(
        st.text(st.sampled_from("abcXYZ019._:-"), max_size=135),
        st.text(st.sampled_from("aZ9._:- \t\n,/\u00e9\x00@"), max_size=16),
        _TEXT,
    )
)
@example("a" * 128)
@example("a" * 129)
@example("_leading-underscore")
@example(".leading-dot")
@example(" spaced ")
def test_limit_ids_follow_the_servers_limit_id_rule(raw: str) -> None:
    try:
        ctx = track_context(limit_ids=raw)
    except InvalidAttribution:
        accepted = False
    else:
        accepted = True
        with ctx as a:
            assert a.limit_ids == (raw.strip(),)
    # Trimmed first, like every list item (the server trims list items too) ...
    assert accepted == (server_limits._LIMIT_ID.fullmatch(raw.strip()) is not None)
    # ... so for a value without surrounding whitespace the rules are the same.
    if raw == raw.strip():
        assert accepted == (server_limits._LIMIT_ID.fullmatch(raw) is not None)


@pytest.mark.parametrize(
    "char", [chr(c) for c in range(0x20, 0x7F)] + ["\u00e9", "\u0660", "\uff21", "\u212a"]
)
@pytest.mark.parametrize("template", ["a{}b", "{}ab"])
def test_limit_ids_agree_with_the_server_char_by_char(template: str, char: str) -> None:
    raw = template.format(char)
    try:
        track_context(limit_ids=[raw])
    except InvalidAttribution:
        client_ok = False
    else:
        client_ok = True
    assert client_ok == (server_limits._LIMIT_ID.fullmatch(raw.strip()) is not None)


@pytest.mark.parametrize(
    "uri",
    [
        "http://localhost",
        "https://api.openai.com/v1",
        "HTTPS://API.Example.COM/v1/",
        "http://127.0.0.1:8001",
        "http://10.0.0.1:65535/a/b/c",
        "http://[::1]",
        "http://[::1]:8003/openai",
        "https://[2001:db8::1]:443/",
        "http://[2001:0DB8:0000:0000:0000:0000:0000:0001]/v1",
        "http://example.com./v1",
        "http://example.com/a@b/c:d/~x/!$&'()*+,;=",
        "http://xn--bcher-kva.example/v1",
    ],
)
def test_every_base_uri_the_server_accepts_the_client_accepts(uri: str) -> None:
    parse_base_uri(uri)  # a valid example for the server
    with track_context(base_uri=uri) as a:
        assert a.base_uri == uri
        assert parse_attribution(header_bytes()).base_uri == uri


@given(_SERVER_BASE_URI)
def test_generated_server_valid_base_uris_pass_the_client(uri: str) -> None:
    with track_context(base_uri=uri) as a:
        assert a.base_uri == uri
        assert parse_attribution(header_bytes()).base_uri == uri


@given(st.one_of(_BASE_URI, st.from_regex(r"(?i:https?)://[\x21-\x7e]{1,40}", fullmatch=True)))
def test_base_uri_client_accepts_all_the_server_accepts(uri: str) -> None:
    try:
        parse_base_uri(uri)
    except InvalidBaseUri:
        server_ok = False
    else:
        server_ok = True
    try:
        track_context(base_uri=uri)
    except InvalidAttribution:
        client_ok = False
    else:
        client_ok = True
    if server_ok:
        assert client_ok
    if not client_ok:
        assert not server_ok  # the client never refuses what the server would take


@given(st.text(max_size=60))
def test_base_uri_client_refusals_are_server_refusals(uri: str) -> None:
    try:
        track_context(base_uri=uri)
    except InvalidAttribution:
        with pytest.raises(InvalidBaseUri):
            parse_base_uri(uri)


# "\u017f" (long s) is "s" to a case-insensitive regex: the client must still refuse it.
@pytest.mark.parametrize(
    "uri",
    [
        "http://ex\u00e4mple.com",
        "http://example.com/caf\u00e9",
        "http://\u212aelvin.example",
        "http\u017f://example.com",
    ],
)
def test_non_ascii_base_uris_are_refused(uri: str) -> None:
    with pytest.raises(InvalidBaseUri):
        parse_base_uri(uri)
    with pytest.raises(InvalidAttribution, match="printable ASCII"):
        track_context(base_uri=uri)


# -- headers() and header_bytes() ---------------------------------------------------------------


def test_headers_gives_ascii_values_as_str() -> None:
    with track_context(
        user_id="alice",
        tags=["chat", "beta"],
        limit_ids=["team-a"],
        use_case_id="uc1",
        use_case_name="support",
        use_case_version=2,
        logging_disable=False,
        base_uri="https://upstream.example/v1",
    ):
        assert headers() == {
            "x-tollgate-user-id": "alice",
            "x-tollgate-tags": "chat,beta",
            "x-tollgate-limit-ids": "team-a",
            "x-tollgate-use-case-id": "uc1",
            "x-tollgate-use-case-name": "support",
            "x-tollgate-use-case-version": "2",
            "x-tollgate-logging-disable": "false",
            "x-tollgate-base-uri": "https://upstream.example/v1",
        }
        with track_context(logging_disable=True):
            assert headers()["x-tollgate-logging-disable"] == "true"
        assert header_bytes() == {name: value.encode() for name, value in headers().items()}


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"user_id": "jos\u00e9"}, "x-tollgate-user-id"),
        ({"tags": ["ok", "\u00fcber"]}, "x-tollgate-tags"),
        ({"use_case_name": "\U0001f600"}, "x-tollgate-use-case-name"),
    ],
)
def test_non_ascii_values_need_header_bytes(kwargs: dict[str, Any], name: str) -> None:
    with track_context(**kwargs):
        with pytest.raises(InvalidAttribution, match=f"{name} is not ASCII"):
            headers()
        value = header_bytes()[name]
        expected = ",".join(_as_items(next(iter(kwargs.values())))).encode("utf-8")
        assert value == expected


# -- @track -------------------------------------------------------------------------------------


def test_track_sync_function_gets_the_static_values() -> None:
    @track(user_id="nightly-report", tags=["batch"], use_case_version=1)
    def report(x: int, *, y: int = 0) -> tuple[int, Attribution]:
        """Builds the report."""
        return x + y, current()

    total, seen = report(1, y=2)
    assert total == 3
    assert seen == Attribution(user_id="nightly-report", tags=("batch",), use_case_version="1")
    assert current() == EMPTY
    assert report.__name__ == "report"
    assert report.__doc__ == "Builds the report."
    assert report.__qualname__.endswith("report")
    assert inspect.unwrap(report) is not report


async def test_track_async_function_gets_the_static_values() -> None:
    @track(user_id="worker", limit_ids="team-a")
    async def job() -> Attribution:
        await asyncio.sleep(0)
        return current()

    assert inspect.iscoroutinefunction(job)
    assert job.__name__ == "job"
    assert await job() == Attribution(user_id="worker", limit_ids=("team-a",))
    assert current() == EMPTY
    results = await asyncio.gather(job(), job())
    assert results == [Attribution(user_id="worker", limit_ids=("team-a",))] * 2


def test_track_arguments_are_evaluated_once() -> None:
    calls = 0

    def who() -> str:
        nonlocal calls
        calls += 1
        return f"user-{calls}"

    @track(user_id=who())
    def f() -> str | None:
        return current().user_id

    assert [f(), f(), f()] == ["user-1", "user-1", "user-1"]
    assert calls == 1


def test_track_static_user_wins_and_tags_add_to_the_outer_ones() -> None:
    @track(user_id="static", tags=["s"])
    def f() -> Attribution:
        return current()

    with track_context(user_id="outer", tags=["o"], use_case_name="uc") as outer:
        assert f() == Attribution(user_id="static", tags=("o", "s"), use_case_name="uc")
        assert current() is outer


def test_track_restores_when_the_function_raises() -> None:
    @track(user_id="static")
    def fails() -> None:
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        fails()
    assert current() == EMPTY


def test_track_refuses_generators() -> None:
    def gen() -> Iterator[int]:
        yield 1

    async def agen() -> AsyncIterator[int]:
        yield 1

    with pytest.raises(TypeError, match=r"cannot follow the generator .*\.gen\b"):
        track(user_id="u")(gen)
    with pytest.raises(TypeError, match=r"cannot follow the generator .*\.agen\b"):
        track(user_id="u")(agen)


async def test_track_follows_async_callables_that_are_not_async_def() -> None:
    """An object with an async ``__call__`` and a plain function returning a coroutine run
    their bodies when awaited, after the wrapper returned: they still get the values."""

    class Job:
        async def __call__(self) -> str | None:
            await asyncio.sleep(0)
            return current().user_id

    async def body() -> tuple[str | None, tuple[str, ...]]:
        return current().user_id, current().tags

    def returns_coroutine() -> Any:
        return body()

    assert await track(user_id="job")(Job())() == "job"
    with track_context(tags="outer"):
        assert await track(user_id="plain", tags="t")(returns_coroutine)() == (
            "plain",
            ("outer", "t"),
        )
    assert current() == EMPTY


def test_bare_track_raises_a_helpful_type_error() -> None:
    def f() -> None:
        pass

    # What `@track` without parentheses does.
    with pytest.raises(TypeError, match=r"write @track\(user_id=\.\.\.\), with parentheses"):
        track(f)


def test_track_refuses_a_non_callable_and_checks_values_at_decoration() -> None:
    decorate: Callable[[Any], Any] = track(user_id="u")
    with pytest.raises(TypeError, match="decorates a function, not int"):
        decorate(42)
    with pytest.raises(InvalidAttribution, match="user_id is empty"):
        track(user_id=" ")


def test_track_keeps_functools_wraps_attributes() -> None:
    def original(a: int) -> int:
        """Doc."""
        return a

    original.custom = "kept"  # type: ignore[attr-defined]
    wrapped = track(tags="t")(original)
    assert wrapped.__wrapped__ is original  # type: ignore[attr-defined]
    assert wrapped.custom == "kept"  # type: ignore[attr-defined]
    assert wrapped.__doc__ == "Doc."
    assert wrapped.__name__ == "original"
    assert inspect.signature(wrapped) == inspect.signature(original)


# -- instrument() and the SDKs -----------------------------------------------------------------


class Recorder:
    """A MockTransport handler that keeps every request it saw."""

    def __init__(self, body: Any = None) -> None:
        self.requests: list[httpx2.Request] = []
        self.body = {} if body is None else body
        self._lock = threading.Lock()

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        with self._lock:
            self.requests.append(request)
        return httpx2.Response(200, json=self.body)

    @property
    def last(self) -> httpx2.Request:
        return self.requests[-1]

    def transport(self) -> httpx2.MockTransport:
        return httpx2.MockTransport(self)


def _tollgate_raw(request: httpx2.Request) -> list[tuple[bytes, bytes]]:
    return [(k.lower(), v) for k, v in request.headers.raw if k.lower().startswith(b"x-tollgate-")]


def test_instrument_adds_the_current_context_headers() -> None:
    recorder = Recorder()
    with instrument(httpx2.Client(transport=recorder.transport())) as client:
        client.get("http://upstream.test/none")
        assert _tollgate_raw(recorder.last) == []
        with track_context(user_id="alice", tags=["a", "b"], logging_disable=True):
            client.get("http://upstream.test/some")
        assert _tollgate_raw(recorder.last) == [
            (b"x-tollgate-user-id", b"alice"),
            (b"x-tollgate-tags", b"a,b"),
            (b"x-tollgate-logging-disable", b"true"),
        ]
        client.get("http://upstream.test/after")
        assert _tollgate_raw(recorder.last) == []


def test_instrument_leaves_headers_the_request_sets() -> None:
    recorder = Recorder()
    client = httpx2.Client(
        transport=recorder.transport(), headers={"X-Tollgate-Tags": "from-defaults"}
    )
    with instrument(client), track_context(user_id="ctx-user", tags=["ctx"], limit_ids="l1"):
        client.get("http://upstream.test/", headers={"x-tollgate-user-id": "explicit"})
    sent = _tollgate_raw(recorder.last)
    assert sorted(sent) == sorted(
        [
            (b"x-tollgate-user-id", b"explicit"),
            (b"x-tollgate-tags", b"from-defaults"),
            (b"x-tollgate-limit-ids", b"l1"),
        ]
    )


def test_instrument_runs_after_the_apps_own_hooks() -> None:
    recorder = Recorder()

    def app_hook(request: httpx2.Request) -> None:
        request.headers["x-tollgate-user-id"] = "from-hook"

    client = httpx2.Client(transport=recorder.transport(), event_hooks={"request": [app_hook]})
    with instrument(client), track_context(user_id="ctx-user"):
        assert client.event_hooks["request"] == [app_hook, add_headers]
        client.get("http://upstream.test/")
    assert _tollgate_raw(recorder.last) == [(b"x-tollgate-user-id", b"from-hook")]


def test_instrument_twice_adds_one_hook() -> None:
    recorder = Recorder()
    client = httpx2.Client(transport=recorder.transport())
    assert instrument(client) is client
    assert instrument(client) is client
    assert client.event_hooks["request"] == [add_headers]
    with client, track_context(user_id="once"):
        client.get("http://upstream.test/")
    assert _tollgate_raw(recorder.last) == [(b"x-tollgate-user-id", b"once")]


def test_instrument_sends_utf8_values_as_utf8_bytes() -> None:
    recorder = Recorder()
    with (
        instrument(httpx2.Client(transport=recorder.transport())) as client,
        track_context(user_id="jos\u00e9", tags=["\u00fcber", "\U0001f600"]),
    ):
        client.get("http://upstream.test/")
    raw = dict(_tollgate_raw(recorder.last))
    assert raw[b"x-tollgate-user-id"] == "jos\u00e9".encode()
    assert raw[b"x-tollgate-tags"] == "\u00fcber,\U0001f600".encode()
    # And the server reads back what was set.
    assert header_candidate({k.decode(): v for k, v in raw.items()}) == "jos\u00e9"


def test_one_instrumented_client_serves_concurrent_threads() -> None:
    recorder = Recorder()
    n = 8
    barrier = threading.Barrier(n, timeout=10)
    client = instrument(httpx2.Client(transport=recorder.transport()))

    def call(i: int) -> None:
        with track_context(user_id=f"user-{i}"):
            barrier.wait()
            client.get(f"http://upstream.test/{i}")

    with client, ThreadPoolExecutor(max_workers=n) as pool:
        list(pool.map(call, range(n)))
    assert len(recorder.requests) == n
    for request in recorder.requests:
        i = request.url.path.strip("/")
        assert request.headers["x-tollgate-user-id"] == f"user-{i}"


async def test_instrument_async_client() -> None:
    recorder = Recorder()
    client = instrument(httpx2.AsyncClient(transport=recorder.transport()))
    assert client.event_hooks["request"] == [add_headers_async]
    instrument(client)
    assert client.event_hooks["request"] == [add_headers_async]

    async def call(i: int) -> None:
        async with track_context(user_id=f"user-{i}", tags=["async"]):
            await asyncio.sleep(0)
            await client.get(f"http://upstream.test/{i}")

    async with client:
        await asyncio.gather(*(call(i) for i in range(50)))
        await client.get("http://upstream.test/outside")
    assert len(recorder.requests) == 51
    for request in recorder.requests[:-1]:
        i = request.url.path.strip("/")
        assert request.headers["x-tollgate-user-id"] == f"user-{i}"
        assert request.headers["x-tollgate-tags"] == "async"
    assert _tollgate_raw(recorder.last) == []


@pytest.mark.parametrize("thing", [object(), "client", httpx2.MockTransport(lambda r: None)])
def test_instrument_refuses_what_is_not_an_http_client(thing: object) -> None:
    with pytest.raises(TypeError, match=r"instrument\(\) takes an openai or anthropic SDK client"):
        instrument(thing)


_CHAT_COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 0,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hi"},
            "finish_reason": "stop",
        }
    ],
}
_ANTHROPIC_MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "m",
    "content": [{"type": "text", "text": "hi"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 1, "output_tokens": 1},
}


def test_instrument_openai_sdk_client() -> None:
    recorder = Recorder(_CHAT_COMPLETION)
    client = openai.OpenAI(
        base_url="http://envoy.test:10000/v1",
        api_key="x",
        max_retries=0,
        default_headers={"x-tollgate-use-case-name": "sdk-default"},
        http_client=httpx2.Client(transport=recorder.transport()),
    )
    assert instrument(client) is client
    try:
        with track_context(user_id="alice", tags=["chat"], use_case_name="ctx-name"):
            answer = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hello"}]
            )
            assert answer.choices[0].message.content == "hi"
            request = recorder.last
            assert request.url.path == "/v1/chat/completions"
            assert request.headers["x-tollgate-user-id"] == "alice"
            assert request.headers["x-tollgate-tags"] == "chat"
            assert request.headers["x-tollgate-use-case-name"] == "sdk-default"

            client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "hello"}],
                extra_headers={"x-tollgate-user-id": "explicit"},
            )
            assert recorder.last.headers.get_list("x-tollgate-user-id") == ["explicit"]

            # Copies made with with_options share the instrumented transport.
            client.with_options(timeout=5).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hello"}]
            )
            assert recorder.last.headers["x-tollgate-user-id"] == "alice"
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert recorder.last.headers.get("x-tollgate-user-id") is None
    finally:
        client.close()


async def test_instrument_async_openai_sdk_client() -> None:
    recorder = Recorder(_CHAT_COMPLETION)
    client = instrument(
        openai.AsyncOpenAI(
            base_url="http://envoy.test:10000/v1",
            api_key="x",
            max_retries=0,
            http_client=httpx2.AsyncClient(transport=recorder.transport()),
        )
    )
    try:

        async def call(user: str) -> None:
            async with track_context(user_id=user):
                await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": user}]
                )

        await asyncio.gather(call("u1"), call("u2"), call("u3"))
        users = sorted(r.headers["x-tollgate-user-id"] for r in recorder.requests)
        assert users == ["u1", "u2", "u3"]
        for request in recorder.requests:
            body = json.loads(request.content)
            assert request.headers["x-tollgate-user-id"] == body["messages"][0]["content"]
    finally:
        await client.close()


def test_instrument_anthropic_sdk_client() -> None:
    recorder = Recorder(_ANTHROPIC_MESSAGE)
    client = instrument(
        anthropic.Anthropic(
            base_url="http://envoy.test:10000",
            api_key="x",
            max_retries=0,
            http_client=httpx2.Client(transport=recorder.transport()),
        )
    )
    try:
        with track_context(user_id="jos\u00e9", limit_ids=["team-a"], logging_disable=True):
            message = client.messages.create(
                model="m", max_tokens=1, messages=[{"role": "user", "content": "hello"}]
            )
        assert message.content[0].text == "hi"  # type: ignore[union-attr]
        request = recorder.last
        assert request.url.path == "/v1/messages"
        raw = dict(_tollgate_raw(request))
        assert raw == {
            b"x-tollgate-user-id": "jos\u00e9".encode(),
            b"x-tollgate-limit-ids": b"team-a",
            b"x-tollgate-logging-disable": b"true",
        }
    finally:
        client.close()


async def test_instrument_async_anthropic_sdk_client() -> None:
    recorder = Recorder(_ANTHROPIC_MESSAGE)
    client = instrument(
        anthropic.AsyncAnthropic(
            base_url="http://envoy.test:10000",
            api_key="x",
            max_retries=0,
            http_client=httpx2.AsyncClient(transport=recorder.transport()),
        )
    )
    try:
        async with track_context(user_id="async-anthropic"):
            await client.messages.create(
                model="m", max_tokens=1, messages=[{"role": "user", "content": "hello"}]
            )
        assert recorder.last.headers["x-tollgate-user-id"] == "async-anthropic"
    finally:
        await client.close()


def test_http_client_returns_an_instrumented_client() -> None:
    recorder = Recorder()
    with http_client(transport=recorder.transport()) as client:
        assert isinstance(client, httpx2.Client)
        assert client.event_hooks["request"] == [add_headers]
        with track_context(user_id="u"):
            client.get("http://upstream.test/")
    assert recorder.last.headers["x-tollgate-user-id"] == "u"

    with http_client(openai.DefaultHttpxClient, transport=recorder.transport()) as sdk_client:
        assert isinstance(sdk_client, openai.DefaultHttpxClient)
        assert sdk_client.event_hooks["request"] == [add_headers]
        with track_context(user_id="v"):
            sdk_client.get("http://upstream.test/")
    assert recorder.last.headers["x-tollgate-user-id"] == "v"


async def test_async_http_client_returns_an_instrumented_client() -> None:
    recorder = Recorder()
    async with async_http_client(transport=recorder.transport()) as client:
        assert isinstance(client, httpx2.AsyncClient)
        assert client.event_hooks["request"] == [add_headers_async]
        async with track_context(user_id="u"):
            await client.get("http://upstream.test/")
    assert recorder.last.headers["x-tollgate-user-id"] == "u"

    sdk_client = async_http_client(
        anthropic.DefaultAsyncHttpxClient, transport=recorder.transport()
    )
    async with sdk_client:
        assert isinstance(sdk_client, anthropic.DefaultAsyncHttpxClient)
        assert sdk_client.event_hooks["request"] == [add_headers_async]
        async with track_context(user_id="v"):
            await sdk_client.get("http://upstream.test/")
    assert recorder.last.headers["x-tollgate-user-id"] == "v"


def test_sdk_with_http_client_from_the_package() -> None:
    recorder = Recorder(_CHAT_COMPLETION)
    client = openai.OpenAI(
        base_url="http://envoy.test/v1",
        api_key="x",
        max_retries=0,
        http_client=http_client(openai.DefaultHttpxClient, transport=recorder.transport()),
    )
    try:
        with track_context(user_id="via-http-client"):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert recorder.last.headers["x-tollgate-user-id"] == "via-http-client"
    finally:
        client.close()


# -- import lightness ---------------------------------------------------------------------------

_HEAVY = ("grpc", "psycopg", "aiohttp", "google", "envoy", "httpx", "httpx2", "openai", "anthropic")


def test_importing_the_client_loads_nothing_heavy(tmp_path: Path) -> None:
    code = "import json, sys; import tollgate.client; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    modules = json.loads(done.stdout)
    assert "tollgate.client" in modules
    heavy = [m for m in modules if any(m == p or m.startswith(p + ".") for p in _HEAVY)]
    assert heavy == []
    server = [
        m
        for m in modules
        if m.startswith("tollgate.")
        and m != "tollgate.client"
        and not m.startswith("tollgate.client.")
    ]
    assert server == []


def test_client_sources_import_only_the_standard_library() -> None:
    files = sorted(CLIENT_DIR.rglob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "_attribution.py", "_context.py", "_httpx.py"}
    imported: list[str] = []
    offenders: list[str] = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    # Relative: fine inside the package itself, nowhere above it.
                    if node.level > 1:
                        offenders.append(f"{path.name}: relative import level {node.level}")
                    continue
                names = [node.module or ""]
            else:
                continue
            for name in names:
                imported.append(name)
                allowed = (
                    name == "__future__"
                    or name.split(".")[0] in sys.stdlib_module_names
                    or name == "tollgate.client"
                    or name.startswith("tollgate.client.")
                )
                if not allowed:
                    offenders.append(f"{path.name}: {name}")
    assert "tollgate.client._attribution" in imported  # the scan saw the real imports
    assert offenders == []

"""Tests for the pure parts of bench/run.py: what each scenario sends, how streams are
counted, the per-event arithmetic, the wrk script and the report's tables and ledger check."""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import yaml

from bench import run as bench
from tollgate.fakeprovider import serve

CHAT_SIZED = ("chat", "chat-body-user", "stream-paced", "stream", "stream-usage")
STREAMS = ("stream-paced", "stream", "stream-usage")


def payload(name: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(bench.SCENARIOS[name].body())
    return body


# -- what each scenario sends ----------------------------------------------------------------


def test_scenarios_are_the_seven_in_order() -> None:
    assert list(bench.SCENARIOS) == [
        "chat",
        "chat-body-user",
        "stream-paced",
        "stream",
        "stream-usage",
        "chat-1mb",
        "unmetered",
    ]


@pytest.mark.parametrize("name", CHAT_SIZED)
def test_chat_bodies_are_about_one_kilobyte(name: str) -> None:
    body = bench.SCENARIOS[name].body()
    assert 1000 <= len(body) <= 1100
    document = json.loads(body)
    assert document["model"] == bench.MODEL
    (message,) = document["messages"]
    assert message["role"] == "user"
    assert message["content"].startswith(bench.PROMPT)
    assert message["content"].isascii()


def test_body_is_padded_to_exactly_its_size() -> None:
    scenario = bench.Scenario("x", "test", body_bytes=777)
    assert len(scenario.body()) == 777
    with pytest.raises(bench.BenchError):
        bench.Scenario("tiny", "test", body_bytes=20).body()


def test_large_body_is_one_mebibyte_in_one_message() -> None:
    body = bench.SCENARIOS["chat-1mb"].body()
    assert len(body) == 1024 * 1024
    document = json.loads(body)
    assert len(document["messages"]) == 1
    assert len(document["messages"][0]["content"]) > 1_000_000
    assert "stream" not in document


def test_user_in_header_or_body() -> None:
    chat = bench.user_headers(bench.SCENARIOS["chat"])
    assert [h["x-tollgate-user-id"] for h in chat] == [f"bench-user-{n}" for n in range(1, 9)]
    assert "user" not in payload("chat")

    (only,) = bench.user_headers(bench.SCENARIOS["chat-body-user"])
    assert "x-tollgate-user-id" not in only
    assert payload("chat-body-user")["user"] == bench.BODY_USER


def test_non_streaming_scenarios_set_no_stream_knobs() -> None:
    for name in ("chat", "chat-body-user", "chat-1mb"):
        assert "stream" not in payload(name)
        for headers in bench.user_headers(bench.SCENARIOS[name]):
            assert headers["Content-Type"] == "application/json"
            assert bench.WORDS_HEADER not in headers
            assert bench.CHUNK_DELAY_HEADER not in headers


def test_stream_flags_and_include_usage() -> None:
    for name in ("stream-paced", "stream"):
        document = payload(name)
        assert document["stream"] is True
        assert "stream_options" not in document  # left to Tollgate
    usage = payload("stream-usage")
    assert usage["stream"] is True
    assert usage["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(("name", "delay"), [("stream-paced", "2"), ("stream", "0")])
def test_stream_knob_headers(name: str, delay: str) -> None:
    for headers in bench.user_headers(bench.SCENARIOS[name]):
        assert headers[bench.WORDS_HEADER] == "200"
        assert headers[bench.CHUNK_DELAY_HEADER] == delay
    (paced_usage, *_) = bench.user_headers(bench.SCENARIOS["stream-usage"])
    assert paced_usage[bench.CHUNK_DELAY_HEADER] == "2"


def test_unmetered_is_a_get_without_body() -> None:
    scenario = bench.SCENARIOS["unmetered"]
    assert scenario.method == "GET"
    assert scenario.path == "/v1/models"
    assert scenario.body() == b""
    headers = bench.user_headers(scenario)
    assert len(headers) == bench.USERS
    assert all("Content-Type" not in h for h in headers)
    assert all(h["x-tollgate-user-id"].startswith("bench-user-") for h in headers)


# -- counting a stream -----------------------------------------------------------------------


def sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def chat_stream(words: int, *, usage: bool) -> bytes:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    parts = [chunk({"role": "assistant", "content": ""})]
    parts += [chunk({"content": f" w{i}"}) for i in range(words)]
    parts.append(chunk({}, "stop"))
    if usage:
        parts.append(sse({"choices": [], "usage": {"prompt_tokens": 3}}))
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


def test_stream_shape_counts_data_events() -> None:
    assert bench.stream_shape(chat_stream(200, usage=False)) == bench.StreamShape(203, 200, False)
    assert bench.stream_shape(chat_stream(200, usage=True)) == bench.StreamShape(204, 200, True)


def test_stream_shape_crlf_comments_and_empty() -> None:
    raw = chat_stream(3, usage=False).replace(b"\n", b"\r\n")
    assert bench.stream_shape(b": keep-alive\r\n\r\n" + raw) == bench.StreamShape(6, 3, False)
    assert bench.stream_shape(b"") == bench.StreamShape(0, 0, False)


@pytest.fixture
async def fake_port() -> AsyncIterator[int]:
    runner, port = await serve("127.0.0.1", 0)
    try:
        yield port
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("name", STREAMS)
async def test_the_fake_streams_what_the_scenarios_ask_for(fake_port: int, name: str) -> None:
    scenario = bench.SCENARIOS[name]
    headers = bench.user_headers(scenario)[0]
    url = f"http://127.0.0.1:{fake_port}{scenario.path}"
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, data=scenario.body(), headers=headers) as resp,
    ):
        assert resp.status == 200
        raw = await resp.read()
    shape = bench.stream_shape(raw)
    assert shape.content_events == bench.STREAM_WORDS
    assert shape.usage_chunk is scenario.client_include_usage
    assert shape.events == bench.STREAM_WORDS + 3 + shape.usage_chunk


async def test_the_fake_answers_the_unmetered_get(fake_port: int) -> None:
    scenario = bench.SCENARIOS["unmetered"]
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            scenario.method,
            f"http://127.0.0.1:{fake_port}{scenario.path}",
            headers=bench.user_headers(scenario)[0],
        ) as resp,
    ):
        assert resp.status == 200
        assert (await resp.json())["object"] == "list"


# -- arithmetic ------------------------------------------------------------------------------


def test_per_event_divides_each_process_by_the_events() -> None:
    per = bench.per_event({"tollgate": 4060.0, "tollgate_envoy": 812.0}, 203)
    assert per == pytest.approx({"tollgate": 20.0, "tollgate_envoy": 4.0})
    assert bench.per_event({"tollgate": 1.0}, None) is None
    assert bench.per_event({"tollgate": 1.0}, 0) is None
    assert bench.per_event(None, 203) is None


def test_cpu_requests_counts_the_late_ones_of_the_python_generator() -> None:
    wrk = bench.RunStats(100, 98, 2, 2.0, 1.0, 2.0, ok_total=98)
    assert wrk.cpu_requests == 100
    python = bench.RunStats(100, 98, 2, 2.0, 1.0, 2.0, ok_total=110)
    assert python.cpu_requests == 112
    assert python.rps == 49.0


# -- the wrk script --------------------------------------------------------------------------


def test_wrk_script_for_a_get_sends_no_body() -> None:
    script = bench.wrk_script(bench.SCENARIOS["unmetered"])
    assert 'local method = "GET"\n' in script
    assert "local body = nil\n" in script
    assert "wrk.format(method, nil, headers, body)" in script
    assert '["x-tollgate-user-id"] = "bench-user-8"' in script
    assert "Content-Type" not in script


def test_wrk_script_for_a_post_carries_body_and_knobs() -> None:
    scenario = bench.SCENARIOS["stream-paced"]
    script = bench.wrk_script(scenario)
    assert 'local method = "POST"\n' in script
    assert f"local body = {bench._lua_string(scenario.body().decode())}\n" in script
    assert '["x-fake-words"] = "200"' in script
    assert '["x-fake-chunk-delay-ms"] = "2"' in script
    assert script.count('["Content-Type"] = "application/json"') == bench.USERS
    # the done hook prints one JSON line with these keys
    for key in ("completed", "duration_us", "status", "timeout", "p50_us", "p99_us"):
        assert f'\\"{key}\\":%d' in script


def test_lua_string_escapes_and_refuses_non_ascii() -> None:
    assert bench._lua_string('a "b" \\c') == '"a \\"b\\" \\\\c"'
    with pytest.raises(bench.BenchError):
        bench._lua_string("caf\u00e9")


# -- the report ------------------------------------------------------------------------------


def measurement(
    scenario: str,
    path: str,
    rps: float,
    p50: float,
    p99: float,
    cpu: dict[str, float] | None = None,
    events: int | None = None,
) -> bench.Measurement:
    return bench.Measurement(
        scenario=scenario,
        concurrency=16,
        path=path,
        rps=rps,
        p50_ms=p50,
        p99_ms=p99,
        errors=0,
        completed=int(rps * 2),
        ok=int(rps * 2),
        duration_s=2.0,
        warmup_ok=int(rps),
        ok_total=int(rps * 2),
        cpu_us_per_request=cpu,
        rss_mib={"tollgate": 80.0, "tollgate_envoy": 40.0} if path == "tollgate" else None,
        sse_events=events,
        cpu_us_per_event=bench.per_event(cpu, events),
    )


def synthetic() -> list[bench.Measurement]:
    return [
        measurement("chat", "direct", 1000.0, 1.0, 2.0),
        measurement("chat", "bare", 800.0, 1.5, 3.0, {"bare_envoy": 100.0}),
        measurement(
            "chat",
            "tollgate",
            400.0,
            4.0,
            9.0,
            {"tollgate": 900.0, "tollgate_envoy": 250.0, "postgres": 30.0},
        ),
        measurement("stream", "direct", 50.0, 10.0, 20.0, None, 203),
        measurement("stream", "bare", 50.0, 11.0, 21.0, {"bare_envoy": 406.0}, 203),
        measurement(
            "stream",
            "tollgate",
            25.0,
            30.0,
            60.0,
            {"tollgate": 4060.0, "tollgate_envoy": 812.0, "postgres": 40.0},
            203,
        ),
    ]


def test_ratios_and_added_latency() -> None:
    rows = {(r["scenario"], r["comparison"]): r for r in bench.ratios(synthetic())}
    chat = rows[("chat", "tollgate/bare")]
    assert chat["throughput_ratio"] == pytest.approx(0.5)
    assert chat["p50_ratio"] == pytest.approx(4.0 / 1.5)
    assert chat["p50_added_ms"] == pytest.approx(2.5)
    assert chat["p99_added_ms"] == pytest.approx(6.0)
    proxy = rows[("chat", "bare/direct")]
    assert proxy["throughput_ratio"] == pytest.approx(0.8)
    assert proxy["p50_added_ms"] == pytest.approx(0.5)
    assert len(rows) == 4


def test_markdown_tables() -> None:
    results = synthetic()
    text = bench.markdown(results, bench.ratios(results), ["## header"])
    lines = text.splitlines()
    assert lines[0] == "## header"
    assert "| chat | 16 | Envoy + Tollgate | 400.0 | 4.00 | 9.00 | 0 | 800 |" in lines
    assert (
        "| chat | 16 | Envoy+Tollgate / bare Envoy | 0.50x | 2.67x | 3.00x | 2.50 | 6.00 |" in lines
    )
    # cost per request: Tollgate, its Envoy, bare Envoy, their ratio, Postgres, RSS
    assert "| chat | 16 | 900 | 250 | 100 | 2.50x | 30 | 80 / 40 |" in lines
    # cost per SSE event only for the stream scenario: 4060/203, 812/203, 406/203
    assert "| stream | 16 | 203 | 20 | 4.0 | 2.0 |" in lines
    event_table = lines[
        lines.index(
            "| scenario | conc. | events/response | Tollgate µs | its Envoy µs | bare Envoy µs |"
        ) :
    ]
    assert not any(line.startswith("| chat |") for line in event_table)


def test_no_event_table_without_streams() -> None:
    chat_only = [m for m in synthetic() if m.scenario == "chat"]
    assert bench.event_lines(chat_only) == []
    assert "events/response" not in bench.markdown(chat_only, bench.ratios(chat_only), [])


def test_soak_lines_compare_with_the_goal() -> None:
    result = bench.SoakResult(
        requested=1000,
        ok=1010,
        errors=0,
        runs=2,
        duration_s=3.0,
        rss_before_mib={"tollgate": 80.0, "tollgate_envoy": 60.0},
        rss_after_mib={"tollgate": 99.0, "tollgate_envoy": 61.0},
        samples=[
            {"ok": 500.0, "tollgate": 101.0, "tollgate_envoy": 60.5},
            {"ok": 1010.0, "tollgate": 99.0, "tollgate_envoy": 61.0},
        ],
    )
    lines = bench.soak_lines(result)
    assert "| Tollgate | 80.0 | 99.0 | +19.0 | 101.0 | NO |" in lines  # 99 MiB > 100 MB
    assert "| its Envoy | 60.0 | 61.0 | +1.0 | 61.0 | yes |" in lines


# -- the ledger check ------------------------------------------------------------------------


def test_ledger_expectation_per_endpoint() -> None:
    results = [
        *synthetic(),
        measurement("unmetered", "direct", 100.0, 1.0, 1.0),
        measurement("unmetered", "tollgate", 100.0, 1.0, 1.0),
    ]
    scenarios = [bench.SCENARIOS[n] for n in ("chat", "stream", "unmetered")]
    soak = bench.SoakResult(50, 60, 0, 3, 1.0, {}, {}, [])
    wrk = bench.ledger_expectation(
        results, scenarios, warmup=True, wrk=True, probes=1, soak_result=soak
    )
    # tollgate rows: warm-up (rps) + measured (2 * rps); chat 400, stream 25, probes, soak
    assert wrk.ok == {"/v1/chat/completions": 1200 + 75 + 1 + 60, "/v1/models": 300}
    assert wrk.cut_off == {"/v1/chat/completions": 2 * 16 * 2 + 3 * 16, "/v1/models": 2 * 16}
    python = bench.ledger_expectation(results, scenarios, warmup=False, wrk=False)
    assert python.ok == {"/v1/chat/completions": 1275, "/v1/models": 300}
    assert python.cut_off == {"/v1/chat/completions": 0, "/v1/models": 0}


def ledger(
    rows_by_endpoint: dict[str, int], ok: dict[str, int], cut: dict[str, int]
) -> dict[str, Any]:
    return {
        "rows": sum(rows_by_endpoint.values()),
        "rows_by_outcome": {"ok": sum(ok.values())},
        "rows_by_endpoint": rows_by_endpoint,
        "distinct_users": 8,
        "client_ok_responses": sum(ok.values()),
        "client_ok_by_endpoint": ok,
        "max_cut_off_requests": sum(cut.values()),
        "max_cut_off_by_endpoint": cut,
    }


def test_ledger_summary_by_endpoint() -> None:
    text = bench.ledger_summary(
        ledger(
            {"/v1/chat/completions": 105, "/v1/models": 50, bench.NO_ENDPOINT: 3},
            {"/v1/chat/completions": 100, "/v1/models": 50},
            {"/v1/chat/completions": 16, "/v1/models": 16},
        )
    )
    first, *rest = text.splitlines()
    assert "158 rows" in first
    assert "Difference +8, within the expected 0..32" in first
    assert rest == [
        "- /v1/chat/completions: 105 rows, 100 successful responses."
        " Difference +5, within the expected 0..16.",
        "- /v1/models: 50 rows, 50 successful responses. They match.",
        "- no endpoint: 3 rows (requests the load generator cut off, counted in the total above).",
    ]


def test_ledger_summary_flags_a_missing_endpoint() -> None:
    text = bench.ledger_summary(
        ledger({"/v1/chat/completions": 100}, {"/v1/chat/completions": 100, "/v1/models": 40}, {})
    )
    assert "Difference -40, OUTSIDE the expected 0..0" in text
    assert "- /v1/models: 0 rows, 40 successful responses. Difference -40, OUTSIDE" in text


def test_ledger_summary_single_endpoint_is_one_line() -> None:
    text = bench.ledger_summary(
        ledger({"/v1/chat/completions": 9}, {"/v1/chat/completions": 9}, {})
    )
    assert text.endswith("They match.")
    assert "\n" not in text


# -- command line ----------------------------------------------------------------------------


def test_scenario_names() -> None:
    assert bench._scenario_names("all") == list(bench.SCENARIOS)
    assert bench._scenario_names("none") == []
    assert bench._scenario_names("unmetered, chat,unmetered") == ["unmetered", "chat"]
    with pytest.raises(argparse.ArgumentTypeError):
        bench._scenario_names("chat,nope")


def test_plans() -> None:
    def plan(*argv: str) -> bench.Plan:
        return bench._plan(bench._parser().parse_args(list(argv)))

    default = plan()
    assert [s.name for s in default.scenarios] == list(bench.SCENARIOS)
    assert (default.concurrencies, default.duration_s, default.warmup_s) == ([1, 16], 8, 2)
    assert default.soak == 0
    quick = plan("--quick")
    assert (quick.concurrencies, quick.duration_s, quick.warmup_s) == ([16], 2, 1)
    assert len(quick.scenarios) == 7
    assert quick.estimated_s() == 7 * 3 * 3
    soak_only = plan("--scenario", "none", "--soak", "100000")
    assert (soak_only.scenarios, soak_only.soak) == ([], 100_000)
    with pytest.raises(SystemExit):
        plan("--scenario", "none")
    with pytest.raises(SystemExit):
        plan("--soak", "0")


# -- the soak and a failing run, with a scripted load generator ------------------------------


class ScriptedLoad:
    """A load generator answering ``rate`` requests per second of each run, or failing."""

    name = "scripted"

    def __init__(self, rate: int, fail: bool = False) -> None:
        self.rate = rate
        self.fail = fail
        self.runs: list[tuple[str, int, int]] = []

    def version(self) -> str:
        return "1"

    def run(
        self, url: str, scenario: bench.Scenario, concurrency: int, duration_s: int
    ) -> bench.RunStats:
        self.runs.append((url, concurrency, duration_s))
        if self.fail:
            raise bench.BenchError("wrk failed")
        ok = self.rate * duration_s
        return bench.RunStats(ok, ok, 0, float(duration_s), 1.0, 2.0, ok_total=ok)


def stack(gone: list[str]) -> bench.Stack:
    rss = iter(range(100, 1000))

    def procs() -> list[Any]:
        return []

    groups = bench.ProcessGroups({g: procs for g in bench.GROUP_ORDER})
    # RSS grows by one MiB per snapshot (0 CPU): replace the snapshot with a counter
    groups.snapshot = lambda names: {g: (0.0, float(next(rss))) for g in names}  # type: ignore[method-assign]
    return bench.Stack(
        bases={p: f"http://127.0.0.1:1/{p}" for p in bench.PATHS},
        database_url="postgresql://unused",
        processes=groups,
        gone=lambda: gone,
    )


def test_soak_runs_until_n_requests_in_chunks_sized_by_rate() -> None:
    load = ScriptedLoad(rate=1000)
    result = bench.soak(25_500, stack([]), load)
    # 1 s to measure the rate, 10 s chunks, then the 4.5 s left rounded up
    assert result.ok == 26_000
    assert [d for _, _, d in load.runs] == [1, 10, 10, 5]
    assert all(c == bench.SOAK_CONCURRENCY for _, c, _ in load.runs)
    assert all(u == "http://127.0.0.1:1/tollgate/v1/chat/completions" for u, _, _ in load.runs)
    assert result.runs == 4
    assert len(result.samples) == 4
    assert result.rss_before_mib["tollgate"] < result.rss_after_mib["tollgate"]
    assert result.samples[-1]["ok"] == 26_000.0


def test_a_failed_run_names_the_processes_gone() -> None:
    scenario = bench.SCENARIOS["chat"]
    dead = stack(["`tollgate up` exited with code -9 (see tollgate.log)"])
    with pytest.raises(bench.BenchError, match=r"wrk failed\n`tollgate up` exited with code -9"):
        dead.run(ScriptedLoad(1, fail=True), "http://x", scenario, 1, 1)
    with pytest.raises(bench.BenchError, match=r"^wrk failed$"):
        stack([]).run(ScriptedLoad(1, fail=True), "http://x", scenario, 1, 1)


def test_bare_envoy_keeps_only_the_routing_filters() -> None:
    text = bench.bare_envoy_yaml("http://127.0.0.1:9999", 8080)
    config = yaml.safe_load(text)
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    names = [f["name"] for f in manager["typed_config"]["http_filters"]]
    assert names == list(bench.BARE_FILTERS)
    assert "json_to_metadata" not in text
    assert "ext_proc" not in yaml.safe_dump(config)

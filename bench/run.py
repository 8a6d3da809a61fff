#!/usr/bin/env python3
"""Benchmark: direct upstream vs bare Envoy vs Envoy + Tollgate, measured in one run.

Three paths to the same fake upstream (``python -m tollgate.fakeprovider``):

* ``direct``   client → fake upstream
* ``bare``     client → Envoy without the ext_proc filter → fake upstream
* ``tollgate`` client → Envoy with ext_proc → Tollgate (own process, real ledger writer,
  real Postgres) → fake upstream

Scenarios (see SCENARIOS): ``chat`` and ``chat-body-user`` (1 KB non-streaming chat, the
user in a header or in the body), ``stream-paced``, ``stream`` and ``stream-usage`` (200
content events, 2 ms apart or unpaced; the first two leave ``include_usage`` to Tollgate),
``chat-1mb`` (a 1 MB request body) and ``unmetered`` (``GET /v1/models``).

For each scenario and concurrency the three paths are measured back to back (so slow drift
of the machine hits all three alike), then the ratios tollgate/bare and bare/direct, the
added latency and the CPU per request (and per SSE event) of each process are printed as
Markdown and everything is written to ``bench/results/<timestamp>.json``. ``--soak N``
then sends N chat requests through Envoy + Tollgate and prints their RSS before and after.

Load comes from ``wrk`` when it is on PATH (one thread, a generated Lua script), otherwise
from an asyncio + aiohttp generator in this process. Everything, including the load
generator, shares the machine's cores: the numbers are for comparing paths, not capacity.

Usage: ``python bench/run.py [--duration S] [--warmup S] [--concurrency 1,16]
[--scenario all|none|NAME[,NAME...]] [--loadgen auto|wrk|python] [--quick] [--soak N]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final, Protocol
from urllib.parse import urlsplit

import aiohttp
import psutil
import psycopg
import yaml

from tollgate.config import load_settings
from tollgate.envoyconf import EXTPROC_CLUSTER, render_yaml
from tollgate.localstack import (
    EmbeddedPostgres,
    EnvoyProcess,
    FakeProviderProcess,
    envoy_binary,
    free_port,
)

BENCH_DIR: Final = Path(__file__).resolve().parent
RESULTS_DIR: Final = BENCH_DIR / "results"

PATHS: Final = ("direct", "bare", "tollgate")
PATH_LABELS: Final = {
    "direct": "direct",
    "bare": "bare Envoy",
    "tollgate": "Envoy + Tollgate",
}
EXTPROC_FILTER: Final = "envoy.filters.http.ext_proc"
CHAT_PATH: Final = "/v1/chat/completions"
MODELS_PATH: Final = "/v1/models"
MODEL: Final = "gpt-4o-mini"
USERS: Final = 8  # requests cycle through x-tollgate-user-id bench-user-1 .. bench-user-8
BODY_USER: Final = "bench-body-user"
PROMPT: Final = "Say hello to the benchmark, briefly."
CHAT_BODY_BYTES: Final = 1024
LARGE_BODY_BYTES: Final = 1024 * 1024
STREAM_WORDS: Final = 200  # content events per streamed reply (the fake's x-fake-words)
STREAM_DELAY_MS: Final = 2  # between the events of the paced streams (x-fake-chunk-delay-ms)
WORDS_HEADER: Final = "x-fake-words"
CHUNK_DELAY_HEADER: Final = "x-fake-chunk-delay-ms"
SOAK_CONCURRENCY: Final = 16
SOAK_CHUNK_S: Final = 10  # the soak runs in chunks of at most this many seconds
RSS_GOAL_BYTES: Final = 100 * 1000 * 1000  # "RSS per process ≤ 100 MB"
REQUEST_TIMEOUT_S: Final = 10.0
READY_TIMEOUT_S: Final = 90.0
LEDGER_WAIT_S: Final = 5.0
NO_ENDPOINT: Final = "(none)"  # ledger rows without an endpoint


class BenchError(RuntimeError):
    """The benchmark could not set up, run or read a measurement."""


# -- what is sent ----------------------------------------------------------------------------


def _dumps(payload: object) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _filler(chars: int) -> str:
    """``chars`` characters of plain ASCII words (one byte each in JSON, no escapes)."""
    unit = " lorem ipsum dolor sit amet"
    return (unit * (chars // len(unit) + 1))[:chars]


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str  # one line for the report
    method: str = "POST"  # GET sends no body
    path: str = CHAT_PATH
    stream: bool = False
    # The client sets stream_options.include_usage itself (otherwise Tollgate injects it
    # and removes the usage chunk on the way back).
    client_include_usage: bool = False
    # The end user in the body's `user` (Tollgate must read the body) instead of a header.
    body_user: bool = False
    body_bytes: int = CHAT_BODY_BYTES  # the JSON body is padded to exactly this size
    words: int | None = None  # reply length asked of the fake (x-fake-words)
    chunk_delay_ms: int | None = None  # between streamed events (x-fake-chunk-delay-ms)

    @property
    def has_body(self) -> bool:
        return self.method == "POST"

    def _payload(self, content: str) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": content}],
        }
        if self.stream:
            payload["stream"] = True
            if self.client_include_usage:
                payload["stream_options"] = {"include_usage": True}
        if self.body_user:
            payload["user"] = BODY_USER
        return payload

    def body(self) -> bytes:
        """The request body: compact JSON of exactly ``body_bytes`` (empty for a GET)."""
        if not self.has_body:
            return b""
        pad = self.body_bytes - len(_dumps(self._payload(PROMPT)))
        if pad < 0:
            raise BenchError(f"{self.name}: {self.body_bytes} bytes is too small for the body")
        body = _dumps(self._payload(PROMPT + _filler(pad)))
        assert len(body) == self.body_bytes
        return body


SCENARIOS: Final = {
    s.name: s
    for s in (
        Scenario("chat", "non-streaming chat, 1 KB body, user in x-tollgate-user-id"),
        Scenario(
            "chat-body-user", "non-streaming chat, 1 KB body, user in the body", body_user=True
        ),
        Scenario(
            "stream-paced",
            f"stream of {STREAM_WORDS} content events {STREAM_DELAY_MS} ms apart, no"
            " stream_options (Tollgate injects include_usage and hides the usage chunk)",
            stream=True,
            words=STREAM_WORDS,
            chunk_delay_ms=STREAM_DELAY_MS,
        ),
        Scenario(
            "stream",
            f"the same stream of {STREAM_WORDS} content events, unpaced (delay 0)",
            stream=True,
            words=STREAM_WORDS,
            chunk_delay_ms=0,
        ),
        Scenario(
            "stream-usage",
            f"stream of {STREAM_WORDS} content events {STREAM_DELAY_MS} ms apart, the client"
            " sets stream_options.include_usage",
            stream=True,
            client_include_usage=True,
            words=STREAM_WORDS,
            chunk_delay_ms=STREAM_DELAY_MS,
        ),
        Scenario(
            "chat-1mb",
            "non-streaming chat, 1 MiB body (one long message), user in a header",
            body_bytes=LARGE_BODY_BYTES,
        ),
        Scenario(
            "unmetered",
            "the fake's model list, user in a header: nothing to meter",
            method="GET",
            path=MODELS_PATH,
        ),
    )
}


def user_headers(scenario: Scenario) -> list[dict[str, str]]:
    """The header sets requests cycle through: one per user, or one with the user in the body."""
    base: dict[str, str] = {}
    if scenario.has_body:
        base["Content-Type"] = "application/json"
    if scenario.words is not None:
        base[WORDS_HEADER] = str(scenario.words)
    if scenario.chunk_delay_ms is not None:
        base[CHUNK_DELAY_HEADER] = str(scenario.chunk_delay_ms)
    if scenario.body_user:
        return [base]
    return [{**base, "x-tollgate-user-id": f"bench-user-{n}"} for n in range(1, USERS + 1)]


@dataclass(frozen=True)
class StreamShape:
    """What one streamed response carries, as the client sees it."""

    events: int  # SSE events with a data: line, [DONE] included
    content_events: int  # chunks whose delta has non-empty content
    usage_chunk: bool  # a chunk with a usage object (the include_usage chunk)


def stream_shape(raw: bytes) -> StreamShape:
    """Count the ``data:`` events of an OpenAI chat stream (LF or CRLF framed)."""
    events = content = 0
    usage = False
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = [ln[5:].strip() for ln in block.split(b"\n") if ln.startswith(b"data:")]
        if not data:
            continue
        events += 1
        text = b"\n".join(data)
        if text == b"[DONE]":
            continue
        try:
            chunk = json.loads(text)
        except ValueError:
            continue
        if not isinstance(chunk, dict):
            continue
        if chunk.get("usage"):
            usage = True
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict) and delta.get("content"):
                content += 1
    return StreamShape(events, content, usage)


# -- what is measured ------------------------------------------------------------------------


@dataclass
class RunStats:
    """One load run against one URL."""

    completed: int  # responses received within the measured window
    ok: int  # of those, 2xx
    errors: int  # non-2xx responses + socket errors + timeouts
    duration_s: float
    p50_ms: float | None
    p99_ms: float | None
    # 2xx responses the client saw in total, including ones that finished after the window
    # (the Python generator lets in-flight requests finish; wrk cuts them off).
    ok_total: int

    @property
    def rps(self) -> float:
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def cpu_requests(self) -> int:
        """The requests whose CPU a snapshot after the run holds: the completed ones, and
        for the Python generator also those it let finish after the window."""
        return self.completed + self.ok_total - self.ok


@dataclass
class Measurement:
    scenario: str
    concurrency: int
    path: str
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int
    completed: int
    ok: int
    duration_s: float
    warmup_ok: int
    ok_total: int
    # CPU µs per completed request and RSS (MiB) at the end, per process group of the path
    # (tollgate: its Python process, its Envoy, Postgres; bare: bare Envoy).
    cpu_us_per_request: dict[str, float] | None = None
    rss_mib: dict[str, float] | None = None
    # Stream scenarios: SSE events per response (counted once at start-up on the direct
    # path) and cpu_us_per_request divided by it.
    sse_events: int | None = None
    cpu_us_per_event: dict[str, float] | None = None


def per_event(
    cpu_us_per_request: dict[str, float] | None, events: int | None
) -> dict[str, float] | None:
    """CPU µs per SSE event: the per-request figures over the events one response carries."""
    if not cpu_us_per_request or not events:
        return None
    return {group: us / events for group, us in cpu_us_per_request.items()}


# -- per-process CPU and memory (from /proc, via psutil) -------------------------------------

# Which process groups each path exercises.
PATH_GROUPS: Final = {
    "direct": (),
    "bare": ("bare_envoy",),
    "tollgate": ("tollgate", "tollgate_envoy", "postgres"),
}
GROUP_LABELS: Final = {
    "tollgate": "Tollgate",
    "tollgate_envoy": "its Envoy",
    "postgres": "Postgres",
    "bare_envoy": "bare Envoy",
}
GROUP_ORDER: Final = tuple(GROUP_LABELS)


def _with_children(pid: int | None) -> list[psutil.Process]:
    if pid is None:
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _cpu_and_rss(procs: list[psutil.Process]) -> tuple[float, float]:
    """Summed user+system CPU seconds and RSS MiB of ``procs`` (gone ones count 0)."""
    cpu = rss = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = proc.cpu_times()
            cpu += times.user + times.system
            rss += proc.memory_info().rss / 2**20
    return cpu, rss


@dataclass
class ProcessGroups:
    """Finds each group's processes afresh at every snapshot (Postgres backends come and
    go; a backend that exits between snapshots takes its CPU with it, so Postgres' figure is
    a lower bound)."""

    finders: dict[str, Callable[[], list[psutil.Process]]]

    def snapshot(self, groups: tuple[str, ...]) -> dict[str, tuple[float, float]]:
        return {g: _cpu_and_rss(self.finders[g]()) for g in groups}


def _envoy_children(pid: int | None) -> list[psutil.Process]:
    return [p for p in _with_children(pid)[1:] if _name(p) == "envoy"]


def _name(proc: psutil.Process) -> str:
    try:
        return str(proc.name())
    except psutil.NoSuchProcess:
        return ""


def _postmaster_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class LoadGenerator(Protocol):
    name: str

    def version(self) -> str: ...

    def run(self, url: str, scenario: Scenario, concurrency: int, duration_s: int) -> RunStats: ...


def _lua_string(text: str) -> str:
    """A double-quoted Lua string literal for printable ASCII ``text``."""
    if not (text.isascii() and text.isprintable()):
        raise BenchError(f"not printable ASCII: {text!r}")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def wrk_script(scenario: Scenario) -> str:
    """wrk's Lua script for ``scenario``: its requests, prepared once per header set, in
    turn; ``done`` prints the statistics as one JSON line."""
    header_tables = ",\n".join(
        "  {"
        + ", ".join(f"[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items())
        + "}"
        for headers in user_headers(scenario)
    )
    body = _lua_string(scenario.body().decode()) if scenario.has_body else "nil"
    return f"""-- generated by bench/run.py for scenario {scenario.name}
local method = {_lua_string(scenario.method)}
local body = {body}
local header_sets = {{
{header_tables}
}}
local prepared = {{}}
local next_index = 0

function init(args)
  for i, headers in ipairs(header_sets) do
    prepared[i] = wrk.format(method, nil, headers, body)
  end
end

function request()
  next_index = next_index % #prepared + 1
  return prepared[next_index]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_JSON {{\\"completed\\":%d,\\"duration_us\\":%d,\\"connect\\":%d,\\"read\\":%d," ..
    "\\"write\\":%d,\\"status\\":%d,\\"timeout\\":%d,\\"p50_us\\":%d,\\"p99_us\\":%d}}\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


class WrkLoad:
    """``wrk`` with one thread; a generated Lua script sends the requests and prints stats
    as JSON."""

    name = "wrk"

    def __init__(self, binary: str, work_dir: Path) -> None:
        self.binary = binary
        self.work_dir = work_dir
        self._scripts: dict[str, Path] = {}

    def version(self) -> str:
        out = subprocess.run([self.binary, "-v"], capture_output=True, text=True, check=False)
        first = (out.stdout or out.stderr).splitlines()[0]
        return " ".join(first.split()[:2])  # "wrk 4.2.0", without the banner

    def _script(self, scenario: Scenario) -> Path:
        if scenario.name in self._scripts:
            return self._scripts[scenario.name]
        path = self.work_dir / f"wrk-{scenario.name}.lua"
        path.write_text(wrk_script(scenario), encoding="utf-8")
        self._scripts[scenario.name] = path
        return path

    def run(self, url: str, scenario: Scenario, concurrency: int, duration_s: int) -> RunStats:
        args = [
            self.binary,
            "-t1",
            f"-c{concurrency}",
            f"-d{duration_s}s",
            f"--timeout={int(REQUEST_TIMEOUT_S)}s",
            "-s",
            str(self._script(scenario)),
            url,
        ]
        try:
            out = subprocess.run(
                args, capture_output=True, text=True, timeout=duration_s + 30, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"wrk did not finish: {' '.join(args)}") from exc
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
        if out.returncode != 0 or line is None:
            raise BenchError(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        data = json.loads(line.removeprefix("BENCH_JSON "))
        completed = int(data["completed"])
        ok = completed - int(data["status"])
        socket_errors = sum(int(data[k]) for k in ("connect", "read", "write", "timeout"))
        return RunStats(
            completed=completed,
            ok=ok,
            errors=int(data["status"]) + socket_errors,
            duration_s=int(data["duration_us"]) / 1e6,
            p50_ms=int(data["p50_us"]) / 1000 if completed else None,
            p99_ms=int(data["p99_us"]) / 1000 if completed else None,
            ok_total=ok,
        )


def _percentile(sorted_values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


class PythonLoad:
    """Fallback: ``concurrency`` asyncio workers on keep-alive aiohttp connections."""

    name = "python-aiohttp"

    def version(self) -> str:
        return f"aiohttp {aiohttp.__version__}, Python {platform.python_version()}"

    def run(self, url: str, scenario: Scenario, concurrency: int, duration_s: int) -> RunStats:
        return asyncio.run(
            asyncio.wait_for(
                self._run(url, scenario, concurrency, duration_s),
                timeout=duration_s + REQUEST_TIMEOUT_S + 20,
            )
        )

    async def _run(
        self, url: str, scenario: Scenario, concurrency: int, duration_s: int
    ) -> RunStats:
        body = scenario.body()
        header_sets = user_headers(scenario)
        latencies: list[float] = []
        counts = {"completed": 0, "ok": 0, "errors": 0, "late_ok": 0}
        connector = aiohttp.TCPConnector(limit=concurrency)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            start = time.perf_counter()
            deadline = start + duration_s

            async def worker(index: int) -> None:
                n = index
                while time.perf_counter() < deadline:
                    headers = header_sets[n % len(header_sets)]
                    n += 1
                    sent = time.perf_counter()
                    try:
                        async with session.request(
                            scenario.method, url, data=body or None, headers=headers
                        ) as resp:
                            await resp.read()
                            good = 200 <= resp.status < 300
                    except (aiohttp.ClientError, TimeoutError):
                        good = False
                    finished = time.perf_counter()
                    if finished > deadline:
                        counts["late_ok"] += good
                        continue
                    counts["completed"] += 1
                    if good:
                        counts["ok"] += 1
                        latencies.append((finished - sent) * 1000)
                    else:
                        counts["errors"] += 1

            await asyncio.gather(*(worker(i) for i in range(concurrency)))
            elapsed = min(time.perf_counter(), deadline) - start
        latencies.sort()
        return RunStats(
            completed=counts["completed"],
            ok=counts["ok"],
            errors=counts["errors"],
            duration_s=elapsed,
            p50_ms=_percentile(latencies, 50),
            p99_ms=_percentile(latencies, 99),
            ok_total=counts["ok"] + counts["late_ok"],
        )


# -- the processes under test ----------------------------------------------------------------


class TollgateChild:
    """``python -m tollgate <command>`` as a child process, ready when a line of its stdout
    starts with ``ready`` (that line is what :meth:`start` returns)."""

    command = "up"
    ready = "tollgate is ready"

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> str:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tollgate", self.command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
            text=True,
        )
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line.startswith(self.ready):
                return line
        code = self.proc.poll()
        state = "timed out" if code is None else f"exited with code {code}"
        if self._reader is not None:
            self._reader.join(1)
        tail = "\n".join(self.log_path.read_text("utf-8", "replace").splitlines()[-20:])
        raise BenchError(
            f"`tollgate {self.command}` {state} before it was ready; {self.log_path}:\n{tail}"
        )

    def _pump(self, stdout: IO[str]) -> None:
        with self.log_path.open("a", encoding="utf-8") as log:
            for line in stdout:
                log.write(line)
                log.flush()
                self._lines.put(line)

    def stop(self, timeout_s: float = 15.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if self._reader is not None:
            self._reader.join(5)
        if proc.stdout is not None:
            proc.stdout.close()
        self.proc = None


class TollgateUp(TollgateChild):
    """``python -m tollgate up``; ready when it says so."""


BARE_FILTERS: Final = ("envoy.filters.http.dynamic_forward_proxy", "envoy.filters.http.router")


def bare_envoy_yaml(upstream_url: str, listen_port: int) -> str:
    """Tollgate's own Envoy bootstrap with only its routing filters (no ext_proc cluster)."""
    settings = load_settings(
        environ={},
        upstream_url=upstream_url,
        envoy_listen_port=listen_port,
        envoy_admin_port=0,
    )
    config = yaml.safe_load(render_yaml(settings))
    resources = config["static_resources"]
    manager = resources["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters = manager["http_filters"]
    # Only routing stays: not ext_proc, nor the filters that serve it (json_to_metadata,
    # which parses every JSON body, and the local-reply observer).
    kept = [f for f in filters if f["name"] in BARE_FILTERS]
    if [f["name"] for f in kept] != list(BARE_FILTERS) or EXTPROC_FILTER not in {
        f["name"] for f in filters
    }:
        raise BenchError(f"unexpected filters in the rendered bootstrap: {filters}")
    manager["http_filters"] = kept
    resources["clusters"] = [c for c in resources["clusters"] if c["name"] != EXTPROC_CLUSTER]
    # Without ext_proc nobody sets the routing headers: send everything through the same
    # plaintext forward-proxy cluster to the fake upstream, as Tollgate's route would.
    (host,) = manager["route_config"]["virtual_hosts"]
    host.pop("typed_per_filter_config", None)
    (plain,) = [r for r in host["routes"] if r["name"] == "upstream_http"]
    plain["match"] = {"prefix": "/"}
    per_route = plain["typed_per_filter_config"]["envoy.filters.http.dynamic_forward_proxy"]
    del per_route["host_rewrite_header"]
    per_route["host_rewrite_literal"] = urlsplit(upstream_url).netloc
    host["routes"] = [plain]
    header = (
        "# Bare Envoy for bench/run.py: Tollgate's bootstrap without ext_proc, every request\n"
        "# to the fake upstream through the same forward-proxy cluster.\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False)


@dataclass
class Stack:
    """Base URLs of the three paths, and the ledger's database URL."""

    bases: dict[str, str]
    database_url: str
    processes: ProcessGroups
    # The processes under test that are gone (e.g. "`tollgate up` exited with code -9").
    gone: Callable[[], list[str]]

    def url(self, path: str, scenario: Scenario) -> str:
        return self.bases[path] + scenario.path

    def run(
        self, load: LoadGenerator, url: str, scenario: Scenario, concurrency: int, seconds: int
    ) -> RunStats:
        """``load.run``; a failure names the processes that have gone since start-up."""
        try:
            return load.run(url, scenario, concurrency, seconds)
        except BenchError as exc:
            gone = self.gone()
            if not gone:
                raise
            raise BenchError(f"{exc}\n{'; '.join(gone)}") from exc


@contextlib.contextmanager
def running_stack(work_dir: Path, extproc: str = "tcp") -> Iterator[Stack]:
    """Start fake upstream, Postgres, bare Envoy and `tollgate up`; stop all on exit.

    ``extproc``: how Envoy reaches Tollgate, ``tcp`` (loopback) or ``unix`` (a socket).
    """
    with contextlib.ExitStack() as stops:
        fake = FakeProviderProcess(free_port(), log_path=work_dir / "fake-provider.log")
        stops.callback(fake.stop)
        fake.start()

        postgres = EmbeddedPostgres(work_dir / "pgdata", log_path=work_dir / "postgres.log")
        stops.callback(postgres.stop)
        database_url = postgres.start()
        pg_data = work_dir / "pgdata"

        bare_port = free_port()
        bare_config = work_dir / "bare-envoy" / "envoy.yaml"
        bare_config.parent.mkdir()
        bare_config.write_text(bare_envoy_yaml(fake.url, bare_port), encoding="utf-8")
        bare = EnvoyProcess(bare_config, log_path=work_dir / "bare-envoy.log")
        stops.callback(bare.stop)
        bare.start()

        tollgate_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
        env.update(
            TOLLGATE_DATABASE_URL=database_url,
            TOLLGATE_STATE_DIR=str(work_dir / "tollgate-state"),
            TOLLGATE_GRPC_ADDRESS=(
                f"unix:{work_dir / 'extproc.sock'}"
                if extproc == "unix"
                else f"127.0.0.1:{free_port()}"
            ),
            TOLLGATE_METRICS_ADDRESS="",
            TOLLGATE_ENVOY_LISTEN_PORT=str(tollgate_port),
            TOLLGATE_ENVOY_ADMIN_PORT="0",
            TOLLGATE_UPSTREAM_URL=fake.url,
            TOLLGATE_LOG_LEVEL="warning",
        )
        tollgate = TollgateUp(env, work_dir / "tollgate.log")
        stops.callback(tollgate.stop)
        tollgate.start()

        yield Stack(
            bases={
                "direct": fake.url.rstrip("/"),
                "bare": f"http://127.0.0.1:{bare_port}",
                "tollgate": f"http://127.0.0.1:{tollgate_port}",
            },
            database_url=database_url,
            gone=lambda: _gone(tollgate, bare),
            processes=ProcessGroups(
                {
                    "tollgate": lambda: _with_children(tollgate.pid)[:1],
                    "tollgate_envoy": lambda: _envoy_children(tollgate.pid),
                    "postgres": lambda: _with_children(_postmaster_pid(pg_data.resolve())),
                    "bare_envoy": lambda: _with_children(bare.pid)[:1],
                }
            ),
        )


def _gone(tollgate: TollgateUp, bare: EnvoyProcess) -> list[str]:
    gone = []
    code = tollgate.proc.poll() if tollgate.proc is not None else None
    if code is not None:
        gone.append(f"`tollgate up` exited with code {code} (see tollgate.log)")
    elif not _envoy_children(tollgate.pid):
        gone.append("the Envoy of `tollgate up` is gone (see tollgate-state/envoy.log)")
    if not _with_children(bare.pid)[:1]:
        gone.append("the bare Envoy is gone")
    return gone


# -- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    scenarios: list[Scenario]
    concurrencies: list[int]
    duration_s: int
    warmup_s: int
    soak: int = 0  # chat requests through Envoy + Tollgate after the measurements (0: none)

    def estimated_s(self) -> int:
        """Seconds of load in the measurements (the soak's length depends on its rate)."""
        runs = len(self.scenarios) * len(self.concurrencies) * len(PATHS)
        return runs * (self.duration_s + self.warmup_s)


def fetch_once(url: str, scenario: Scenario) -> tuple[int, bytes]:
    """One request of ``scenario`` (the first header set), read to the end: status and body."""
    request = urllib.request.Request(
        url,
        data=scenario.body() if scenario.has_body else None,
        headers=user_headers(scenario)[0],
        method=scenario.method,
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise BenchError(f"{scenario.method} {url} failed: {exc}") from exc


def probe_streams(scenarios: list[Scenario], stack: Stack) -> dict[str, dict[str, StreamShape]]:
    """One request per stream scenario and path, counting what a response carries; the
    direct path's count is the one per-event figures use, the others are printed beside it
    (Envoy + Tollgate should show the same unless the client asked for the usage chunk)."""
    shapes: dict[str, dict[str, StreamShape]] = {}
    for scenario in scenarios:
        if not scenario.stream:
            continue
        by_path: dict[str, StreamShape] = {}
        for path in PATHS:
            status, raw = fetch_once(stack.url(path, scenario), scenario)
            if status != 200:
                raise BenchError(
                    f"{scenario.name} probe on {PATH_LABELS[path]}: HTTP {status}: {raw[:300]!r}"
                )
            by_path[path] = stream_shape(raw)
        direct = by_path["direct"]
        if scenario.words is not None and direct.content_events < scenario.words:
            raise BenchError(
                f"{scenario.name}: {direct.content_events} content events from the fake, "
                f"expected {scenario.words} (does it honour {WORDS_HEADER}?)"
            )
        shapes[scenario.name] = by_path
    return shapes


def shape_text(name: str, by_path: dict[str, StreamShape]) -> str:
    """``stream: direct 203 data: events (200 content), bare Envoy 203, ...`` for the report."""
    parts = []
    for path, shape in by_path.items():
        text = f"{PATH_LABELS[path]} {shape.events}"
        if path == "direct":
            text += f" data: events ({shape.content_events} content)"
        if shape.usage_chunk:
            text += " with the usage chunk"
        parts.append(text)
    return f"{name}: " + ", ".join(parts)


def measure_all(
    plan: Plan, stack: Stack, load: LoadGenerator, events: dict[str, int]
) -> list[Measurement]:
    """Every scenario and level, the three paths back to back; ``events`` are the SSE events
    per response of the stream scenarios."""
    results: list[Measurement] = []
    for scenario in plan.scenarios:
        for concurrency in plan.concurrencies:
            # The three paths back to back at each level, so drift affects them alike.
            for path in PATHS:
                url = stack.url(path, scenario)
                warmup_ok = 0
                if plan.warmup_s > 0:
                    warmup_ok = stack.run(load, url, scenario, concurrency, plan.warmup_s).ok_total
                groups = PATH_GROUPS[path]
                before = stack.processes.snapshot(groups)
                stats = stack.run(load, url, scenario, concurrency, plan.duration_s)
                after = stack.processes.snapshot(groups)
                cpu = {
                    g: (after[g][0] - before[g][0]) * 1e6 / stats.cpu_requests
                    for g in groups
                    if stats.cpu_requests
                }
                rss = {g: after[g][1] for g in groups}
                sse_events = events.get(scenario.name)
                m = Measurement(
                    scenario=scenario.name,
                    concurrency=concurrency,
                    path=path,
                    rps=stats.rps,
                    p50_ms=stats.p50_ms,
                    p99_ms=stats.p99_ms,
                    errors=stats.errors,
                    completed=stats.completed,
                    ok=stats.ok,
                    duration_s=stats.duration_s,
                    warmup_ok=warmup_ok,
                    ok_total=stats.ok_total,
                    cpu_us_per_request=cpu or None,
                    rss_mib=rss or None,
                    sse_events=sse_events,
                    cpu_us_per_event=per_event(cpu, sse_events),
                )
                results.append(m)
                print(
                    f"  {scenario.name:14} c={concurrency:<3} {PATH_LABELS[path]:17}"
                    f" {m.rps:9.1f} req/s  p50 {_ms(m.p50_ms):>8}  p99 {_ms(m.p99_ms):>8}"
                    f"  errors {m.errors}",
                    file=sys.stderr,
                    flush=True,
                )
    return results


@dataclass
class SoakResult:
    requested: int
    ok: int  # 2xx responses seen, in-flight ones at the end of each chunk included
    errors: int
    runs: int  # load-generator runs (chunks of at most SOAK_CHUNK_S)
    duration_s: float
    rss_before_mib: dict[str, float]
    rss_after_mib: dict[str, float]
    # After each chunk: responses so far and the RSS of each process.
    samples: list[dict[str, float]]


SOAK_GROUPS: Final = ("tollgate", "tollgate_envoy")


def soak(requests: int, stack: Stack, load: LoadGenerator) -> SoakResult:
    """``requests`` chat requests through Envoy + Tollgate at SOAK_CONCURRENCY, in chunks
    sized from the rate so far (it may overshoot by the last chunk's in-flight requests)."""
    scenario = SCENARIOS["chat"]
    url = stack.url("tollgate", scenario)
    rss_before = {g: v[1] for g, v in stack.processes.snapshot(SOAK_GROUPS).items()}
    ok = errors = runs = 0
    samples: list[dict[str, float]] = []
    chunk_s = 1  # a short first chunk measures the rate
    started = time.monotonic()
    while ok < requests:
        stats = stack.run(load, url, scenario, SOAK_CONCURRENCY, chunk_s)
        runs += 1
        ok += stats.ok_total
        errors += stats.errors
        rss = {g: v[1] for g, v in stack.processes.snapshot(SOAK_GROUPS).items()}
        samples.append({"ok": float(ok), **rss})
        print(
            f"  soak {ok:>9,}/{requests:,}  errors {errors}  RSS "
            + ", ".join(f"{GROUP_LABELS[g]} {v:.1f} MiB" for g, v in rss.items()),
            file=sys.stderr,
            flush=True,
        )
        if stats.ok_total == 0:
            raise BenchError(f"soak: no successful responses in {chunk_s}s ({errors} errors)")
        rate = stats.ok_total / max(stats.duration_s, 1e-3)
        chunk_s = max(1, min(SOAK_CHUNK_S, math.ceil((requests - ok) / rate)))
    return SoakResult(
        requested=requests,
        ok=ok,
        errors=errors,
        runs=runs,
        duration_s=time.monotonic() - started,
        rss_before_mib=rss_before,
        rss_after_mib=samples[-1] if samples else rss_before,
        samples=samples,
    )


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def ratios(results: list[Measurement]) -> list[dict[str, Any]]:
    by_key = {(m.scenario, m.concurrency, m.path): m for m in results}
    rows: list[dict[str, Any]] = []
    seen: list[tuple[str, int]] = []
    for m in results:
        if (m.scenario, m.concurrency) not in seen:
            seen.append((m.scenario, m.concurrency))
    for scenario, concurrency in seen:
        for num, den in (("tollgate", "bare"), ("bare", "direct")):
            a = by_key[(scenario, concurrency, num)]
            b = by_key[(scenario, concurrency, den)]
            rows.append(
                {
                    "scenario": scenario,
                    "concurrency": concurrency,
                    "comparison": f"{num}/{den}",
                    "throughput_ratio": _ratio(a.rps, b.rps),
                    "p50_ratio": _ratio(a.p50_ms, b.p50_ms),
                    "p99_ratio": _ratio(a.p99_ms, b.p99_ms),
                    "p50_added_ms": _minus(a.p50_ms, b.p50_ms),
                    "p99_added_ms": _minus(a.p99_ms, b.p99_ms),
                }
            )
    return rows


@dataclass(frozen=True)
class LedgerExpectation:
    """What the client saw on the Envoy + Tollgate path, per endpoint."""

    ok: dict[str, int]  # successful responses (warm-ups, probes and soak included)
    cut_off: dict[str, int]  # requests wrk may have dropped in flight (0 for Python)


def ledger_expectation(
    results: list[Measurement],
    scenarios: list[Scenario],
    *,
    warmup: bool,
    wrk: bool,
    probes: int = 0,
    soak_result: SoakResult | None = None,
) -> LedgerExpectation:
    endpoint = {s.name: s.path for s in scenarios}
    ok: dict[str, int] = {}
    cut_off: dict[str, int] = {}
    runs_per_level = 2 if warmup else 1

    def add(path: str, n_ok: int, n_cut: int) -> None:
        ok[path] = ok.get(path, 0) + n_ok
        cut_off[path] = cut_off.get(path, 0) + (n_cut if wrk else 0)

    for m in results:
        if m.path == "tollgate":
            add(endpoint[m.scenario], m.warmup_ok + m.ok_total, runs_per_level * m.concurrency)
    if probes:
        add(CHAT_PATH, probes, 0)
    if soak_result is not None:
        add(CHAT_PATH, soak_result.ok, soak_result.runs * SOAK_CONCURRENCY)
    return LedgerExpectation(ok, cut_off)


def ledger_check(database_url: str, expected: LedgerExpectation) -> dict[str, Any]:
    """Count ledger rows, waiting up to LEDGER_WAIT_S for the writer to catch up."""
    expected_ok = sum(expected.ok.values())
    deadline = time.monotonic() + LEDGER_WAIT_S
    with psycopg.connect(database_url, autocommit=True) as conn:
        while True:
            row = conn.execute("SELECT count(*) FROM tollgate.requests").fetchone()
            rows = int(row[0]) if row else 0
            if rows >= expected_ok or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        # Let a batch still in flight land before the breakdown.
        time.sleep(0.5)
        rows = int((conn.execute("SELECT count(*) FROM tollgate.requests").fetchone() or [0])[0])
        outcomes = {
            str(outcome): int(n)
            for outcome, n in conn.execute(
                "SELECT outcome, count(*) FROM tollgate.requests GROUP BY outcome ORDER BY 1"
            ).fetchall()
        }
        endpoints = {
            NO_ENDPOINT if endpoint is None else str(endpoint): int(n)
            for endpoint, n in conn.execute(
                "SELECT endpoint, count(*) FROM tollgate.requests GROUP BY endpoint ORDER BY 1"
            ).fetchall()
        }
        users = int(
            (
                conn.execute("SELECT count(DISTINCT end_user_id) FROM tollgate.requests").fetchone()
                or [0]
            )[0]
        )
    return {
        "rows": rows,
        "rows_by_outcome": outcomes,
        "rows_by_endpoint": endpoints,
        "distinct_users": users,
        "client_ok_responses": expected_ok,
        "client_ok_by_endpoint": expected.ok,
        # wrk drops requests in flight when a run ends: at most one per connection per run.
        "max_cut_off_requests": sum(expected.cut_off.values()),
        "max_cut_off_by_endpoint": expected.cut_off,
    }


# -- output ----------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _us(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def markdown(
    results: list[Measurement], ratio_rows: list[dict[str, Any]], header: list[str]
) -> str:
    lines = [*header, ""]
    lines.append("| scenario | conc. | path | req/s | p50 ms | p99 ms | errors | requests |")
    lines.append("|---|---:|---|---:|---:|---:|---:|---:|")
    for m in results:
        lines.append(
            f"| {m.scenario} | {m.concurrency} | {PATH_LABELS[m.path]} | {m.rps:.1f} "
            f"| {_ms(m.p50_ms)} | {_ms(m.p99_ms)} | {m.errors} | {m.completed} |"
        )
    lines += [
        "",
        "Ratios (throughput: higher is better; latency: lower is better) and the latency the"
        " first path adds over the second:",
        "",
    ]
    lines.append(
        "| scenario | conc. | comparison | throughput | p50 | p99 | added p50 ms | added p99 ms |"
    )
    lines.append("|---|---:|---|---:|---:|---:|---:|---:|")
    names = {"tollgate/bare": "Envoy+Tollgate / bare Envoy", "bare/direct": "bare Envoy / direct"}
    for r in ratio_rows:
        lines.append(
            f"| {r['scenario']} | {r['concurrency']} | {names[r['comparison']]} "
            f"| {_x(r['throughput_ratio'])} | {_x(r['p50_ratio'])} | {_x(r['p99_ratio'])} "
            f"| {_ms(r.get('p50_added_ms'))} | {_ms(r.get('p99_added_ms'))} |"
        )
    lines += cpu_lines(results)
    lines += event_lines(results)
    return "\n".join(lines) + "\n"


def cpu_lines(results: list[Measurement]) -> list[str]:
    """Per scenario and concurrency: CPU µs per request of each process (from /proc, over
    the measured window) and their RSS at its end."""
    by_key = {(m.scenario, m.concurrency, m.path): m for m in results}
    lines = [
        "",
        "Cost per request (CPU µs from /proc over the measured window, per request finished"
        " in it; RSS at its end):",
        "",
        "| scenario | conc. | Tollgate µs | its Envoy µs | bare Envoy µs "
        "| Envoy ratio | Postgres µs | RSS MiB (Tollgate / its Envoy) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (scenario, concurrency, path), m in by_key.items():
        if path != "tollgate":
            continue
        bare = by_key.get((scenario, concurrency, "bare"))
        cpu, rss = m.cpu_us_per_request or {}, m.rss_mib or {}
        bare_cpu = (bare.cpu_us_per_request or {}).get("bare_envoy") if bare else None
        lines.append(
            f"| {scenario} | {concurrency} | {_us(cpu.get('tollgate'))} "
            f"| {_us(cpu.get('tollgate_envoy'))} | {_us(bare_cpu)} "
            f"| {_x(_ratio(cpu.get('tollgate_envoy'), bare_cpu))} | {_us(cpu.get('postgres'))} "
            f"| {rss.get('tollgate', 0):.0f} / {rss.get('tollgate_envoy', 0):.0f} |"
        )
    return lines


def event_lines(results: list[Measurement]) -> list[str]:
    """The stream scenarios' cost per SSE event: CPU per request over events per response."""
    by_key = {(m.scenario, m.concurrency, m.path): m for m in results}
    rows = []
    for (scenario, concurrency, path), m in by_key.items():
        if path != "tollgate" or not m.sse_events:
            continue
        bare = by_key.get((scenario, concurrency, "bare"))
        cpu = m.cpu_us_per_event or {}
        bare_cpu = (bare.cpu_us_per_event or {}).get("bare_envoy") if bare else None
        rows.append(
            f"| {scenario} | {concurrency} | {m.sse_events} | {_us(cpu.get('tollgate'))} "
            f"| {_us(cpu.get('tollgate_envoy'))} | {_us(bare_cpu)} |"
        )
    if not rows:
        return []
    return [
        "",
        "Cost per SSE event (the CPU per request above over the data: events one response"
        " carries, counted at start-up on the direct path):",
        "",
        "| scenario | conc. | events/response | Tollgate µs | its Envoy µs | bare Envoy µs |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
    ]


def rss_line(rss_mib: dict[str, float]) -> str:
    parts = ", ".join(f"{GROUP_LABELS[g]} {v:.1f} MiB" for g, v in rss_mib.items())
    return f"RSS at the end of the measurements: {parts}."


def soak_lines(result: SoakResult) -> list[str]:
    goal_mib = RSS_GOAL_BYTES / 2**20
    lines = [
        "",
        f"Soak: {result.ok:,} successful chat requests (asked for {result.requested:,}) through"
        f" Envoy + Tollgate at concurrency {SOAK_CONCURRENCY} in {result.duration_s:.0f}s,"
        f" {result.errors} errors. RSS before → after (goal ≤ 100 MB = {goal_mib:.1f} MiB):",
        "",
        "| process | before MiB | after MiB | change MiB | max MiB | ≤ 100 MB |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for group in SOAK_GROUPS:
        before = result.rss_before_mib.get(group, 0.0)
        after = result.rss_after_mib.get(group, 0.0)
        peak = max([before, *(s.get(group, 0.0) for s in result.samples)])
        verdict = "yes" if after <= goal_mib else "NO"
        lines.append(
            f"| {GROUP_LABELS[group]} | {before:.1f} | {after:.1f} | {after - before:+.1f} "
            f"| {peak:.1f} | {verdict} |"
        )
    return lines


def ledger_summary(ledger: dict[str, Any]) -> str:
    rows, ok = ledger["rows"], ledger["client_ok_responses"]
    outcomes = ", ".join(f"{k}={v}" for k, v in ledger["rows_by_outcome"].items()) or "none"
    text = (
        f"Ledger: {rows} rows in tollgate.requests ({outcomes}; "
        f"{ledger['distinct_users']} distinct users); "
        f"{ok} successful responses on the Envoy + Tollgate path (all of them: warm-ups,"
        " start-up probes and any soak included)."
    )
    text += _verdict(rows, ok, ledger["max_cut_off_requests"])
    rows_by = dict(ledger.get("rows_by_endpoint") or {})
    ok_by = ledger.get("client_ok_by_endpoint") or {}
    cut_by = ledger.get("max_cut_off_by_endpoint") or {}
    without = rows_by.pop(NO_ENDPOINT, 0)
    if len(ok_by) > 1 or set(ok_by) != set(rows_by) or without:
        text += " By endpoint:"
        for endpoint in sorted({*ok_by, *rows_by}):
            e_rows, e_ok = rows_by.get(endpoint, 0), ok_by.get(endpoint, 0)
            text += f"\n- {endpoint}: {e_rows} rows, {e_ok} successful responses."
            text += _verdict(e_rows, e_ok, cut_by.get(endpoint, 0), explain=False)
        if without:
            outcomes_note = (
                " (requests the load generator cut off, counted in the total above)"
                if ledger["max_cut_off_requests"]
                else ""
            )
            text += f"\n- no endpoint: {without} rows{outcomes_note}."
    return text


def _verdict(rows: int, ok: int, bound: int, *, explain: bool = True) -> str:
    diff = rows - ok
    if diff == 0:
        return " They match."
    verdict = "within" if 0 <= diff <= bound else "OUTSIDE"
    text = f" Difference {diff:+d}, {verdict} the expected 0..{bound}"
    if not explain:
        return text + "."
    return text + (
        ": the load generator drops requests still in flight when a run ends (at most one per"
        " connection per run), and Tollgate records those too."
    )


# -- command line ----------------------------------------------------------------------------


def _concurrencies(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of ints: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("concurrencies must be positive integers")
    return values


def _scenario_names(text: str) -> list[str]:
    """``all``, ``none`` or a comma-separated list of scenario names, in the given order."""
    if text == "all":
        return list(SCENARIOS)
    if text == "none":
        return []
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown scenario {', '.join(unknown) or text!r}; choose all, none or from "
            + ", ".join(SCENARIOS)
        )
    return list(dict.fromkeys(names))


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python bench/run.py",
        description="Compare direct upstream, bare Envoy and Envoy + Tollgate in one run.",
    )
    parser.add_argument("--duration", type=int, help="seconds per measurement (default 8)")
    parser.add_argument("--warmup", type=int, help="warm-up seconds before each (default 2)")
    parser.add_argument(
        "--concurrency", type=_concurrencies, help="comma-separated levels (default 1,16)"
    )
    parser.add_argument(
        "--scenario",
        type=_scenario_names,
        default="all",
        metavar="all|none|NAME[,NAME...]",
        help=f"scenarios to measure (default all: {', '.join(SCENARIOS)}); none with --soak"
        " runs the soak only",
    )
    parser.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="auto: wrk when on PATH, else the Python aiohttp generator",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 s per measurement after 1 s warm-up, concurrency 16",
    )
    parser.add_argument(
        "--extproc",
        choices=("tcp", "unix"),
        default="tcp",
        help="how Envoy reaches Tollgate: loopback TCP (default, as `tollgate up`) or a unix"
        " socket (as the compose and Kubernetes targets)",
    )
    parser.add_argument(
        "--soak",
        type=_positive,
        metavar="N",
        help=f"after the measurements, N chat requests through Envoy + Tollgate at concurrency"
        f" {SOAK_CONCURRENCY}, with its RSS before and after",
    )
    return parser


def _plan(args: argparse.Namespace) -> Plan:
    quick = bool(args.quick)
    duration = args.duration if args.duration is not None else (2 if quick else 8)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    concurrencies = args.concurrency or ([16] if quick else [1, 16])
    if duration < 1 or warmup < 0:
        raise SystemExit("--duration must be >= 1 and --warmup >= 0 (whole seconds)")
    names: list[str] = args.scenario
    if not names and not args.soak:
        raise SystemExit("--scenario none measures nothing: add --soak N")
    return Plan([SCENARIOS[n] for n in names], concurrencies, duration, warmup, args.soak or 0)


def _load_generator(choice: str, work_dir: Path) -> LoadGenerator:
    wrk = shutil.which("wrk")
    if choice == "wrk" and wrk is None:
        raise SystemExit("--loadgen wrk: wrk is not on PATH")
    if choice != "python" and wrk is not None:
        return WrkLoad(wrk, work_dir)
    return PythonLoad()


def _envoy_version() -> str:
    out = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, check=False)
    # "envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL" -> "1.40.0"
    parts = out.stdout.strip().rsplit(" ", 1)[-1].split("/")
    return parts[1] if out.returncode == 0 and len(parts) > 1 else "unknown"


def scenario_lines(scenarios: list[Scenario]) -> list[str]:
    """One report line per scenario: what it sends."""
    lines = []
    for s in scenarios:
        body = f"{len(s.body()):,}-byte JSON body" if s.has_body else "no body"
        lines.append(f"  - `{s.name}`: {s.method} {s.path}, {body}; {s.summary}.")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    plan = _plan(args)
    started = datetime.now(UTC)
    t0 = time.monotonic()
    work_dir = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    work_dir.chmod(0o755)  # Postgres runs as an unprivileged user when we are root
    load = _load_generator(args.loadgen, work_dir)
    cores = os.cpu_count() or 0
    soak_text = f"; then a soak of {plan.soak:,} requests" if plan.soak else ""
    print(
        f"tollgate bench: scenarios {','.join(s.name for s in plan.scenarios) or 'none'}, "
        f"concurrency {','.join(map(str, plan.concurrencies))}, ext_proc over {args.extproc}, "
        f"{plan.duration_s}s per run "
        f"after {plan.warmup_s}s warm-up, load from {load.name}; about {plan.estimated_s()}s "
        f"of load{soak_text}.\nwork dir (logs): {work_dir}",
        file=sys.stderr,
        flush=True,
    )
    ok = False
    soak_result: SoakResult | None = None
    try:
        with running_stack(work_dir, args.extproc) as stack:
            print(f"stack ready after {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)
            shapes = probe_streams(plan.scenarios, stack)
            for name, by_path in shapes.items():
                print(f"SSE events per response: {shape_text(name, by_path)}", file=sys.stderr)
            events = {name: by_path["direct"].events for name, by_path in shapes.items()}
            results = measure_all(plan, stack, load, events)
            end_rss = {g: v[1] for g, v in stack.processes.snapshot(GROUP_ORDER).items()}
            if plan.soak:
                soak_result = soak(plan.soak, stack, load)
            expected = ledger_expectation(
                results,
                plan.scenarios,
                warmup=plan.warmup_s > 0,
                wrk=load.name == "wrk",
                probes=len(shapes),
                soak_result=soak_result,
            )
            ledger = ledger_check(stack.database_url, expected)
        ok = True
    except KeyboardInterrupt:
        print(f"\ninterrupted; processes stopped; logs in {work_dir}", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"bench failed: {exc}\nlogs in {work_dir}", file=sys.stderr)
        return 1
    finally:
        if ok:
            shutil.rmtree(work_dir, ignore_errors=True)

    elapsed = time.monotonic() - t0
    ratio_rows = ratios(results)
    header = [
        f"## Tollgate benchmark, {started.strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        f"- Machine: {cores} cores ({platform.machine()}, {platform.system()}), shared by the "
        "load generator, fake upstream, both Envoys, Tollgate and Postgres: compare paths, "
        "do not read these as capacity.",
        f"- Load: {load.name} ({load.version()}), keep-alive, {plan.duration_s}s per "
        f"measurement after {plan.warmup_s}s warm-up; Envoy {_envoy_version()}.",
        f"- Requests: model {MODEL}, {USERS} users via x-tollgate-user-id unless the user is"
        " in the body; scenarios:",
        *scenario_lines(plan.scenarios),
    ]
    if shapes:
        header.append("- SSE events per response (one probe request per path at start-up):")
        header += [f"  - {shape_text(name, by_path)}" for name, by_path in shapes.items()]
    header.append(
        "- req/s counts 2xx responses only; latencies are per request, end to end. "
        f"Total wall time {elapsed:.0f}s."
    )
    if results:
        print(markdown(results, ratio_rows, header))
        print(rss_line(end_rss))
    else:
        print("\n".join(header))
    if soak_result is not None:
        print("\n".join(soak_lines(soak_result)))
    print()
    print(ledger_summary(ledger))

    RESULTS_DIR.mkdir(exist_ok=True)
    out_path = RESULTS_DIR / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    report = {
        "started_at": started.isoformat(),
        "elapsed_s": round(elapsed, 1),
        "host": {
            "cores": cores,
            "machine": platform.machine(),
            "system": platform.platform(),
            "python": platform.python_version(),
            "note": "all processes, including the load generator, share these cores",
        },
        "config": {
            "scenarios": [s.name for s in plan.scenarios],
            "scenario_definitions": [
                {**asdict(s), "body_length": len(s.body())} for s in plan.scenarios
            ],
            "concurrencies": plan.concurrencies,
            "duration_s": plan.duration_s,
            "warmup_s": plan.warmup_s,
            "soak_requests": plan.soak,
            "load_generator": load.name,
            "load_generator_version": load.version(),
            "envoy_version": _envoy_version(),
            "users": USERS,
            "model": MODEL,
        },
        "stream_shapes": {
            name: {path: asdict(shape) for path, shape in by_path.items()}
            for name, by_path in shapes.items()
        },
        "results": [asdict(m) for m in results],
        "ratios": ratio_rows,
        "rss_mib_at_end": end_rss,
        "soak": asdict(soak_result) if soak_result is not None else None,
        "ledger": ledger,
    }
    out_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nresults: {out_path.relative_to(BENCH_DIR.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

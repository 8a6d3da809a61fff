#!/usr/bin/env python3
"""Benchmark: direct upstream vs bare Envoy vs Envoy + Tollgate, measured in one run.

Three paths to the same fake upstream (``python -m tollgate.fakeprovider``):

* ``direct``   client → fake upstream
* ``bare``     client → Envoy without the ext_proc filter → fake upstream
* ``tollgate`` client → Envoy with ext_proc → Tollgate (own process, real ledger writer,
  real Postgres) → fake upstream

For each scenario and concurrency the three paths are measured back to back (so slow drift
of the machine hits all three alike), then the ratios tollgate/bare and bare/direct are
printed as Markdown and everything is written to ``bench/results/<timestamp>.json``.

Load comes from ``wrk`` when it is on PATH (one thread, a generated Lua script), otherwise
from an asyncio + aiohttp generator in this process. Everything, including the load
generator, shares the machine's cores: the numbers are for comparing paths, not capacity.

Usage: ``python bench/run.py [--duration S] [--warmup S] [--concurrency 1,8,32]
[--scenario chat|stream|all] [--loadgen auto|wrk|python] [--quick]``
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
MODEL: Final = "gpt-4o-mini"
USERS: Final = 8  # requests cycle through x-tollgate-user-id bench-user-1 .. bench-user-8
REQUEST_TIMEOUT_S: Final = 10.0
READY_TIMEOUT_S: Final = 90.0
LEDGER_WAIT_S: Final = 5.0


class BenchError(RuntimeError):
    """The benchmark could not set up, run or read a measurement."""


# -- what is sent ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    stream: bool
    # The end user in the body's `user` (Tollgate must read the body) instead of a header.
    body_user: bool = False

    def body(self) -> bytes:
        payload: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say hello to the benchmark, briefly."}],
        }
        if self.stream:
            payload["stream"] = True
            payload["stream_options"] = {"include_usage": True}
        if self.body_user:
            payload["user"] = "bench-body-user"
        return json.dumps(payload, separators=(",", ":")).encode()


SCENARIOS: Final = {
    "chat": Scenario("chat", stream=False),
    "stream": Scenario("stream", True),
    "chat-body-user": Scenario("chat-body-user", stream=False, body_user=True),
}


def user_headers(scenario: Scenario) -> list[dict[str, str]]:
    if scenario.body_user:
        return [{"Content-Type": "application/json"}]
    return [
        {"Content-Type": "application/json", "x-tollgate-user-id": f"bench-user-{n}"}
        for n in range(1, USERS + 1)
    ]


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


class WrkLoad:
    """``wrk`` with one thread; a Lua script sends the POST and prints stats as JSON."""

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
        header_tables = ",\n".join(
            "  {"
            + ", ".join(f"[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items())
            + "}"
            for headers in user_headers(scenario)
        )
        script = f"""-- generated by bench/run.py for scenario {scenario.name}
local body = {_lua_string(scenario.body().decode())}
local header_sets = {{
{header_tables}
}}
local prepared = {{}}
local next_index = 0

function init(args)
  for i, headers in ipairs(header_sets) do
    prepared[i] = wrk.format("POST", nil, headers, body)
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
        path = self.work_dir / f"wrk-{scenario.name}.lua"
        path.write_text(script, encoding="utf-8")
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
                        async with session.post(url, data=body, headers=headers) as resp:
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


class TollgateUp:
    """``python -m tollgate up`` as a child process; ready when it says so on stdout."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str] = queue.Queue()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None
        self._reader: threading.Thread | None = None

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tollgate", "up"],
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
                if "tollgate is ready" in self._lines.get(timeout=0.2):
                    return
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
        code = self.proc.poll()
        state = "timed out" if code is None else f"exited with code {code}"
        if self._reader is not None:
            self._reader.join(1)
        tail = "\n".join(self.log_path.read_text("utf-8", "replace").splitlines()[-20:])
        raise BenchError(f"`tollgate up` {state} before it was ready; {self.log_path}:\n{tail}")

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


def bare_envoy_yaml(upstream_url: str, listen_port: int) -> str:
    """Tollgate's own Envoy bootstrap with the ext_proc filter (and its cluster) removed."""
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
    kept = [f for f in filters if f["name"] != EXTPROC_FILTER]
    if len(kept) != len(filters) - 1:
        raise BenchError(f"expected one {EXTPROC_FILTER} filter in the rendered bootstrap")
    manager["http_filters"] = kept
    resources["clusters"] = [c for c in resources["clusters"] if c["name"] != EXTPROC_CLUSTER]
    # Without ext_proc nobody sets the routing headers: send everything through the same
    # plaintext forward-proxy cluster to the fake upstream, as Tollgate's route would.
    (host,) = manager["route_config"]["virtual_hosts"]
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
    """URLs of the three paths, and the ledger's database URL."""

    urls: dict[str, str]
    database_url: str
    processes: ProcessGroups


@contextlib.contextmanager
def running_stack(work_dir: Path) -> Iterator[Stack]:
    """Start fake upstream, Postgres, bare Envoy and `tollgate up`; stop all on exit."""
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
            TOLLGATE_GRPC_ADDRESS=f"127.0.0.1:{free_port()}",
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
            urls={
                "direct": fake.url + CHAT_PATH,
                "bare": f"http://127.0.0.1:{bare_port}{CHAT_PATH}",
                "tollgate": f"http://127.0.0.1:{tollgate_port}{CHAT_PATH}",
            },
            database_url=database_url,
            processes=ProcessGroups(
                {
                    "tollgate": lambda: _with_children(tollgate.pid)[:1],
                    "tollgate_envoy": lambda: _envoy_children(tollgate.pid),
                    "postgres": lambda: _with_children(_postmaster_pid(pg_data.resolve())),
                    "bare_envoy": lambda: _with_children(bare.pid)[:1],
                }
            ),
        )


# -- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    scenarios: list[Scenario]
    concurrencies: list[int]
    duration_s: int
    warmup_s: int

    def estimated_s(self) -> int:
        runs = len(self.scenarios) * len(self.concurrencies) * len(PATHS)
        return runs * (self.duration_s + self.warmup_s)


def measure_all(plan: Plan, stack: Stack, load: LoadGenerator) -> list[Measurement]:
    results: list[Measurement] = []
    for scenario in plan.scenarios:
        for concurrency in plan.concurrencies:
            # The three paths back to back at each level, so drift affects them alike.
            for path in PATHS:
                url = stack.urls[path]
                warmup_ok = 0
                if plan.warmup_s > 0:
                    warmup_ok = load.run(url, scenario, concurrency, plan.warmup_s).ok_total
                groups = PATH_GROUPS[path]
                before = stack.processes.snapshot(groups)
                stats = load.run(url, scenario, concurrency, plan.duration_s)
                after = stack.processes.snapshot(groups)
                cpu = {
                    g: (after[g][0] - before[g][0]) * 1e6 / stats.completed
                    for g in groups
                    if stats.completed
                }
                rss = {g: after[g][1] for g in groups}
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
                )
                results.append(m)
                print(
                    f"  {scenario.name:6} c={concurrency:<3} {PATH_LABELS[path]:17}"
                    f" {m.rps:9.1f} req/s  p50 {_ms(m.p50_ms):>8}  p99 {_ms(m.p99_ms):>8}"
                    f"  errors {m.errors}",
                    file=sys.stderr,
                    flush=True,
                )
    return results


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


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
                }
            )
    return rows


def ledger_check(database_url: str, expected_ok: int, max_cut_off: int) -> dict[str, Any]:
    """Count ledger rows, waiting up to LEDGER_WAIT_S for the writer to catch up."""
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
        users = int(
            (
                conn.execute("SELECT count(DISTINCT end_user_id) FROM tollgate.requests").fetchone()
                or [0]
            )[0]
        )
    return {
        "rows": rows,
        "rows_by_outcome": outcomes,
        "distinct_users": users,
        "client_ok_responses": expected_ok,
        # wrk drops requests in flight when a run ends: at most one per connection per run.
        "max_cut_off_requests": max_cut_off,
    }


# -- output ----------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


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
    lines += ["", "Ratios (throughput: higher is better; latency: lower is better):", ""]
    lines.append("| scenario | conc. | comparison | throughput | p50 | p99 |")
    lines.append("|---|---:|---|---:|---:|---:|")
    names = {"tollgate/bare": "Envoy+Tollgate / bare Envoy", "bare/direct": "bare Envoy / direct"}
    for r in ratio_rows:
        lines.append(
            f"| {r['scenario']} | {r['concurrency']} | {names[r['comparison']]} "
            f"| {_x(r['throughput_ratio'])} | {_x(r['p50_ratio'])} | {_x(r['p99_ratio'])} |"
        )
    lines += cpu_lines(results)
    return "\n".join(lines) + "\n"


def cpu_lines(results: list[Measurement]) -> list[str]:
    """Per scenario and concurrency: added p50, CPU µs per request of each process (from
    /proc, over the measured window) and their RSS at its end."""
    by_key = {(m.scenario, m.concurrency, m.path): m for m in results}
    lines = [
        "",
        "Cost per request (CPU µs per completed request over the measured window, from /proc;"
        " RSS at its end):",
        "",
        "| scenario | conc. | added p50 ms | Tollgate µs | its Envoy µs | bare Envoy µs "
        "| Envoy ratio | Postgres µs | RSS MiB (Tollgate / its Envoy) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (scenario, concurrency, path), m in by_key.items():
        if path != "tollgate":
            continue
        bare = by_key.get((scenario, concurrency, "bare"))
        cpu, rss = m.cpu_us_per_request or {}, m.rss_mib or {}
        bare_cpu = (bare.cpu_us_per_request or {}).get("bare_envoy") if bare else None
        added = (
            m.p50_ms - bare.p50_ms
            if bare and m.p50_ms is not None and bare.p50_ms is not None
            else None
        )

        def us(value: float | None) -> str:
            return "-" if value is None else f"{value:.0f}"

        lines.append(
            f"| {scenario} | {concurrency} | {_ms(added)} | {us(cpu.get('tollgate'))} "
            f"| {us(cpu.get('tollgate_envoy'))} | {us(bare_cpu)} "
            f"| {_x(_ratio(cpu.get('tollgate_envoy'), bare_cpu))} | {us(cpu.get('postgres'))} "
            f"| {rss.get('tollgate', 0):.0f} / {rss.get('tollgate_envoy', 0):.0f} |"
        )
    return lines


def ledger_summary(ledger: dict[str, Any]) -> str:
    rows, ok = ledger["rows"], ledger["client_ok_responses"]
    outcomes = ", ".join(f"{k}={v}" for k, v in ledger["rows_by_outcome"].items()) or "none"
    text = (
        f"Ledger: {rows} rows in tollgate.requests ({outcomes}; "
        f"{ledger['distinct_users']} distinct users); "
        f"{ok} successful responses on the Envoy + Tollgate path (warm-ups included)."
    )
    diff = rows - ok
    if diff == 0:
        return text + " They match."
    bound = ledger["max_cut_off_requests"]
    verdict = "within" if 0 <= diff <= bound else "OUTSIDE"
    return text + (
        f" Difference {diff:+d}, {verdict} the expected 0..{bound}: the load generator drops"
        " requests still in flight when a run ends (at most one per connection per run),"
        " and Tollgate records those too."
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python bench/run.py",
        description="Compare direct upstream, bare Envoy and Envoy + Tollgate in one run.",
    )
    parser.add_argument("--duration", type=int, help="seconds per measurement (default 10)")
    parser.add_argument("--warmup", type=int, help="warm-up seconds before each (default 2)")
    parser.add_argument(
        "--concurrency", type=_concurrencies, help="comma-separated levels (default 1,8,32)"
    )
    parser.add_argument("--scenario", choices=(*SCENARIOS, "all"), default="all")
    parser.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="auto: wrk when on PATH, else the Python aiohttp generator",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 3 s, concurrencies 1,8, 1 s warm-up"
    )
    return parser


def _plan(args: argparse.Namespace) -> Plan:
    quick = bool(args.quick)
    duration = args.duration if args.duration is not None else (3 if quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    concurrencies = args.concurrency or ([1, 8] if quick else [1, 8, 32])
    if duration < 1 or warmup < 0:
        raise SystemExit("--duration must be >= 1 and --warmup >= 0 (whole seconds)")
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    return Plan([SCENARIOS[n] for n in names], concurrencies, duration, warmup)


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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    plan = _plan(args)
    started = datetime.now(UTC)
    t0 = time.monotonic()
    work_dir = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    work_dir.chmod(0o755)  # Postgres runs as an unprivileged user when we are root
    load = _load_generator(args.loadgen, work_dir)
    cores = os.cpu_count() or 0
    print(
        f"tollgate bench: scenarios {','.join(s.name for s in plan.scenarios)}, concurrency "
        f"{','.join(map(str, plan.concurrencies))}, {plan.duration_s}s per run after "
        f"{plan.warmup_s}s warm-up, load from {load.name}; about {plan.estimated_s()}s of load."
        f"\nwork dir (logs): {work_dir}",
        file=sys.stderr,
        flush=True,
    )
    ok = False
    try:
        with running_stack(work_dir) as stack:
            print(f"stack ready after {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)
            results = measure_all(plan, stack, load)
            expected = sum(m.warmup_ok + m.ok_total for m in results if m.path == "tollgate")
            runs_per_level = 2 if plan.warmup_s > 0 else 1
            cut_off = 0
            if load.name == "wrk":
                cut_off = sum(
                    runs_per_level * m.concurrency for m in results if m.path == "tollgate"
                )
            ledger = ledger_check(stack.database_url, expected, cut_off)
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
        f"- Request: POST {CHAT_PATH}, model {MODEL}, {USERS} users via x-tollgate-user-id; "
        "`stream` adds stream=true with stream_options.include_usage.",
        f"- req/s counts 2xx responses only; latencies are per request, end to end. "
        f"Total wall time {elapsed:.0f}s.",
    ]
    print(markdown(results, ratio_rows, header))
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
            "concurrencies": plan.concurrencies,
            "duration_s": plan.duration_s,
            "warmup_s": plan.warmup_s,
            "load_generator": load.name,
            "load_generator_version": load.version(),
            "envoy_version": _envoy_version(),
            "users": USERS,
            "model": MODEL,
        },
        "results": [asdict(m) for m in results],
        "ratios": ratio_rows,
        "ledger": ledger,
    }
    out_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nresults: {out_path.relative_to(BENCH_DIR.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tollgate's HTTP endpoint: Prometheus ``/metrics``, ``/healthz`` and ``/readyz``.

Nothing is updated on the request path for metrics' sake beyond a few counter and bucket
increments: the collector reads the writer's, the servicer's and the key cache's own counters
when Prometheus scrapes. No metric carries an end-user id (the ledger has those; a label per
user would be unbounded); model and endpoint labels come from clients and are capped in
number (:mod:`tollgate.stats`).

``/healthz`` answers 200 while the process and its ledger writer run (a failing liveness
probe restarts the container). ``/readyz`` answers 200 when Tollgate should get traffic:
started, gateway keys loaded, the journal accepting records; 503 with the reason while
starting, after SIGTERM (draining), or when the journal is full with ``journal_full_policy =
"reject"`` or failing to write. A Postgres outage alone keeps it ready: the journal covers it.

The server runs on the event loop that serves ext_proc, so a stuck loop fails the probes too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from tollgate.app import Stack
    from tollgate.stats import Histogram

__all__ = ["StackCollector", "start_http_endpoint"]


def _histogram(family: HistogramMetricFamily, labels: list[str], h: Histogram) -> None:
    family.add_metric(labels, h.cumulative(), sum_value=h.total)


class StackCollector(Collector):
    def __init__(self, stack: Stack) -> None:
        self._stack = stack

    def collect(self) -> Iterator[Metric]:
        yield from self._requests()
        yield from self._ledger()
        yield from self._extproc()
        yield from self._keys()
        yield from self._limits()

    def _requests(self) -> Iterator[Metric]:
        stats = self._stack.writer.stats
        requests = CounterMetricFamily(
            "tollgate_requests",
            "Requests seen by ext_proc, by ledger outcome, provider, model and endpoint",
            labels=["outcome", "provider", "model", "endpoint"],
        )
        for labels, count in stats.requests.items():
            requests.add_metric(list(labels), count)
        yield requests
        refusals = CounterMetricFamily(
            "tollgate_refusals", "Requests refused (outcome blocked), by reason", labels=["reason"]
        )
        for reason, count in sorted(stats.refusals.items()):
            refusals.add_metric([reason], count)
        yield refusals
        usage = self._stack.usage_counters
        tokens = CounterMetricFamily(
            "tollgate_tokens",
            "Tokens in the ledger as providers reported them, by provider, model and type"
            " (input, output, cached_input, cache_write, reasoning)",
            labels=["provider", "model", "type"],
        )
        for labels, count in usage.tokens.items():
            tokens.add_metric(list(labels), count)
        yield tokens
        cost = CounterMetricFamily(
            "tollgate_cost_usd",
            "Cost in the ledger, in US dollars, by provider and model",
            labels=["provider", "model"],
        )
        for labels, amount in usage.cost_usd.items():
            cost.add_metric(list(labels), amount)
        yield cost

    def _ledger(self) -> Iterator[Metric]:
        writer = self._stack.writer
        stats = writer.stats
        records = CounterMetricFamily(
            "tollgate_ledger_records", "Usage records by what became of them", labels=["state"]
        )
        for state, count in (
            ("submitted", stats.submitted),
            ("written", stats.written),
            ("duplicate", stats.duplicates),
            ("dropped", stats.dropped),
            ("dead_letter", stats.dead_letters),
            ("replayed", stats.replayed),
            ("skipped", stats.skipped),
        ):
            records.add_metric([state], count)
        yield records
        yield CounterMetricFamily(
            "tollgate_ledger_dead_letters",
            "Records Postgres refused or that could not be encoded, kept in tollgate.dead_letters",
            value=stats.dead_letters,
        )
        yield CounterMetricFamily(
            "tollgate_ledger_rows_written",
            "Rows newly inserted into tollgate.requests (rate() of it is rows/s)",
            value=stats.written,
        )
        yield CounterMetricFamily(
            "tollgate_ledger_write_failures",
            "Failed ledger write attempts (each retried with backoff)",
            value=stats.failed_attempts,
        )
        batch = HistogramMetricFamily(
            "tollgate_ledger_batch_duration_seconds",
            "Time to store one batch (COPY, insert, rollup, commit)",
        )
        _histogram(batch, [], stats.batch_seconds)
        yield batch
        yield CounterMetricFamily(
            "tollgate_unpriced_records",
            "Records stored with NULL cost (model price unknown, or usage refused by pricing)",
            value=stats.unpriced,
        )
        yield CounterMetricFamily(
            "tollgate_pricing_errors",
            "Records stored unpriced because their usage could not be priced (pricing_error)",
            value=stats.pricing_errors,
        )
        yield GaugeMetricFamily(
            "tollgate_ledger_queue_depth",
            "Records waiting for the writer (the older name of"
            " tollgate_ledger_unshipped_records, same value)",
            value=writer.pending,
        )
        yield GaugeMetricFamily(
            "tollgate_ledger_unshipped_records",
            "Records accepted (in the journal) and not yet in Postgres",
            value=writer.pending,
        )
        yield GaugeMetricFamily(
            "tollgate_ledger_writer_alive",
            "1 while the ledger writer loop runs, else 0",
            value=1 if writer.alive else 0,
        )
        yield GaugeMetricFamily(
            "tollgate_ledger_oldest_unshipped_age_seconds",
            "Age (from its created_at) of the oldest record not yet in Postgres; 0 when none",
            value=writer.oldest_unshipped_age_s,
        )
        yield GaugeMetricFamily(
            "tollgate_journal_unshipped_bytes",
            "Bytes of journal records not yet in Postgres",
            value=writer.journal_unshipped_bytes,
        )
        yield GaugeMetricFamily(
            "tollgate_journal_bytes",
            "Bytes of journal files on disk (shipped segments are removed)",
            value=writer.journal_disk_bytes,
        )
        yield GaugeMetricFamily(
            "tollgate_journal_max_bytes",
            "journal_max_bytes: the cap on unshipped journal bytes (0: no cap)",
            value=self._stack.settings.journal_max_bytes,
        )

    def _extproc(self) -> Iterator[Metric]:
        extproc = self._stack.extproc
        yield GaugeMetricFamily(
            "tollgate_extproc_active_streams",
            "Open ext_proc streams",
            value=extproc.active_streams if extproc else 0,
        )
        yield _by_phase(
            "tollgate_extproc_messages",
            "ext_proc messages received from Envoy, by phase (each request's plan decides"
            " which it sends)",
            extproc.messages if extproc else {},
        )
        phases = HistogramMetricFamily(
            "tollgate_extproc_phase_duration_seconds",
            "Time Tollgate spent on one ext_proc message, by phase",
            labels=["phase"],
        )
        if extproc is not None:
            for phase, histogram in extproc.phase_seconds.items():
                _histogram(phases, [phase], histogram)
        yield phases
        yield _by_phase(
            "tollgate_internal_errors",
            "ext_proc handlers that raised, by phase (the request failed closed and was"
            " recorded as internal_error)",
            extproc.internal_errors if extproc else {},
        )
        ready, _ = self._stack.readiness()
        yield GaugeMetricFamily("tollgate_ready", "1 while /readyz answers 200", value=int(ready))

    def _keys(self) -> Iterator[Metric]:
        keys = self._stack.keys
        yield GaugeMetricFamily(
            "tollgate_gateway_keys", "Active gateway keys in the in-memory cache", value=keys.size
        )
        yield CounterMetricFamily(
            "tollgate_gateway_key_refresh_failures",
            "Failed reloads of the gateway key cache (the previous keys stay in use)",
            value=keys.refresh_failures,
        )

    def _limits(self) -> Iterator[Metric]:
        limits, alerts = self._stack.limits, self._stack.alerts
        yield GaugeMetricFamily(
            "tollgate_limit_replicas",
            "Tollgate replicas sharing the limits at the last refresh (this one included)",
            value=limits.replicas,
        )
        yield CounterMetricFamily(
            "tollgate_limit_refresh_failures",
            "Failed reloads of the limits and their spend (the last view stays in use)",
            value=limits.refresh_failures,
        )
        fired = CounterMetricFamily(
            "tollgate_limit_alerts",
            "Limit thresholds crossed (each once per limit, subject and period)",
            labels=["limit_id", "threshold"],
        )
        for (limit_id, threshold), count in sorted(alerts.fired.items()):
            fired.add_metric([limit_id, threshold], count)
        yield fired
        yield _labelled(
            "tollgate_alert_webhook_deliveries",
            "Alert webhook deliveries: ok, attempt_failed (each failed try), gave_up",
            "result",
            alerts.deliveries,
        )


def _labelled(
    name: str, documentation: str, label: str, counts: Mapping[str, int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in sorted(counts.items()):
        family.add_metric([value], count)
    return family


def _by_phase(name: str, documentation: str, counts: Mapping[str, int]) -> CounterMetricFamily:
    """A counter family labelled by ext_proc phase."""
    return _labelled(name, documentation, "phase", counts)


async def start_http_endpoint(address: str, stack: Stack) -> Callable[[], Awaitable[None]]:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port``; return the stop."""
    host, _, port = address.rpartition(":")
    registry = CollectorRegistry()
    registry.register(StackCollector(stack))
    # process_resident_memory_bytes, process_cpu_seconds_total, open fds (from /proc).
    ProcessCollector(registry=registry)

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        alive, why = stack.liveness()
        return web.json_response({"status": "ok" if alive else why}, status=200 if alive else 503)

    async def readyz(_: web.Request) -> web.Response:
        ready, why = stack.readiness()
        return web.json_response(
            {"status": "ready" if ready else why}, status=200 if ready else 503
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host.strip("[]"), int(port), reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(f"cannot listen on {address} for /metrics: {exc.strerror}") from None
    return runner.cleanup

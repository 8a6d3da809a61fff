"""Prometheus ``/metrics``: counters read from the running stack at scrape time.

Nothing is updated on the request path for metrics' sake: the collector reads the writer's
and the servicer's own counters when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from tollgate.app import Stack

__all__ = ["StackCollector", "start_metrics_server"]


class StackCollector(Collector):
    def __init__(self, stack: Stack) -> None:
        self._stack = stack

    def collect(self) -> Iterator[Metric]:
        stats = self._stack.writer.stats
        records = CounterMetricFamily(
            "tollgate_ledger_records", "Usage records by what became of them", labels=["state"]
        )
        records.add_metric(["submitted"], stats.submitted)
        records.add_metric(["written"], stats.written)
        records.add_metric(["duplicate"], stats.duplicates)
        records.add_metric(["dropped"], stats.dropped)
        records.add_metric(["dead_letter"], stats.dead_letters)
        records.add_metric(["replayed"], stats.replayed)
        records.add_metric(["skipped"], stats.skipped)
        yield records
        outcomes = CounterMetricFamily(
            "tollgate_requests", "Requests seen by ext_proc, by ledger outcome", labels=["outcome"]
        )
        for outcome, count in sorted(stats.outcomes.items()):
            outcomes.add_metric([outcome], count)
        yield outcomes
        yield CounterMetricFamily(
            "tollgate_ledger_write_failures",
            "Failed ledger write attempts (each retried with backoff)",
            value=stats.failed_attempts,
        )
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
        writer = self._stack.writer
        yield GaugeMetricFamily(
            "tollgate_ledger_queue_depth",
            "Records waiting for the writer",
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
        keys = self._stack.keys
        yield GaugeMetricFamily(
            "tollgate_gateway_keys", "Active gateway keys in the in-memory cache", value=keys.size
        )
        yield CounterMetricFamily(
            "tollgate_gateway_key_refresh_failures",
            "Failed reloads of the gateway key cache (the previous keys stay in use)",
            value=keys.refresh_failures,
        )
        extproc = self._stack.extproc
        yield GaugeMetricFamily(
            "tollgate_extproc_active_streams",
            "Open ext_proc streams",
            value=extproc.active_streams if extproc else 0,
        )
        internal = CounterMetricFamily(
            "tollgate_internal_errors",
            "ext_proc handlers that raised, by phase (the request failed closed and was"
            " recorded as internal_error)",
            labels=["phase"],
        )
        for phase, count in sorted((extproc.internal_errors if extproc else {}).items()):
            internal.add_metric([phase], count)
        yield internal


def start_metrics_server(address: str, stack: Stack) -> Callable[[], None]:
    """Serve ``/metrics`` on ``host:port``; return a function that stops it."""
    host, _, port = address.rpartition(":")
    registry = CollectorRegistry()
    registry.register(StackCollector(stack))
    server, thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop

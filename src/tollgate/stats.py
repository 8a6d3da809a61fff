"""Counters and histograms cheap enough for the request path, read when Prometheus scrapes.

Plain Python objects updated without locks: every update happens on the event loop or in
the writer's one worker thread, each a few list or dict operations under the GIL, and a
scrape that reads a bucket list while it grows is off by at most the observation in flight.
Label values that come from clients (model names, paths) are capped in number, so that a
client inventing model names cannot grow the exporter without bound: past the cap, new
label sets are counted under :data:`OTHER`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

__all__ = [
    "LATENCY_BUCKETS_S",
    "OTHER",
    "BoundedCounter",
    "Histogram",
    "HistogramFamily",
]

OTHER = "_other"

# Seconds: from 50 µs (a header decision) to a minute (a long stream's body phase).
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class Histogram:
    """Counts of observations per bucket (upper bounds inclusive, as Prometheus' ``le``)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, cumulative count)`` pairs ending with ``+Inf``, as Prometheus wants them."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), list(self.counts), strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


class HistogramFamily:
    """One histogram per label value (a small, fixed set such as ext_proc phases)."""

    __slots__ = ("_bounds", "by_label")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = tuple(bounds)
        self.by_label: dict[str, Histogram] = {}

    def observe(self, label: str, value: float) -> None:
        histogram = self.by_label.get(label)
        if histogram is None:
            histogram = self.by_label[label] = Histogram(self._bounds)
        histogram.observe(value)

    def items(self) -> list[tuple[str, Histogram]]:
        return sorted(self.by_label.items())


class BoundedCounter:
    """Counts per label tuple, at most ``max_series`` tuples; later new tuples are counted
    with every client-chosen part replaced by :data:`OTHER`."""

    __slots__ = ("_max", "_other", "values")

    def __init__(self, max_series: int = 2000, *, keep: Sequence[int] = ()) -> None:
        self._max = max_series
        self._other = frozenset(keep)  # positions kept as they are (values Tollgate chose)
        self.values: dict[tuple[str, ...], float] = {}

    def add(self, labels: tuple[str, ...], amount: float = 1) -> None:
        values = self.values
        if labels in values:
            values[labels] += amount
            return
        if len(values) >= self._max:
            labels = tuple(value if i in self._other else OTHER for i, value in enumerate(labels))
        values[labels] = values.get(labels, 0) + amount

    def items(self) -> Iterator[tuple[tuple[str, ...], float]]:
        yield from sorted(dict(self.values).items())

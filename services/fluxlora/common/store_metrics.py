"""Object-store request metrics that a worker in its own process (FLUXLORA_RUNNER=process) or
Kubernetes Job carries home in its report, so none disappear when the worker exits.

The worker's process counts its store calls like any server does (fluxlora.common.s3_retry into
fluxlora.common.metrics); `snapshot()` flattens those totals into plain numbers that the worker puts
in its report's `metrics` map under keys starting with PREFIX, and the service, reading the report
(fluxlora.jobs.reports), `add`s what grew since its last read to its own metrics and keeps the keys out
of the job's record. The request-latency histogram is kept here rather than by prometheus-client's
Histogram because a worker's bucket counts must be added to it as they are.

Keys: `store/<operation>/<outcome>/n` (requests), `.../sum` (seconds), `.../b<i>` (requests in bucket i,
not cumulative), `store/<operation>/retries`, `store/<operation>/failed_<kind>`, and `store/worker` (the
reporting process: totals restart from zero when it changes). Unknown operations, outcomes and kinds
are dropped, so a report cannot add label values.
"""

from __future__ import annotations

import bisect
import random
import threading
from collections.abc import Iterable, Iterator

from prometheus_client import Counter
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

PREFIX = "store/"
WORKER_KEY = "store/worker"
OUTCOMES = ("ok", "not_found", "error")
FAILURE_KINDS = ("permanent", "unavailable")
_WORKER = float(random.getrandbits(48))  # this process, as a report tells it (exact in a double)


class RequestHistogram(Collector):
    """A Prometheus histogram by (operation, outcome) whose bucket counts can also be added whole."""

    def __init__(self, name: str, documentation: str, buckets: Iterable[float]):
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(float(b) for b in buckets)
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str], tuple[list[float], list[float]]] = {}  # -> (buckets + inf, [sum])

    def labels(self, operation: str, outcome: str) -> _Child:
        return _Child(self, (operation, outcome))

    def _counts(self, key: tuple[str, str]) -> tuple[list[float], list[float]]:
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = ([0.0] * (len(self.bounds) + 1), [0.0])
        return series

    def observe(self, key: tuple[str, str], seconds: float) -> None:
        with self._lock:
            counts, total = self._counts(key)
            counts[bisect.bisect_left(self.bounds, seconds)] += 1
            total[0] += seconds

    def add(self, key: tuple[str, str], buckets: list[float], seconds: float) -> None:
        with self._lock:
            counts, total = self._counts(key)
            for i, n in enumerate(buckets[:len(counts)]):
                counts[i] += n
            total[0] += seconds

    def totals(self) -> dict[tuple[str, str], tuple[list[float], float]]:
        with self._lock:
            return {key: (list(counts), total[0]) for key, (counts, total) in self._series.items()}

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=["operation", "outcome"])]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=["operation", "outcome"])
        for key, (counts, total) in sorted(self.totals().items()):
            cumulative, running = [], 0.0
            for bound, n in zip([*(_le(b) for b in self.bounds), "+Inf"], counts, strict=True):
                running += n
                cumulative.append((bound, running))
            family.add_metric(list(key), cumulative, total)
        yield family


class _Child:
    def __init__(self, histogram: RequestHistogram, key: tuple[str, str]):
        self.histogram = histogram
        self.key = key

    def observe(self, seconds: float) -> None:
        self.histogram.observe(self.key, seconds)


def _le(bound: float) -> str:
    return repr(float(bound))


def _counter_values(counter: Counter) -> dict[tuple[str, ...], float]:
    values = {}
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                values[tuple(sample.labels.values())] = sample.value
    return values


def snapshot(seconds: RequestHistogram, retries: Counter, failures: Counter) -> dict[str, float]:
    """This process's store totals as report metrics (the worker's side)."""
    flat = {WORKER_KEY: _WORKER}
    for (operation, outcome), (counts, total) in seconds.totals().items():
        base = f"{PREFIX}{operation}/{outcome}/"
        flat[base + "n"] = sum(counts)
        flat[base + "sum"] = total
        flat.update({f"{base}b{i}": n for i, n in enumerate(counts) if n})
    for (operation,), n in _counter_values(retries).items():
        flat[f"{PREFIX}{operation}/retries"] = n
    for (operation, kind), n in _counter_values(failures).items():
        flat[f"{PREFIX}{operation}/failed_{kind}"] = n
    return flat


def growth(now: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """What grew between two snapshots of report metrics (everything, when another process reported)."""
    now = {k: v for k, v in now.items() if k.startswith(PREFIX)}
    if not now:
        return {}
    if before.get(WORKER_KEY) != now.get(WORKER_KEY):
        before = {}
    return {k: v - before.get(k, 0.0) for k, v in now.items() if k != WORKER_KEY and v > before.get(k, 0.0)}


def add(grown: dict[str, float], seconds: RequestHistogram, retries: Counter, failures: Counter,
        operations: Iterable[str]) -> None:
    """Adds a worker's growth (`growth`) to this process's metrics (the service's side)."""
    known = set(operations)
    series: dict[tuple[str, str], tuple[list[float], float]] = {}
    for key, value in grown.items():
        parts = key[len(PREFIX):].split("/")
        if len(parts) < 2 or parts[0] not in known:
            continue
        operation = parts[0]
        if len(parts) == 2 and parts[1] == "retries":
            retries.labels(operation).inc(value)
        elif len(parts) == 2 and parts[1] in {f"failed_{kind}" for kind in FAILURE_KINDS}:
            failures.labels(operation, parts[1].removeprefix("failed_")).inc(value)
        elif len(parts) == 3 and parts[1] in OUTCOMES:
            buckets, total = series.setdefault((operation, parts[1]), ([0.0] * (len(seconds.bounds) + 1), 0.0))
            if parts[2] == "sum":
                series[(operation, parts[1])] = (buckets, total + value)
            elif parts[2].startswith("b") and parts[2][1:].isdigit() and int(parts[2][1:]) < len(buckets):
                buckets[int(parts[2][1:])] += value
    for labels, (buckets, total) in series.items():
        seconds.add(labels, buckets, total)


def without_store(values: dict[str, float]) -> dict[str, float]:
    """Report metrics less the store totals (which go to Prometheus, not into the job's record)."""
    return {k: v for k, v in values.items() if not k.startswith(PREFIX)}

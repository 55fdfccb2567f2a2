"""A worker's store totals as its report carries them (fluxlora.common.store_metrics): what grew
between two reports is added once; a new worker process's totals count from zero; label values a
report makes up are dropped."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from fluxlora.common import store_metrics
from fluxlora.common.metrics import OPERATIONS, STORE_BUCKETS


def fresh():
    registry = CollectorRegistry()
    seconds = store_metrics.RequestHistogram("t_seconds", "t", STORE_BUCKETS)
    registry.register(seconds)
    retries = Counter("t_retries_total", "t", ["operation"], registry=registry)
    failures = Counter("t_failures_total", "t", ["operation", "kind"], registry=registry)
    return registry, seconds, retries, failures


def test_a_workers_totals_reach_the_services_metrics_once_and_made_up_labels_do_not():
    _, w_seconds, w_retries, w_failures = fresh()  # the worker's process
    w_seconds.labels("read", "ok").observe(0.003)
    w_seconds.labels("read", "ok").observe(0.2)
    w_retries.labels("write").inc()
    first = store_metrics.snapshot(w_seconds, w_retries, w_failures)
    w_seconds.labels("write", "error").observe(0.02)
    w_failures.labels("write", "unavailable").inc()
    second = store_metrics.snapshot(w_seconds, w_retries, w_failures)

    registry, seconds, retries, failures = fresh()  # the service's
    seconds.labels("read", "ok").observe(0.5)
    for now, before in ((first, {}), (second, first), (second, second)):
        store_metrics.add(store_metrics.growth(now, before), seconds, retries, failures, OPERATIONS)
    store_metrics.add({"store/nosuchop/ok/n": 1, "store/read/weird/b0": 1, "store/read/failed_x": 1},
                      seconds, retries, failures, OPERATIONS)
    value = registry.get_sample_value
    assert value("t_seconds_count", {"operation": "read", "outcome": "ok"}) == 3
    assert value("t_seconds_bucket", {"operation": "read", "outcome": "ok", "le": "0.005"}) == 1
    assert abs(value("t_seconds_sum", {"operation": "read", "outcome": "ok"}) - 0.703) < 1e-9
    assert value("t_seconds_count", {"operation": "write", "outcome": "error"}) == 1
    assert value("t_retries_total", {"operation": "write"}) == 1
    assert value("t_failures_total", {"operation": "write", "kind": "unavailable"}) == 1
    labels = {s.labels.get("operation") for m in registry.collect() for s in m.samples}
    assert labels <= {"read", "write", None}

    # another worker process (a retry of the job): its totals start again from zero
    restarted = {**first, store_metrics.WORKER_KEY: first[store_metrics.WORKER_KEY] + 1}
    assert store_metrics.growth(restarted, second)["store/read/ok/n"] == 2
    assert store_metrics.without_store({**second, "loss": 0.5}) == {"loss": 0.5}

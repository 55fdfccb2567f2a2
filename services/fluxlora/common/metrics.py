"""Prometheus metrics every fluxlora server exports (prometheus-client, the default registry).

Naming follows Prometheus' conventions: a `fluxlora_` prefix, base units in the name (`_seconds`,
`_bytes`), `_total` on counters. Every label has a bounded set of values: the service (four), a job
state (five), a gRPC status code name (17), an object-store operation (OPERATIONS), a gRPC method
registered on the server (unknown names become "unknown"). Never a job id, a key or an address:
those belong in the job records, logs and traces.

Each server serves its metrics on FLUXLORA_METRICS_PORT (0: off, the laptop default; Compose and
Kubernetes set 9464). Workers in their own process or Kubernetes Job report progress, loss and
memory through the job's record, which the server turns into these metrics, so nothing is lost when
a worker exits (fluxlora.server.telemetry).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

from fluxlora.common import store_metrics

log = logging.getLogger(__name__)

# Request latencies from a health check (~1 ms) to a slow submit (seconds).
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Job durations and GPU waits: seconds (a preprocessing job) to a day (a long training run).
JOB_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
STORE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# --- gRPC (fluxlora.server.telemetry.MetricsInterceptor); names as go-grpc-prometheus has them ------
GRPC_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.",
                       ["service", "grpc_service", "grpc_method", "grpc_type"])
GRPC_HANDLED = Counter("grpc_server_handled_total", "RPCs completed on the server, by status code.",
                       ["service", "grpc_service", "grpc_method", "grpc_type", "grpc_code"])
GRPC_SECONDS = Histogram("grpc_server_handling_seconds", "Time from an RPC's start to its status.",
                         ["service", "grpc_service", "grpc_method", "grpc_type"], buckets=RPC_BUCKETS)

# --- jobs (fed by JobRuntime events and read from the runtime at scrape time) ----------------------
JOBS_SUBMITTED = Counter("fluxlora_jobs_submitted_total", "Jobs accepted.", ["service"])
JOBS_STARTED = Counter("fluxlora_jobs_started_total", "Job starts (attempts) by a worker.", ["service"])
JOBS_FINISHED = Counter("fluxlora_jobs_finished_total", "Jobs that reached a terminal state.",
                        ["service", "state", "error_code"])
JOB_SECONDS = Histogram("fluxlora_job_duration_seconds", "Seconds from a job's start to its end.",
                        ["service", "state"], buckets=JOB_BUCKETS)
JOB_WAIT_SECONDS = Histogram("fluxlora_job_queue_wait_seconds",
                             "Seconds a job waited in the queue (for a worker or GPU) before it started.",
                             ["service"], buckets=JOB_BUCKETS)
TRAINING_STEPS = Counter("fluxlora_training_steps_total", "Training steps done by runs of this server.",
                         ["service"])
TRAINING_RATE = Gauge("fluxlora_training_steps_per_second",
                      "Steps per second of the running training runs together (0: none runs).", ["service"])
TRAINING_LOSS = Gauge("fluxlora_training_loss", "Latest loss a training run reported (kept after the run).",
                      ["service"])
TRAINING_PEAK = Gauge("fluxlora_training_peak_gpu_memory_bytes",
                      "Largest peak GPU memory of the running training runs (CUDA tensors; 0 off CUDA or none "
                      "runs).", ["service"])
JOB_ETA = Gauge("fluxlora_job_eta_seconds", "Estimated seconds left of the running jobs' stages (the longest; "
                "0: none runs).", ["service"])

# --- object store (fluxlora.common.s3_retry) ----------------------------------------------------------
# Workers in their own process add theirs through their reports (fluxlora.common.store_metrics).
STORE_SECONDS = store_metrics.RequestHistogram("fluxlora_store_request_duration_seconds",
                                               "One object-store request attempt.", STORE_BUCKETS)
REGISTRY.register(STORE_SECONDS)
STORE_RETRIES = Counter("fluxlora_store_retries_total", "Object-store requests retried after a transient failure.",
                        ["operation"])
STORE_FAILURES = Counter("fluxlora_store_failures_total",
                         "Object-store calls that failed after their retries (UNAVAILABLE) or at once.",
                         ["operation", "kind"])
OPERATIONS = ("read", "write", "list", "delete", "create", "presign", "other")

# --- job leases of replicas (fluxlora.jobs.replicas; the leases held: fluxlora.server.telemetry) ----
LEASES_TAKEN_OVER = Counter("fluxlora_job_leases_taken_over_total",
                            "Job leases this replica took from another (or an earlier process) whose lease "
                            "expired or whose process is gone: `job`, an unfinished job; `webhooks`, a finished "
                            "job's undelivered webhook events.", ["service", "what"])
LEASES_LOST = Counter("fluxlora_job_leases_lost_total",
                      "Job leases this replica found taken by another replica (it stopped working on the job).",
                      ["service"])

# --- auth (fluxlora.common.auth) ---------------------------------------------------------------------
AUTH_FAILURES = Counter("fluxlora_auth_failures_total", "RPCs refused for missing or wrong credentials.",
                        ["reason"])
AUTH_LOCKOUTS = Counter("fluxlora_auth_lockouts_total", "Addresses locked out after too many failures.")
AUTH_LOCKED_REFUSED = Counter("fluxlora_auth_locked_out_calls_total", "Calls refused from a locked-out address.")

# --- webhooks (fluxlora.jobs.webhooks) -----------------------------------------------------------------
WEBHOOK_ATTEMPTS = Counter("fluxlora_webhook_attempts_total", "Webhook delivery attempts, by outcome.",
                           ["service", "outcome"])
WEBHOOK_GIVEN_UP = Counter("fluxlora_webhook_given_up_total",
                           "Webhook events not delivered within the retry time.", ["service"])
WEBHOOK_QUEUE = Gauge("fluxlora_webhook_pending_events", "Webhook events waiting for delivery.", ["service"])


def store_operation(action: str) -> str:
    """A bounded operation name from a store action ("writing 'x'" -> "write")."""
    verb = action.split(" ", 1)[0]
    return {"reading": "read", "writing": "write", "listing": "list", "deleting": "delete",
            "creating": "create", "presigning": "presign"}.get(verb, "other")


_servers: dict[tuple[str, int], Any] = {}
_lock = threading.Lock()


def serve_metrics(host: str, port: int) -> int:
    """Serves /metrics of this process's registry on host:port (0: a free port); returns the port.
    One HTTP server per address per process: the four in-process servers of a test share one."""
    with _lock:
        if port and (host, port) in _servers:
            return port
        server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
        bound = server.server_port
        _servers[(host, bound)] = server
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound


def stop_metrics(port: int) -> None:
    with _lock:
        for key in [k for k in _servers if k[1] == port]:
            server = _servers.pop(key)
            server.shutdown()
            server.server_close()


def store_snapshot() -> dict[str, float]:
    """This process's object-store totals, for a worker's report."""
    return store_metrics.snapshot(STORE_SECONDS, STORE_RETRIES, STORE_FAILURES)


def add_worker_store_totals(grown: dict[str, float]) -> None:
    """Adds what a worker's store totals grew by (store_metrics.growth) to this server's metrics."""
    store_metrics.add(grown, STORE_SECONDS, STORE_RETRIES, STORE_FAILURES, OPERATIONS)

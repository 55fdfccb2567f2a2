"""What a server tells operators: Prometheus metrics of its RPCs and jobs (fluxlora.common.metrics).

- `MetricsInterceptor`: every RPC by service, method and status code, with a latency histogram.
  Methods are those the server registered; any other name counts as "unknown", so a caller cannot
  grow the label set.
- `JobMetrics`: a JobRuntime event listener. Jobs submitted, started and finished (by state and
  error code), job duration and time waiting in the queue, and the running training run's steps,
  steps/s, loss and peak GPU memory, read from the job's events. Those events carry what a worker
  in its own process or Kubernetes Job reported into the record, so the numbers survive the worker.
- `fluxlora_jobs{service,state}`: queued and running jobs, counted from the runtime at scrape time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import grpc
from google.protobuf import descriptor_pool
from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily

from fluxlora.common import metrics
from fluxlora.common.config import Settings
from fluxlora_api.v1 import jobs_pb2

if TYPE_CHECKING:
    from fluxlora.jobs.runtime import JobRuntime

S = jobs_pb2.JobState
TERMINAL = frozenset({S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED})
GIB = 2**30


def state_name(state: int) -> str:
    return S.Name(S.ValueType(state)).removeprefix("JOB_STATE_").lower()


def known_methods(service_names: Iterable[str]) -> dict[str, tuple[str, str, str]]:
    """'/pkg.Service/Method' -> (grpc_service, grpc_method, grpc_type) for every method of the services."""
    known = {}
    pool = descriptor_pool.Default()
    for name in service_names:
        try:
            service = pool.FindServiceByName(name)
        except KeyError:
            continue
        for method in service.methods:
            kind = {(False, False): "unary", (False, True): "server_stream", (True, False): "client_stream",
                    (True, True): "bidi_stream"}[(method.client_streaming, method.server_streaming)]
            known[f"/{service.full_name}/{method.name}"] = (service.full_name, method.name, kind)
    return known


class MetricsInterceptor(grpc.ServerInterceptor):
    def __init__(self, service: str, service_names: Iterable[str]):
        self.service = service
        self.known = known_methods(service_names)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        labels = (self.service, *self.known.get(handler_call_details.method, ("unknown", "unknown", "unknown")))
        return _timed(handler, labels)


def _finish(labels: tuple[str, ...], context: grpc.ServicerContext, started: float,
            code: grpc.StatusCode | None) -> None:
    code = code or context.code() or grpc.StatusCode.OK
    metrics.GRPC_HANDLED.labels(*labels, code.name).inc()
    metrics.GRPC_SECONDS.labels(*labels).observe(time.perf_counter() - started)


def _timed(handler: grpc.RpcMethodHandler, labels: tuple[str, ...]) -> grpc.RpcMethodHandler:
    serializers = {"request_deserializer": handler.request_deserializer,
                   "response_serializer": handler.response_serializer}

    def unary(call):
        def run(request_or_iterator, context):
            metrics.GRPC_STARTED.labels(*labels).inc()
            started, code = time.perf_counter(), None
            try:
                return call(request_or_iterator, context)
            except Exception:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                _finish(labels, context, started, code)
        return run

    def streaming(call):
        def run(request_or_iterator, context):
            metrics.GRPC_STARTED.labels(*labels).inc()
            started, code = time.perf_counter(), None
            try:
                yield from call(request_or_iterator, context)
            except GeneratorExit:  # the client went away
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                _finish(labels, context, started, code)
        return run

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **serializers)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **serializers)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **serializers)
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **serializers)


class JobMetrics:
    """Turns one runtime's JobEvents into metrics; called under the runtime's lock, so it only counts.

    A server may run several jobs at once (FLUXLORA_WORKERS), and a gauge has no job label, so the
    running jobs' figures are kept per job and exported together: steps/s summed (the server's
    throughput), ETA and peak GPU memory the largest, 0 once nothing runs. The loss is the latest any
    run reported and stays after the run, so a finished run's last loss can still be read."""

    def __init__(self, service: str):
        self.service = service
        self._seen: dict[str, tuple[int, int]] = {}  # unfinished job -> (state, steps done)
        self._running: dict[str, tuple[float, float, float]] = {}  # running job -> (steps/s, ETA s, peak bytes)

    def __call__(self, event: jobs_pb2.JobEvent) -> None:
        job, service = event.job, self.service
        state, steps = self._seen.get(job.job_id, (S.JOB_STATE_UNSPECIFIED, -1))
        if job.state == S.JOB_STATE_QUEUED and event.message == "queued" and not job.attempts:
            metrics.JOBS_SUBMITTED.labels(service).inc()
        if job.state == S.JOB_STATE_RUNNING and state != S.JOB_STATE_RUNNING:
            metrics.JOBS_STARTED.labels(service).inc()
            if job.attempts <= 1 and job.HasField("started_at"):
                waited = (job.started_at.ToNanoseconds() - job.created_at.ToNanoseconds()) / 1e9
                metrics.JOB_WAIT_SECONDS.labels(service).observe(max(0.0, waited))
        progress = job.progress
        if job.state == S.JOB_STATE_RUNNING and progress.unit == "step" and progress.stage == "training":
            if steps < 0:  # the first steps seen of this run: those since its start or its resume
                steps = int(job.metrics.get("resumed_from_step", 0))
            if progress.done > steps:
                metrics.TRAINING_STEPS.labels(service).inc(progress.done - steps)
            steps = progress.done
            if "loss" in job.metrics:
                metrics.TRAINING_LOSS.labels(service).set(job.metrics["loss"])
        self._running_figures(job)
        if job.state in TERMINAL:
            self._seen.pop(job.job_id, None)
            if state in TERMINAL:
                return
            metrics.JOBS_FINISHED.labels(service, state_name(job.state), job.error.code).inc()
            if job.HasField("started_at") and job.HasField("finished_at"):
                ran = (job.finished_at.ToNanoseconds() - job.started_at.ToNanoseconds()) / 1e9
                metrics.JOB_SECONDS.labels(service, state_name(job.state)).observe(max(0.0, ran))
            return
        self._seen[job.job_id] = (job.state, steps)

    def _running_figures(self, job: jobs_pb2.Job) -> None:
        progress, before = job.progress, self._running.pop(job.job_id, None)
        if job.state == S.JOB_STATE_RUNNING:
            training = progress.unit == "step" and progress.stage == "training"
            self._running[job.job_id] = (progress.rate if training else 0.0, progress.eta_seconds,
                                         job.metrics.get("peak_memory_gib", 0.0) * GIB)
        elif before is None:
            return  # neither running nor ran: nothing changes
        figures = list(self._running.values())
        metrics.TRAINING_RATE.labels(self.service).set(sum(f[0] for f in figures))
        metrics.JOB_ETA.labels(self.service).set(max((f[1] for f in figures), default=0.0))
        metrics.TRAINING_PEAK.labels(self.service).set(max((f[2] for f in figures), default=0.0))


class _JobsCollector:
    """fluxlora_jobs{service,state}: the unfinished jobs of every runtime of this process, at scrape time."""

    def __init__(self) -> None:
        self.runtimes: dict[int, JobRuntime] = {}
        self.lock = threading.Lock()

    def collect(self):
        family = GaugeMetricFamily("fluxlora_jobs", "Unfinished jobs held by the server, by state.",
                                   labels=["service", "state"])
        with self.lock:
            runtimes = list(self.runtimes.values())
        oldest = GaugeMetricFamily("fluxlora_oldest_queued_job_age_seconds",
                                   "Seconds the longest-waiting queued job has waited (0: none queued).",
                                   labels=["service"])
        serving = GaugeMetricFamily("fluxlora_server_serving",
                                    "1 while the server can run jobs; 0 while the store refuses job records or a "
                                    "worker stopped (gRPC health NOT_SERVING).", labels=["service"])
        leases = GaugeMetricFamily("fluxlora_job_leases_held",
                                   "Job leases this replica holds (jobs it works on, and finished jobs whose "
                                   "webhook events it still sends).", labels=["service"])
        counts: dict[tuple[str, str], int] = {}
        now = time.time()
        for runtime in runtimes:
            waited = 0.0
            for state in (S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING):
                counts.setdefault((runtime.service, state_name(state)), 0)
            for job in runtime.list([S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING], limit=0):
                key = (runtime.service, state_name(job.state))
                counts[key] = counts.get(key, 0) + 1
                if job.state == S.JOB_STATE_QUEUED:
                    waited = max(waited, now - job.created_at.ToNanoseconds() / 1e9)
            oldest.add_metric([runtime.service], waited)
            serving.add_metric([runtime.service], 1.0 if runtime.healthy()[0] else 0.0)
            leases.add_metric([runtime.service], runtime.leases_held())
        for (service, state_label), count in sorted(counts.items()):
            family.add_metric([service, state_label], count)
        yield family
        yield oldest
        yield serving
        yield leases

    def describe(self):
        return []  # collected lazily: runtimes come and go


_JOBS = _JobsCollector()
REGISTRY.register(_JOBS)


def watch_runtime(runtime: JobRuntime) -> None:
    """Feeds the job metrics from this runtime's events, and counts its unfinished jobs at scrapes."""
    runtime.add_event_listener(JobMetrics(runtime.service))
    with _JOBS.lock:
        _JOBS.runtimes[id(runtime)] = runtime


def forget_runtime(runtime: JobRuntime) -> None:
    with _JOBS.lock:
        _JOBS.runtimes.pop(id(runtime), None)


def serve(settings: Settings) -> int:
    """Starts (once per address) the HTTP server of /metrics; returns its port."""
    return metrics.serve_metrics(settings.metrics_host or settings.host, settings.metrics_port or 0)

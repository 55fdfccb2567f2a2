"""A worker's report as the server sees it, for the runners whose work happens outside the server's
threads (fluxlora.jobs.process: a child process; fluxlora.jobs.kubernetes: a pod): copying the report
into the job's record as it changes (and so to WatchJob), and the job's outcome once it is finished.
The report also carries the worker's object-store totals, which go to this server's Prometheus
metrics instead of the record (fluxlora.common.store_metrics).

The worker writes the report (fluxlora.jobs.worker.WorkerReport); the server only reads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from google.protobuf.message import Message

from fluxlora.common import metrics, store_metrics
from fluxlora.jobs.worker import PERMANENT_CODES, load_report, unpack_any
from fluxlora_api.shared.errors import FluxloraError
from fluxlora_api.v1 import jobs_pb2

if TYPE_CHECKING:
    from fluxlora.jobs.runtime import JobRuntime

S = jobs_pb2.JobState
FINISHED = frozenset({S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED})


class RemoteJobFailed(FluxloraError):
    """A failure that happened in a worker, with the status code it (or its runner) gave."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class WorkerDied(RemoteJobFailed):
    """The worker process died without storing an outcome (the out-of-memory killer's SIGKILL, a
    crash): the job runtime runs the job again, from its last checkpoint, until it has been started
    FLUXLORA_MAX_JOB_ATTEMPTS times, then fails it with this status."""


class ReportMirror:
    """Keeps a job's record in step with its worker's report.

    seen: a report whose content is in the record already (an earlier attempt's, whose progress
    must not be shown again as the new attempt's). extra_metrics: the runner's own, kept beside the
    worker's (the report's metrics replace the record's)."""

    def __init__(self, runtime: JobRuntime, service: str, job_id: str, seen: jobs_pb2.Job | None = None,
                 extra_metrics: dict[str, float] | None = None):
        self.runtime = runtime
        self.service = service
        self.job_id = job_id
        self.seen = seen if seen is not None else jobs_pb2.Job()
        self.extra_metrics = dict(extra_metrics or {})

    def refresh(self) -> jobs_pb2.Job | None:
        """Reads the report (None: not written yet) and mirrors it when it changed. Raises
        Unavailable when the store cannot be read this time."""
        report = load_report(self.runtime.store, self.service, self.job_id)
        if report is not None and report != self.seen:
            # The worker's store calls, which no server counted: added here as they grow.
            metrics.add_worker_store_totals(store_metrics.growth(dict(report.metrics), dict(self.seen.metrics)))
            self._mirror(report)
            self.seen = report
        return report

    def _mirror(self, report: jobs_pb2.Job) -> None:
        new_keys = [a.key for a in report.artifacts if a.key not in {s.key for s in self.seen.artifacts}]

        def mutate(job: jobs_pb2.Job) -> None:
            if report.progress.stage:
                job.progress.CopyFrom(report.progress)
            job.metrics.clear()
            job.metrics.update(store_metrics.without_store(dict(report.metrics)))
            job.metrics.update(self.extra_metrics)
            del job.artifacts[:]
            job.artifacts.extend(report.artifacts)
            del job.warnings[:]
            job.warnings.extend(report.warnings)

        self.runtime.update(self.job_id, mutate, message="wrote " + ", ".join(new_keys) if new_keys else "",
                            persist=True if new_keys else "throttle")


def finished_outcome(report: jobs_pb2.Job | None) -> Message | None:
    """The result of a report that says the work succeeded; RemoteJobFailed with the worker's own
    status for one that says it failed; None while it says neither."""
    if report is None:
        return None
    if report.state == S.JOB_STATE_SUCCEEDED and report.HasField("result"):
        return unpack_any(report.result)
    if report.state == S.JOB_STATE_FAILED and report.error.code:
        raise RemoteJobFailed(report.error.code, report.error.message)
    return None


def after_a_rank_refused(report: jobs_pb2.Job | None) -> bool:
    """Whether rank 0's stored outcome is only the echo of another rank's config error (the launcher
    exited EXIT_PERMANENT): rank 0 stored no config error of its own (only, at most, its echo of it:
    gloo's "Connection closed by peer"), and the run must fail as the request's fault."""
    return report is None or report.state != S.JOB_STATE_FAILED or report.error.code not in PERMANENT_CODES


def rank_refused(what: str, report: jobs_pb2.Job | None, where: str) -> RemoteJobFailed:
    """FAILED_PRECONDITION for a run one of whose ranks (not rank 0, which alone reports) found the
    request wrong: its error is in its log (`where`)."""
    after = f"; rank 0 failed after it: {report.error.message}" if report is not None and report.error.code else ""
    return RemoteJobFailed("FAILED_PRECONDITION", (
        f"{what}: a rank found the request wrong (exit 3, a config error: every retry would fail the same way); "
        f"its error is in {where}{after}"))

"""Running one stored job in this process, with the handler the server would run, against the
same store: what `fluxlora worker <service> <job_id>` and `python -m fluxlora.server.worker` (the
entry points, in fluxlora.server) do. A Kubernetes Job's pod runs this (fluxlora.jobs.kubernetes),
and so does each child process of a server with FLUXLORA_RUNNER=process (fluxlora.jobs.process).

The server's job record (jobs/<service>/<job_id>.json) stays the server's alone: the worker reads
the spec from it and writes what happens to its own report, jobs/workers/<service>/<job_id>.json
(a Job message too), which the server mirrors into its record. One writer per object, so neither
overwrites the other.

Exit codes tell Kubernetes whether a retry can help (the Job's podFailurePolicy reads them).
SIGTERM (and, with --watch-parent, stdin closing) stops the job at its next safe point.

Under torchrun (a data-parallel training job: fluxlora.jobs.launch) every rank runs the handler;
only rank 0 stores its report, so the report keeps one writer. The other ranks log instead. Rank 0
stores a failure as the outcome only when it is the request's fault (PERMANENT_CODES); any other is
left to the launcher's exit code, since it may only be the echo of another rank's death.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.message import Message

from fluxlora.common import metrics, tracing
from fluxlora.common.config import Settings
from fluxlora.common.storage import ArtifactStore
from fluxlora.jobs.context import JobContext, JobInterrupted, interruptible_now
from fluxlora.jobs.records import JobRecords, mark_finished
from fluxlora_api.shared.errors import NotFound, Unavailable, status_of
from fluxlora_api.v1 import jobs_pb2

log = logging.getLogger(__name__)

S = jobs_pb2.JobState
EXIT_SUCCEEDED = 0
EXIT_FAILED = 1  # may succeed on a retry (store unreachable, a crash): counts against backoffLimit
EXIT_PERMANENT = 3  # the same request fails again however often it runs: podFailurePolicy FailJob
EXIT_INTERRUPTED = 75  # SIGTERM (cancel, drain, preemption): a retry resumes from the last checkpoint
# The store was unreachable (sysexits' EX_UNAVAILABLE) to read the job, or to store the report that holds
# its end: the server never learns an outcome, so the job is started again (a training run resumes).
EXIT_UNAVAILABLE = 69
RANK_RESULTS_ENV = "FLUXLORA_RANK_RESULTS"  # the launcher's folder of rank exit codes (note_rank_result)
PERMANENT_CODES = frozenset({"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED"})
# How often progress and metrics reach the report (state changes, artifacts and warnings: at once);
# the server mirrors the report about as often (fluxlora.jobs.process.REPORT_POLL_S).
PERSIST_INTERVAL_S = 1.0


def report_key(service: str, job_id: str) -> str:
    return f"jobs/workers/{service}/{job_id}.json"


def load_report(store: ArtifactStore, service: str, job_id: str) -> jobs_pb2.Job | None:
    try:
        return json_format.Parse(store.get_bytes(report_key(service, job_id)), jobs_pb2.Job())
    except NotFound:
        return None


def unpack_any(any_msg: Any) -> Message:
    descriptor = descriptor_pool.Default().FindMessageTypeByName(any_msg.TypeName())
    message = message_factory.GetMessageClass(descriptor)()
    any_msg.Unpack(message)
    return message


class WorkerReport:
    """The one-job runtime a worker's JobContext reports to: everything lands in the report."""

    def __init__(self, store: ArtifactStore, settings: Settings, service: str, job_id: str,
                 stop: threading.Event | None = None, stored: bool = True):
        self.stored = stored  # False: a follower rank, whose report stays in memory
        self.store = store
        self.settings = settings
        self.key = report_key(service, job_id)
        self.job = jobs_pb2.Job(job_id=job_id, service=service, state=S.JOB_STATE_RUNNING)
        self.job.started_at.GetCurrentTime()
        self.stop = stop or threading.Event()
        self._lock = threading.Lock()
        self._saved_at = 0.0
        self._pending = False  # a throttled change not in the stored report yet
        self._closed = threading.Event()
        # Saves a throttled change that no later update carries along (the last progress before a
        # long model load, say), so the server sees it within about PERSIST_INTERVAL_S.
        threading.Thread(target=self._save_pending, name="report-saver", daemon=True).start()

    def update(self, job_id: str, mutate: Callable[[jobs_pb2.Job], Any], message: str = "",
               persist: bool | str = True) -> None:
        with self._lock:
            mutate(self.job)
            if message:
                log.info("%s: %s", job_id, message)
            if persist is True or (persist == "throttle" and time.monotonic() - self._saved_at > PERSIST_INTERVAL_S):
                self._save()
            elif persist == "throttle":
                self._pending = True

    def should_stop(self, job_id: str) -> bool:
        return self.stop.is_set()

    def finish(self, state: int, error: tuple[str, str] | None = None, result: Message | None = None) -> None:
        self.update(self.job.job_id, lambda job: mark_finished(job, state, error, result))

    def close(self) -> None:
        self._closed.set()

    def _save(self) -> None:
        if not self.stored:
            return
        # This process's store calls so far: the server adds them to its metrics (nothing else would).
        self.job.metrics.update(metrics.store_snapshot())
        self.store.put_bytes(self.key, json_format.MessageToJson(self.job).encode(), "application/json")
        self._saved_at = time.monotonic()
        self._pending = False

    def _save_pending(self) -> None:
        while not self._closed.wait(PERSIST_INTERVAL_S):
            with self._lock:
                if not self._pending:
                    continue
                try:
                    self._save()
                except Exception as exc:  # noqa: BLE001 - the next update or round tries again
                    log.warning("could not save the report %s: %s", self.key, exc)


def run_worker(service: str, job_id: str, settings: Settings, store: ArtifactStore | None = None,
               stop: threading.Event | None = None, *, handler: Callable[[JobContext, Any], Message]) -> int:
    """Runs the stored job `job_id` of `service` once with `handler` (the service's own:
    fluxlora.server.worker finds it); returns the process exit code."""
    from fluxlora.common.storage import open_store

    try:
        store = store or open_store(settings)
        record = json_format.Parse(store.get_bytes(JobRecords(store, service).key(job_id)), jobs_pb2.Job())
        earlier = load_report(store, service, job_id)
    except NotFound:
        log.error("no %s job %s in %s: the server's record is missing", service, job_id, settings.store)
        return EXIT_PERMANENT
    except Unavailable as exc:  # nothing started: the runner starts the worker again once the store is back
        log.error("job %s not started: %s", job_id, exc)
        return EXIT_UNAVAILABLE
    stop = stop or stop_on_sigterm()
    follower = launched_rank() > 0
    report = WorkerReport(store, settings, service, job_id, stop, stored=not follower)
    if earlier is not None:  # a retry: what the earlier attempt stored is still in the store
        report.job.artifacts.extend(earlier.artifacts)
        report.job.warnings.extend(earlier.warnings)
    try:
        return tracing.in_span(record.traceparent, f"{service} worker", partial(
            _run_reported, report, handler, record, job_id), **{"fluxlora.job_id": job_id})
    except Unavailable as exc:  # the report, its end included, could not be stored
        log.error("job %s: its report could not be stored: %s", job_id, exc)
        return EXIT_UNAVAILABLE
    finally:
        report.close()


def _run_reported(report: WorkerReport, handler: Callable[[JobContext, Any], Message], record: jobs_pb2.Job,
                  job_id: str) -> int:
    report.update(job_id, lambda job: None, message="worker started")
    scratch = Path(tempfile.mkdtemp(prefix=f"{job_id}-"))
    try:
        spec = unpack_any(record.spec)
        result = handler(JobContext(report, job_id, spec, scratch), spec)
    except JobInterrupted:
        report.update(job_id, lambda job: None, message="interrupted; a retry resumes from the last checkpoint")
        return EXIT_INTERRUPTED
    except BaseException as exc:  # noqa: BLE001 - every failure must end up in the report
        code, message = status_of(exc)
        if code in PERMANENT_CODES:
            note_rank_result(EXIT_PERMANENT)  # first: torchrun may stop this rank once a peer has failed
        if code == "INTERNAL" or not report.stored:  # a follower's error is seen in its log alone
            log.exception("job %s failed (rank %d): %s", job_id, launched_rank(), message)
        if code not in PERMANENT_CODES and launched_world_size() > 1:
            # With several ranks such a failure is often only the echo of another rank's death (gloo:
            # "Connection reset by peer" when the out-of-memory killer took it), so it is not stored as
            # the outcome: the launcher's exit code decides (a killed rank: the run goes again). Rank 0's
            # error stays in the report for the runner's message.
            report.update(job_id, partial(_set_error, code=code, message=message))
            return EXIT_FAILED
        report.finish(S.JOB_STATE_FAILED, error=(code, message))
        return EXIT_PERMANENT if code in PERMANENT_CODES else EXIT_FAILED
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report.finish(S.JOB_STATE_SUCCEEDED, result=result)
    return EXIT_SUCCEEDED


def note_rank_result(exit_code: int) -> None:
    """Tells the launcher (fluxlora.server.launcher, through the folder it names in RANK_RESULTS_ENV)
    how this rank is about to end. Its peers fail as soon as it leaves their collectives, and torchrun
    may see one of them exit first and stop this rank with SIGTERM: the launcher reads this note
    instead of the exit code torchrun saw. Nothing to do outside the launcher."""
    folder = os.environ.get(RANK_RESULTS_ENV)
    if folder:
        try:
            Path(folder, str(launched_rank())).write_text(str(exit_code))
        except OSError as exc:
            log.warning("could not note this rank's exit code %d for the launcher: %s", exit_code, exc)


def _set_error(job: jobs_pb2.Job, code: str, message: str) -> None:
    job.error.code, job.error.message = code, message


def launched_rank() -> int:
    """This process's rank among the processes torchrun started for one job (0 when it started none)."""
    return int(os.environ.get("RANK", "0"))


def launched_world_size() -> int:
    """How many processes torchrun started for one job, over all nodes (1 when it started none)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def stop_on_sigterm() -> threading.Event:
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum, frame) -> None:
            stop.set()
            if interruptible_now():  # loading a model or the like: nothing to save, stop right here
                log.info("worker received %s while loading; stopping now", signal.Signals(signum).name)
                raise JobInterrupted(f"{signal.Signals(signum).name} while loading")
            log.info("worker received %s; stopping at the next safe point", signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    return stop


def stop_when_stdin_closes(stop: threading.Event) -> None:
    """The server that started this process holds the other end of stdin and never writes to it:
    end of file means it is gone (killed, crashed), and nobody would see this job's outcome."""
    # os.read on the raw descriptor, not sys.stdin: a daemon thread blocked inside a buffered reader
    # holds its lock, and interpreter shutdown then aborts the process ("_enter_buffered_busy").
    fd = sys.stdin.fileno()

    def watch() -> None:
        try:
            while os.read(fd, 4096):
                pass
        except OSError:
            pass
        if not stop.is_set():
            log.warning("the server that started this worker is gone; stopping at the next safe point")
            stop.set()

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()

"""Worker threads that run queued jobs: attempts and poison jobs, the free-space check, the runner
that runs the handler (a thread, a child process or a Kubernetes Job), and the job's end state."""

from __future__ import annotations

import logging
import queue
import shutil
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from google.protobuf.message import Message

from fluxlora.common import tracing
from fluxlora.common.config import Settings
from fluxlora.common.storage import ArtifactStore
from fluxlora.jobs import admission, recorder
from fluxlora.jobs.context import JobContext, JobInterrupted
from fluxlora.jobs.records import TERMINAL
from fluxlora.jobs.reports import WorkerDied
from fluxlora.jobs.runners import Runner, runner_for
from fluxlora_api.shared.errors import ResourceExhausted, status_of
from fluxlora_api.v1 import jobs_pb2

if TYPE_CHECKING:
    from fluxlora.jobs.runtime import JobRuntime

log = logging.getLogger(__name__)

S = jobs_pb2.JobState
MAX_JOB_ATTEMPTS = 2  # default of FLUXLORA_MAX_JOB_ATTEMPTS
MIN_FREE_BYTES = 256 * 1024**2  # default of FLUXLORA_MIN_FREE_BYTES

Handler = Callable[[JobContext, Any], Message]


class JobExecution(recorder.JobRecorder):
    def __init__(self, service: str, store: ArtifactStore, handler: Handler, settings: Settings | None,
                 runner: Runner | None, finished_in_memory: int | None, max_watchers: int):
        super().__init__(service, store, settings, finished_in_memory, max_watchers)
        self._handler = handler
        # Local threads by default; FLUXLORA_RUNNER=kubernetes runs each job as a Kubernetes Job.
        self._runner = runner or runner_for(settings, service, handler)
        self._max_attempts = max(1, int(getattr(settings, "max_job_attempts", MAX_JOB_ATTEMPTS)))
        self._min_free_bytes = max(0, int(getattr(settings, "min_free_bytes", MIN_FREE_BYTES)))
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._scratch_root = Path(tempfile.mkdtemp(prefix=f"fluxlora-{service}-"))

    @property
    def stopping(self) -> bool:
        """True once shutdown began (a runner then leaves remote work running for the next start)."""
        return self._stopping.is_set()

    def should_stop(self, job_id: str) -> bool:
        return self._stopping.is_set() or self._jobs[job_id].cancel_requested

    def _check_free_space(self) -> None:
        """RESOURCE_EXHAUSTED naming the path when a disk this server's jobs write to has less than
        FLUXLORA_MIN_FREE_BYTES free: refused before work starts, not failed half-way with stray files."""
        paths = [self._scratch_root]
        root = getattr(self.store, "root", None)
        if isinstance(root, Path):
            paths.append(root)
        admission.check_free_space(paths, self._min_free_bytes, self.service)

    def _work(self) -> None:
        try:
            while True:
                job_id = self._queue.get()
                if job_id is None or self._stopping.is_set():
                    return
                try:
                    self._run(job_id)
                except BaseException as exc:  # noqa: BLE001 - a worker thread must outlive any job
                    log.exception("job %s: the runtime failed around it", job_id)
                    self._fail_unrecorded(job_id, exc)
        finally:
            self._health_changed()  # a thread that stops for any other reason than shutdown: NOT_SERVING

    def _fail_unrecorded(self, job_id: str, exc: BaseException) -> None:
        """Gives a job the runtime itself failed around a terminal state every watcher sees."""
        try:
            with self._cond:
                job = self._jobs.get(job_id)
                if job is None or job.state in TERMINAL or job_id in self._finals:
                    return
            code, message = status_of(exc)
            self._finish(job_id, S.JOB_STATE_FAILED, message=message, error=(code, message))
        except Exception:  # noqa: BLE001
            log.exception("job %s: could not record its failure", job_id)

    def _run(self, job_id: str) -> None:
        with self._cond:
            job = self._jobs[job_id]
            if job.state != S.JOB_STATE_QUEUED or job_id in self._finals:  # ended (cancelled) while queued
                return
            attempts = job.attempts
        if attempts >= self._max_attempts:
            message = (
                f"job {job_id} was started {attempts} times and each time its server or worker process died, or "
                "stopped while the store was unreachable, before its result was recorded "
                f"(FLUXLORA_MAX_JOB_ATTEMPTS={self._max_attempts}), so it is not run again: the usual "
                "cause is running out of memory (`dmesg` or `journalctl -k` names the process the kernel killed); "
                "lower the request's sizes or steps and resubmit with a new request_id"
                + (" (a training run can continue from its last checkpoint with resume_from_run)"
                   if self.service == "training" else "")
            )
            log.error("%s", message)
            self._finish(job_id, S.JOB_STATE_FAILED, message=message, error=("ABORTED", message))
            return
        try:
            self._check_free_space()
        except ResourceExhausted as exc:
            self._finish(job_id, S.JOB_STATE_FAILED, message=exc.message, error=(exc.code, exc.message))
            return

        def start(j: jobs_pb2.Job) -> None:
            j.state = S.JOB_STATE_RUNNING
            j.started_at.GetCurrentTime()
            j.attempts += 1

        # The attempt is counted in the store before the work starts: a job that kills its server is
        # failed as poison after FLUXLORA_MAX_JOB_ATTEMPTS starts, not re-queued forever.
        if not self.update(job_id, start, message=f"running (attempt {attempts + 1} of {self._max_attempts})"):
            def back(j: jobs_pb2.Job) -> None:
                j.state = S.JOB_STATE_QUEUED
                j.attempts -= 1

            self.update(job_id, back, persist="later",
                        message="the store refused the job's record: it starts once the store takes it")
            if not self._stopping.wait(recorder.RESAVE_INTERVAL_S):
                self._queue.put(job_id)
            return
        with self._cond:
            spec = _message_class(job.spec)()
            job.spec.Unpack(spec)
        scratch = Path(tempfile.mkdtemp(prefix=f"{job_id}-", dir=self._scratch_root))
        try:
            result = tracing.in_span(job.traceparent, f"{self.service} job", partial(
                self._runner.run, cast("JobRuntime", self), job_id, spec, scratch), **{"fluxlora.job_id": job_id})
        except JobInterrupted:
            if self._jobs[job_id].cancel_requested:
                self._finish(job_id, S.JOB_STATE_CANCELLED)
            else:
                def requeue(j: jobs_pb2.Job) -> None:
                    j.state = S.JOB_STATE_QUEUED
                    j.attempts = max(0, j.attempts - 1)  # a clean interruption is no attempt used up

                self.update(job_id, requeue, message="interrupted by shutdown; will run again on restart")
        except WorkerDied as exc:
            self._worker_died(job_id, exc)
        except BaseException as exc:  # noqa: BLE001 - every failure must end up in the record
            code, message = status_of(exc)
            if code == "INTERNAL":
                log.exception("job %s failed", job_id)
            else:
                log.warning("job %s failed: %s: %s", job_id, code, message)
            self._finish(job_id, S.JOB_STATE_FAILED, message=message, error=(code, message))
        else:
            self._finish(job_id, S.JOB_STATE_SUCCEEDED, result=result)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _worker_died(self, job_id: str, exc: WorkerDied) -> None:
        """A worker process killed (out of memory) or crashed: the job runs again, resuming from what it
        stored, until it was started FLUXLORA_MAX_JOB_ATTEMPTS times; then it fails as poison."""
        with self._cond:
            job = self._jobs[job_id]
            attempts, cancelled = job.attempts, job.cancel_requested
        if cancelled:
            self._finish(job_id, S.JOB_STATE_CANCELLED, message=f"cancelled; {exc.message}")
            return
        if attempts < self._max_attempts and not self._stopping.is_set():
            log.warning("job %s: %s; running it again (attempt %d of %d)", job_id, exc.message, attempts + 1,
                        self._max_attempts)
            self.update(job_id, lambda j: setattr(j, "state", S.JOB_STATE_QUEUED),
                        message=f"{exc.message}; running it again (attempt {attempts + 1} of {self._max_attempts})")
            self._queue.put(job_id)
            return
        message = (f"{exc.message}. It was started {attempts} times and its worker died each time "
                   f"(FLUXLORA_MAX_JOB_ATTEMPTS={self._max_attempts}), so it is not run again")
        log.warning("job %s failed: %s: %s", job_id, exc.code, message)
        self._finish(job_id, S.JOB_STATE_FAILED, message=message, error=(exc.code, message))


def _message_class(any_msg: Any) -> type[Message]:
    from google.protobuf import descriptor_pool, message_factory

    descriptor = descriptor_pool.Default().FindMessageTypeByName(any_msg.TypeName())
    return message_factory.GetMessageClass(descriptor)

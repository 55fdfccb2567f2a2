"""The job runtime: accepts jobs, runs them on worker threads outside the gRPC request threads,
persists every record in the store, streams changes to watchers, and cancels on request.

State machine: QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED; QUEUED -> CANCELLED.
A job interrupted by a shutdown goes back to QUEUED in the store, so the next server start runs it
again (training then resumes from its last checkpoint).

While the store is unreachable (past its retries) a job's record lives only here: the job goes on or
fails UNAVAILABLE, watchers still see every change, and an idle worker writes the record again once
the store answers. A server killed meanwhile finds the last record it did write and runs the job again.
"""

from __future__ import annotations

import collections
import logging
import queue
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from fluxlora.common.errors import FailedPrecondition, NotFound, ResourceExhausted, Unavailable, status_of
from fluxlora.common.storage import ArtifactStore
from fluxlora.jobs.context import JobContext, JobInterrupted
from fluxlora.jobs.records import JobRecords, mark_finished
from fluxlora.jobs.runners import Runner, runner_for
from fluxlora_api.v1 import jobs_pb2

log = logging.getLogger(__name__)

S = jobs_pb2.JobState
TERMINAL = frozenset({S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED})
PERSIST_INTERVAL_S = 2.0
EVENTS_KEPT = 256
FINISHED_EVENTS_KEPT_S = 60.0
RESAVE_INTERVAL_S = 5.0  # how often an idle worker tries again to write records the store refused

Handler = Callable[[JobContext, Any], Message]


class JobRuntime:
    def __init__(
        self,
        service: str,
        prefix: str,
        store: ArtifactStore,
        handler: Handler,
        settings: Any = None,
        workers: int = 1,
        max_queued: int = 64,
        runner: Runner | None = None,
        max_watchers: int = 0,
    ):
        self.service = service
        self.prefix = prefix
        self.store = store
        self.settings = settings
        self._handler = handler
        # Local threads by default; FLUXLORA_RUNNER=kubernetes runs each job as a Kubernetes Job.
        self._runner = runner or runner_for(settings, service, handler)
        self._records = JobRecords(store, service)
        self._workers = workers
        self._max_queued = max_queued
        # Each watch stream holds a gRPC server thread for as long as the job runs: unbounded, they
        # would take every thread and leave none for submits or health checks. 0: no limit.
        self._max_watchers = max_watchers
        self._watchers = 0
        self._cond = threading.Condition(threading.RLock())
        self._jobs: dict[str, jobs_pb2.Job] = {}
        self._by_request: dict[str, str] = {}
        self._events: dict[str, collections.deque[jobs_pb2.JobEvent]] = {}
        self._sequence: dict[str, int] = {}
        self._persisted_at: dict[str, float] = {}
        self._unsaved: set[str] = set()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._scratch_root = Path(tempfile.mkdtemp(prefix=f"fluxlora-{service}-"))

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Loads this service's jobs from the store and queues the unfinished ones again."""
        for job in sorted(self._records.load_all(), key=lambda j: j.created_at.ToNanoseconds()):
            self._remember(job)
            if job.state not in TERMINAL:
                if job.cancel_requested:
                    self._finish(job.job_id, S.JOB_STATE_CANCELLED)
                    continue
                job.state = S.JOB_STATE_QUEUED
                self._records.save(job)
                log.info("job %s picked up again after a restart", job.job_id)
                self._queue.put(job.job_id)
        self._runner.recover(self)
        for i in range(self._workers):
            thread = threading.Thread(target=self._work, name=f"{self.service}-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stops the workers; a running job is interrupted and stays queued in the store."""
        self._stopping.set()
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            self._cond.notify_all()
        shutil.rmtree(self._scratch_root, ignore_errors=True)

    # --- the public surface (servicers call these) ----------------------------------------
    def submit(self, spec: Message, request_id: str = "") -> jobs_pb2.Job:
        with self._cond:
            if request_id and request_id in self._by_request:
                return self.get(self._by_request[request_id])
            queued = sum(1 for j in self._jobs.values() if j.state == S.JOB_STATE_QUEUED)
            if queued >= self._max_queued:
                raise ResourceExhausted(
                    f"{self.service} queue is full: {queued} jobs waiting, the limit is {self._max_queued} "
                    "(FLUXLORA_MAX_QUEUED_JOBS): retry later with the same request_id, or raise the setting"
                )
            job = jobs_pb2.Job(
                job_id=f"{self.prefix}-{uuid.uuid4().hex[:12]}",
                service=self.service,
                request_id=request_id,
                state=S.JOB_STATE_QUEUED,
            )
            job.created_at.GetCurrentTime()
            job.spec.Pack(spec)
            self._records.save(job)
            self._remember(job)
            self._emit(job, "queued")
            self._forget_old_events()
        self._queue.put(job.job_id)
        return self.get(job.job_id)

    def get(self, job_id: str) -> jobs_pb2.Job:
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                raise NotFound(f"no {self.service} job {job_id!r}")
            copy = jobs_pb2.Job()
            copy.CopyFrom(job)
            return copy

    def list(self, states: list[int] | None = None, limit: int = 100) -> list[jobs_pb2.Job]:
        with self._cond:
            jobs = [j for j in self._jobs.values() if not states or j.state in states]
            jobs.sort(key=lambda j: j.created_at.ToNanoseconds(), reverse=True)
            return [self.get(j.job_id) for j in jobs[: limit or 100]]

    def cancel(self, job_id: str) -> jobs_pb2.Job:
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                raise NotFound(f"no {self.service} job {job_id!r}")
            if job.state in TERMINAL:
                raise FailedPrecondition(
                    f"job {job_id} already finished ({S.Name(job.state)}); there is nothing to cancel"
                )
            if job.state == S.JOB_STATE_QUEUED:
                job.cancel_requested = True
                self._finish(job_id, S.JOB_STATE_CANCELLED, message="cancelled while queued")
            else:
                self.update(job_id, lambda j: setattr(j, "cancel_requested", True), message="cancel requested")
            return self.get(job_id)

    def watch(self, job_id: str, is_active: Callable[[], bool] = lambda: True) -> Iterator[jobs_pb2.JobEvent]:
        """The current state, then every change; ends after a terminal state. RESOURCE_EXHAUSTED when
        max_watchers streams are open already (GetJob still answers)."""
        with self._cond:
            job = self.get(job_id)
            if self._max_watchers and self._watchers >= self._max_watchers:
                raise ResourceExhausted(
                    f"{self.service} has {self._watchers} WatchJob streams open, the limit is {self._max_watchers} "
                    "(FLUXLORA_MAX_WATCHERS): poll GetJob instead (the SDK does), or raise FLUXLORA_MAX_WATCHERS"
                )
            self._watchers += 1
            last = self._sequence.get(job_id, 0)
            first = jobs_pb2.JobEvent(sequence=last, job=job)
            first.time.GetCurrentTime()
        try:
            yield first
            if job.state in TERMINAL:
                return
            while is_active() and not self._stopping.is_set():
                with self._cond:
                    self._cond.wait_for(partial(self._changed_since, job_id, last), timeout=1.0)
                    events = [e for e in self._events[job_id] if e.sequence > last]
                for event in events:
                    last = event.sequence
                    yield event
                    if event.job.state in TERMINAL:
                        return
        finally:  # also when the client goes away: gRPC then closes this generator
            with self._cond:
                self._watchers -= 1

    @property
    def watchers(self) -> int:
        """WatchJob streams open now."""
        with self._cond:
            return self._watchers

    def _changed_since(self, job_id: str, sequence: int) -> bool:
        return self._sequence[job_id] > sequence or self._stopping.is_set()

    @property
    def stopping(self) -> bool:
        """True once shutdown began (a runner then leaves remote work running for the next start)."""
        return self._stopping.is_set()

    def should_stop(self, job_id: str) -> bool:
        return self._stopping.is_set() or self._jobs[job_id].cancel_requested

    def update(self, job_id: str, mutate: Callable[[jobs_pb2.Job], Any], message: str = "",
               persist: bool | str = True) -> None:
        """Applies a change to a job, tells watchers, and writes the record (throttled for progress)."""
        with self._cond:
            job = self._jobs[job_id]
            mutate(job)
            now = time.monotonic()
            due = now - self._persisted_at.get(job_id, 0) > PERSIST_INTERVAL_S
            if persist is True or (persist == "throttle" and due):
                self._persisted_at[job_id] = now
                self._save(job)
            self._emit(job, message)

    # --- internals -------------------------------------------------------------------------
    def _save(self, job: jobs_pb2.Job) -> None:
        """Writes a job's record; a store that stays unreachable must not stop the job or hide its
        state from watchers (the record is written again later, by _save_unsaved)."""
        try:
            self._records.save(job)
        except Unavailable as exc:
            if job.job_id not in self._unsaved:
                log.warning("job %s: record not saved (%s); kept in memory and saved once the store answers",
                            job.job_id, exc.message)
            self._unsaved.add(job.job_id)
        else:
            self._unsaved.discard(job.job_id)

    def _save_unsaved(self) -> None:
        with self._cond:
            for job_id in sorted(self._unsaved):
                self._save(self._jobs[job_id])
                if job_id in self._unsaved:
                    return  # still unreachable: the next idle round tries again
                log.info("job %s: record saved again after the store came back", job_id)

    def _remember(self, job: jobs_pb2.Job) -> None:
        self._jobs[job.job_id] = job
        if job.request_id:
            self._by_request[job.request_id] = job.job_id
        self._events.setdefault(job.job_id, collections.deque(maxlen=EVENTS_KEPT))
        self._sequence.setdefault(job.job_id, 0)

    def _forget_old_events(self) -> None:
        """Finished jobs keep only their last event: a late watcher gets the final state anyway,
        and a long-running server's memory stays bounded."""
        horizon = time.time() - FINISHED_EVENTS_KEPT_S
        for job_id, events in self._events.items():
            job = self._jobs[job_id]
            if len(events) > 1 and job.state in TERMINAL and job.finished_at.seconds < horizon:
                last = events[-1]
                events.clear()
                events.append(last)

    def _emit(self, job: jobs_pb2.Job, message: str) -> None:
        self._sequence[job.job_id] += 1
        event = jobs_pb2.JobEvent(sequence=self._sequence[job.job_id], message=message)
        event.job.CopyFrom(job)
        event.time.GetCurrentTime()
        self._events[job.job_id].append(event)
        self._cond.notify_all()

    def _finish(self, job_id: str, state: int, message: str = "", error: tuple[str, str] | None = None,
                result: Message | None = None) -> None:
        self.update(job_id, lambda job: mark_finished(job, state, error, result),
                    message=message or S.Name(state).removeprefix("JOB_STATE_").lower())

    def _work(self) -> None:
        while True:
            try:
                job_id = self._queue.get(timeout=RESAVE_INTERVAL_S)
            except queue.Empty:
                if self._unsaved:
                    self._save_unsaved()
                continue
            if job_id is None or self._stopping.is_set():
                return
            self._run(job_id)

    def _run(self, job_id: str) -> None:
        with self._cond:
            job = self._jobs[job_id]
            if job.state != S.JOB_STATE_QUEUED:
                return

            def start(j: jobs_pb2.Job) -> None:
                j.state = S.JOB_STATE_RUNNING
                j.started_at.GetCurrentTime()

            self.update(job_id, start, message="running")
            spec_type = _message_class(job.spec)
            spec = spec_type()
            job.spec.Unpack(spec)
        scratch = Path(tempfile.mkdtemp(prefix=f"{job_id}-", dir=self._scratch_root))
        try:
            result = self._runner.run(self, job_id, spec, scratch)
        except JobInterrupted:
            if self._jobs[job_id].cancel_requested:
                self._finish(job_id, S.JOB_STATE_CANCELLED)
            else:
                self.update(job_id, lambda j: setattr(j, "state", S.JOB_STATE_QUEUED),
                            message="interrupted by shutdown; will run again on restart")
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


def _message_class(any_msg: Any) -> type[Message]:
    from google.protobuf import descriptor_pool, message_factory

    descriptor = descriptor_pool.Default().FindMessageTypeByName(any_msg.TypeName())
    return message_factory.GetMessageClass(descriptor)

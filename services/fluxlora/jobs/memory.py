"""What a job runtime holds in memory: its unfinished jobs and the most recently finished ones (an
LRU of finished_in_memory; older ones are read from the store when asked for), their event logs, and
the request_ids of the jobs held. One condition (`_cond`) guards all of it; store writes happen
outside it (fluxlora.jobs.recorder), so GetJob and ListJobs answer from here during a store outage.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
import time
from collections.abc import Callable

from fluxlora.common.config import Settings
from fluxlora.common.s3_retry import RetryPolicy
from fluxlora.common.storage import ArtifactStore
from fluxlora.jobs.records import TERMINAL, JobRecords
from fluxlora_api.shared.errors import NotFound
from fluxlora_api.v1 import jobs_pb2

log = logging.getLogger(__name__)

S = jobs_pb2.JobState
ACTIVE = frozenset({S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING})
EVENTS_KEPT = 256
FINISHED_EVENTS_KEPT_S = 60.0
# Store reads inside a request handler (GetJob of a job not in memory, ListJobs, a resubmit): a few
# quick retries, never the ~25 s the job's own writes wait out (FLUXLORA_S3_RETRIES).
QUICK_RETRY = RetryPolicy(retries=2, base_s=0.05, max_s=0.25)
FINISHED_IN_MEMORY = 1000  # default of FLUXLORA_FINISHED_JOBS_IN_MEMORY
JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class EventLog:
    """A job's recent events and the sequence of its last one. A watch stream holds on to the log it
    started with, so a job forgotten from memory meanwhile still ends that stream properly."""

    __slots__ = ("events", "sequence")

    def __init__(self) -> None:
        self.events: collections.deque[jobs_pb2.JobEvent] = collections.deque(maxlen=EVENTS_KEPT)
        self.sequence = 0


class JobMemory:
    def __init__(self, service: str, store: ArtifactStore, settings: Settings | None,
                 finished_in_memory: int | None, max_watchers: int):
        self.service = service
        self.store = store
        self.settings = settings
        # What request handlers read with: a few quick retries, then UNAVAILABLE (or memory, for ListJobs).
        self._quick = JobRecords(store.with_retry(QUICK_RETRY), service)
        if finished_in_memory is None:
            finished_in_memory = getattr(settings, "finished_jobs_in_memory", FINISHED_IN_MEMORY)
        self._finished_kept = max(0, int(finished_in_memory))
        # Each watch stream holds a gRPC server thread for as long as the job runs: unbounded, they
        # would take every thread and leave none for submits or health checks. 0: no limit.
        self._max_watchers = max_watchers
        self._watchers = 0
        self._cond = threading.Condition(threading.RLock())
        self._event_listeners: list[Callable[[jobs_pb2.JobEvent], None]] = []
        # Unfinished jobs, and finished ones while they are in the LRU `_finished` (oldest first);
        # the other maps hold entries only for jobs in `_jobs`.
        self._jobs: dict[str, jobs_pb2.Job] = {}
        self._finished: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._by_request: dict[str, str] = {}
        self._logs: dict[str, EventLog] = {}
        # Jobs whose latest change the store has not confirmed yet -> the generation of that change.
        self._unsaved: dict[str, int] = {}
        self._pinned: dict[str, int] = {}  # jobs whose change waits for its store write before its event
        self._stopping = threading.Event()

    def get(self, job_id: str) -> jobs_pb2.Job:
        """The job from memory, else its record from the store (then kept in the finished LRU)."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is not None:
                if job_id in self._finished:
                    self._finished.move_to_end(job_id)
                return copy_job(job)
        job = self._load(job_id)  # outside the lock where the caller holds none: a store read may be slow
        with self._cond:
            if job.state in TERMINAL and job_id not in self._jobs:
                self._jobs[job_id] = job
                self._finished[job_id] = None
                if job.request_id:
                    self._by_request[job.request_id] = job_id
                self._evict()
            return copy_job(self._jobs.get(job_id, job))

    def held(self) -> dict[str, int]:
        """What this runtime holds in memory: unfinished jobs, finished ones (at most
        finished_in_memory, more only while their record waits for the store), event buffers and
        request_ids."""
        with self._cond:
            return {"active": len(self._jobs) - len(self._finished), "finished": len(self._finished),
                    "event_buffers": len(self._logs), "request_ids": len(self._by_request)}

    def _load(self, job_id: str) -> jobs_pb2.Job:
        job = self._quick.load(job_id) if JOB_ID.match(job_id) else None
        if job is None:
            raise NotFound(f"no {self.service} job {job_id!r}")
        return job

    def _peek(self, job_id: str) -> jobs_pb2.Job | None:
        """A copy of the job for a listing, without touching the LRU; None when it has no record."""
        with self._cond:
            if job_id in self._jobs:
                return copy_job(self._jobs[job_id])
        try:
            return self._load(job_id)
        except NotFound:  # an index entry whose submit is still writing, or failed
            return None

    def _remember(self, job: jobs_pb2.Job) -> None:
        self._jobs[job.job_id] = job
        if job.request_id:
            self._by_request[job.request_id] = job.job_id
        self._logs.setdefault(job.job_id, EventLog())

    def _evict(self) -> None:
        """Forgets the least recently used finished jobs beyond finished_in_memory; a record the
        store has not taken yet stays until it has."""
        excess = len(self._finished) - self._finished_kept
        for job_id in list(self._finished):
            if excess <= 0:
                return
            if job_id in self._unsaved or job_id in self._pinned:
                continue
            job = self._jobs.pop(job_id)
            del self._finished[job_id]
            self._logs.pop(job_id, None)
            if job.request_id and self._by_request.get(job.request_id) == job_id:
                del self._by_request[job.request_id]
            excess -= 1

    def _forget_old_events(self) -> None:
        """Finished jobs keep only their last event: a late watcher gets the final state anyway,
        and the events of up to finished_in_memory jobs take little memory."""
        horizon = time.time() - FINISHED_EVENTS_KEPT_S
        for job_id in self._finished:
            events_log = self._logs.get(job_id)
            if events_log and len(events_log.events) > 1 and self._jobs[job_id].finished_at.seconds < horizon:
                last = events_log.events[-1]
                events_log.events.clear()
                events_log.events.append(last)

    def add_event_listener(self, listener: Callable[[jobs_pb2.JobEvent], None]) -> None:
        """Calls listener(event) with every JobEvent as it is emitted (metrics, webhooks), under the
        runtime's lock: a listener must only take note or enqueue, never block; its errors are logged."""
        self._event_listeners.append(listener)

    def _emit(self, job: jobs_pb2.Job, message: str) -> None:
        events_log = self._logs[job.job_id]
        events_log.sequence += 1
        event = jobs_pb2.JobEvent(sequence=events_log.sequence, message=message)
        event.job.CopyFrom(job)
        event.time.GetCurrentTime()
        events_log.events.append(event)
        self._cond.notify_all()
        for listener in self._event_listeners:
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - an observer must never stop a job
                log.exception("job event listener failed")


def copy_job(job: jobs_pb2.Job) -> jobs_pb2.Job:
    copy = jobs_pb2.Job()
    copy.CopyFrom(job)
    return copy


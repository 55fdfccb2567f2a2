"""The job runtime: accepts jobs, runs them on worker threads outside the gRPC request threads,
persists every record in the store, streams changes to watchers, and cancels on request.

State machine: QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED; QUEUED -> CANCELLED.
A job interrupted by a shutdown goes back to QUEUED in the store, so another replica or the next server
start runs it again (training then resumes from its last checkpoint).

While the store is unreachable (past its retries) a job's record lives only here: the job goes on or
fails UNAVAILABLE, watchers still see every change but its end (shown once its record is stored), and
the recorder thread writes the record again once the store answers. A server killed meanwhile finds the
last record it did write and runs the job again.

Faults (fluxlora issue 12): a store error of any kind while a record is written (unreachable, a full
disk, a missing bucket, access denied) never stops a worker thread: the in-memory record is the truth
until the store takes it, every watcher sees the job's one terminal state, and the server reports
NOT_SERVING through `healthy()` / `add_health_listener` (the bootstrap's grpc health) until a record
write succeeds again. Store writes happen outside the lock GetJob/ListJobs take, and request handlers
read the store with a short retry policy (QUICK_RETRY), so both answer from memory during an outage.
A job counts its starts in its record (`attempts`, stored before the work starts): one whose server or
worker process died FLUXLORA_MAX_JOB_ATTEMPTS times is failed as poison instead of re-queued forever.
A request_id resent with another spec is ALREADY_EXISTS; a disk with less than FLUXLORA_MIN_FREE_BYTES
free refuses submits and starts with RESOURCE_EXHAUSTED naming the path.

Memory holds unfinished jobs and the most recently finished ones (finished_in_memory, an LRU; with
their event buffers); an older finished job is read from the store when asked for (GetJob, WatchJob,
a resubmit of its request_id), and ListJobs pages through the store's job index (fluxlora.jobs.records),
so a server's memory does not grow with the number of jobs it ever ran.

JobRuntime is built in floors, one concern each: memory.JobMemory (the jobs, LRU and event logs held),
recorder.JobRecorder (record writes, the recorder thread, health), execution.JobExecution (worker
threads, attempts, runners), watching.JobWatching (WatchJob), replicas.JobReplicas (a lease per job, so
several replicas share one store); here: lifecycle, submit, list, cancel.
listing.py pages ListJobs, admission.py holds the submit checks.
"""

from __future__ import annotations

import builtins
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Sequence

from google.protobuf.message import Message

from fluxlora.common import tracing
from fluxlora.common.config import Settings
from fluxlora.common.storage import ArtifactStore
from fluxlora.jobs import listing, webhooks
from fluxlora.jobs.admission import check_same_spec
from fluxlora.jobs.execution import Handler
from fluxlora.jobs.kueue_flavors import ClusterQueueGpus
from fluxlora.jobs.memory import ACTIVE, EVENTS_KEPT, copy_job
from fluxlora.jobs.records import TERMINAL
from fluxlora.jobs.replicas import JobReplicas
from fluxlora.jobs.runners import Runner
from fluxlora_api.shared.errors import FailedPrecondition, NotFound, ResourceExhausted, Unavailable
from fluxlora_api.v1 import jobs_pb2

__all__ = ["EVENTS_KEPT", "Handler", "JobRuntime"]

log = logging.getLogger(__name__)

S = jobs_pb2.JobState
CANCEL_ANSWER_S = 5.0  # how long CancelJob of a queued job waits for its CANCELLED record to be stored


class JobRuntime(JobReplicas):
    def __init__(
        self,
        service: str,
        prefix: str,
        store: ArtifactStore,
        handler: Handler,
        settings: Settings | None = None,
        workers: int = 1,
        max_queued: int = 64,
        runner: Runner | None = None,
        max_watchers: int = 0,
        finished_in_memory: int | None = None,
    ):
        super().__init__(service, store, handler, settings, runner, finished_in_memory, max_watchers)
        self.prefix = prefix
        self._workers = workers
        self._max_queued = max_queued
        self._submit_lock = threading.Lock()  # a request_id is claimed by one submit at a time

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Queues this service's unfinished jobs no other live replica holds (replicas.py); finished
        records stay in the store, unread."""
        self._records.repair(in_flight=self.submit_in_flight)
        self.start_replica()
        self._runner.recover(self)
        # A runner whose cluster admits jobs (Kubernetes with Kueue) gets one in flight per job the
        # server may hold: the cluster's queue, not this server's, decides what runs when.
        workers = self._max_queued if getattr(self._runner, "cluster_admits", False) else self._workers
        for i in range(workers):
            thread = threading.Thread(target=self._work, name=f"{self.service}-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._recorder = threading.Thread(target=self._record_loop, name=f"{self.service}-recorder", daemon=True)
        self._recorder.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stops the workers; a running job is interrupted and stays queued in the store."""
        self._stopping.set()
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._recorder_wake.set()
        if self._recorder is not None:
            self._recorder.join(max(0.0, deadline - time.monotonic()))
        self.stop_replica()
        with self._cond:
            self._cond.notify_all()
        shutil.rmtree(self._scratch_root, ignore_errors=True)

    # --- the public surface (servicers call these) ----------------------------------------
    def cluster_gpus(self) -> ClusterQueueGpus | None:
        """The GPUs Kueue may give this service's jobs, when its runner submits through Kueue."""
        flavors = getattr(self._runner, "gpu_flavors", None)
        return flavors() if flavors else None

    def submit(self, spec: Message, request_id: str = "", webhook_urls: Sequence[str] = ()) -> jobs_pb2.Job:
        self._check_free_space()
        urls = webhooks.webhook_urls(webhook_urls, self.settings)
        with self._submit_lock:  # store I/O below happens outside _cond: GetJob never waits for it
            orphan = False  # a claim of this request_id whose job was never stored
            if request_id:
                with self._cond:
                    known = self._by_request.get(request_id)
                known = known or self._quick.claimed(request_id)
                if known:
                    try:
                        found: jobs_pb2.Job | None = self.get(known)
                    except NotFound:  # another replica's submit still storing it (waited for), or one that died
                        found = self.orphan_or_job(known)
                        orphan = found is None
                    if found is not None:
                        check_same_spec(found, spec, request_id)
                        return found
            with self._cond:
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
            job.webhook_urls.extend(urls)
            job.traceparent = tracing.current_traceparent()  # the submit's trace, continued by the job's work
            job.trace_id = tracing.trace_id_of(job.traceparent)
            self.lease_new(job.job_id)  # first: a job is never in the store without its lease
            if request_id and not self._records.claim(request_id, job.job_id, replace=orphan):
                self._leases.forget(job.job_id)  # another replica's submit of it claimed it first: its job
                found = self.claimed_job(request_id)
                check_same_spec(found, spec, request_id)
                return found
            self._records.mark_active(job.job_id)
            self._records.add_to_index(job)
            self._records.save(job)  # last: the job exists once its record does
            with self._cond:
                self._remember(job)
                self._emit(job, "queued")
                self._forget_old_events()
        self._queue.put(job.job_id)
        return self.get(job.job_id)

    def list(self, states: builtins.list[int] | None = None, limit: int = 100) -> builtins.list[jobs_pb2.Job]:
        """The newest `limit` jobs (0: all), through as many pages as that takes."""
        jobs: builtins.list[jobs_pb2.Job] = []
        token = ""
        while True:
            size = min(limit - len(jobs), listing.MAX_PAGE_SIZE) if limit else listing.MAX_PAGE_SIZE
            page, token = self.page(states, size, token)
            jobs += page
            if not token or (limit and len(jobs) >= limit):
                return jobs

    def page(self, states: builtins.list[int] | None = None, page_size: int = 0,
             page_token: str = "") -> tuple[builtins.list[jobs_pb2.Job], str]:
        """One page of jobs, newest first, and the token of the next page ("" after the last)."""
        jobs, token, _ = self.page_or_memory(states, page_size, page_token, fallback=False)
        return jobs, token

    def page_or_memory(self, states: builtins.list[int] | None = None, page_size: int = 0, page_token: str = "",
                       fallback: bool = True) -> tuple[builtins.list[jobs_pb2.Job], str, bool]:
        """page(), and whether it came from memory: while the store cannot be read (after a few
        quick retries) the page holds the jobs this server has in memory, rather than an error."""
        size = listing.page_size(page_size)
        after = listing.decode_token(page_token)
        wanted: set[int] = set(states or ())
        try:
            if wanted and wanted <= ACTIVE:  # every unfinished job has an active marker: no index scan
                return (*listing.memory_page(self.active_jobs(), wanted, size, after), False)
            return (*listing.store_page(self._quick.index_after(after), self._peek, wanted, size, after), False)
        except Unavailable as exc:
            if not fallback:
                raise
            log.warning("ListJobs answered from memory: %s", exc.message)
            return (*self._memory_page(wanted, size, after), True)

    def _memory_page(self, wanted: set[int], size: int, after: str) -> listing.Page:
        with self._cond:
            held = [copy_job(j) for j in self._jobs.values() if not wanted or j.state in wanted]
        return listing.memory_page(held, wanted, size, after)

    def cancel(self, job_id: str) -> jobs_pb2.Job:
        with self._cond:
            job = self._jobs.get(job_id)
        state = job.state if job is not None else self.get(job_id).state
        if state in TERMINAL:
            raise FailedPrecondition(
                f"job {job_id} already finished ({S.Name(state)}); there is nothing to cancel"
            )
        if self.finishing(job_id):
            raise FailedPrecondition(
                f"job {job_id} already finished and its result is being recorded; there is nothing to cancel"
            )
        if job is None or not self.owns(job_id):  # another replica runs it: it honours the request
            return self.cancel_elsewhere(job_id)
        with self._cond:
            # The record is written by the recorder thread: a slow store holds up this answer at most
            # CANCEL_ANSWER_S, then it says QUEUED with cancel_requested (CANCELLED once stored).
            if job.state == S.JOB_STATE_QUEUED:
                job.cancel_requested = True
                self._finish(job_id, S.JOB_STATE_CANCELLED, message="cancelled while queued", persist="later")
                self._cond.wait_for(lambda: job.state in TERMINAL, timeout=CANCEL_ANSWER_S)
            elif job.state not in TERMINAL:
                self.update(job_id, lambda j: setattr(j, "cancel_requested", True), message="cancel requested",
                            persist="later")
            return copy_job(job)

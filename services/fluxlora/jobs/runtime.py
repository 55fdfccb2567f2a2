"""The job runtime: accepts jobs, runs them on worker threads outside the gRPC request threads,
persists every record in the store, streams changes to watchers, and cancels on request.

State machine: QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED; QUEUED -> CANCELLED.
A job interrupted by a shutdown goes back to QUEUED in the store, so the next server start runs it
again (training then resumes from its last checkpoint).

While the store is unreachable (past its retries) a job's record lives only here: the job goes on or
fails UNAVAILABLE, watchers still see every change, and an idle worker writes the record again once
the store answers. A server killed meanwhile finds the last record it did write and runs the job again.

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
"""

from __future__ import annotations

import base64
import binascii
import builtins
import collections
import logging
import queue
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from fluxlora.common import tracing
from fluxlora.common.s3_retry import RetryPolicy
from fluxlora.common.storage import ArtifactStore
from fluxlora.jobs import webhooks
from fluxlora.jobs.context import JobContext, JobInterrupted
from fluxlora.jobs.records import INDEX_NAME, TERMINAL, JobRecords, index_name, job_id_of, mark_finished
from fluxlora.jobs.reports import WorkerDied
from fluxlora.jobs.runners import Runner, runner_for
from fluxlora_api.shared.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    status_of,
)
from fluxlora_api.shared.files import human_bytes
from fluxlora_api.v1 import jobs_pb2

log = logging.getLogger(__name__)

S = jobs_pb2.JobState
ACTIVE = frozenset({S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING})
PERSIST_INTERVAL_S = 2.0
EVENTS_KEPT = 256
FINISHED_EVENTS_KEPT_S = 60.0
RESAVE_INTERVAL_S = 5.0  # how often the recorder tries again to write records the store refused
# Store reads inside a request handler (GetJob of a job not in memory, ListJobs, a resubmit): a few
# quick retries, never the ~25 s the job's own writes wait out (FLUXLORA_S3_RETRIES).
QUICK_RETRY = RetryPolicy(retries=2, base_s=0.05, max_s=0.25)
MAX_JOB_ATTEMPTS = 2  # default of FLUXLORA_MAX_JOB_ATTEMPTS
MIN_FREE_BYTES = 256 * 1024**2  # default of FLUXLORA_MIN_FREE_BYTES
FINISHED_IN_MEMORY = 1000  # default of FLUXLORA_FINISHED_JOBS_IN_MEMORY
PAGE_SIZE, MAX_PAGE_SIZE = 100, 500
# Records one ListJobs page reads at most while filtering by state: the page then comes back short,
# with a token to go on, rather than one call reading the whole store.
MAX_SCANNED = 2000
JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

Handler = Callable[[JobContext, Any], Message]


class _EventLog:
    """A job's recent events and the sequence of its last one. A watch stream holds on to the log it
    started with, so a job forgotten from memory meanwhile still ends that stream properly."""

    __slots__ = ("events", "sequence")

    def __init__(self) -> None:
        self.events: collections.deque[jobs_pb2.JobEvent] = collections.deque(maxlen=EVENTS_KEPT)
        self.sequence = 0


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
        finished_in_memory: int | None = None,
    ):
        self.service = service
        self.prefix = prefix
        self.store = store
        self.settings = settings
        self._handler = handler
        # Local threads by default; FLUXLORA_RUNNER=kubernetes runs each job as a Kubernetes Job.
        self._runner = runner or runner_for(settings, service, handler)
        self._records = JobRecords(store, service)
        # What request handlers read with: a few quick retries, then UNAVAILABLE (or memory, for ListJobs).
        self._quick = JobRecords(store.with_retry(QUICK_RETRY), service)
        self._workers = workers
        self._max_queued = max_queued
        # Each watch stream holds a gRPC server thread for as long as the job runs: unbounded, they
        # would take every thread and leave none for submits or health checks. 0: no limit.
        self._max_watchers = max_watchers
        self._watchers = 0
        if finished_in_memory is None:
            finished_in_memory = getattr(settings, "finished_jobs_in_memory", FINISHED_IN_MEMORY)
        self._finished_kept = max(0, int(finished_in_memory))
        self._max_attempts = max(1, int(getattr(settings, "max_job_attempts", MAX_JOB_ATTEMPTS)))
        self._min_free_bytes = max(0, int(getattr(settings, "min_free_bytes", MIN_FREE_BYTES)))
        self._cond = threading.Condition(threading.RLock())
        # Unfinished jobs, and finished ones while they are in the LRU `_finished` (oldest first);
        # the other maps hold entries only for jobs in `_jobs`.
        self._jobs: dict[str, jobs_pb2.Job] = {}
        self._finished: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._by_request: dict[str, str] = {}
        self._logs: dict[str, _EventLog] = {}
        self._persisted_at: dict[str, float] = {}
        # Jobs whose latest change the store has not confirmed yet -> the generation of that change.
        self._unsaved: dict[str, int] = {}
        self._generation = 0
        self._pinned: dict[str, int] = {}  # jobs whose change waits for its store write before its event
        self._warned_unsaved: set[str] = set()
        # Record writes one at a time, each of the newest state: an older snapshot never lands last.
        # Held during store I/O, which `_cond` (taken by GetJob, ListJobs, watchers) never is.
        self._store_lock = threading.Lock()
        self._submit_lock = threading.Lock()  # a request_id is claimed by one submit at a time
        self._recorder_wake = threading.Event()
        self._store_error = ""  # why the last record write failed; "" once one succeeds
        self._health_listeners: builtins.list[Callable[[bool, str], None]] = []
        self._event_listeners: builtins.list[Callable[[jobs_pb2.JobEvent], None]] = []
        self._last_health: tuple[bool, str] | None = None
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._threads: builtins.list[threading.Thread] = []
        self._recorder: threading.Thread | None = None
        self._stopping = threading.Event()
        self._scratch_root = Path(tempfile.mkdtemp(prefix=f"fluxlora-{service}-"))

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Queues this service's unfinished jobs again; finished records stay in the store, unread."""
        self._records.repair()
        for job in sorted(self._records.load_active(), key=lambda j: j.created_at.ToNanoseconds()):
            self._remember(job)
            if job.cancel_requested:
                self._finish(job.job_id, S.JOB_STATE_CANCELLED)
                continue
            # A RUNNING record means its server died mid-job: `attempts` counted that start, and
            # _run fails the job as poison once it reaches FLUXLORA_MAX_JOB_ATTEMPTS.
            job.state = S.JOB_STATE_QUEUED
            self._records.save(job)
            log.info("job %s picked up again after a restart (started %d times before)", job.job_id, job.attempts)
            self._queue.put(job.job_id)
        self._runner.recover(self)
        for i in range(self._workers):
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
        with self._cond:
            self._cond.notify_all()
        shutil.rmtree(self._scratch_root, ignore_errors=True)

    # --- health ------------------------------------------------------------------------------
    def healthy(self) -> tuple[bool, str]:
        """(True, "") while this server can run jobs; else (False, why): a worker thread stopped, or
        the store refuses job records (a full disk, a missing bucket, no access, unreachable)."""
        if self._stopping.is_set():
            return True, ""  # the bootstrap's graceful shutdown says NOT_SERVING itself
        dead = [t.name for t in self._threads if not t.is_alive()]
        if dead:
            return False, f"worker thread {', '.join(dead)} stopped: restart the {self.service} server"
        if self._store_error:
            return False, self._store_error
        return True, ""

    def add_health_listener(self, listener: Callable[[bool, str], None]) -> None:
        """Calls listener(serving, why) now and whenever healthy() changes."""
        self._health_listeners.append(listener)
        listener(*self.healthy())

    def add_event_listener(self, listener: Callable[[jobs_pb2.JobEvent], None]) -> None:
        """Calls listener(event) with every JobEvent as it is emitted (metrics, webhooks), under the
        runtime's lock: a listener must only take note or enqueue, never block; its errors are logged."""
        self._event_listeners.append(listener)

    def _health_changed(self) -> None:
        now = self.healthy()
        if now == self._last_health:
            return
        self._last_health = now
        if now[0]:
            log.info("%s can run jobs again", self.service)
        else:
            log.error("%s cannot run jobs: %s", self.service, now[1])
        for listener in list(self._health_listeners):
            try:
                listener(*now)
            except Exception:  # noqa: BLE001 - a listener must not stop a worker
                log.exception("health listener failed")

    # --- the public surface (servicers call these) ----------------------------------------
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
                        existing = self.get(known)
                    except NotFound:
                        orphan = True
                    else:
                        _check_same_spec(existing, spec, request_id)
                        return existing
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
            if request_id and not self._records.claim(request_id, job.job_id, replace=orphan):
                # Only another server on the same store gets here (one server per service is the
                # supported set-up): its submit of this request_id is under way; a retry finds the job.
                raise Unavailable(f"another {self.service} server is submitting request_id {request_id!r}: "
                                  "retry with the same request_id")
            self._records.mark_active(job.job_id)
            self._records.add_to_index(job)
            self._records.save(job)  # last: the job exists once its record does
            with self._cond:
                self._remember(job)
                self._emit(job, "queued")
                self._forget_old_events()
        self._queue.put(job.job_id)
        return self.get(job.job_id)

    def get(self, job_id: str) -> jobs_pb2.Job:
        """The job from memory, else its record from the store (then kept in the finished LRU)."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is not None:
                if job_id in self._finished:
                    self._finished.move_to_end(job_id)
                return _copy(job)
        job = self._load(job_id)  # outside the lock where the caller holds none: a store read may be slow
        with self._cond:
            if job.state in TERMINAL and job_id not in self._jobs:
                self._jobs[job_id] = job
                self._finished[job_id] = None
                if job.request_id:
                    self._by_request[job.request_id] = job_id
                self._evict()
            return _copy(self._jobs.get(job_id, job))

    def list(self, states: builtins.list[int] | None = None, limit: int = 100) -> builtins.list[jobs_pb2.Job]:
        """The newest `limit` jobs (0: all), through as many pages as that takes."""
        jobs: builtins.list[jobs_pb2.Job] = []
        token = ""
        while True:
            size = min(limit - len(jobs), MAX_PAGE_SIZE) if limit else MAX_PAGE_SIZE
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
        if page_size < 0:
            raise InvalidArgument("page_size must be >= 0")
        size = min(page_size or PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_token(page_token)
        wanted: set[int] = set(states or ())
        if wanted and wanted <= ACTIVE:  # every unfinished job is in memory: no store listing needed
            return (*self._memory_page(wanted, size, after), False)
        try:
            return (*self._store_page(wanted, size, after), False)
        except Unavailable as exc:
            if not fallback:
                raise
            log.warning("ListJobs answered from memory: %s", exc.message)
            return (*self._memory_page(wanted, size, after), True)

    def _memory_page(self, wanted: set[int], size: int, after: str) -> tuple[builtins.list[jobs_pb2.Job], str]:
        with self._cond:
            held = sorted(((index_name(j), _copy(j)) for j in self._jobs.values() if not wanted or j.state in wanted),
                          key=lambda named: named[0])
        later = [(name, job) for name, job in held if name > after]
        token = _encode_token(later[size - 1][0]) if len(later) > size else ""
        return [job for _, job in later[:size]], token

    def _store_page(self, wanted: set[int], size: int, after: str) -> tuple[builtins.list[jobs_pb2.Job], str]:
        jobs: builtins.list[jobs_pb2.Job] = []
        last, scanned = after, 0
        for name in self._quick.index_after(after):
            if len(jobs) == size or scanned == MAX_SCANNED:
                return jobs, _encode_token(last)
            scanned += 1
            last = name
            job = self._peek(job_id_of(name))
            if job is not None and (not wanted or job.state in wanted):
                jobs.append(job)
        return jobs, ""

    def cancel(self, job_id: str) -> jobs_pb2.Job:
        with self._cond:
            job = self._jobs.get(job_id)
        state = job.state if job is not None else self.get(job_id).state
        if state in TERMINAL:
            raise FailedPrecondition(
                f"job {job_id} already finished ({S.Name(state)}); there is nothing to cancel"
            )
        if job is None:  # an unfinished record this server does not run (it was not picked up)
            raise FailedPrecondition(
                f"job {job_id} is {S.Name(state)} in the store but not queued on this server: "
                f"restart the {self.service} server to pick it up, then cancel it"
            )
        with self._cond:
            # The record is written by the recorder thread: a slow store never holds up this answer.
            if job.state == S.JOB_STATE_QUEUED:
                job.cancel_requested = True
                self._finish(job_id, S.JOB_STATE_CANCELLED, message="cancelled while queued", persist="later")
            elif job.state not in TERMINAL:
                self.update(job_id, lambda j: setattr(j, "cancel_requested", True), message="cancel requested",
                            persist="later")
            return _copy(job)

    def watch(self, job_id: str, is_active: Callable[[], bool] = lambda: True,
              after: int = 0) -> Iterator[jobs_pb2.JobEvent]:
        """The current state, then every change; ends after a terminal state. RESOURCE_EXHAUSTED when
        max_watchers streams are open already (GetJob still answers). `after`: the sequence of the last
        event a dropped stream delivered; the buffered events after it come instead of the current state
        when this process numbered that far and still holds them all (else the current state comes)."""
        job = self.get(job_id)  # a finished job no longer in memory: its record, the final state
        with self._cond:
            if self._max_watchers and self._watchers >= self._max_watchers:
                raise ResourceExhausted(
                    f"{self.service} has {self._watchers} WatchJob streams open, the limit is {self._max_watchers} "
                    "(FLUXLORA_MAX_WATCHERS): poll GetJob instead (the SDK does), or raise FLUXLORA_MAX_WATCHERS"
                )
            self._watchers += 1
            held = job_id in self._jobs
            if held:  # the state and the sequence from the same moment
                job = _copy(self._jobs[job_id])
            events_log = self._logs.get(job_id)
            last = events_log.sequence if events_log else 0
            missed = ([e for e in events_log.events if e.sequence > after]
                      if events_log is not None and 0 < after <= last else None)
        try:
            if not held and job.state not in TERMINAL:
                job = self._load(job_id)  # it finished and left memory since: its final record
            first = [jobs_pb2.JobEvent(sequence=last, job=job)]
            first[0].time.GetCurrentTime()
            # none of the missed events dropped from the buffer: they come instead of the current state
            if missed is not None and job.state not in TERMINAL and (not missed or missed[0].sequence == after + 1):
                first = missed
            yield from first
            if job.state in TERMINAL or events_log is None:
                return
            while is_active() and not self._stopping.is_set():
                with self._cond:
                    self._cond.wait_for(partial(self._changed_since, events_log, last), timeout=1.0)
                    events = [e for e in events_log.events if e.sequence > last]
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

    def held(self) -> dict[str, int]:
        """What this runtime holds in memory: unfinished jobs, finished ones (at most
        finished_in_memory, more only while their record waits for the store), event buffers and
        request_ids."""
        with self._cond:
            return {"active": len(self._jobs) - len(self._finished), "finished": len(self._finished),
                    "event_buffers": len(self._logs), "request_ids": len(self._by_request)}

    def _changed_since(self, events_log: _EventLog, sequence: int) -> bool:
        return events_log.sequence > sequence or self._stopping.is_set()

    @property
    def stopping(self) -> bool:
        """True once shutdown began (a runner then leaves remote work running for the next start)."""
        return self._stopping.is_set()

    def should_stop(self, job_id: str) -> bool:
        return self._stopping.is_set() or self._jobs[job_id].cancel_requested

    def update(self, job_id: str, mutate: Callable[[jobs_pb2.Job], Any], message: str = "",
               persist: bool | str = True) -> bool:
        """Applies a change to a job, tells watchers, and writes the record: at once (True: watchers
        hear of the change once the store took it or refused it), at most every PERSIST_INTERVAL_S
        ("throttle"), by the recorder thread soon ("later") or not (False). Returns False only when a
        write due now was refused by the store: the change is kept in memory and written later, and
        healthy() says why meanwhile."""
        with self._cond:
            job = self._jobs[job_id]
            mutate(job)
            now = time.monotonic()
            due = now - self._persisted_at.get(job_id, 0) > PERSIST_INTERVAL_S
            write_now = persist is True or (persist == "throttle" and due)
            if write_now or persist == "later":
                self._persisted_at[job_id] = now
                self._generation += 1
                self._unsaved[job_id] = self._generation  # also keeps it from being evicted unsaved
            if job.state in TERMINAL and job_id not in self._finished:
                self._finished[job_id] = None
                self._persisted_at.pop(job_id, None)
            if not write_now:
                self._emit(job, message)
                self._evict()
            else:
                self._pinned[job_id] = self._pinned.get(job_id, 0) + 1  # not evicted before its event
        if persist == "later":
            self._recorder_wake.set()
        if not write_now:
            return True
        saved = False
        try:
            saved = self._persist(job_id)
        finally:
            with self._cond:
                self._emit(job, message)
                self._pinned[job_id] -= 1
                if not self._pinned[job_id]:
                    del self._pinned[job_id]
                self._evict()
        return saved

    # --- internals -------------------------------------------------------------------------
    def _persist(self, job_id: str) -> bool:
        """Writes a job's newest state. An error of any kind (unreachable, a full disk, a missing
        bucket, access denied) must not stop the job or hide its state from watchers: the record
        stays in memory, the recorder writes it again, and healthy() says why meanwhile."""
        with self._store_lock:
            with self._cond:
                job = self._jobs.get(job_id)
                if job is None:
                    return True
                snapshot, generation = _copy(job), self._unsaved.get(job_id)
            try:
                self._records.save(snapshot)
            except Exception as exc:  # noqa: BLE001 - every store error, see above
                self._store_failed(job_id, exc)
                return False
            if snapshot.state in TERMINAL:
                try:
                    self._records.clear_active(job_id)
                except Exception as exc:  # noqa: BLE001 - harmless: the next start finds it finished and drops it
                    log.warning("job %s: active marker not removed (%s)", job_id, status_of(exc)[1])
            with self._cond:
                if self._unsaved.get(job_id) == generation:
                    self._unsaved.pop(job_id, None)
                if job_id in self._warned_unsaved:
                    self._warned_unsaved.discard(job_id)
                    log.info("job %s: record saved again after the store refused it", job_id)
            if self._store_error:
                self._store_error = ""
                self._health_changed()
        return True

    def _store_failed(self, job_id: str, exc: Exception) -> None:
        code, message = status_of(exc)
        if code == "INTERNAL":
            log.error("job %s: record not saved", job_id, exc_info=exc)
        elif job_id not in self._warned_unsaved:
            log.warning("job %s: record not saved (%s: %s); kept in memory and saved once the store takes it",
                        job_id, code, message)
        self._warned_unsaved.add(job_id)
        self._store_error = f"the store {self.store.uri} refuses job records ({code}: {message})"
        self._health_changed()

    def _record_loop(self) -> None:
        """Writes records a request handler left for later, and again those the store refused."""
        while True:
            self._recorder_wake.wait(RESAVE_INTERVAL_S)
            self._recorder_wake.clear()
            try:
                self._save_unsaved()
            except Exception:  # noqa: BLE001 - the recorder must outlive any surprise
                log.exception("recorder round failed")
            if self._stopping.is_set():
                return

    def _save_unsaved(self) -> None:
        with self._cond:
            pending = sorted(self._unsaved, key=self._unsaved.__getitem__)
        for job_id in pending:
            if not self._persist(job_id):
                return  # still refused: the next round tries again
        with self._cond:
            self._evict()

    def _load(self, job_id: str) -> jobs_pb2.Job:
        job = self._quick.load(job_id) if JOB_ID.match(job_id) else None
        if job is None:
            raise NotFound(f"no {self.service} job {job_id!r}")
        return job

    def _peek(self, job_id: str) -> jobs_pb2.Job | None:
        """A copy of the job for a listing, without touching the LRU; None when it has no record."""
        with self._cond:
            if job_id in self._jobs:
                return _copy(self._jobs[job_id])
        try:
            return self._load(job_id)
        except NotFound:  # an index entry whose submit is still writing, or failed
            return None

    def _remember(self, job: jobs_pb2.Job) -> None:
        self._jobs[job.job_id] = job
        if job.request_id:
            self._by_request[job.request_id] = job.job_id
        self._logs.setdefault(job.job_id, _EventLog())

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

    def _finish(self, job_id: str, state: int, message: str = "", error: tuple[str, str] | None = None,
                result: Message | None = None, persist: bool | str = True) -> None:
        self.update(job_id, lambda job: mark_finished(job, state, error, result),
                    message=message or S.Name(S.ValueType(state)).removeprefix("JOB_STATE_").lower(),
                    persist=persist)

    def _check_free_space(self) -> None:
        """RESOURCE_EXHAUSTED naming the path when a disk this server's jobs write to has less than
        FLUXLORA_MIN_FREE_BYTES free: refused before work starts, not failed half-way with stray files."""
        if not self._min_free_bytes:
            return
        paths = [self._scratch_root]
        root = getattr(self.store, "root", None)
        if isinstance(root, Path):
            paths.append(root)
        for path in paths:
            try:
                free = _free_bytes(path)
            except OSError:
                continue
            if free < self._min_free_bytes:
                raise ResourceExhausted(
                    f"only {human_bytes(free)} free on the disk holding {path}, under the "
                    f"{human_bytes(self._min_free_bytes)} a {self.service} job needs to start "
                    f"(FLUXLORA_MIN_FREE_BYTES={self._min_free_bytes}): free space there (old runs, datasets, "
                    "caches) or move FLUXLORA_STORE / TMPDIR to a bigger disk, then resubmit"
                )

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
                if job is None or job.state in TERMINAL:
                    return
            code, message = status_of(exc)
            self._finish(job_id, S.JOB_STATE_FAILED, message=message, error=(code, message))
        except Exception:  # noqa: BLE001
            log.exception("job %s: could not record its failure", job_id)

    def _run(self, job_id: str) -> None:
        with self._cond:
            job = self._jobs[job_id]
            if job.state != S.JOB_STATE_QUEUED:
                return
            attempts = job.attempts
        if attempts >= self._max_attempts:
            message = (
                f"job {job_id} was started {attempts} times and each time its server or worker process died before "
                f"it finished (FLUXLORA_MAX_JOB_ATTEMPTS={self._max_attempts}), so it is not run again: the usual "
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
            if not self._stopping.wait(RESAVE_INTERVAL_S):
                self._queue.put(job_id)
            return
        with self._cond:
            spec = _message_class(job.spec)()
            job.spec.Unpack(spec)
        scratch = Path(tempfile.mkdtemp(prefix=f"{job_id}-", dir=self._scratch_root))
        try:
            result = tracing.in_span(job.traceparent, f"{self.service} job", partial(
                self._runner.run, self, job_id, spec, scratch), **{"fluxlora.job_id": job_id})
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


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _check_same_spec(job: jobs_pb2.Job, spec: Message, request_id: str) -> None:
    """ALREADY_EXISTS when a request_id comes back with another spec than its job was submitted with."""
    earlier = type(spec)()
    if not job.spec.Unpack(earlier) or earlier == spec:
        return
    names = sorted({f.name for f, _ in earlier.ListFields()} | {f.name for f, _ in spec.ListFields()})
    changed = [n for n in names if _field(earlier, n) != _field(spec, n)]
    raise AlreadyExists(
        f"request_id {request_id!r} was used for job {job.job_id} with a different spec (it differs in "
        f"{', '.join('spec.' + n for n in changed) or 'its fields'}): resend the same spec to get that job, or "
        "use a new request_id for a new job"
    )


def _field(message: Message, name: str) -> Any:
    value = getattr(message, name)
    return list(value) if hasattr(value, "__len__") and not isinstance(value, (str, bytes)) else value


def _copy(job: jobs_pb2.Job) -> jobs_pb2.Job:
    copy = jobs_pb2.Job()
    copy.CopyFrom(job)
    return copy


def _encode_token(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def _decode_token(token: str) -> str:
    """The index name a page token stands for ("" for the first page)."""
    if not token:
        return ""
    try:
        name = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        name = ""
    if not INDEX_NAME.match(name):
        raise InvalidArgument(
            f"page_token {token[:40]!r} is not a next_page_token this service issued: pass the previous "
            "ListJobs response's next_page_token unchanged, or none for the first page"
        )
    return name


def _message_class(any_msg: Any) -> type[Message]:
    from google.protobuf import descriptor_pool, message_factory

    descriptor = descriptor_pool.Default().FindMessageTypeByName(any_msg.TypeName())
    return message_factory.GetMessageClass(descriptor)

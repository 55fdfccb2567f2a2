"""The job runtime: accepts jobs, runs them on worker threads outside the gRPC request threads,
persists every record in the store, streams changes to watchers, and cancels on request.

State machine: QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED; QUEUED -> CANCELLED.
A job interrupted by a shutdown goes back to QUEUED in the store, so the next server start runs it
again (training then resumes from its last checkpoint).

While the store is unreachable (past its retries) a job's record lives only here: the job goes on or
fails UNAVAILABLE, watchers still see every change, and an idle worker writes the record again once
the store answers. A server killed meanwhile finds the last record it did write and runs the job again.

Memory holds unfinished jobs and the most recently finished ones (finished_in_memory, an LRU; with
their event buffers); an older finished job is read from the store when asked for (GetJob, WatchJob,
a resubmit of its request_id), and ListJobs pages through the store's job index (fluxlora.jobs.records),
so a server's memory does not grow with the number of jobs it ever ran.
"""

from __future__ import annotations

import base64
import binascii
import collections
import logging
import queue
import re
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

from fluxlora.common.storage import ArtifactStore
from fluxlora.jobs.context import JobContext, JobInterrupted
from fluxlora.jobs.records import INDEX_NAME, TERMINAL, JobRecords, index_name, job_id_of, mark_finished
from fluxlora.jobs.runners import Runner, runner_for
from fluxlora_api.shared.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    status_of,
)
from fluxlora_api.v1 import jobs_pb2

log = logging.getLogger(__name__)

S = jobs_pb2.JobState
ACTIVE = frozenset({S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING})
PERSIST_INTERVAL_S = 2.0
EVENTS_KEPT = 256
FINISHED_EVENTS_KEPT_S = 60.0
RESAVE_INTERVAL_S = 5.0  # how often an idle worker tries again to write records the store refused
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
        self._workers = workers
        self._max_queued = max_queued
        # Each watch stream holds a gRPC server thread for as long as the job runs: unbounded, they
        # would take every thread and leave none for submits or health checks. 0: no limit.
        self._max_watchers = max_watchers
        self._watchers = 0
        if finished_in_memory is None:
            finished_in_memory = getattr(settings, "finished_jobs_in_memory", FINISHED_IN_MEMORY)
        self._finished_kept = max(0, int(finished_in_memory))
        self._cond = threading.Condition(threading.RLock())
        # Unfinished jobs, and finished ones while they are in the LRU `_finished` (oldest first);
        # the other maps hold entries only for jobs in `_jobs`.
        self._jobs: dict[str, jobs_pb2.Job] = {}
        self._finished: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._by_request: dict[str, str] = {}
        self._logs: dict[str, _EventLog] = {}
        self._persisted_at: dict[str, float] = {}
        self._unsaved: set[str] = set()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
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
            orphan = False  # a claim of this request_id whose job was never stored
            if request_id:
                known = self._by_request.get(request_id) or self._records.claimed(request_id)
                if known:
                    try:
                        return self.get(known)
                    except NotFound:
                        orphan = True
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
            if request_id and not self._records.claim(request_id, job.job_id, replace=orphan):
                # Only another server on the same store gets here (one server per service is the
                # supported set-up): its submit of this request_id is under way; a retry finds the job.
                raise Unavailable(f"another {self.service} server is submitting request_id {request_id!r}: "
                                  "retry with the same request_id")
            self._records.mark_active(job.job_id)
            self._records.add_to_index(job)
            self._records.save(job)  # last: the job exists once its record does
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

    def list(self, states: list[int] | None = None, limit: int = 100) -> list[jobs_pb2.Job]:
        """The newest `limit` jobs (0: all), through as many pages as that takes."""
        jobs: list[jobs_pb2.Job] = []
        token = ""
        while True:
            size = min(limit - len(jobs), MAX_PAGE_SIZE) if limit else MAX_PAGE_SIZE
            page, token = self.page(states, size, token)
            jobs += page
            if not token or (limit and len(jobs) >= limit):
                return jobs

    def page(self, states: list[int] | None = None, page_size: int = 0,
             page_token: str = "") -> tuple[list[jobs_pb2.Job], str]:
        """One page of jobs, newest first, and the token of the next page ("" after the last)."""
        if page_size < 0:
            raise InvalidArgument("page_size must be >= 0")
        size = min(page_size or PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_token(page_token)
        wanted = set(states or ())
        if wanted and wanted <= ACTIVE:  # every unfinished job is in memory: no store listing needed
            with self._cond:
                held = sorted(((index_name(j), _copy(j)) for j in self._jobs.values() if j.state in wanted),
                              key=lambda named: named[0])
            later = [(name, job) for name, job in held if name > after]
            token = _encode_token(later[size - 1][0]) if len(later) > size else ""
            return [job for _, job in later[:size]], token
        jobs: list[jobs_pb2.Job] = []
        last, scanned = after, 0
        for name in self._records.index_after(after):
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
            if job.state == S.JOB_STATE_QUEUED:
                job.cancel_requested = True
                self._finish(job_id, S.JOB_STATE_CANCELLED, message="cancelled while queued")
            else:
                self.update(job_id, lambda j: setattr(j, "cancel_requested", True), message="cancel requested")
            return self.get(job_id)

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
            if job_id in self._jobs:  # the state and the sequence from the same moment
                job = _copy(self._jobs[job_id])
            elif job.state not in TERMINAL:  # it finished and left memory since: its final record
                job = self._load(job_id)
            events_log = self._logs.get(job_id)
            last = events_log.sequence if events_log else 0
            first = [jobs_pb2.JobEvent(sequence=last, job=job)]
            first[0].time.GetCurrentTime()
            if 0 < after <= last and job.state not in TERMINAL:
                missed = [e for e in events_log.events if e.sequence > after]
                if not missed or missed[0].sequence == after + 1:  # none of them dropped from the buffer
                    first = missed
        try:
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
            if job.state in TERMINAL and job_id not in self._finished:
                self._finished[job_id] = None
                self._persisted_at.pop(job_id, None)
                self._evict()

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
            return
        self._unsaved.discard(job.job_id)
        if job.state in TERMINAL:
            try:
                self._records.clear_active(job.job_id)
            except Unavailable as exc:  # harmless: the next start finds the record finished and drops it
                log.warning("job %s: active marker not removed (%s)", job.job_id, exc.message)

    def _save_unsaved(self) -> None:
        with self._cond:
            for job_id in sorted(self._unsaved):
                self._save(self._jobs[job_id])
                if job_id in self._unsaved:
                    return  # still unreachable: the next idle round tries again
                log.info("job %s: record saved again after the store came back", job_id)
            self._evict()

    def _load(self, job_id: str) -> jobs_pb2.Job:
        job = self._records.load(job_id) if JOB_ID.match(job_id) else None
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
            if job_id in self._unsaved:
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

"""Job records written to the store, and the health that follows from it.

`update` applies a change in memory, tells watchers and writes the record (at once, throttled, or
soon by the recorder thread). A store error of any kind while a record is written (unreachable, a
full disk, a missing bucket, access denied) never stops a worker thread: the in-memory record is the
truth until the store takes it, the recorder thread writes it again every RESAVE_INTERVAL_S, and the
server reports NOT_SERVING through `healthy()` / `add_health_listener` until a write succeeds again.
Store writes happen outside the lock GetJob/ListJobs take.

A terminal state is the exception: `_finish` tells nobody (GetJob, ListJobs, WatchJob, webhooks) before
the store holds it. Told first, a server killed before the write left a RUNNING record, the next
generation ran the job again, and a watcher saw FAILED, then SUCCEEDED. Until the write lands the job
keeps its last state, its progress stage saying the result is being recorded and why it waits; a server
killed meanwhile runs it again, which nobody can tell from one run. (Not a local journal: it would be a
second truth beside the store, lost anyway when a pod moves to another node.)
"""

from __future__ import annotations

import builtins
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from google.protobuf.message import Message

from fluxlora.common.config import Settings
from fluxlora.common.storage import ArtifactStore
from fluxlora.jobs.artifact_refs import refresh_artifacts
from fluxlora.jobs.memory import JobMemory, copy_job
from fluxlora.jobs.records import TERMINAL, JobRecords, mark_finished
from fluxlora_api.shared.errors import status_of
from fluxlora_api.v1 import jobs_pb2

log = logging.getLogger(__name__)

S = jobs_pb2.JobState
PERSIST_INTERVAL_S = 2.0
RESAVE_INTERVAL_S = 5.0  # how often the recorder tries again to write records the store refused


class JobRecorder(JobMemory):
    def __init__(self, service: str, store: ArtifactStore, settings: Settings | None,
                 finished_in_memory: int | None, max_watchers: int):
        super().__init__(service, store, settings, finished_in_memory, max_watchers)
        self._records = JobRecords(store, service)
        self._persisted_at: dict[str, float] = {}
        self._generation = 0
        self._warned_unsaved: set[str] = set()
        # Record writes one at a time, each of the newest state: an older snapshot never lands last.
        # Held during store I/O, which `_cond` (taken by GetJob, ListJobs, watchers) never is.
        self._store_lock = threading.Lock()
        self._recorder_wake = threading.Event()
        self._store_error = ""  # why the last record write failed; "" once one succeeds
        # Terminal records not in the store yet -> (the record, its event's message); told once stored.
        self._finals: dict[str, tuple[jobs_pb2.Job, str]] = {}
        self._health_listeners: builtins.list[Callable[[bool, str], None]] = []
        self._last_health: tuple[bool, str] | None = None
        self._threads: builtins.list[threading.Thread] = []  # the worker threads
        self._recorder: threading.Thread | None = None

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

    # --- writing records -------------------------------------------------------------------------
    def _persist(self, job_id: str) -> bool:
        """Writes a job's newest state. An error of any kind (unreachable, a full disk, a missing
        bucket, access denied) must not stop the job or hide its state from watchers: the record
        stays in memory, the recorder writes it again, and healthy() says why meanwhile."""
        with self._store_lock:
            with self._cond:
                job = self._jobs.get(job_id)
                if job is None:
                    return True
                final = self._finals.get(job_id)
                snapshot, generation = copy_job(final[0] if final else job), self._unsaved.get(job_id)
            try:
                self._records.save(snapshot)
            except Exception as exc:  # noqa: BLE001 - every store error, see above
                self._store_failed(job_id, exc)
                if final:
                    self._still_recording(job_id, exc)
                return False
            if snapshot.state in TERMINAL:
                try:
                    self._records.clear_active(job_id)
                except Exception as exc:  # noqa: BLE001 - harmless: the next start finds it finished and drops it
                    log.warning("job %s: active marker not removed (%s)", job_id, status_of(exc)[1])
            with self._cond:
                if self._unsaved.get(job_id) == generation:
                    self._unsaved.pop(job_id, None)
                if final and self._finals.get(job_id) is final:
                    self._tell_final(job_id)
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

    # --- terminal states: stored before anyone is told ------------------------------------------------
    def _finish(self, job_id: str, state: int, message: str = "", error: tuple[str, str] | None = None,
                result: Message | None = None, persist: bool | str = True) -> None:
        """Ends a job: its terminal record is written first (now, or by the recorder with persist="later")
        and only then shown; refused, the recorder writes it again every RESAVE_INTERVAL_S."""
        with self._cond:
            job = self._jobs[job_id]
            if job.state in TERMINAL or job_id in self._finals:
                return  # ended already, or ending: a job has one terminal state
            final = copy_job(job)
        if result is None and final.artifacts:
            refresh_artifacts(self.store, final.artifacts)  # outside the lock: store calls
        with self._cond:
            if job.state in TERMINAL or job_id in self._finals:
                return
            mark_finished(final, state, error, result)
            self._finals[job_id] = (final, message or S.Name(S.ValueType(state)).removeprefix("JOB_STATE_").lower())
            self._generation += 1
            self._unsaved[job_id] = self._generation
        if persist == "later":
            self._recorder_wake.set()
        else:
            self._persist(job_id)

    def finishing(self, job_id: str) -> bool:
        """True while the job's terminal record waits for the store (it must not run, nor end again)."""
        with self._cond:
            return job_id in self._finals

    def _tell_final(self, job_id: str) -> None:
        """The stored terminal record becomes the job everyone sees (under _cond)."""
        final, message = self._finals.pop(job_id)
        job = self._jobs[job_id]
        final.cancel_requested |= job.cancel_requested  # a cancel that came while it was being recorded
        job.CopyFrom(final)
        self._finished[job_id] = None
        self._persisted_at.pop(job_id, None)
        self._emit(job, message)
        self._evict()

    def _still_recording(self, job_id: str, exc: Exception) -> None:
        """Says on the job (its progress stage, and an event) why its end is not shown yet; once per reason."""
        code, message = status_of(exc)
        why = ("the store is unavailable" if code == "UNAVAILABLE"
               else f"the store refuses it ({code}: {message})")
        stage = (f"finished; recording the result: {why}, retrying every {RESAVE_INTERVAL_S:g} s "
                 "(the result is shown once it is stored)")
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job_id not in self._finals or job.progress.stage == stage:
                return
            job.progress.stage = stage
            self._emit(job, stage)

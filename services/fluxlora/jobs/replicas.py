"""Several replicas of one service on one store (issue 14): each job is worked on by the one replica
holding its lease (fluxlora.jobs.leases), and every replica answers for every job.

- A submit takes epoch 1 of its new job's lease before anything else is stored; a start, and then a scan
  every lease period, takes the unfinished jobs (jobs/active/<service>/) whose lease is free, expired or
  held by a process known to be gone, and queues them (`_scan`).
- A thread renews this replica's leases every third of a lease and lets go of a job another replica
  took over: the job's handler is told to stop (should_stop), its record is never written again here,
  and it leaves memory once its run ends. What remains possible after a takeover: the old owner's
  handler may still write artifacts until it reaches its next safe point (at most a renewal period
  plus one safe point later). That is safe because a re-run writes the same keys with the same bytes
  (datasets are content-addressed, captions and grids are rewritten whole, training resumes from its
  last complete checkpoint) and completion markers and records are written last: a record is written
  only while its lease is valid on the owner's own clock (`_persist`; a write begun in time must land
  within the lease's last quarter, see leases.py), so no late record of the old owner overwrites the
  new owner's. A job about to finish on a lapsed lease checks it first (`update`); if the store cannot
  be reached for that, the end is announced here and written once the lease is taken again, or never.
- Webhook events (fluxlora.jobs.webhooks) go out from the replica holding the job's lease, which it keeps
  while any of them waits, even after the job ended; a replica taking a lease over takes the job's
  outbox with it, and a finished job's outbox left by a dead owner is taken like a job (`_scan_outboxes`).
- Reads of a job this replica does not own come from its stored record (fluxlora.jobs.replica_reads);
  a CancelJob of it leaves a marker, which the owner honours within a tick (CANCEL_CHECK_S).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from google.protobuf.message import Message

from fluxlora.common import metrics
from fluxlora.common.config import Settings
from fluxlora.common.s3_retry import RetryPolicy
from fluxlora.common.storage import ArtifactStore
from fluxlora.jobs import leases
from fluxlora.jobs.execution import Handler
from fluxlora.jobs.memory import copy_job
from fluxlora.jobs.records import TERMINAL
from fluxlora.jobs.replica_reads import ReplicaReads
from fluxlora.jobs.runners import Runner
from fluxlora_api.shared.errors import Unavailable, status_of
from fluxlora_api.v1 import jobs_pb2

log = logging.getLogger(__name__)

S = jobs_pb2.JobState
CANCEL_CHECK_S = 2.0  # how often the owner looks for cancels left by other replicas
SUBMIT_WAIT_S = 10.0  # how long a submit waits for another replica's submit of the same request_id
# Lease I/O must answer well within a lease: a few quick retries, then the next round tries again.
LEASE_RETRY = RetryPolicy(retries=2, base_s=0.1, max_s=0.5)


class Outbox(Protocol):
    """What the replicas need of fluxlora.jobs.webhooks.WebhookDispatcher (a floor above)."""

    def stored_jobs(self) -> list[str]: ...
    def take_over(self, job_id: str) -> None: ...
    def drop(self, job_id: str) -> None: ...
    def holds(self, job_id: str) -> bool: ...


class JobReplicas(ReplicaReads):
    def __init__(self, service: str, store: ArtifactStore, handler: Handler, settings: Settings | None,
                 runner: Runner | None, finished_in_memory: int | None, max_watchers: int):
        super().__init__(service, store, handler, settings, runner, finished_in_memory, max_watchers)
        self.lease_seconds = float(getattr(settings, "lease_seconds", leases.LEASE_SECONDS))
        self.identity = leases.identity(getattr(settings, "replica_id", ""))
        book = leases.LeaseBook(store.with_retry(LEASE_RETRY), service, self.identity, self.lease_seconds)
        self._leases = leases.JobLeases(book)
        self._let_go: set[str] = set()  # jobs still in memory whose lease another replica took
        self._expires_seen: dict[str, float] = {}  # jobs leased elsewhere -> when that lease ends
        self._submitting: dict[str, float] = {}  # jobs leased by a submit here, not in memory yet -> since
        self._cancels_prefix = f"jobs/cancels/{service}/"
        self._replica_thread: threading.Thread | None = None
        self._outbox: Outbox | None = None
        self._outbox_expires: dict[str, float] = {}  # finished jobs' outboxes leased elsewhere -> until when

    def attach_outbox(self, outbox: Outbox) -> None:
        """The webhook dispatcher: it sends the events of the jobs whose lease this replica holds, and
        the lease stays held while any of them waits (before start)."""
        self._outbox = outbox

    # --- ownership -------------------------------------------------------------------------------
    def owns(self, job_id: str) -> bool:
        """Whether this replica works on the job (holds it in memory and has not let it go)."""
        with self._cond:
            return job_id in self._jobs and job_id not in self._let_go

    def should_stop(self, job_id: str) -> bool:
        return job_id in self._let_go or super().should_stop(job_id)

    def update(self, job_id: str, mutate: Callable[[jobs_pb2.Job], object], message: str = "",
               persist: bool | str = True) -> bool:
        if self._would_finish(job_id, mutate):
            self._confirm_lease(job_id)
        if job_id in self._let_go:
            return True  # another replica works on it now: no change, no event, no record from here
        return super().update(job_id, mutate, message, persist)

    def _finish(self, job_id: str, state: int, message: str = "", error: tuple[str, str] | None = None,
                result: Message | None = None, persist: bool | str = True) -> None:
        self._confirm_lease(job_id)
        with self._cond:
            elsewhere = job_id in self._let_go or job_id not in self._jobs
        if elsewhere:
            return  # another replica works on it now: the job ends there
        super()._finish(job_id, state, message, error, result, persist)

    def _confirm_lease(self, job_id: str) -> None:
        """A lapsed lease (renewals failed, or this process was paused): before a job is finished here,
        learn whether another replica took it meanwhile (then it is theirs to finish)."""
        if job_id in self._let_go or self._leases.holds(job_id):
            return
        try:
            if not self._leases.renew(job_id):
                self._lose(job_id)
        except Exception as exc:  # noqa: BLE001 - unreachable: its end waits in memory until it can be written
            log.warning("job %s: lease not confirmed before finishing (%s)", job_id, status_of(exc)[1])

    def _would_finish(self, job_id: str, mutate: Callable[[jobs_pb2.Job], object]) -> bool:
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.state in TERMINAL:
                return False
            probe = copy_job(job)
        mutate(probe)
        return probe.state in TERMINAL

    def _persist(self, job_id: str) -> bool:
        if job_id in self._let_go:
            return True  # the new owner writes this record now
        with self._cond:
            job = self._jobs.get(job_id)
            leased = job is not None and not (job.state in TERMINAL and job_id not in self._unsaved)
        if leased and not self._leases.holds(job_id):
            return False  # lapsed: kept in memory; the recorder writes it once the lease is taken again
        return super()._persist(job_id)

    def _run(self, job_id: str) -> None:
        try:
            if self.owns(job_id):
                super()._run(job_id)
        finally:
            if job_id in self._let_go:
                self._drop(job_id)

    def _drop(self, job_id: str) -> None:
        """Forgets a job another replica took over: reads of it go to the store from now on."""
        with self._cond:
            job = self._jobs.pop(job_id, None)
            self._finished.pop(job_id, None)
            self._logs.pop(job_id, None)
            self._unsaved.pop(job_id, None)
            self._finals.pop(job_id, None)  # an end recorded there, not here
            if job is not None and job.request_id and self._by_request.get(job.request_id) == job_id:
                del self._by_request[job.request_id]
            self._let_go.discard(job_id)
            self._cond.notify_all()

    def _lose(self, job_id: str) -> None:
        """Lets go of a job another replica took: its handler stops at the next safe point, and the job
        leaves memory when its run (or, queued, its turn) ends: a worker may be about to start it."""
        log.warning("job %s: another %s replica took it over; this replica (%s) stops working on it",
                    job_id, self.service, self.identity.replica)
        metrics.LEASES_LOST.labels(self.service).inc()
        if self._outbox is not None:
            self._outbox.drop(job_id)
        with self._cond:
            self._let_go.add(job_id)
            finished = job_id in self._jobs and (self._jobs[job_id].state in TERMINAL  # its record still unsaved
                                                 or job_id in self._finals)
            self._cond.notify_all()
        if finished:  # no worker will come back to it
            self._drop(job_id)

    # --- taking jobs -----------------------------------------------------------------------------
    def lease_new(self, job_id: str) -> None:
        """Epoch 1 of a job being submitted here: taken before anything of it is stored."""
        if self._leases.take(job_id, None) is None:
            raise Unavailable(f"job id {job_id} is taken already: submit again")
        self._submitting[job_id] = time.monotonic()

    def orphan_or_job(self, job_id: str) -> jobs_pb2.Job | None:
        """For a request_id claimed by `job_id` that has no record: the job, once another replica's submit
        of it stored it; None when that submit died (this replica then takes the claim over)."""
        if self._leases.lease(job_id) is not None:  # this replica's own earlier submit of it failed
            self._leases.forget(job_id)
            return None
        job = self.await_submit(job_id)
        if job is not None:
            return job
        newest = self._leases.book.newest(job_id)
        if newest is not None:
            if self._leases.take(job_id, newest) is None:  # of replicas taking the claim over, one does
                raise Unavailable(f"replica {newest.owner} of {self.service} is submitting job {job_id} for this "
                                  "request_id: retry with the same request_id")
            self._leases.forget(job_id)
        return self._records.load(job_id)

    def claimed_job(self, request_id: str) -> jobs_pb2.Job:
        """The job of a request_id another replica claimed while this one was submitting it too."""
        job_id = self._records.claimed(request_id)
        job = self.await_submit(job_id) if job_id else None
        if job is None:
            raise Unavailable(f"another {self.service} replica was submitting request_id {request_id!r} and "
                              "stopped: retry with the same request_id")
        return job

    def await_submit(self, job_id: str) -> jobs_pb2.Job | None:
        """The job another replica is submitting, once it stored its record (a few store writes away);
        None when that submit died (its lease is free or expired)."""
        deadline = time.monotonic() + SUBMIT_WAIT_S
        while (job := self._records.load(job_id)) is None:
            if self._leases.book.takeable(self._leases.book.newest(job_id)):
                return None
            if time.monotonic() > deadline:
                raise Unavailable(f"another {self.service} replica is still submitting job {job_id} for this "
                                  "request_id: retry with the same request_id")
            time.sleep(0.05)
        return job

    def _scan(self, at_start: bool = False) -> None:
        """Takes the unfinished jobs no live replica holds and queues them, oldest first."""
        taken: list[tuple[jobs_pb2.Job, leases.Lease | None]] = []
        prefix = self._quick.active_prefix
        unfinished = [info.key[len(prefix):] for info in self._quick.store.list(prefix)]
        for job_id in set(self._expires_seen) - set(unfinished):  # finished elsewhere: forget when it ended
            del self._expires_seen[job_id]
        for job_id in unfinished:
            with self._cond:
                if job_id in self._jobs:  # ours, or let go and still stopping
                    continue
            if time.time() < self._expires_seen.get(job_id, 0.0):
                continue
            newest = self._leases.book.newest(job_id)
            if not self._leases.book.takeable(newest, at_start):
                self._expires_seen[job_id] = newest.expires_at if newest else 0.0
                continue
            if self._leases.take(job_id, newest) is None:
                continue
            if newest is not None:
                metrics.LEASES_TAKEN_OVER.labels(self.service, "job").inc()
            self._expires_seen.pop(job_id, None)
            if self._outbox is not None:  # its earlier events go out before those of its adoption
                self._outbox.take_over(job_id)
            job = self._records.load(job_id)
            if job is None or job.state in TERMINAL:  # a submit that died before its record, or a finished job
                self._records.clear_active(job_id)
                if not self._sends_events(job_id):
                    self._leases.release(job_id)
                continue
            taken.append((job, newest))
        for job, previous in sorted(taken, key=lambda t: t[0].created_at.ToNanoseconds()):
            self._adopt(job, previous, at_start)
        self._scan_outboxes(set(unfinished), at_start)

    def _scan_outboxes(self, unfinished: set[str], at_start: bool) -> None:
        """Takes the lease of each finished job whose undelivered webhook events no live replica holds
        (its owner died or stopped after the job ended), and with it the events (webhooks.py)."""
        if self._outbox is None:
            return
        stored = self._outbox.stored_jobs()
        for job_id in set(self._outbox_expires) - set(stored):
            del self._outbox_expires[job_id]
        for job_id in stored:
            if job_id in unfinished or self._leases.lease(job_id) is not None or self._outbox.holds(job_id) \
                    or time.time() < self._outbox_expires.get(job_id, 0.0):
                continue  # an unfinished job's events go with the job (above)
            with self._cond:
                if job_id in self._jobs:
                    continue
            newest = self._leases.book.newest(job_id)
            if not self._leases.book.takeable(newest, at_start):
                self._outbox_expires[job_id] = newest.expires_at if newest else 0.0
                continue
            if self._leases.take(job_id, newest) is None:
                continue
            self._outbox_expires.pop(job_id, None)
            metrics.LEASES_TAKEN_OVER.labels(self.service, "webhooks").inc()
            self._outbox.take_over(job_id)
            if not self._outbox.holds(job_id):  # delivered and deleted meanwhile by the one before
                self._leases.release(job_id)

    def leases_held(self) -> int:
        return len(self._leases.held())

    def _sends_events(self, job_id: str) -> bool:
        return self._outbox is not None and self._outbox.holds(job_id)

    def _adopt(self, job: jobs_pb2.Job, previous: leases.Lease | None, at_start: bool) -> None:
        job_id = job.job_id
        cancelled = job.cancel_requested or self.store.exists(self._cancels_prefix + job_id)
        with self._cond:
            self._remember(job)
        if cancelled:
            job.cancel_requested = True
            self._finish(job_id, S.JOB_STATE_CANCELLED)
            return
        # A RUNNING record means its owner died mid-job: `attempts` counted that start, and _run fails
        # the job as poison once it reaches FLUXLORA_MAX_JOB_ATTEMPTS.
        where = "after a restart" if at_start and (previous is None or previous.owner == self.identity.replica) \
            else f"from replica {previous.owner if previous else '?'}"
        message = f"picked up again {where} (started {job.attempts} times before)"
        log.info("job %s %s", job_id, message)
        self.update(job_id, lambda j: setattr(j, "state", S.JOB_STATE_QUEUED), message=message)
        self._queue.put(job_id)

    # --- the replica thread ----------------------------------------------------------------------
    def start_replica(self) -> None:
        """Takes the free unfinished jobs, then starts renewing, scanning and honouring cancels."""
        self._scan(at_start=True)
        self._replica_thread = threading.Thread(target=self._replica_loop, name=f"{self.service}-leases",
                                                daemon=True)
        self._replica_thread.start()

    def _replica_loop(self) -> None:
        tick = min(CANCEL_CHECK_S, self.lease_seconds / 3)
        renewed = scanned = time.monotonic()
        while not self._stopping.wait(tick):
            now = time.monotonic()
            for due, step in ((True, self._honour_cancels),
                              (now - renewed >= self.lease_seconds / 3, self._renew),
                              (now - scanned >= self.lease_seconds, self._scan)):
                if not due:
                    continue
                try:
                    step()
                except Exception as exc:  # noqa: BLE001 - the next tick tries again
                    log.warning("%s replica %s: %s failed: %s", self.service, self.identity.replica,
                                step.__name__.strip("_"), status_of(exc)[1])
            renewed = now if now - renewed >= self.lease_seconds / 3 else renewed
            scanned = now if now - scanned >= self.lease_seconds else scanned

    def _renew(self) -> None:
        for job_id in self._leases.held():
            with self._cond:
                job = self._jobs.get(job_id)
                done = job is not None and job.state in TERMINAL and job_id not in self._unsaved
            since = self._submitting.get(job_id)
            if job is not None or since is None or time.monotonic() - since > self.lease_seconds:
                self._submitting.pop(job_id, None)  # stored, or a submit that failed (a retry takes it over)
                done = done or job is None
            if done and not self._sends_events(job_id):  # finished, stored, told: no one needs to take it over
                self._leases.forget(job_id)
            elif not self._leases.renew(job_id):
                if job is not None:
                    self._lose(job_id)
                elif self._outbox is not None:  # held for its webhook events only
                    metrics.LEASES_LOST.labels(self.service).inc()
                    self._outbox.drop(job_id)

    def _honour_cancels(self) -> None:
        for info in list(self._quick.store.list(self._cancels_prefix)):
            job_id = info.key[len(self._cancels_prefix):]
            if self.owns(job_id):
                try:
                    self.cancel(job_id)
                except Exception as exc:  # noqa: BLE001 - finished meanwhile: nothing to cancel
                    log.info("job %s: cancel from another replica: %s", job_id, status_of(exc)[1])
                self.store.delete(info.key)
            elif (job := self._quick.load(job_id)) is None or job.state in TERMINAL:
                self.store.delete(info.key)  # a cancel that came too late, or whose job is gone

    def cancel(self, job_id: str) -> jobs_pb2.Job:
        raise NotImplementedError  # JobRuntime's

    def submit_in_flight(self, job_id: str) -> bool:
        """Whether a job without a record may still be being submitted (by a live replica)."""
        return not self._leases.book.takeable(self._leases.book.newest(job_id), at_start=True)

    def stop_replica(self) -> None:
        """At shutdown, once the workers stopped: jobs sent back to the queue are handed to the other
        replicas at once (unless webhook events of theirs wait: this server's deliveries go on until
        the server stops them, after this, so those leases expire instead); a handler left running
        writes no record any more (its lease is dropped)."""
        if self._replica_thread is not None:
            self._replica_thread.join(5.0)
        for job_id in self._leases.held():
            with self._cond:
                job = self._jobs.get(job_id)
                queued = job is not None and job.state == S.JOB_STATE_QUEUED and job_id not in self._unsaved
            queued = queued and not self._sends_events(job_id)
            try:
                if queued:
                    self._leases.release(job_id)
                else:
                    self._leases.forget(job_id)
            except Exception as exc:  # noqa: BLE001 - it expires by itself
                log.warning("job %s: lease not released (%s)", job_id, status_of(exc)[1])

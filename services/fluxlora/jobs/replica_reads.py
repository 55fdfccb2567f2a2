"""Reads of jobs another replica of the service owns (fluxlora.jobs.replicas): GetJob / ListJobs answer
them from their stored records; WatchJob follows the stored record (FOLLOW_INTERVAL_S) until it ends,
switching between memory and the store as the job comes and goes; CancelJob leaves a marker,
jobs/cancels/<service>/<id>, which the owner honours within a tick."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from fluxlora.jobs.execution import JobExecution
from fluxlora.jobs.memory import ACTIVE, copy_job
from fluxlora.jobs.records import TERMINAL
from fluxlora.jobs.watching import JobWatching
from fluxlora_api.shared.errors import FailedPrecondition, NotFound, ResourceExhausted
from fluxlora_api.v1 import jobs_pb2

S = jobs_pb2.JobState
FOLLOW_INTERVAL_S = 1.0  # how often a watch of a job owned elsewhere reads its record


class ReplicaReads(JobExecution, JobWatching):
    _let_go: set[str]  # jobs still in memory whose lease another replica took
    _cancels_prefix: str

    def owns(self, job_id: str) -> bool:
        raise NotImplementedError  # JobReplicas'

    # --- reads of jobs owned elsewhere -----------------------------------------------------------
    def get(self, job_id: str) -> jobs_pb2.Job:
        if job_id in self._let_go:
            return self._load(job_id)
        return super().get(job_id)

    def _peek(self, job_id: str) -> jobs_pb2.Job | None:
        if job_id in self._let_go:
            try:
                return self._load(job_id)
            except NotFound:
                return None
        return super()._peek(job_id)

    def active_jobs(self) -> list[jobs_pb2.Job]:
        """Every unfinished job of the service, whichever replica runs it: those held here from memory,
        the others from their records."""
        prefix = self._quick.active_prefix
        names = {info.key[len(prefix):] for info in self._quick.store.list(prefix)}
        jobs = [job for job in map(self._peek, sorted(names)) if job is not None and job.state in ACTIVE]
        with self._cond:
            jobs += [copy_job(j) for j in self._jobs.values() if j.state in ACTIVE and j.job_id not in names]
        return jobs

    def watch(self, job_id: str, is_active: Callable[[], bool] = lambda: True,
              after: int = 0) -> Iterator[jobs_pb2.JobEvent]:
        """JobWatching.watch while this replica owns the job; else its stored record, followed."""
        while True:
            if self.owns(job_id):
                last = None
                for last in super().watch(job_id, lambda: is_active() and self.owns(job_id), after):
                    yield last
                if last is not None and last.job.state in TERMINAL:
                    return
            else:
                last = None
                for last in self._follow(job_id, is_active):
                    yield last
                if last is not None and last.job.state in TERMINAL:
                    return
            if not is_active() or self._stopping.is_set():
                return
            after = 0  # another process numbered the events so far

    def _follow(self, job_id: str, is_active: Callable[[], bool]) -> Iterator[jobs_pb2.JobEvent]:
        """The stored record whenever it changes, until it is terminal or this replica takes the job.
        Events carry sequence 0 and no message: a reconnecting SDK then drops a repeat of the state."""
        with self._cond:
            if self._max_watchers and self._watchers >= self._max_watchers:
                raise ResourceExhausted(
                    f"{self.service} has {self._watchers} WatchJob streams open, the limit is {self._max_watchers} "
                    "(FLUXLORA_MAX_WATCHERS): poll GetJob instead (the SDK does), or raise FLUXLORA_MAX_WATCHERS")
            self._watchers += 1
        try:
            seen = None
            while True:
                job = self._load(job_id)
                if job != seen:
                    seen = job
                    event = jobs_pb2.JobEvent(job=job)
                    event.time.GetCurrentTime()
                    yield event
                if job.state in TERMINAL:
                    return
                deadline = time.monotonic() + FOLLOW_INTERVAL_S
                while time.monotonic() < deadline:
                    if not is_active() or self._stopping.is_set() or self.owns(job_id):
                        return
                    with self._cond:
                        self._cond.wait(0.2)
        finally:
            with self._cond:
                self._watchers -= 1

    def cancel_elsewhere(self, job_id: str) -> jobs_pb2.Job:
        """Cancel of an unfinished job another replica owns: a marker its owner honours."""
        job = self._load(job_id)
        if job.state in TERMINAL:
            raise FailedPrecondition(f"job {job_id} already finished ({S.Name(job.state)}); there is nothing to cancel")
        self.store.put_bytes(self._cancels_prefix + job_id, b"")
        job.cancel_requested = True
        return job

"""WatchJob: a job's current state, then each of its events until a terminal one; a dropped stream
resumes after the last sequence it saw while this process still holds the events after it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

from fluxlora.jobs.memory import EventLog, JobMemory, copy_job
from fluxlora.jobs.records import TERMINAL
from fluxlora_api.shared.errors import ResourceExhausted
from fluxlora_api.v1 import jobs_pb2


class JobWatching(JobMemory):
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
                job = copy_job(self._jobs[job_id])
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

    def _changed_since(self, events_log: EventLog, sequence: int) -> bool:
        return events_log.sequence > sequence or self._stopping.is_set()

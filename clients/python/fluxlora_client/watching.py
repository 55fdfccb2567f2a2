"""Following jobs: get, list (paged), cancel, and watch/wait that ride out a server that drops the
stream, is down or restarts (reconnecting with backoff and jitter, resuming after the last event),
and fall back to polling GetJob when the server's watch streams are all taken."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Iterator

import grpc

from fluxlora_api.v1 import jobs_pb2
from fluxlora_client.connection import ServiceConnections
from fluxlora_client.errors import FluxloraClientError, JobCancelled, JobFailed

S = jobs_pb2.JobState
TERMINAL = (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED)


class JobWatching(ServiceConnections):
    def get_job(self, job_id: str) -> jobs_pb2.Job:
        return self._call(self._jobs(job_id).GetJob, jobs_pb2.GetJobRequest(job_id=job_id))

    def list_jobs(self, service: str, states: list[int] | None = None, page_size: int = 0,
                  limit: int = 100) -> list[jobs_pb2.Job]:
        """A service's newest `limit` jobs (0: all of them), newest first, `page_size` per ListJobs call
        (0: `limit`, at most the server's 500)."""
        pages = self.iter_jobs(service, states, page_size or min(limit, 500))
        return list(itertools.islice(pages, limit or None))

    def iter_jobs(self, service: str, states: list[int] | None = None, page_size: int = 0) -> Iterator[jobs_pb2.Job]:
        """Every job of a service, newest first, asking for the next page only when the last is used up."""
        if service not in self.addresses:
            raise FluxloraClientError(
                "INVALID_ARGUMENT", f"unknown service {service!r}; choose one of {', '.join(self.addresses)}"
            )
        self._channel(service)
        token = ""
        while True:
            request = jobs_pb2.ListJobsRequest(states=states or [], page_size=page_size, page_token=token)
            reply = self._call(self._endpoints[service].jobs.ListJobs, request)
            yield from reply.jobs
            token = reply.next_page_token
            if not token:
                return

    def cancel(self, job_id: str) -> jobs_pb2.Job:
        return self._call(self._jobs(job_id).CancelJob, jobs_pb2.CancelJobRequest(job_id=job_id))

    def watch(self, job_id: str, reconnect_for_s: float | None = None) -> Iterator[jobs_pb2.JobEvent]:
        """Streams the job's events until it finishes: the terminal event comes exactly once and no
        event twice. A dropped stream or a server that is down or restarting is reconnected, with
        backoff and jitter, for up to `reconnect_for_s` seconds of outage (default: the client's
        reconnect_for_s, 300), resuming after the last event seen; past that FluxloraClientError
        UNAVAILABLE. A server with all its watch streams taken (RESOURCE_EXHAUSTED,
        FLUXLORA_MAX_WATCHERS) is polled with GetJob instead: those events carry sequence 0 and come
        only when the job changed."""
        limit = self.reconnect_for_s if reconnect_for_s is None else reconnect_for_s
        outage, seen = _Outage(job_id, limit), _Seen()
        stub = self._jobs(job_id)
        while True:
            try:
                request = jobs_pb2.WatchJobRequest(job_id=job_id, after_sequence=seen.sequence)
                for event in stub.WatchJob(request):
                    outage.over()
                    if seen.is_new(event):
                        yield event
                    if event.job.state in TERMINAL:
                        return
                why = "the stream ended before the job finished (the server is stopping)"
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    yield from self._poll(job_id, seen, outage)
                    return
                if err.code() not in _RECONNECT_ON:
                    raise FluxloraClientError(err.code().name, err.details() or "") from None
                why = f"{err.code().name}: {err.details()}"
            outage.wait(why)

    def _poll(self, job_id: str, seen: _Seen, outage: _Outage, first_s: float = 0.2,
              max_s: float = 2.0) -> Iterator[jobs_pb2.JobEvent]:
        delay = first_s
        while True:
            try:
                job = self.get_job(job_id)
            except FluxloraClientError as err:
                if err.code != "UNAVAILABLE":
                    raise
                outage.wait(f"{err.code}: {err.message}")
                continue
            outage.over()
            event = jobs_pb2.JobEvent(job=job, message="polled (the server's watch streams are all in use)")
            event.time.GetCurrentTime()
            if job != seen.job:
                seen.is_new(event)
                yield event
                delay = first_s
            if job.state in TERMINAL:
                return
            time.sleep(delay)
            delay = min(max_s, delay * 1.5)

    def wait(self, job: jobs_pb2.Job | str, on_event: Callable[[jobs_pb2.JobEvent], None] | None = None,
             raise_on_failure: bool = True, reconnect_for_s: float | None = None) -> jobs_pb2.Job:
        """Blocks until the job finishes, riding out server restarts as `watch` does; raises JobFailed /
        JobCancelled unless told not to."""
        job_id = job if isinstance(job, str) else job.job_id
        final = None
        for event in self.watch(job_id, reconnect_for_s=reconnect_for_s):
            if on_event:
                on_event(event)
            final = event.job
        final = final if final is not None and final.state in TERMINAL else self.get_job(job_id)
        if raise_on_failure and final.state == S.JOB_STATE_FAILED:
            raise JobFailed(final.error.code, final.error.message, final)
        if raise_on_failure and final.state == S.JOB_STATE_CANCELLED:
            raise JobCancelled("CANCELLED", f"job {job_id} was cancelled", final)
        return final


# A watch reconnects on these: the server is down or restarting (UNAVAILABLE), or it was stopped
# while the stream was open (CANCELLED comes from a server that shut down with the stream open).
_RECONNECT_ON = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


class _Seen:
    """The last event a watch delivered: its sequence (to resume after) and its job (to drop the
    repeat of the current state a resumed stream may start with)."""

    def __init__(self) -> None:
        self.sequence = 0
        self.job: jobs_pb2.Job | None = None

    def is_new(self, event: jobs_pb2.JobEvent) -> bool:
        self.sequence = event.sequence  # the server's numbering (a restarted server numbers afresh)
        if self.job is not None and event.job == self.job and not event.message:
            return False
        self.job = event.job
        return True


class _Outage:
    """How long a watch has been unable to reach its server, and the waits between its attempts:
    exponential backoff with full jitter, so the watchers of a restarted server do not return as one."""

    def __init__(self, job_id: str, limit_s: float, first_s: float = 0.25, max_s: float = 3.0):
        self.job_id, self.limit_s, self.first_s, self.max_s = job_id, limit_s, first_s, max_s
        self.since: float | None = None
        self.delay = first_s

    def over(self) -> None:
        self.since, self.delay = None, self.first_s

    def wait(self, why: str) -> None:
        now = time.monotonic()
        self.since = now if self.since is None else self.since
        left = self.since + self.limit_s - now
        if left <= 0:
            raise FluxloraClientError(
                "UNAVAILABLE", f"lost the server of job {self.job_id} and could not reach it again for "
                f"{self.limit_s:.0f} s (last: {why}); the job itself may still be running: watch it again "
                f"(fluxlora jobs watch {self.job_id}) or allow longer outages (reconnect_for_s)")
        time.sleep(min(left, random.uniform(self.delay / 2, self.delay)))
        self.delay = min(self.max_s, self.delay * 2)

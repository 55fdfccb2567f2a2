"""Two job runtimes of one service on one store, as two replicas (fluxlora.jobs.replicas), in one
process with 1-second leases: a request_id submitted to both at once makes one job; each answers
GetJob / ListJobs / WatchJob / CancelJob for the other's jobs; a replica that stops renewing has its
jobs taken over, and once it notices it lets go without writing their records; a replica shut down
hands its queued jobs to the other at once. The real-process version: tests/integration/test_replicas.py."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from google.protobuf import json_format

from fluxlora.common.config import Settings
from fluxlora.common.storage import LocalStore
from fluxlora.jobs.context import JobInterrupted
from fluxlora.jobs.runtime import JobRuntime
from fluxlora_api.shared.errors import FailedPrecondition, Unavailable
from fluxlora_api.v1 import jobs_pb2, preprocessing_pb2
from support import wait_until

pytestmark = pytest.mark.timeout(120)
S = jobs_pb2.JobState
TERMINAL = (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED)


def spec(size: int = 64) -> preprocessing_pb2.PreprocessSpec:
    return preprocessing_pb2.PreprocessSpec(source_prefix="uploads/x/", base_size=size)


class Handler:
    """Records who ran what; a replica's runs wait for its gate (checking for a stop) when it is cleared."""

    def __init__(self):
        self.gates: dict[str, threading.Event] = {}
        self.started: list[tuple[str, str]] = []
        self.finished: list[tuple[str, str]] = []
        self.interrupted: list[tuple[str, str]] = []

    def gate(self, name: str) -> threading.Event:
        return self.gates.setdefault(name, threading.Event())

    def close(self, *names: str) -> None:
        for name in names:
            self.gate(name).clear()

    def for_replica(self, name: str):
        gate = self.gate(name)
        gate.set()

        def handler(ctx, spec):
            self.started.append((name, ctx.job_id))
            try:
                while not gate.wait(0.02):
                    ctx.check_cancelled()
            except JobInterrupted:
                self.interrupted.append((name, ctx.job_id))
                raise
            self.finished.append((name, ctx.job_id))
            return preprocessing_pb2.PreprocessResult(dataset_id=f"ds-{name}-{ctx.job_id}")

        return handler


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


@pytest.fixture
def replicas(store):
    made: list[JobRuntime] = []
    handler = Handler()

    def make(name: str) -> JobRuntime:
        settings = Settings(store="unused", replica_id=name, lease_seconds=1.0)
        runtime = JobRuntime("preprocessing", "pre", store, handler.for_replica(name), settings=settings)
        runtime.start()
        made.append(runtime)
        return runtime

    make.handler = handler
    yield make
    for gate in handler.gates.values():
        gate.set()
    for runtime in made:
        runtime.shutdown(timeout=5)


def stored(store, job_id: str) -> jobs_pb2.Job:
    return json_format.Parse(store.get_bytes(f"jobs/preprocessing/{job_id}.json"), jobs_pb2.Job())


def submit_retrying(runtime: JobRuntime, request_id: str) -> jobs_pb2.Job:
    """As the SDK's channel does: UNAVAILABLE is retried."""
    for _ in range(200):
        try:
            return runtime.submit(spec(), request_id=request_id)
        except Unavailable:
            time.sleep(0.01)
    raise AssertionError("submit never got through")


def test_a_request_id_submitted_to_both_replicas_at_once_makes_one_job(store, replicas):
    a, b = replicas("a"), replicas("b")
    barrier = threading.Barrier(2)

    def submit(runtime, request_id):
        barrier.wait()
        return submit_retrying(runtime, request_id)

    with ThreadPoolExecutor(2) as pool:
        for i in range(8):
            jobs = list(pool.map(submit, (a, b), (f"req-{i}", f"req-{i}")))
            assert jobs[0].job_id == jobs[1].job_id, f"req-{i} made two jobs"
    recorded = [json_format.Parse(store.get_bytes(info.key), jobs_pb2.Job())
                for info in store.list("jobs/preprocessing/") if info.key.count("/") == 2]
    assert sorted(j.request_id for j in recorded) == [f"req-{i}" for i in range(8)]
    for job in recorded:
        wait_until(lambda job=job: stored(store, job.job_id).state == S.JOB_STATE_SUCCEEDED,
                   "every job done", timeout=30.0)
    handler = replicas.handler
    assert sorted(job for _, job in handler.finished) == sorted(j.job_id for j in recorded)  # each ran once
    assert len(handler.started) == len(recorded)


def test_each_replica_answers_for_the_others_jobs_and_cancels_them_through_it(store, replicas):
    a, b = replicas("a"), replicas("b")
    replicas.handler.close("a", "b")
    job = a.submit(spec())
    wait_until(lambda: stored(store, job.job_id).state == S.JOB_STATE_RUNNING, "the job to run on a", timeout=30.0)
    assert b.get(job.job_id).state == S.JOB_STATE_RUNNING
    assert [j.job_id for j in b.list(states=[S.JOB_STATE_RUNNING])] == [job.job_id]
    assert [j.job_id for j in b.list()] == [job.job_id]

    events: list[jobs_pb2.JobEvent] = []
    watcher = threading.Thread(target=lambda: events.extend(b.watch(job.job_id)), daemon=True)
    watcher.start()
    answer = b.cancel(job.job_id)
    assert answer.cancel_requested and answer.state == S.JOB_STATE_RUNNING
    watcher.join(30)
    assert not watcher.is_alive() and events[-1].job.state == S.JOB_STATE_CANCELLED
    assert [e.job.state for e in events if e.job.state in TERMINAL] == [S.JOB_STATE_CANCELLED]
    assert stored(store, job.job_id).state == S.JOB_STATE_CANCELLED
    assert replicas.handler.interrupted == [("a", job.job_id)]
    wait_until(lambda: list(store.list("jobs/cancels/")) == [],
               "the cancel marker to be removed once honoured", timeout=30.0)
    with pytest.raises(FailedPrecondition):
        b.cancel(job.job_id)


def cut_off(runtime: JobRuntime, monkeypatch) -> threading.Event:
    """While the event is set, the runtime's lease renewals fail as if it could not reach the store."""
    down = threading.Event()
    real_renew = runtime._leases.renew

    def renew(job_id):
        if down.is_set():
            raise OSError("cannot reach the store")
        return real_renew(job_id)

    monkeypatch.setattr(runtime._leases, "renew", renew)
    down.set()
    return down


def test_a_replica_cut_off_loses_its_job_and_lets_go_once_it_is_back(store, replicas, monkeypatch):
    a, b = replicas("a"), replicas("b")
    replicas.handler.close("a")
    job = a.submit(spec())
    wait_until(lambda: replicas.handler.started, "a to start the job", timeout=30.0)
    down = cut_off(a, monkeypatch)  # b takes the job once a's lease expired
    wait_until(lambda: stored(store, job.job_id).state == S.JOB_STATE_SUCCEEDED,
               "b to take the job over and finish", timeout=30.0)
    assert replicas.handler.finished == [("b", job.job_id)]
    final = stored(store, job.job_id)
    assert final.attempts == 2  # a's start and b's
    down.clear()  # a reaches the store again: its next renewal finds the newer epoch and lets go
    wait_until(lambda: ("a", job.job_id) in replicas.handler.interrupted, "a's handler to be stopped", timeout=30.0)
    wait_until(lambda: not a.owns(job.job_id), "a to let go", timeout=30.0)
    time.sleep(0.5)
    assert stored(store, job.job_id) == final  # nothing of a's overwrote it
    assert a.get(job.job_id) == final and b.get(job.job_id) == final
    assert replicas.handler.finished == [("b", job.job_id)]


def test_a_paused_replica_that_finishes_a_job_taken_over_meanwhile_records_nothing(store, replicas, monkeypatch):
    a = replicas("a")
    replicas("b")
    replicas.handler.close("a")
    job = a.submit(spec())
    wait_until(lambda: replicas.handler.started, "a to start the job", timeout=30.0)
    monkeypatch.setattr(a, "_renew", lambda: None)  # a's renewals stop (a paused process, a stuck thread)
    wait_until(lambda: stored(store, job.job_id).state == S.JOB_STATE_SUCCEEDED,
               "b to take the job over and finish", timeout=30.0)
    final = stored(store, job.job_id)
    events: list[jobs_pb2.JobEvent] = []
    a.add_event_listener(events.append)
    replicas.handler.gate("a").set()  # a's handler returns a result: a checks its lease before finishing
    wait_until(lambda: not a.owns(job.job_id), "a to let go", timeout=30.0)
    assert ("a", job.job_id) in replicas.handler.finished
    assert stored(store, job.job_id) == final and final.result.value
    assert not [e for e in events if e.job.state in TERMINAL], "a announced an end it does not own"
    assert a.get(job.job_id) == final


def test_a_replica_shut_down_hands_its_queued_jobs_to_the_other_at_once(store, replicas):
    a = replicas("a")
    replicas.handler.close("a")
    jobs = [a.submit(spec(64 + i)) for i in range(3)]
    wait_until(lambda: replicas.handler.started, "a to start the first job", timeout=30.0)
    b = replicas("b")
    a.shutdown(timeout=5)  # the running job stops at its safe point and goes back to the queue
    for job in jobs:
        wait_until(lambda job=job: stored(store, job.job_id).state == S.JOB_STATE_SUCCEEDED,
                   "b to run it", timeout=30.0)
    assert sorted(job for name, job in replicas.handler.finished if name == "b") == sorted(j.job_id for j in jobs)
    assert b.get(jobs[0].job_id).state == S.JOB_STATE_SUCCEEDED

"""The job runtime under faults (issue 12): a store error of any kind while a record is written never
stops a worker thread, every watcher sees the job's one terminal state, and nobody is told it before
the store holds it, with health saying NOT_SERVING until the store takes records again; starts are
counted in the record before the work starts and a job whose server died FLUXLORA_MAX_JOB_ATTEMPTS
times fails as poison; a request_id resent with another spec is ALREADY_EXISTS; a full disk is
RESOURCE_EXHAUSTED naming the path; every numeric field of every spec has a bound, refused with the
field, the value and the range."""

from __future__ import annotations

import errno
import math
import threading

import pytest
from google.protobuf import json_format

from fluxlora.common.config import Settings
from fluxlora.common.limits import Bound, check_numbers, numeric_fields
from fluxlora.common.storage import LocalStore
from fluxlora.jobs import admission, recorder
from fluxlora.jobs import runtime as runtime_module
from fluxlora.jobs.records import JobRecords
from fluxlora.jobs.runtime import JobRuntime
from fluxlora_api.shared.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    status_of,
)
from fluxlora_api.v1 import captioning_pb2, evaluation_pb2, jobs_pb2, preprocessing_pb2, training_pb2
from support import wait_until

S = jobs_pb2.JobState
SPEC = preprocessing_pb2.PreprocessSpec(source_prefix="uploads/x/", base_size=512)


class RefusingStore(LocalStore):
    """Job-record writes fail with `error` (set by the test) while it is set, as a full disk, a
    deleted bucket or a revoked key make them fail."""

    def __init__(self, root):
        super().__init__(root)
        self.error: Exception | None = None

    def put_file(self, key, path, content_type="application/octet-stream"):
        if self.error is not None and key.startswith("jobs/preprocessing/"):
            raise self.error
        return super().put_file(key, path, content_type)


class AccessDenied(Exception):
    """Stands in for minio's S3Error(AccessDenied): not one of ours, not transient."""


def gated(gate: threading.Event, started: threading.Event | None = None):
    def handler(ctx, spec):
        if started is not None:
            started.set()
        assert gate.wait(30)
        return preprocessing_pb2.PreprocessResult(dataset_id="ds-1")

    return handler


@pytest.fixture
def runtimes():
    made = []

    def make(store, handler, **settings) -> JobRuntime:
        config = Settings(store="unused", **settings)
        runtime = JobRuntime("preprocessing", "pre", store, handler, settings=config)
        runtime.start()
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.shutdown()


def stored(store, job_id) -> jobs_pb2.Job:
    return json_format.Parse(store.get_bytes(f"jobs/preprocessing/{job_id}.json"), jobs_pb2.Job())


@pytest.mark.parametrize("error, code", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/jobs/preprocessing/x.json"), "RESOURCE_EXHAUSTED"),
    (NotFound("object 'jobs/preprocessing/x.json' not found (NoSuchBucket)"), "NOT_FOUND"),
    (AccessDenied("Access Denied"), "INTERNAL"),
])
def test_a_store_error_of_any_kind_at_the_end_of_a_job_holds_its_end_back_until_the_record_is_stored(
        tmp_path, runtimes, monkeypatch, error, code):
    """Nobody is told a terminal state the store does not hold: a server killed before the write would run
    the job again, and a watcher could see FAILED, then SUCCEEDED."""
    monkeypatch.setattr(recorder, "RESAVE_INTERVAL_S", 0.02)
    store = RefusingStore(tmp_path / "store")
    gate, started = threading.Event(), threading.Event()
    health: list[tuple[bool, str]] = []
    runtime = runtimes(store, gated(gate, started))
    runtime.add_health_listener(lambda ok, why: health.append((ok, why)))
    job = runtime.submit(SPEC, request_id="r1")
    assert started.wait(30)
    watchers = [runtime.watch(job.job_id) for _ in range(3)]
    store.error = error
    gate.set()
    wait_until(lambda: "recording the result" in runtime.get(job.job_id).progress.stage,
               "the recording notice", timeout=30.0)
    seen = runtime.get(job.job_id)
    assert seen.state == S.JOB_STATE_RUNNING  # what the store holds, and all anyone is told
    assert f"the store refuses it ({code}: " in seen.progress.stage and "retrying" in seen.progress.stage
    assert stored(store, job.job_id).state == S.JOB_STATE_RUNNING
    assert [j.state for j in runtime.list()] == [S.JOB_STATE_RUNNING]
    ok, why = runtime.healthy()
    assert not ok and f"({code}: " in why and store.uri in why
    assert health[0] == (True, "") and health[-1] == (False, why)

    store.error = None  # the disk freed, the bucket back, the key restored: the record lands, then it is told
    for watcher in watchers:  # every watcher ends with the one terminal state, never one before it
        states = [event.job.state for event in watcher]
        assert states[-1] == S.JOB_STATE_SUCCEEDED and S.JOB_STATE_SUCCEEDED not in states[:-1]
        assert not {S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED} & set(states)
    assert stored(store, job.job_id).state == S.JOB_STATE_SUCCEEDED
    second = runtime.submit(SPEC, request_id="r2")  # the worker thread is alive and runs the next job
    assert list(runtime.watch(second.job_id))[-1].job.state == S.JOB_STATE_SUCCEEDED
    assert runtime.healthy() == (True, "") and health[-1] == (True, "")


def test_a_shutdown_before_the_end_is_stored_leaves_the_job_to_run_again_and_nobody_saw_it_end(
        tmp_path, runtimes, monkeypatch):
    monkeypatch.setattr(recorder, "RESAVE_INTERVAL_S", 0.02)
    store = RefusingStore(tmp_path / "store")
    gate, started = threading.Event(), threading.Event()
    first = runtimes(store, gated(gate, started))
    job = first.submit(SPEC)
    assert started.wait(30)
    store.error = OSError(errno.ENOSPC, "No space left on device", "x")
    gate.set()
    wait_until(lambda: "recording the result" in first.get(job.job_id).progress.stage,
               "the recording notice", timeout=30.0)
    with pytest.raises(FailedPrecondition, match="being recorded"):
        first.cancel(job.job_id)
    first.shutdown()
    assert stored(store, job.job_id).state == S.JOB_STATE_RUNNING
    store.error = None
    second = runtimes(store, gated(gate))
    final = list(second.watch(job.job_id))[-1].job
    assert final.state == S.JOB_STATE_SUCCEEDED and final.attempts == 2


def test_cancelling_a_queued_job_while_the_store_refuses_answers_queued_then_ends_cancelled(
        tmp_path, runtimes, monkeypatch):
    monkeypatch.setattr(recorder, "RESAVE_INTERVAL_S", 0.02)
    monkeypatch.setattr(runtime_module, "CANCEL_ANSWER_S", 0.2)
    store = RefusingStore(tmp_path / "store")
    gate, started = threading.Event(), threading.Event()
    runtime = runtimes(store, gated(gate, started))
    running = runtime.submit(SPEC)
    queued = runtime.submit(SPEC)
    assert started.wait(30)
    store.error = OSError(errno.ENOSPC, "No space left on device", "x")
    answer = runtime.cancel(queued.job_id)
    assert answer.state == S.JOB_STATE_QUEUED and answer.cancel_requested  # not CANCELLED before it is stored
    store.error = None
    gate.set()
    assert list(runtime.watch(running.job_id))[-1].job.state == S.JOB_STATE_SUCCEEDED
    final = list(runtime.watch(queued.job_id))[-1].job
    assert final.state == S.JOB_STATE_CANCELLED and final.attempts == 0  # it never ran
    assert stored(store, queued.job_id).state == S.JOB_STATE_CANCELLED


def test_a_worker_thread_survives_a_runtime_failure_around_a_job_and_the_job_still_ends(tmp_path, runtimes,
                                                                                        monkeypatch):
    store = LocalStore(tmp_path / "store")
    gate = threading.Event()
    gate.set()
    runtime = runtimes(store, gated(gate))
    real = runtime._runner.run
    calls = []

    def broken(*args):
        calls.append(1)
        if len(calls) == 1:
            raise SystemExit("a runner bug")  # BaseException: what used to end the thread
        return real(*args)

    monkeypatch.setattr(runtime._runner, "run", broken)
    first = runtime.submit(SPEC)
    assert list(runtime.watch(first.job_id))[-1].job.state == S.JOB_STATE_FAILED
    second = runtime.submit(SPEC)
    assert list(runtime.watch(second.job_id))[-1].job.state == S.JOB_STATE_SUCCEEDED
    assert runtime.healthy() == (True, "")


def test_a_dead_worker_thread_makes_the_runtime_unhealthy(tmp_path, runtimes):
    runtime = runtimes(LocalStore(tmp_path / "store"), gated(threading.Event()))
    runtime._threads[0] = threading.Thread(target=lambda: None, name="preprocessing-worker-0")
    runtime._threads[0].start()
    runtime._threads[0].join()
    ok, why = runtime.healthy()
    assert not ok and "worker thread preprocessing-worker-0 stopped" in why


def test_each_start_is_counted_in_the_record_before_the_work_and_a_clean_shutdown_gives_it_back(tmp_path, runtimes):
    store = LocalStore(tmp_path / "store")
    started = threading.Event()
    seen = []

    def handler(ctx, spec):
        seen.append(stored(store, ctx.job_id).attempts)  # what the store says while the work runs
        started.set()
        while not ctx.should_stop:
            threading.Event().wait(0.01)
        ctx.check_cancelled()

    runtime = runtimes(store, handler)
    job = runtime.submit(SPEC)
    assert started.wait(30)
    assert seen == [1] and runtime.get(job.job_id).attempts == 1
    runtime.shutdown()
    record = stored(store, job.job_id)
    assert record.state == S.JOB_STATE_QUEUED and record.attempts == 0  # interrupted cleanly: not used up


def died_with(store, attempts: int) -> str:
    """A job record as a server killed mid-job leaves it, after `attempts` starts."""
    records = JobRecords(store, "preprocessing")
    job = jobs_pb2.Job(job_id="pre-0123456789ab", service="preprocessing", state=S.JOB_STATE_RUNNING,
                       attempts=attempts)
    job.created_at.GetCurrentTime()
    job.spec.Pack(SPEC)
    records.mark_active(job.job_id)
    records.add_to_index(job)
    records.save(job)
    return job.job_id


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_a_job_whose_server_died_max_attempts_times_fails_as_poison_and_never_runs_again(tmp_path, runtimes, limit):
    store = LocalStore(tmp_path / "store")
    ran = []
    job_id = died_with(store, attempts=limit)
    runtime = runtimes(store, lambda ctx, spec: ran.append(1), max_job_attempts=limit)
    final = list(runtime.watch(job_id))[-1].job
    assert final.state == S.JOB_STATE_FAILED and not ran
    assert final.error.code == "ABORTED"
    assert f"started {limit} times" in final.error.message
    assert f"FLUXLORA_MAX_JOB_ATTEMPTS={limit}" in final.error.message
    wait_until(lambda: stored(store, job_id).state == S.JOB_STATE_FAILED, "the FAILED record", timeout=30.0)


def test_a_job_whose_server_died_fewer_times_runs_again_and_counts_the_attempt(tmp_path, runtimes):
    store = LocalStore(tmp_path / "store")
    job_id = died_with(store, attempts=1)
    runtime = runtimes(store, lambda ctx, spec: preprocessing_pb2.PreprocessResult(dataset_id="d"))
    final = list(runtime.watch(job_id))[-1].job
    assert final.state == S.JOB_STATE_SUCCEEDED and final.attempts == 2


def test_a_request_id_resent_with_another_spec_is_already_exists_and_with_the_same_spec_the_same_job(
        tmp_path, runtimes):
    store = LocalStore(tmp_path / "store")
    runtime = runtimes(store, lambda ctx, spec: preprocessing_pb2.PreprocessResult(dataset_id="d"))
    job = runtime.submit(SPEC, request_id="req-1")
    assert runtime.submit(SPEC, request_id="req-1").job_id == job.job_id
    other = preprocessing_pb2.PreprocessSpec(source_prefix="uploads/x/", base_size=1024, background="#000000")
    with pytest.raises(AlreadyExists) as err:
        runtime.submit(other, request_id="req-1")
    message = err.value.message
    assert "request_id 'req-1'" in message and job.job_id in message and "different spec" in message
    assert "spec.background, spec.base_size" in message
    # the same after a restart, when the job is read from the store through its request claim
    runtime.shutdown()
    again = runtimes(store, lambda ctx, spec: None, finished_jobs_in_memory=0)
    with pytest.raises(AlreadyExists):
        again.submit(other, request_id="req-1")
    assert again.submit(SPEC, request_id="req-1").job_id == job.job_id


def test_a_disk_under_the_free_space_minimum_refuses_submits_and_starts_naming_the_path(tmp_path, runtimes,
                                                                                        monkeypatch):
    store = LocalStore(tmp_path / "store")
    gate, started = threading.Event(), threading.Event()
    runtime = runtimes(store, gated(gate, started), min_free_bytes=10**9)
    running = runtime.submit(SPEC)  # takes the only worker
    assert started.wait(30)  # before the disk fills: a busy machine may start it late
    queued = runtime.submit(SPEC)
    assert started.wait(30)  # past its own free-space check before the disk "fills" (a loaded machine lags)
    monkeypatch.setattr(admission, "free_bytes", lambda path: 10**6 if path == store.root else 10**12)
    with pytest.raises(ResourceExhausted) as err:
        runtime.submit(SPEC)
    message = err.value.message
    assert f"disk holding {store.root}" in message and "FLUXLORA_MIN_FREE_BYTES=1000000000" in message
    assert "free space there" in message
    gate.set()
    assert list(runtime.watch(running.job_id))[-1].job.state == S.JOB_STATE_SUCCEEDED
    final = list(runtime.watch(queued.job_id))[-1].job  # it had not started: refused before any work
    assert final.state == S.JOB_STATE_FAILED and final.error.code == "RESOURCE_EXHAUSTED" and final.attempts == 0
    assert f"disk holding {store.root}" in final.error.message


def test_no_space_left_is_resource_exhausted_naming_the_path_and_the_fix():
    code, message = status_of(OSError(errno.ENOSPC, "No space left on device", "/data/runs/r/loss.csv"))
    assert code == "RESOURCE_EXHAUSTED"
    assert "/data/runs/r/loss.csv" in message and "free space there" in message and "FLUXLORA_STORE" in message


# --- bounds of numeric spec fields --------------------------------------------------------------------
def spec_bounds():
    from fluxlora.captioning.servicer import BOUNDS as caption_bounds
    from fluxlora.evaluation.validation import bounds as evaluation_bounds
    from fluxlora.preprocessing.job import BOUNDS as preprocess_bounds
    from fluxlora.training.servicer import bounds as train_bounds

    settings = Settings(store="unused")
    return {
        preprocessing_pb2.PreprocessSpec: preprocess_bounds,
        captioning_pb2.CaptionSpec: caption_bounds,
        training_pb2.TrainSpec: train_bounds(settings),
        evaluation_pb2.GridSpec: evaluation_bounds(settings),
        evaluation_pb2.GenerateSpec: evaluation_bounds(settings),
    }


def test_every_numeric_field_of_every_spec_has_a_bound():
    for message, bounds in spec_bounds().items():
        fields = numeric_fields(message.DESCRIPTOR)
        assert fields, message
        missing = [f for f in fields if f not in bounds]
        assert not missing, f"{message.DESCRIPTOR.name} fields without a bound: {missing}"
        for field in fields:
            assert bounds[field].low <= 0 <= bounds[field].high or field == "checkpoint_steps", field


@pytest.mark.parametrize("message, field, value, shown", [
    (training_pb2.TrainSpec(sample_steps=10**9), "spec.sample_steps", 10**9, "1000000000"),
    (training_pb2.TrainSpec(guidance=math.nan), "spec.guidance", None, "nan"),
    (training_pb2.TrainSpec(learning_rate=math.inf), "spec.learning_rate", None, "inf"),
    (preprocessing_pb2.PreprocessSpec(base_size=10**6), "spec.base_size", 10**6, "1000000"),
    (captioning_pb2.CaptionSpec(max_new_tokens=10**6), "spec.max_new_tokens", 10**6, "1000000"),
    (evaluation_pb2.GridSpec(strengths=[0.5, math.nan]), "spec.strengths[1]", None, "nan"),
    (evaluation_pb2.GenerateSpec(loras=[evaluation_pb2.LoraWeight(run_id="r", step=-3)]), "spec.loras[0].step", -3,
     "-3"),
])
def test_a_value_outside_its_bound_is_refused_naming_the_field_the_value_and_the_range(message, field, value, shown):
    bounds = spec_bounds()[type(message)]
    with pytest.raises(InvalidArgument) as err:
        check_numbers(message, bounds)
    text = err.value.message
    assert text.startswith(f"{field} is {shown}"), text
    key = field.removeprefix("spec.").split("[")[0] + (".step" if "loras" in field else "")
    assert bounds[key].text() in text


def test_values_at_the_bounds_pass_and_an_unbounded_field_is_a_programming_error():
    check_numbers(training_pb2.TrainSpec(sample_steps=500, guidance=100.0, max_steps=100_000), spec_bounds()[
        training_pb2.TrainSpec])
    with pytest.raises(KeyError, match="no bound for the numeric field rank"):
        check_numbers(training_pb2.TrainSpec(rank=4), {"sample_steps": Bound(0, 1)})

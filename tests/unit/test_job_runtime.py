"""The job runtime: state machine, persistence, idempotency, watching and cancellation."""

from __future__ import annotations

import threading

import pytest

from fluxlora.common.storage import LocalStore
from fluxlora.jobs.runtime import JobRuntime
from fluxlora_api.shared.errors import FailedPrecondition, NotFound, ResourceExhausted
from fluxlora_api.v1 import jobs_pb2, preprocessing_pb2

S = jobs_pb2.JobState
SPEC = preprocessing_pb2.PreprocessSpec(source_prefix="uploads/x/", base_size=512)


def ok_handler(ctx, spec):
    ctx.progress("working", 1, 2, "item")
    ctx.metrics(loss=0.5)
    ctx.warn("only a few images")
    ctx.add_artifact(ctx.store.put_bytes("datasets/d/manifest.json", b"{}"), "dataset-manifest")
    ctx.progress("working", 2, 2, "item")
    return preprocessing_pb2.PreprocessResult(dataset_id="ds-1", image_count=spec.base_size)


def make_runtime(store, handler=ok_handler, **kw):
    runtime = JobRuntime("preprocessing", "pre", store, handler, **kw)
    runtime.start()
    return runtime


def wait_terminal(runtime, job_id):
    events = list(runtime.watch(job_id))
    return events[-1].job, events


@pytest.fixture
def local_store(tmp_path):
    return LocalStore(tmp_path / "store")


def test_a_job_runs_to_success_with_result_metrics_warnings_and_artifacts(local_store):
    runtime = make_runtime(local_store)
    job = runtime.submit(SPEC, request_id="r1")
    assert job.job_id.startswith("pre-") and job.state in (S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING)
    final, events = wait_terminal(runtime, job.job_id)
    assert final.state == S.JOB_STATE_SUCCEEDED
    result = preprocessing_pb2.PreprocessResult()
    assert final.result.Unpack(result) and result.image_count == 512
    assert final.metrics["loss"] == 0.5
    assert list(final.warnings) == ["only a few images"]
    assert [a.key for a in final.artifacts] == ["datasets/d/manifest.json"]
    assert final.progress.done == 2 and final.progress.total == 2
    seqs = [e.sequence for e in events]
    assert seqs == sorted(seqs)
    states = [e.job.state for e in events]
    assert S.JOB_STATE_RUNNING in states
    runtime.shutdown()


def test_the_same_request_id_returns_the_same_job(local_store):
    runtime = make_runtime(local_store)
    a = runtime.submit(SPEC, request_id="same")
    b = runtime.submit(SPEC, request_id="same")
    c = runtime.submit(SPEC, request_id="other")
    assert a.job_id == b.job_id != c.job_id
    runtime.shutdown()


def test_records_persist_and_a_restarted_runtime_finds_and_finishes_queued_jobs(local_store):
    gate = threading.Event()

    def blocked(ctx, spec):
        while not gate.is_set():
            ctx.check_cancelled()
            gate.wait(0.05)
        return preprocessing_pb2.PreprocessResult(dataset_id="ds")

    first = make_runtime(local_store, blocked)
    running = first.submit(SPEC, request_id="a")
    queued = first.submit(SPEC, request_id="b")
    first.shutdown()  # interrupts the running job; both stay unfinished in the store
    gate.set()
    second = make_runtime(local_store, ok_handler)
    assert second.submit(SPEC, request_id="a").job_id == running.job_id  # idempotent across restarts
    for job_id in (running.job_id, queued.job_id):
        final, _ = wait_terminal(second, job_id)
        assert final.state == S.JOB_STATE_SUCCEEDED
    second.shutdown()


def test_cancel_a_running_job_stops_it_at_its_next_check(local_store):
    started = threading.Event()

    def slow(ctx, spec):
        started.set()
        while True:
            ctx.check_cancelled()
            threading.Event().wait(0.01)

    runtime = make_runtime(local_store, slow)
    job = runtime.submit(SPEC)
    started.wait(5)
    assert runtime.cancel(job.job_id).cancel_requested
    final, _ = wait_terminal(runtime, job.job_id)
    assert final.state == S.JOB_STATE_CANCELLED
    with pytest.raises(FailedPrecondition, match="already finished"):
        runtime.cancel(job.job_id)
    runtime.shutdown()


def test_cancel_a_queued_job_never_runs_it(local_store):
    ran = []
    gate = threading.Event()

    def handler(ctx, spec):
        ran.append(ctx.job_id)
        gate.wait(5)
        return preprocessing_pb2.PreprocessResult()

    runtime = make_runtime(local_store, handler)
    first = runtime.submit(SPEC)
    second = runtime.submit(SPEC)
    assert runtime.cancel(second.job_id).state == S.JOB_STATE_CANCELLED
    gate.set()
    wait_terminal(runtime, first.job_id)
    assert ran == [first.job_id]
    runtime.shutdown()


@pytest.mark.parametrize(
    "exc, code",
    [
        (ValueError("base_size must be a multiple of 64"), "INVALID_ARGUMENT"),
        (FileNotFoundError("no such model"), "NOT_FOUND"),
        (FailedPrecondition("dataset has no captions"), "FAILED_PRECONDITION"),
        (RuntimeError("boom"), "INTERNAL"),
    ],
)
def test_a_failing_job_records_a_status_code_and_message(local_store, exc, code):
    def failing(ctx, spec):
        raise exc

    runtime = make_runtime(local_store, failing)
    final, _ = wait_terminal(runtime, runtime.submit(SPEC).job_id)
    assert final.state == S.JOB_STATE_FAILED
    assert final.error.code == code and str(exc) in final.error.message
    assert "Traceback" not in final.error.message
    runtime.shutdown()


def test_a_full_queue_is_resource_exhausted(local_store):
    gate, started = threading.Event(), threading.Event()

    def blocked(ctx, spec):
        started.set()
        gate.wait(5)
        return preprocessing_pb2.PreprocessResult()

    runtime = make_runtime(local_store, blocked, max_queued=2)
    runtime.submit(SPEC)
    started.wait(5)
    runtime.submit(SPEC)
    runtime.submit(SPEC)
    with pytest.raises(ResourceExhausted, match="queue is full"):
        runtime.submit(SPEC)
    gate.set()
    runtime.shutdown()


def test_unknown_job_is_not_found(local_store):
    runtime = make_runtime(local_store)
    with pytest.raises(NotFound, match="nope"):
        runtime.get("nope")
    runtime.shutdown()


def test_list_is_newest_first_and_filters_by_state(local_store):
    runtime = make_runtime(local_store)
    ids = [runtime.submit(SPEC).job_id for _ in range(3)]
    for job_id in ids:
        wait_terminal(runtime, job_id)
    assert [j.job_id for j in runtime.list()] == ids[::-1]
    assert runtime.list([S.JOB_STATE_FAILED]) == []
    runtime.shutdown()


def test_finished_jobs_keep_only_their_last_event(local_store, monkeypatch):
    import fluxlora.jobs.memory as memory_module

    monkeypatch.setattr(memory_module, "FINISHED_EVENTS_KEPT_S", -1.0)
    runtime = make_runtime(local_store)
    first = runtime.submit(SPEC)
    wait_terminal(runtime, first.job_id)
    runtime.submit(SPEC)  # a new submission trims what finished jobs hold
    events = list(runtime.watch(first.job_id))
    assert len(runtime._logs[first.job_id].events) == 1
    assert events[-1].job.state == S.JOB_STATE_SUCCEEDED
    runtime.shutdown()

"""WatchJob resumes a dropped stream: after_sequence gives the events after it (not the current state
again) while this process holds them, and the current state otherwise."""

from __future__ import annotations

import threading

import pytest

from fluxlora.common.storage import LocalStore
from fluxlora.jobs.runtime import JobRuntime
from fluxlora_api.v1 import jobs_pb2, preprocessing_pb2

S = jobs_pb2.JobState
SPEC = preprocessing_pb2.PreprocessSpec(source_prefix="uploads/x/", base_size=512)


@pytest.fixture
def gated(tmp_path):
    """A runtime whose job reports steps 1-3, waits for `gate`, then reports 4-6 and succeeds."""
    gate, paused = threading.Event(), threading.Event()

    def handler(ctx, spec):
        for step in (1, 2, 3):
            ctx.progress("working", step, 6, "step")
        paused.set()
        assert gate.wait(30)
        for step in (4, 5, 6):
            ctx.progress("working", step, 6, "step")
        return preprocessing_pb2.PreprocessResult(dataset_id="ds-1")

    runtime = JobRuntime("preprocessing", "pre", LocalStore(tmp_path / "store"), handler)
    runtime.start()
    job = runtime.submit(SPEC, request_id="resume")
    assert paused.wait(30)
    yield runtime, job.job_id, gate
    gate.set()
    runtime.shutdown()


def steps(events) -> list[int]:
    return [e.job.progress.done for e in events]


def test_a_resumed_watch_gets_the_missed_events_and_nothing_twice(gated):
    runtime, job_id, gate = gated
    first = next(runtime.watch(job_id))  # the current state: step 3
    assert first.job.progress.done == 3 and first.sequence > 0
    stream = runtime.watch(job_id, after=first.sequence)  # nothing happened since: no repeat of step 3
    gate.set()
    events = list(stream)
    assert steps(events)[:3] == [4, 5, 6] and events[-1].job.state == S.JOB_STATE_SUCCEEDED
    assert [e.sequence for e in events] == list(range(first.sequence + 1, events[-1].sequence + 1))


def test_a_resume_from_further_back_replays_the_buffered_events(gated):
    runtime, job_id, gate = gated
    current = next(runtime.watch(job_id)).sequence
    replayed = runtime.watch(job_id, after=current - 2)
    assert [next(replayed).sequence, next(replayed).sequence] == [current - 1, current]
    gate.set()
    assert list(replayed)[-1].job.state == S.JOB_STATE_SUCCEEDED


def test_a_sequence_this_process_never_numbered_gets_the_current_state(gated):
    runtime, job_id, _ = gated
    # what a client that watched the server before its restart sends
    first = next(runtime.watch(job_id, after=10**6))
    assert first.job.progress.done == 3 and first.sequence == next(runtime.watch(job_id)).sequence


def test_a_finished_job_gives_its_final_state_whatever_the_sequence(gated):
    runtime, job_id, gate = gated
    gate.set()
    final = list(runtime.watch(job_id))[-1]
    assert final.job.state == S.JOB_STATE_SUCCEEDED
    for after in (0, final.sequence - 1, final.sequence, final.sequence + 5):
        events = list(runtime.watch(job_id, after=after))
        assert [e.job.state for e in events] == [S.JOB_STATE_SUCCEEDED], after

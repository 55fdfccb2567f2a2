"""The SDK's job surface over real gRPC servers (local directory and S3 store): content-addressed
uploads, idempotent submits, watching, listing, cancelling and failures as exceptions."""

from __future__ import annotations

import pytest

from fluxlora.common import keys
from fluxlora.domain.runs import list_checkpoints
from fluxlora.training.trainer.checkpoint import TRAINING_STATE_NAME
from fluxlora_api.v1 import jobs_pb2
from fluxlora_client import FluxloraClientError, JobCancelled, JobFailed

S = jobs_pb2.JobState
TERMINAL = {S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED}


@pytest.fixture
def puts(monkeypatch, running):
    """Every key written to the store through put_file from now on."""
    written: list[str] = []
    original = running.store.put_file

    def spy(key, path, *args, **kwargs):
        written.append(key)
        return original(key, path, *args, **kwargs)

    monkeypatch.setattr(running.store, "put_file", spy)
    return written


def test_uploading_the_same_photos_twice_gives_one_prefix_and_stores_each_file_once(running, photos, puts):
    files = sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*") if p.is_file())
    first = running.upload_photos(photos)
    assert first.startswith("uploads/") and first.endswith("/")
    stored = {o.key: o.version for o in running.store.list("uploads/")}
    assert sorted(stored) == [first + f for f in files]
    for f in files:
        assert running.store.get_bytes(first + f) == (photos / f).read_bytes()

    puts.clear()  # (the local store's writes: S3 uploads go to presigned URLs, not through put_file)
    second = running.upload_photos(photos)
    assert second == first
    assert [key for key in puts if key.startswith("uploads/")] == []
    assert {o.key: o.version for o in running.store.list("uploads/")} == stored  # nothing rewritten


def test_uploading_other_photos_gives_another_prefix(running, photos, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    first = sorted(p for p in photos.iterdir() if p.is_file())[0]
    (other / first.name).write_bytes(first.read_bytes())
    assert running.upload_photos(other) != running.upload_photos(photos)


def test_the_same_request_id_submits_one_job(running, photos):
    source = running.upload_photos(photos)
    first = running.preprocess(source, base_size=64, request_id="retry-me-1")
    again = running.preprocess(source, base_size=64, request_id="retry-me-1")
    other = running.preprocess(source, base_size=64, request_id="retry-me-2")
    assert again.job_id == first.job_id
    assert other.job_id != first.job_id
    assert again.request_id == "retry-me-1"
    assert sorted(j.job_id for j in running.list_jobs("preprocessing")) == sorted({first.job_id, other.job_id})
    for job in (first, other):
        running.wait(job)


def test_wait_reports_events_in_order_and_ends_in_a_terminal_state(running, photos):
    events: list[jobs_pb2.JobEvent] = []
    job = running.preprocess(running.upload_photos(photos), base_size=64)
    final = running.wait(job, on_event=events.append)

    assert final.state == S.JOB_STATE_SUCCEEDED and final.job_id == job.job_id
    sequences = [e.sequence for e in events]
    assert sequences == sorted(sequences)
    assert events[-1].job.state in TERMINAL
    assert events[-1].job.state == S.JOB_STATE_SUCCEEDED
    assert all(e.job.job_id == job.job_id for e in events)
    assert any(e.job.progress.stage == "processing images" for e in events)
    assert running.result(final).image_count > 0


def test_list_jobs_is_newest_first(running, photos):
    source = running.upload_photos(photos)
    submitted = [running.preprocess(source, base_size=64).job_id for _ in range(3)]
    listed = running.list_jobs("preprocessing")
    assert [j.job_id for j in listed] == submitted[::-1]
    created = [j.created_at.ToNanoseconds() for j in listed]
    assert created == sorted(created, reverse=True)
    for job_id in submitted:
        running.wait(job_id)
    assert [j.job_id for j in running.list_jobs("preprocessing")] == submitted[::-1]


def test_listing_an_unknown_service_is_invalid_argument(running):
    with pytest.raises(FluxloraClientError) as err:
        running.list_jobs("trainer")
    assert err.value.code == "INVALID_ARGUMENT"
    assert "trainer" in err.value.message and "training" in err.value.message


def test_cancelling_a_running_training_job_keeps_its_checkpoints(running, photos, tiny_models):
    client = running
    dataset_id = client.result(client.wait(client.preprocess(client.upload_photos(photos), base_size=64))).dataset_id
    client.wait(client.caption(dataset_id, "fluxone", model=str(tiny_models["florence2"])))
    job = client.train(dataset_id, base_model=str(tiny_models["flux"]), resolution=64,
                       max_steps=100000, checkpoint_every=5, sample_every=0)

    # Cancel once the first checkpoint (step 5) is in the store and training has gone past it, so
    # the run most likely stops between two checkpoint steps.
    for event in client.watch(job.job_id):
        assert event.job.state not in TERMINAL, event.job
        written = [a.key for a in event.job.artifacts if a.kind == "lora"]
        if event.job.progress.stage == "training" and event.job.progress.done > 5 and written:
            cancelling = client.cancel(job.job_id)
            break
    assert cancelling.cancel_requested
    assert cancelling.state == S.JOB_STATE_RUNNING

    with pytest.raises(JobCancelled) as err:
        client.wait(job)
    final = err.value.job
    assert err.value.code == "CANCELLED" and job.job_id in err.value.message
    assert final.state == S.JOB_STATE_CANCELLED
    assert client.get_job(job.job_id).state == S.JOB_STATE_CANCELLED

    # Everything the run wrote stays in the store, including a checkpoint at the stop step.
    stopped_at = final.progress.done
    assert 0 < stopped_at < 100000
    stored = list_checkpoints(client.store, job.job_id)
    assert set(written) <= set(stored.values())
    assert max(stored) == stopped_at
    lora_artifacts = [a for a in final.artifacts if a.kind == "lora"]
    assert sorted(a.step for a in lora_artifacts) == sorted(stored)
    for artifact in final.artifacts:
        assert client.store.exists(artifact.key), artifact.key
    for artifact in lora_artifacts:
        assert client.store.stat(artifact.key).size == artifact.size_bytes
    state = keys.checkpoint_prefix(job.job_id, stopped_at) + TRAINING_STATE_NAME
    assert client.store.exists(state), "the stop-step checkpoint is resumable"

    with pytest.raises(FluxloraClientError) as again:
        client.cancel(job.job_id)
    assert again.value.code == "FAILED_PRECONDITION"


def test_a_failed_job_raises_job_failed_with_its_code_and_message(running, tmp_path):
    folder = tmp_path / "not-photos"
    folder.mkdir()
    (folder / "photo.jpg").write_text("this is a text file, not a JPEG")
    job = running.preprocess(running.upload_photos(folder), base_size=64)

    with pytest.raises(JobFailed) as err:
        running.wait(job)
    assert err.value.code == "FAILED_PRECONDITION"
    assert "photo.jpg" in err.value.message
    assert err.value.job.state == S.JOB_STATE_FAILED
    assert err.value.job.error.code == "FAILED_PRECONDITION"
    assert err.value.job.error.message == err.value.message

    final = running.wait(job, raise_on_failure=False)
    assert final.state == S.JOB_STATE_FAILED
    assert [j.state for j in running.list_jobs("preprocessing", states=[S.JOB_STATE_FAILED])] == [S.JOB_STATE_FAILED]

"""A service killed with SIGKILL at any point of a job loses nothing: real server processes are
killed (no shutdown code runs) and started again on the same store and port, and then

- every job is found again and finishes (the running one runs again, the queued one runs);
- resubmitting a request_id returns the job it created, which ran once;
- every stored artifact is whole: the checksums in the manifest and in the job record match the
  stored bytes, and nothing references an object that is not there;
- a training run continues from its last complete checkpoint, each step trained once;
- a caption job or a grid runs again from the start and stores its outputs once (one caption version,
  one set of cells).
"""

from __future__ import annotations

import csv
import hashlib
import io
import sys

import pytest

from fluxlora.common import keys
from fluxlora.common.storage import ArtifactStore, LocalStore
from fluxlora_api.v1 import jobs_pb2
from fluxlora_client import FluxloraClient, JobFailed
from support import ServiceProcess, services_and_client, wait_until

pytestmark = pytest.mark.timeout(240)  # a regression that hangs a wait fails here, not after 10 minutes
S = jobs_pb2.JobState
TERMINAL = (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED)
MAX_STEPS = 100
EVERY = 10


def stored_state(store: ArtifactStore, service: str, job_id: str) -> int:
    record = store.get_json(f"jobs/{service}/{job_id}.json")
    return S.Value(record.get("state", "JOB_STATE_UNSPECIFIED"))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_artifacts_whole(store: ArtifactStore, job: jobs_pb2.Job) -> None:
    """Every object the job references is stored, with the bytes its checksum names (a key written
    more than once, such as loss.csv, is checked against its last reference)."""
    latest = {ref.key: ref for ref in job.artifacts}
    assert latest, "the job references no artifacts"
    for key, ref in latest.items():
        assert sha256(store.get_bytes(key)) == ref.sha256, key


def test_a_killed_preprocessing_server_finds_its_running_and_queued_jobs_again(store, tmp_path, processes):
    from fluxlora.demo.sample_data import write_sample_photos

    server = ServiceProcess("preprocessing", store, tmp_path)
    processes.append(server.start())
    client = FluxloraClient(preprocessing=server.address)
    many, few = tmp_path / "many", tmp_path / "few"
    write_sample_photos(many, count=24, seed=3)
    write_sample_photos(few, count=3, seed=4)
    running = client.preprocess(client.upload_photos(many), base_size=256, request_id="req-running")
    queued = client.preprocess(client.upload_photos(few), base_size=64, request_id="req-queued")

    def processing_images() -> bool:
        job = client.get_job(running.job_id)  # (a job already finished fails the asserts below)
        return job.progress.stage == "processing images" or job.state in TERMINAL

    wait_until(processing_images, "the first job to process images", logs=server.logs)
    server.kill()
    # killed mid-job: the store says so, and nothing ran the second job yet
    assert stored_state(store, "preprocessing", running.job_id) == S.JOB_STATE_RUNNING
    assert stored_state(store, "preprocessing", queued.job_id) == S.JOB_STATE_QUEUED

    server.start()
    finished = {job.job_id: client.wait(job) for job in (running, queued)}
    assert {job.state for job in finished.values()} == {S.JOB_STATE_SUCCEEDED}, server.logs()
    # the same request is the same job, which is not run again
    again = client.preprocess(client.upload_photos(many), base_size=256, request_id="req-running")
    assert again.job_id == running.job_id and again.state == S.JOB_STATE_SUCCEEDED
    assert sorted(j.job_id for j in client.list_jobs("preprocessing")) == sorted(finished)

    for job in finished.values():
        assert_artifacts_whole(store, job)
        result = client.result(job)
        manifest = store.get_json(result.manifest_key)
        assert len(manifest["images"]) == result.image_count > 0
        for image in manifest["images"]:
            stored = store.get_bytes(keys.dataset_images(result.dataset_id) + image["file_name"])
            assert sha256(stored) == image["pixel_sha256"], image["file_name"]
            original = store.get_bytes(f"{keys.dataset_prefix(result.dataset_id)}raw/{image['source_key']}")
            assert sha256(original) == image["sha256"], image["source_key"]
    client.close()


@pytest.mark.slow
def test_a_killed_training_server_resumes_the_run_from_its_last_checkpoint(tmp_path, photos, tiny_models,
                                                                          processes):
    store = LocalStore(tmp_path / "store")
    with services_and_client(store, tmp_path) as setup:
        dataset = setup.result(setup.wait(setup.preprocess(setup.upload_photos(photos), base_size=64)))
        setup.wait(setup.caption(dataset.dataset_id, "fluxone", model=str(tiny_models["florence2"])))
    server = ServiceProcess("training", store, tmp_path)
    processes.append(server.start())
    client = FluxloraClient(training=server.address)
    options = dict(base_model=str(tiny_models["flux"]), resolution=64, max_steps=MAX_STEPS,
                   checkpoint_every=EVERY, sample_every=0, request_id="req-train")
    job = client.train(dataset.dataset_id, **options)

    def second_checkpoint_stored() -> bool:
        return any(a.step == 2 * EVERY and a.kind == "checkpoint-state" for a in client.get_job(job.job_id).artifacts)

    wait_until(second_checkpoint_stored, "the checkpoint at step 20", logs=server.logs)
    server.kill()
    assert stored_state(store, "training", job.job_id) == S.JOB_STATE_RUNNING

    server.start()
    final = client.wait(job)
    assert final.state == S.JOB_STATE_SUCCEEDED, server.logs()
    resumed_from = final.metrics["resumed_from_step"]
    assert 2 * EVERY <= resumed_from < MAX_STEPS
    again = client.train(dataset.dataset_id, **options)
    assert again.job_id == job.job_id and again.state == S.JOB_STATE_SUCCEEDED
    assert [j.job_id for j in client.list_jobs("training")] == [job.job_id]

    result = client.result(final)
    steps = [c.step for c in result.checkpoints]
    assert steps == list(range(EVERY, MAX_STEPS + 1, EVERY)), "each checkpoint once"
    rows = list(csv.DictReader(io.StringIO(store.get_bytes(result.loss_csv_key).decode())))
    assert [int(r["step"]) for r in rows] == list(range(1, MAX_STEPS + 1)), "each step trained once"
    assert_artifacts_whole(store, final)
    referenced = {a.key for a in final.artifacts}
    for checkpoint in result.checkpoints:
        assert {checkpoint.lora_key, checkpoint.kohya_lora_key} <= referenced
    client.close()


def store_dataset(store: ArtifactStore, dataset_id: str, count: int) -> list[str]:
    """A preprocessed dataset as the preprocessing service leaves one (images and manifest), made in
    milliseconds; returns the stems."""
    from PIL import Image, ImageDraw

    stems = [f"img{i:02d}" for i in range(count)]
    for i, stem in enumerate(stems):
        image = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(image).ellipse((8 + i % 8, 6, 56 - i % 8, 58), fill=(40 * i % 256, 90, 200 - 5 * i))
        data = io.BytesIO()
        image.save(data, format="PNG")
        store.put_bytes(keys.dataset_images(dataset_id) + f"{stem}.png", data.getvalue(), "image/png")
    store.put_json(keys.dataset_manifest(dataset_id), {"dataset_id": dataset_id,
                                                       "images": [{"stem": stem} for stem in stems]})
    return stems


def kill_mid_stage(server: ServiceProcess, client: FluxloraClient, job: jobs_pb2.Job, stage: str) -> None:
    """SIGKILLs the server once the job has done some, but not all, units of `stage`; the store then
    still says RUNNING."""
    def midway() -> bool:
        current = client.get_job(job.job_id)  # (a job already finished fails the assert below)
        progress = current.progress
        return (progress.stage == stage and 0 < progress.done < progress.total) or current.state in TERMINAL

    wait_until(midway, f"the job midway through {stage!r}", logs=server.logs)
    server.kill()
    assert stored_state(server.store, server.service, job.job_id) == S.JOB_STATE_RUNNING


@pytest.mark.slow
def test_a_killed_captioning_server_captions_the_dataset_again_once(tmp_path, tiny_models, processes):
    store = LocalStore(tmp_path / "store")
    stems = store_dataset(store, "ds-sigkill000001", count=24)
    server = ServiceProcess("captioning", store, tmp_path)
    processes.append(server.start())
    client = FluxloraClient(captioning=server.address)
    # batch 1 and longer captions: the job takes a few seconds, so the kill lands mid-caption
    options = dict(model=str(tiny_models["florence2"]), batch_size=1, max_new_tokens=128, request_id="req-caption")
    job = client.caption("ds-sigkill000001", "fluxone", **options)
    kill_mid_stage(server, client, job, "captioning")

    server.start()
    final = client.wait(job)
    assert final.state == S.JOB_STATE_SUCCEEDED, server.logs()
    again = client.caption("ds-sigkill000001", "fluxone", **options)
    assert again.job_id == job.job_id and again.state == S.JOB_STATE_SUCCEEDED
    assert [j.job_id for j in client.list_jobs("captioning")] == [job.job_id]

    assert_artifacts_whole(store, final)
    result = client.result(final)
    assert result.caption_count == len(stems) and result.version == 1
    history = client.captions.history("ds-sigkill000001")
    assert [(v.version, v.kind, v.author) for v in history.versions] == [(1, "auto", job.job_id)]  # one draft
    captions = store.get_json(result.captions_key)["captions"]
    assert sorted(captions) == stems
    images = keys.dataset_images("ds-sigkill000001")
    for stem, caption in captions.items():  # the sidecars agree with captions.json, written after them
        assert store.get_bytes(f"{images}{stem}.txt").decode().rstrip("\n") == caption
    client.close()


@pytest.mark.slow
def test_a_killed_evaluation_server_renders_the_grid_again_once(tmp_path, tiny_models, processes):
    from fluxlora.evaluation.tiny_models import store_random_run

    store = LocalStore(tmp_path / "store")
    run = store_random_run(store, tiny_models["flux"])
    server = ServiceProcess("evaluation", store, tmp_path)
    processes.append(server.start())
    client = FluxloraClient(evaluation=server.address)
    # 3 checkpoints x 6 strengths; enough sampling steps that rendering takes a few seconds
    options = dict(steps=24, image_text_model="none", skip_convergence=True, request_id="req-grid")
    job = client.evaluate(run["run_id"], **options)
    kill_mid_stage(server, client, job, "rendering cells")

    server.start()
    final = client.wait(job)
    assert final.state == S.JOB_STATE_SUCCEEDED, server.logs()
    again = client.evaluate(run["run_id"], **options)
    assert again.job_id == job.job_id and again.state == S.JOB_STATE_SUCCEEDED
    assert [j.job_id for j in client.list_jobs("evaluation")] == [job.job_id]

    result = client.result(final)
    assert (result.rows, result.cols) == (3, 6) and len(result.cells) == 18
    assert_artifacts_whole(store, final)
    referenced = [a.key for a in final.artifacts]
    assert len(referenced) == len(set(referenced)), "each object stored and referenced once"
    stored = {o.key for o in store.list(keys.grid_prefix(result.grid_id))}
    assert stored == set(referenced), "nothing half-written or left over from the killed run"
    assert {c.image_key for c in result.cells} | {result.report_key, result.grid_key} <= stored
    client.close()



# A preprocessing server whose jobs never end (as one that grows until the kernel kills it).
HANGING_SERVER = """
import dataclasses, sys, threading
from fluxlora.common.config import Settings
from fluxlora.server.bootstrap import RunningServer
from fluxlora.server.services import load_definition

def handler(ctx, spec):
    ctx.progress("growing", 1)
    threading.Event().wait()

definition = dataclasses.replace(load_definition("preprocessing"), handler=handler)
RunningServer(definition, Settings(), port=int(sys.argv[-1])).start()
threading.Event().wait()
"""


def test_a_job_that_kills_its_server_twice_fails_as_poison_instead_of_running_forever(tmp_path, photos, processes):
    """FLUXLORA_MAX_JOB_ATTEMPTS (default 2): each start is counted in the record before the work starts;
    the third server start fails the job as poison, says why, and serves on."""
    from fluxlora.server.healthcheck import serving

    store = LocalStore(tmp_path / "store")
    server = ServiceProcess("preprocessing", store, tmp_path, command=[sys.executable, "-c", HANGING_SERVER])
    processes.append(server.start())
    client = FluxloraClient(preprocessing=server.address)
    source = client.upload_photos(photos)
    job = client.preprocess(source, base_size=64, request_id="req-poison")

    def record() -> dict:
        return store.get_json(f"jobs/preprocessing/{job.job_id}.json")

    for attempt in (1, 2):
        wait_until(lambda a=attempt: record().get("attempts") == a and record()["state"] == "JOB_STATE_RUNNING",
                   f"start {attempt} of the job in its record", logs=server.logs)
        server.kill()  # as the out-of-memory killer ends a server that a request makes grow
        server.start()
    with pytest.raises(JobFailed) as failed:
        client.wait(job)
    assert failed.value.code == "ABORTED" and failed.value.job.attempts == 2
    assert "started 2 times" in failed.value.message and "FLUXLORA_MAX_JOB_ATTEMPTS=2" in failed.value.message
    wait_until(lambda: record()["state"] == "JOB_STATE_FAILED", "the FAILED record", logs=server.logs)
    assert serving(server.address)[0]
    again = client.preprocess(source, base_size=64, request_id="req-poison")  # the same request: that job
    assert again.job_id == job.job_id and again.state == S.JOB_STATE_FAILED
    client.close()

"""A training run interrupted by a server restart continues from its last checkpoint: the new
server picks the job up from the store and neither repeats finished steps nor loses them. A cancelled
run continues when asked (`fluxlora train --resume-from`)."""

from __future__ import annotations

import csv
import io
import json
import time

import pytest

from fluxlora.common.config import Settings
from fluxlora.common.storage import LocalStore
from fluxlora.server.bootstrap import start_server
from fluxlora_api.v1 import jobs_pb2
from fluxlora_client import JobCancelled
from support import fluxlora, services_and_client

MAX_STEPS = 60
EVERY = 10


def test_a_restarted_training_server_resumes_the_run(tmp_path, photos, tiny_models):
    store = LocalStore(tmp_path / "store")
    with services_and_client(store, tmp_path) as client:
        dataset = client.result(client.wait(client.preprocess(client.upload_photos(photos), base_size=64)))
        client.wait(client.caption(dataset.dataset_id, "fluxone", model=str(tiny_models["florence2"])))
        # The four servers of services_and_client stop here: training is interrupted mid-run.
        job = client.train(dataset.dataset_id, base_model=str(tiny_models["flux"]), resolution=64,
                           max_steps=MAX_STEPS, checkpoint_every=EVERY, sample_every=0)
        deadline = time.monotonic() + 120
        while client.get_job(job.job_id).progress.done < 2 * EVERY + 3:
            assert time.monotonic() < deadline, "training made no progress"
            time.sleep(0.05)
    interrupted = store.get_json(f"jobs/training/{job.job_id}.json")
    assert interrupted["state"] == "JOB_STATE_QUEUED"

    settings = Settings(store=str(store.root), cache_dir=tmp_path / "cache")
    with start_server("training", settings, store=store, port=0) as server:
        runtime = server.runtime
        events = list(runtime.watch(job.job_id))
        final = events[-1].job
    assert final.state == jobs_pb2.JOB_STATE_SUCCEEDED
    # (The "resuming" log line may come before the watch starts; the metric stays on the record.)
    resumed_from = final.metrics["resumed_from_step"]
    assert 2 * EVERY <= resumed_from < MAX_STEPS
    first_step_after_restart = min(e.job.progress.done for e in events
                                   if e.job.progress.stage == "training" and e.job.progress.done > 0)
    assert first_step_after_restart > 2 * EVERY

    from fluxlora_api.v1 import training_pb2

    result = training_pb2.TrainResult()
    final.result.Unpack(result)
    steps = [c.step for c in result.checkpoints]
    # every periodic checkpoint once, plus the one saved at the step the shutdown stopped
    assert steps == sorted(set(steps)) and set(range(EVERY, MAX_STEPS + 1, EVERY)) <= set(steps)
    assert len(steps) <= MAX_STEPS // EVERY + 1
    assert steps[-1] == MAX_STEPS and result.steps_done == MAX_STEPS
    rows = list(csv.DictReader(io.StringIO(store.get_bytes(f"runs/{job.job_id}/loss.csv").decode())))
    assert [int(r["step"]) for r in rows] == list(range(1, MAX_STEPS + 1))


def test_fluxlora_train_resume_from_continues_a_cancelled_run_without_its_dataset(cli_env, photos, tiny_models):
    """`fluxlora train --resume-from <run> --max-steps N`: no dataset argument (the run knows its own);
    the new job goes on in the cancelled run from its checkpoint and raises its steps."""
    client = cli_env
    dataset = client.result(client.wait(client.preprocess(client.upload_photos(photos), base_size=64)))
    client.wait(client.caption(dataset.dataset_id, "fluxone", model=str(tiny_models["florence2"])))
    job = client.train(dataset.dataset_id, base_model=str(tiny_models["flux"]), resolution=64, max_steps=40,
                       checkpoint_every=0, sample_every=0)
    for event in client.watch(job.job_id):
        if event.job.progress.stage == "training" and event.job.progress.done >= 2:
            break
    client.cancel(job.job_id)
    with pytest.raises(JobCancelled) as cancelled:
        client.wait(job)
    stopped_at = cancelled.value.job.progress.done
    assert 2 <= stopped_at < 40

    refused = fluxlora("train")
    assert refused.exit_code == 2 and "--resume-from RUN_ID" in refused.output

    resumed = fluxlora("train", "--resume-from", job.job_id, "--max-steps", "44")
    assert resumed.exit_code == 0, resumed.output
    result = json.loads(resumed.output[resumed.output.index("{"):])
    assert result["runId"] == job.job_id and int(result["stepsDone"]) == 44
    [second] = [j for j in client.list_jobs("training") if j.job_id != job.job_id]
    assert client.spec(second).resume_from_run == job.job_id and second.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert stopped_at <= second.metrics["resumed_from_step"] < 44

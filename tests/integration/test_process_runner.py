"""Training in worker processes (FLUXLORA_RUNNER=process), through the SDK over gRPC with the tiny
models: the run happens in a child of the server and streams as an in-thread run does, with its peak
memory; killing the child fails only that run, the server goes on serving; cancel stops the child and
keeps the checkpoint; a restarted server resumes the run in a new child from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from metrics_support import scrape, total
from safetensors.torch import load_file

from fluxlora.common.config import Settings
from fluxlora.common.storage import LocalStore
from fluxlora.server.bootstrap import start_server
from fluxlora_api.v1 import jobs_pb2
from fluxlora_client import FluxloraClient, FluxloraClientError, JobCancelled, JobFailed

S = jobs_pb2.JobState
pytestmark = pytest.mark.slow


@contextlib.contextmanager
def training_server(store: LocalStore, tmp_path: Path, runner: str = "process"):
    settings = Settings(store=str(tmp_path / "unused"), cache_dir=tmp_path / "cache", runner=runner, metrics_port=0)
    server = start_server("training", settings, store=store, port=0)
    client = FluxloraClient(training=server.address)
    try:
        yield server, client
    finally:
        client.close()
        server.stop(grace=1.0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, photos, tiny_models):
    """A captioned dataset in a store of its own (copied into each test's store)."""
    root = tmp_path_factory.mktemp("process-runner")
    store = LocalStore(root / "store")
    settings = Settings(store=str(root / "unused"), cache_dir=root / "cache")
    servers = [start_server(name, settings, store=store, port=0) for name in ("preprocessing", "captioning")]
    client = FluxloraClient(**{s.definition.name: s.address for s in servers})
    try:
        dataset = client.result(client.wait(client.preprocess(client.upload_photos(photos), base_size=64)))
        client.wait(client.caption(dataset.dataset_id, "fluxone", model=str(tiny_models["florence2"])))
    finally:
        client.close()
        for server in servers:
            server.stop(grace=1.0)
    return store.root / "datasets", dataset.dataset_id


@pytest.fixture
def store(tmp_path, dataset):
    store = LocalStore(tmp_path / "store")
    shutil.copytree(dataset[0], store.root / "datasets")
    return store


def train(client: FluxloraClient, dataset, tiny_models, **options) -> jobs_pb2.Job:
    values = dict(resolution=64, max_steps=4, checkpoint_every=2, sample_every=0) | options
    return client.train(dataset[1], base_model=str(tiny_models["flux"]), **values)


def wait_for_step(client: FluxloraClient, job_id: str, step: int) -> jobs_pb2.Job:
    for event in client.watch(job_id):
        if event.job.progress.stage == "training" and event.job.progress.done >= step:
            return event.job
    raise AssertionError(f"run {job_id} ended before step {step}")


def alive(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes() != b""
    return False


def relative_keys(job: jobs_pb2.Job) -> list[tuple[str, str]]:
    return sorted((a.kind, a.key.replace(job.job_id, "<run>")) for a in job.artifacts)


def test_a_run_in_a_worker_process_streams_like_an_in_thread_run_and_stores_the_same(store, tmp_path, dataset,
                                                                                      tiny_models):
    events: list[jobs_pb2.JobEvent] = []
    with training_server(store, tmp_path) as (server, client):
        before = scrape(server.metrics_port)
        job = client.wait(train(client, dataset, tiny_models), on_event=events.append)
        after = scrape(server.metrics_port)
    # the worker process is gone; its steps and the job's end reached the server's metrics through the record
    steps = "fluxlora_training_steps_total"
    assert total(after, steps, service="training") - total(before, steps, service="training") == 4
    assert total(after, "fluxlora_jobs_finished_total", service="training", state="succeeded") \
        == total(before, "fluxlora_jobs_finished_total", service="training", state="succeeded") + 1
    with training_server(store, tmp_path, runner="local") as (_, client):
        in_thread = client.wait(train(client, dataset, tiny_models))

    assert job.state == in_thread.state == S.JOB_STATE_SUCCEEDED
    assert job.metrics["worker_pid"] != os.getpid() and "worker_pid" not in in_thread.metrics
    steps = [e.job.progress.done for e in events if e.job.progress.stage == "training"]
    assert steps and steps == sorted(steps) and steps[-1] == 4
    assert any(e.job.progress.rate > 0 and "loss" in e.job.metrics for e in events)
    # peak memory while it runs and in the run's report (the worker's RSS on this CPU; CUDA's on a GPU)
    assert any(e.job.metrics["peak_rss_gib"] > 0 for e in events if e.job.state == S.JOB_STATE_RUNNING)
    report = store.get_json(f"runs/{job.job_id}/report.json")
    assert report["memory"]["peak_rss_gib"] == pytest.approx(job.metrics["peak_rss_gib"])
    assert report["memory"]["peak_memory_gib"] is None and "peak_memory_gib" not in job.metrics  # no CUDA here

    assert relative_keys(job) == relative_keys(in_thread)
    result, reference = client.result(job), client.result(in_thread)
    assert [c.step for c in result.checkpoints] == [c.step for c in reference.checkpoints] == [2, 4]
    ours, theirs = load_file(store.root / result.checkpoints[-1].lora_key), load_file(
        store.root / reference.checkpoints[-1].lora_key)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_the_training_gauges_move_while_a_worker_process_runs_and_settle_when_it_ends(store, tmp_path, dataset,
                                                                                     tiny_models):
    """Scraped during the run: what the worker process reports reaches /metrics through the record.
    (A long run, cancelled after the scrapes: a short one may end between two of them.)"""
    during: list[dict] = []
    with training_server(store, tmp_path) as (server, client):
        before = scrape(server.metrics_port)
        job = train(client, dataset, tiny_models, max_steps=50_000, checkpoint_every=0)
        step = 3
        for _ in range(2):  # (worker reports are throttled: the second waits for a step past the first scrape)
            wait_for_step(client, job.job_id, step)
            during.append(scrape(server.metrics_port))
            step = int(total(during[-1], "fluxlora_training_steps_total", service="training")
                       - total(before, "fluxlora_training_steps_total", service="training")) + 1
        client.cancel(job.job_id)
        with pytest.raises(JobCancelled):
            client.wait(job)
        after = scrape(server.metrics_port)

    def value(samples, name, **labels):
        return total(samples, name, service="training", **labels)

    steps = [value(s, "fluxlora_training_steps_total") - value(before, "fluxlora_training_steps_total")
             for s in (*during, after)]
    assert 3 <= steps[0] < steps[1] <= steps[2]
    for samples in during:
        assert value(samples, "fluxlora_jobs", state="running") == 1
        assert value(samples, "fluxlora_training_steps_per_second") > 0
        assert value(samples, "fluxlora_training_loss") > 0
        assert value(samples, "fluxlora_job_eta_seconds") > 0
    # the same numbers the SDK shows; once the run is over, nothing runs and nothing is left to go
    assert value(after, "fluxlora_training_loss") > 0
    assert value(after, "fluxlora_training_steps_per_second") == value(after, "fluxlora_job_eta_seconds") == 0
    assert value(after, "fluxlora_jobs", state="running") == 0


KILLED_STEPS = 60


def wait_for(client: FluxloraClient, job_id: str, condition, what: str) -> jobs_pb2.Job:
    for event in client.watch(job_id):
        if condition(event.job):
            return event.job
    raise AssertionError(f"run {job_id} ended before {what}")


def test_a_killed_worker_runs_again_from_its_checkpoint_a_second_kill_fails_it_and_resume_finishes_it(
        store, tmp_path, dataset, tiny_models):
    with training_server(store, tmp_path) as (server, client):
        job = train(client, dataset, tiny_models, max_steps=KILLED_STEPS, checkpoint_every=5)
        first = wait_for_step(client, job.job_id, 6)
        first_pid = int(first.metrics["worker_pid"])
        os.kill(first_pid, signal.SIGKILL)  # as the out-of-memory killer does
        # the second worker's own report: its pid and where it resumed (the record keeps the first
        # worker's progress until the second one reports, so progress alone could be stale)
        second = wait_for(client, job.job_id, lambda j: int(j.metrics.get("worker_pid", 0)) not in (0, first_pid)
                          and "resumed_from_step" in j.metrics and j.progress.stage == "training",
                          "a second worker resuming")
        assert second.attempts == 2 and 5 <= second.metrics["resumed_from_step"] < KILLED_STEPS  # a checkpoint
        os.kill(int(second.metrics["worker_pid"]), signal.SIGKILL)
        with pytest.raises(JobFailed) as failed:
            client.wait(job)
        assert failed.value.code == "RESOURCE_EXHAUSTED" and failed.value.job.attempts == 2
        assert "SIGKILL" in failed.value.message and "out-of-memory" in failed.value.message
        assert "started 2 times" in failed.value.message and "FLUXLORA_MAX_JOB_ATTEMPTS=2" in failed.value.message
        assert any(a.kind == "lora" and a.step == 10 for a in failed.value.job.artifacts)  # kept

        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        # the failed run goes on from its last checkpoint, in the same run (and with its own spec)
        with pytest.raises(FluxloraClientError) as refused:
            client.resume_training(job.job_id, rank=64)
        assert refused.value.code == "INVALID_ARGUMENT" and "spec.rank is 64" in refused.value.message
        resumed = client.wait(client.resume_training(job.job_id))
        with pytest.raises(FluxloraClientError) as refused:
            client.resume_training(job.job_id)
        assert refused.value.code == "FAILED_PRECONDITION" and "finished already" in refused.value.message
    assert resumed.state == S.JOB_STATE_SUCCEEDED and resumed.job_id != job.job_id
    assert 10 <= resumed.metrics["resumed_from_step"] < KILLED_STEPS
    result = client.result(resumed)
    assert result.run_id == job.job_id and result.steps_done == KILLED_STEPS
    assert [c.step for c in result.checkpoints] == list(range(5, KILLED_STEPS + 1, 5)), "each checkpoint once"
    steps = [int(r.split(",")[0]) for r in store.get_bytes(result.loss_csv_key).decode().split()[1:]]
    assert steps == list(range(1, KILLED_STEPS + 1)), "each step trained once"
    assert result.loss_csv_key.startswith(f"runs/{job.job_id}/")


def test_cancel_stops_the_worker_within_a_step_and_keeps_its_checkpoint(store, tmp_path, dataset, tiny_models):
    with training_server(store, tmp_path) as (_, client):
        job = train(client, dataset, tiny_models, max_steps=50_000, checkpoint_every=0)
        running = wait_for_step(client, job.job_id, 3)
        client.cancel(job.job_id)
        with pytest.raises(JobCancelled) as cancelled:
            client.wait(job)
    final = cancelled.value.job
    assert final.state == S.JOB_STATE_CANCELLED and not alive(int(running.metrics["worker_pid"]))
    [checkpoint] = [a for a in final.artifacts if a.kind == "lora"]
    assert checkpoint.step == final.progress.done >= 3 and store.exists(checkpoint.key)  # the step it was at
    assert store.exists(checkpoint.key.replace("pytorch_lora_weights.safetensors", "training_state.pt"))


STEPS = 200


def test_a_restarted_server_resumes_the_run_in_a_new_worker_from_its_last_checkpoint(store, tmp_path, dataset,
                                                                                   tiny_models):
    with training_server(store, tmp_path) as (_, client):
        # Enough steps that the server's shutdown (SIGTERM to the worker) lands mid-run on a loaded machine.
        job = train(client, dataset, tiny_models, max_steps=STEPS, checkpoint_every=5)
        first = wait_for_step(client, job.job_id, 7)
    # The server stopped: its worker saved a checkpoint and exited; the run waits in the store.
    assert store.get_json(f"jobs/training/{job.job_id}.json")["state"] == "JOB_STATE_QUEUED"
    assert not alive(int(first.metrics["worker_pid"]))

    with training_server(store, tmp_path) as (_, client):
        final = client.wait(job.job_id)
    assert final.state == S.JOB_STATE_SUCCEEDED
    assert final.metrics["worker_pid"] != first.metrics["worker_pid"]
    assert 5 <= final.metrics["resumed_from_step"] < STEPS
    result = client.result(final)
    assert result.steps_done == STEPS and result.checkpoints[-1].step == STEPS
    assert [int(r.split(",")[0]) for r in store.get_bytes(f"runs/{job.job_id}/loss.csv").decode().split()[1:]] == \
        list(range(1, STEPS + 1))


def test_a_run_on_two_gpus_is_two_torchrun_ranks_equal_to_one_process_at_the_same_global_batch(
        store, tmp_path, dataset, tiny_models):
    """spec.gpus=2 on this CPU: torchrun starts two worker processes (gloo), rank 0 alone stores; the
    LoRA equals an in-thread run of batch 2 (each rank trains batch_size 1 of the global batch of 2)."""
    with training_server(store, tmp_path) as (_, client):
        job = client.wait(train(client, dataset, tiny_models, gpus=2))
    with training_server(store, tmp_path, runner="local") as (_, client):
        reference = client.wait(train(client, dataset, tiny_models, batch_size=2))

    assert job.state == reference.state == S.JOB_STATE_SUCCEEDED, job.error
    assert relative_keys(job) == relative_keys(reference)  # each artifact once: no second writer
    result, expected = client.result(job), client.result(reference)
    assert result.steps_done == 4 and [c.step for c in result.checkpoints] == [2, 4]
    assert result.final_loss == pytest.approx(expected.final_loss, rel=1e-5)
    ours, theirs = load_file(store.root / result.checkpoints[-1].lora_key), load_file(
        store.root / expected.checkpoints[-1].lora_key)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)


PARALLEL_STEPS = 30


CANCELLED_STEPS = 150  # long enough that a cancel at step 3 lands mid-run on a fast idle machine


def test_a_cancelled_two_gpu_run_resumes_to_the_lora_of_an_uninterrupted_one(store, tmp_path, dataset, tiny_models):
    """The cancel's SIGTERM reaches both ranks through torchrun: they stop at the same step, rank 0
    stores that checkpoint, and resume_from_run continues exactly (the LoRA is bit for bit the one of
    an uninterrupted 2-GPU run)."""
    with training_server(store, tmp_path) as (_, client):
        whole = client.wait(train(client, dataset, tiny_models, gpus=2, max_steps=CANCELLED_STEPS, checkpoint_every=0))
        job = train(client, dataset, tiny_models, gpus=2, max_steps=CANCELLED_STEPS, checkpoint_every=0)
        running = wait_for_step(client, job.job_id, 3)
        client.cancel(job.job_id)
        with pytest.raises(JobCancelled) as cancelled:
            client.wait(job)
        stopped = cancelled.value.job
        [checkpoint] = [a for a in stopped.artifacts if a.kind == "lora"]
        assert 3 <= checkpoint.step < CANCELLED_STEPS and not alive(int(running.metrics["worker_pid"]))
        resumed = client.wait(client.resume_training(job.job_id))

    assert whole.state == resumed.state == S.JOB_STATE_SUCCEEDED, resumed.error
    assert resumed.metrics["resumed_from_step"] == checkpoint.step
    a, b = (load_file(store.root / client.result(j).checkpoints[-1].lora_key) for j in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def rank_process(launcher_pid: int, rank: int) -> int:
    """The pid of the worker process of `rank` among the launcher's (torchrun's) children."""
    for child in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no rank {rank} among the children of {launcher_pid}")


def test_a_two_gpu_run_whose_rank_1_is_killed_runs_again_from_its_checkpoint_and_trains_each_step_once(
        store, tmp_path, dataset, tiny_models):
    """SIGKILL to one rank (what the out-of-memory killer does to one GPU's process): the launcher exits
    137, the run starts again (FLUXLORA_MAX_JOB_ATTEMPTS, default 2) and resumes from its last checkpoint."""
    with training_server(store, tmp_path) as (_, client):
        job = train(client, dataset, tiny_models, gpus=2, max_steps=KILLED_STEPS, checkpoint_every=5)
        first = wait_for_step(client, job.job_id, 6)
        os.kill(rank_process(int(first.metrics["worker_pid"]), 1), signal.SIGKILL)
        final = client.wait(job)
    assert final.state == S.JOB_STATE_SUCCEEDED and final.attempts == 2, final.error
    assert final.metrics["worker_pid"] != first.metrics["worker_pid"]
    assert 5 <= final.metrics["resumed_from_step"] < KILLED_STEPS
    result = client.result(final)
    assert result.steps_done == KILLED_STEPS
    assert [c.step for c in result.checkpoints] == list(range(5, KILLED_STEPS + 1, 5)), "each checkpoint once"
    steps = [int(r.split(",")[0]) for r in store.get_bytes(result.loss_csv_key).decode().split()[1:]]
    assert steps == list(range(1, KILLED_STEPS + 1)), "each step trained once"

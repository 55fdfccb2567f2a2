"""A real training run (tiny models) as a Kueue-admitted Kubernetes Job, through the SDK over gRPC,
against the fake Kubernetes API (tests/deploy/kube_fakes.py) with the real kubernetes client: the run
waits for admission, trains, is preempted (Kueue suspends its Job: the pod's SIGTERM stops the
worker, exit 75), and on re-admission resumes from its last checkpoint in the same Job; every step is
in loss.csv once, and at most checkpoint_every steps were trained twice."""

from __future__ import annotations

import shutil
import threading

import pytest
from deploy.kube_fakes import FakeKubelet
from test_process_runner import dataset, train, wait_for_step  # noqa: F401 - dataset is a fixture

from fluxlora.common.config import Settings
from fluxlora.common.storage import LocalStore
from fluxlora.jobs.worker import EXIT_INTERRUPTED, run_worker
from fluxlora.server.bootstrap import start_server
from fluxlora.server.services import load_definition
from fluxlora_api.v1 import jobs_pb2
from fluxlora_client import FluxloraClient

S = jobs_pb2.JobState
NS = "fluxlora"
STEPS, CHECKPOINT_EVERY = 40, 5
pytestmark = pytest.mark.slow


def test_a_preempted_training_run_resumes_from_its_checkpoint_in_the_same_job(tmp_path, dataset, tiny_models,  # noqa: F811
                                                                             kube):
    store = LocalStore(tmp_path / "store")
    shutil.copytree(dataset[0], store.root / "datasets")
    settings = Settings(store=str(store.root), cache_dir=tmp_path / "cache", runner="kubernetes",
                        k8s_image="registry.example.com/fluxlora-gpu:0.1.0", k8s_namespace=NS, k8s_poll_s=0.05,
                        k8s_queue_name="fluxlora", k8s_priority_class="fluxlora-training")
    kubelet = FakeKubelet(kube, lambda service, job_id, stop: run_worker(
        service, job_id, settings, store, stop, handler=load_definition(service).handler))
    server = start_server("training", settings, store=store, port=0)
    client = FluxloraClient(training=server.address)
    try:
        job = train(client, dataset, tiny_models, max_steps=STEPS, checkpoint_every=CHECKPOINT_EVERY)
        waiting = next(e.job for e in client.watch(job.job_id)
                       if e.job.progress.stage.startswith("waiting for Kueue"))
        assert "ClusterQueue fluxlora-gpu" in waiting.progress.stage
        kube.admit(NS, job.job_id)
        wait_for_step(client, job.job_id, CHECKPOINT_EVERY + 2)
        kube.evict(NS, job.job_id)  # a grid request of higher priority takes the GPU
        evicted = next(e.job for e in client.watch(job.job_id) if "evicted (Preempted)" in e.job.progress.stage)
        assert evicted.state == S.JOB_STATE_RUNNING
        stopped_at = evicted.progress.done  # the last step reported before the preemption
        while job.job_id in kubelet.running:  # the worker stops at a step and stores its checkpoint
            threading.Event().wait(0.05)
        assert kubelet.exit_codes[job.job_id] == EXIT_INTERRUPTED
        kube.admit(NS, job.job_id)
        final = client.wait(job.job_id)
        result = client.result(final)
    finally:
        client.close()
        server.stop(grace=1.0)

    assert final.state == S.JOB_STATE_SUCCEEDED, final.error
    assert len(kube.requests_of("POST")) == 1 and kubelet.pods_started[job.job_id] == 2  # one Job, two pods
    resumed = int(final.metrics["resumed_from_step"])
    assert CHECKPOINT_EVERY <= resumed < STEPS and resumed >= stopped_at - CHECKPOINT_EVERY  # at most that lost
    assert result.steps_done == STEPS
    steps = [int(r.split(",")[0]) for r in store.get_bytes(f"runs/{job.job_id}/loss.csv").decode().split()[1:]]
    assert steps == list(range(1, STEPS + 1))

"""Every GPU stage but training (caption, grid, generate; training: test_training_preempted_by_kueue)
as a Kueue-admitted Kubernetes Job, with the tiny models, through the SDK over gRPC: the captioning
and evaluation servers run FLUXLORA_RUNNER=kubernetes with a queue, the fake Kubernetes API
(tests/deploy/kube_fakes.py, the real kubernetes client) admits each suspended Job, and the fake
kubelet runs the real `fluxlora worker` code with each service's own handler. What the services
returned in-process they return from a Job: the captions, the grid and its report, the images."""

from __future__ import annotations

import pytest
from deploy.kube_fakes import FakeKubelet

from fluxlora.common.config import Settings
from fluxlora.common.storage import LocalStore
from fluxlora.evaluation.tiny_models import PROMPT, store_random_run
from fluxlora.jobs.worker import run_worker
from fluxlora.server.bootstrap import start_server
from fluxlora.server.services import load_definition
from fluxlora_api.v1 import jobs_pb2
from fluxlora_client import FluxloraClient

S = jobs_pb2.JobState
NS = "fluxlora"
pytestmark = pytest.mark.slow


def test_caption_grid_and_generate_each_run_in_their_own_admitted_job(tmp_path, tiny_models, kube):
    store = LocalStore(tmp_path / "store")
    run = store_random_run(store, tiny_models["flux"])
    settings = Settings(store=str(store.root), cache_dir=tmp_path / "cache", runner="kubernetes",
                        k8s_image="registry.example.com/fluxlora-gpu:0.1.0", k8s_namespace=NS, k8s_poll_s=0.05,
                        k8s_queue_name="fluxlora")
    priorities = {"captioning": "fluxlora-captioning", "evaluation": "fluxlora-interactive"}
    kubelet = FakeKubelet(kube, lambda service, job_id, stop: run_worker(
        service, job_id, settings, store, stop, handler=load_definition(service).handler))
    created = []

    def admit_at_once(namespace, job):  # Kueue with free quota
        created.append(job)
        kube.admit(namespace, job["metadata"]["name"])

    kube.on_create = admit_at_once
    servers = {name: start_server(name, settings.model_copy(update={"k8s_priority_class": priority}),
                                  store=store, port=0)
               for name, priority in priorities.items()}
    client = FluxloraClient(**{name: server.address for name, server in servers.items()})
    try:
        captioned = client.wait(client.caption(run["dataset_id"], "fluxone", model=str(tiny_models["florence2"])))
        grid = client.wait(client.evaluate(run["run_id"], steps=2))
        generated = client.wait(client.generate(PROMPT, steps=2, width=64, height=64,
                                                base_model=str(tiny_models["flux"])))
    finally:
        client.close()
        for server in servers.values():
            server.stop(grace=1.0)

    assert [j.state for j in (captioned, grid, generated)] == [S.JOB_STATE_SUCCEEDED] * 3, (
        captioned.error, grid.error, generated.error)
    assert [j["metadata"]["name"] for j in created] == [captioned.job_id, grid.job_id, generated.job_id]
    assert [j["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] for j in created] == [
        "fluxlora-captioning", "fluxlora-interactive", "fluxlora-interactive"]
    assert all(j["spec"]["suspend"] is True for j in created)
    assert all(kubelet.exit_codes[j.job_id] == 0 for j in (captioned, grid, generated))
    grid_result = client.result(grid)
    assert grid_result.cells and store.exists(grid_result.report_key)
    assert any(a.key.endswith(".png") for a in generated.artifacts)
    assert captioned.artifacts

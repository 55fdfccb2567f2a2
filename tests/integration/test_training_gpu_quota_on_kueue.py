"""Behind Kueue, a training run asking for more GPUs (spec.gpus x spec.nodes) than any flavor of its
ClusterQueue can ever give (nominal quota, plus the borrowingLimit in a cohort) is refused at submit
and at plan, FAILED_PRECONDITION naming the queue, the flavors' quota and the fix: Kueue would never
admit it, and it would wait forever. A run within the quota is accepted and waits for admission as
before, and the plan says per flavor whether the run fits its quota. Without Kueue, or with a worker
that takes no GPU, nothing is checked. Through the SDK over gRPC, against the fake Kubernetes API
(the `kube` fixture) with the real kubernetes client and the repository's own Kueue objects."""

from __future__ import annotations

import copy

import pytest
from deploy.kube_fakes import kueue_objects

from fluxlora.common import keys
from fluxlora.common.config import Settings
from fluxlora.common.storage import LocalStore
from fluxlora.evaluation.tiny_models import TRIGGER, store_random_run
from fluxlora.server.bootstrap import start_server
from fluxlora_client import FluxloraClient, FluxloraClientError
from fluxlora_client.cli_reports import print_plan

NS = "fluxlora"
BASE = "store://models/tiny-flux"


@pytest.fixture
def training(tmp_path, tiny_models, kube):
    """serve(cluster_queue=..., **settings) -> an SDK client of a training server whose LocalQueue
    "fluxlora" leads to that ClusterQueue (default: the shipped one, 4 GPUs of flavor rtx4090)."""
    store = LocalStore(tmp_path / "store")
    store.upload_dir(tiny_models["flux"], "models/tiny-flux/")
    dataset_id = store_random_run(store, tiny_models["flux"])["dataset_id"]
    store.put_json(keys.dataset_captions(dataset_id), {"trigger_word": TRIGGER})
    objects = kueue_objects()
    kube.cluster_objects[("resourceflavors", "rtx4090")] = objects["ResourceFlavor"]
    started = []

    def serve(cluster_queue: dict | None = None, **overrides) -> FluxloraClient:
        kube.cluster_objects[("clusterqueues", "fluxlora-gpu")] = cluster_queue or objects["ClusterQueue"]
        settings = Settings(**(dict(store=str(store.root), cache_dir=tmp_path / "cache", runner="kubernetes",
                                    k8s_image="registry.example.com/fluxlora-gpu:0.1.0", k8s_namespace=NS,
                                    k8s_queue_name="fluxlora") | overrides))
        server = start_server("training", settings, store=store, port=0)
        client = FluxloraClient(training=server.address)
        started.append((server, client))
        return client

    serve.dataset_id = dataset_id
    yield serve
    for server, client in started:
        client.close()
        server.stop(grace=1.0)


def train(serve, client: FluxloraClient, **options):
    return client.train(serve.dataset_id, base_model=BASE, resolution=64, max_steps=4, **options)


def in_cohort(borrowing_limit: str | None = None) -> dict:
    """The shipped ClusterQueue in a cohort, with a borrowingLimit on its GPUs when given."""
    cluster_queue = copy.deepcopy(kueue_objects()["ClusterQueue"])
    cluster_queue["spec"]["cohort"] = "gpus"
    if borrowing_limit is not None:
        for resource in cluster_queue["spec"]["resourceGroups"][0]["flavors"][0]["resources"]:
            if resource["name"] == "nvidia.com/gpu":
                resource["borrowingLimit"] = borrowing_limit
    return cluster_queue


def test_a_run_over_the_cluster_queues_gpu_quota_is_refused_before_a_job_is_created(training, kube):
    client = training()
    with pytest.raises(FluxloraClientError) as err:
        train(training, client, gpus=4, nodes=2)
    assert err.value.code == "FAILED_PRECONDITION"
    message = err.value.message
    assert "spec.gpus 4 x spec.nodes 2" in message and "8 GPUs" in message
    assert "ClusterQueue fluxlora-gpu" in message and "flavor rtx4090: 4 GPUs of quota" in message
    assert "at most 4 GPUs" in message and "nominalQuota" in message
    assert kube.requests_of("POST") == []  # no Job waits forever for an admission that cannot come
    with pytest.raises(FluxloraClientError) as planned:  # fluxlora train --plan says the same
        client.plan_training(BASE, resolution=64, gpus=8)
    assert planned.value.code == "FAILED_PRECONDITION" and "ClusterQueue fluxlora-gpu" in planned.value.message


def test_a_run_within_the_quota_is_accepted_and_waits_for_admission_and_the_plan_says_it_fits(training, kube,
                                                                                             capsys):
    client = training()
    plan = client.plan_training(BASE, resolution=64, gpus=2, nodes=2)
    assert [(f.name, f.gpu_quota, f.gpu_limit, f.fits_quota) for f in plan.flavors] == [("rtx4090", 4, 4, True)]
    print_plan(plan)
    assert "GPUs within quota" in capsys.readouterr().out

    job = train(training, client, gpus=2, nodes=2)  # the quota's 4 GPUs, busy or not: Kueue admits it later
    waiting = next(e.job for e in client.watch(job.job_id) if e.job.progress.stage.startswith("waiting for Kueue"))
    assert "ClusterQueue fluxlora-gpu" in waiting.progress.stage
    assert len(kube.requests_of("POST")) == 2  # the Indexed Job and its rendezvous Service


def test_gpus_a_cohort_may_lend_count_up_to_the_borrowing_limit(training, kube):
    client = training(in_cohort(borrowing_limit="4"))
    plan = client.plan_training(BASE, resolution=64, gpus=4, nodes=2)
    assert [(f.gpu_quota, f.gpu_limit, f.fits_quota) for f in plan.flavors] == [(4, 8, True)]
    with pytest.raises(FluxloraClientError) as err:
        client.plan_training(BASE, resolution=64, gpus=3, nodes=3)
    assert "4 GPUs of quota + 4 borrowable from its cohort" in err.value.message
    assert "at most 8 GPUs" in err.value.message


def test_a_cohort_without_a_borrowing_limit_bounds_nothing(training, kube):
    client = training(in_cohort())
    plan = client.plan_training(BASE, resolution=64, gpus=8, nodes=2)
    (flavor,) = plan.flavors
    assert not flavor.HasField("gpu_limit") and flavor.fits_quota
    assert train(training, client, gpus=8, nodes=2).job_id


@pytest.mark.parametrize("settings", [
    {"k8s_queue_name": ""},  # plain Jobs: no ClusterQueue, the cluster schedules them
    {"k8s_resources": {"limits": {"cpu": "8"}}},  # a CPU-only overlay's workers take no GPU quota
], ids=["plain-jobs", "cpu-workers"])
def test_without_kueue_or_without_gpus_in_the_job_nothing_is_checked(training, kube, settings):
    client = training(**settings)
    assert train(training, client, gpus=8, nodes=2).job_id

"""Behind Kueue, the memory planner plans against the GPUs the ClusterQueue may give a run: it reads
the LocalQueue's ClusterQueue and its ResourceFlavors through the Kubernetes API (the fake API here,
with the repository's own Kueue objects), plans for the smallest GPU among them, since Kueue assigns
flavors by quota and knows nothing of GPU memory, and says for each flavor whether the run fits."""

from __future__ import annotations

import copy

import jsonschema
import pytest
from kube_fakes import FakeKubeAPI, kueue_objects, use_kubeconfig
from test_kueue_manifests import crd_schemas

from fluxlora.common.config import Settings
from fluxlora.common.storage import LocalStore
from fluxlora.jobs.kueue_flavors import ClusterQueueGpus, Flavor, gpu_borrowing, gpu_memory_gib, gpu_quotas
from fluxlora.server.bootstrap import start_server
from fluxlora.training.gpu_budget import gpu_target
from fluxlora_client import FluxloraClient
from fluxlora_client.cli import _print_plan

NS = "fluxlora"


def test_the_gpu_quota_of_each_flavor_is_read_from_the_cluster_queue_as_shipped():
    assert gpu_quotas(kueue_objects()["ClusterQueue"]) == [("rtx4090", 4)]


@pytest.mark.parametrize("cohort, borrowing_limit, borrowing", [
    (None, None, 0),  # outside a cohort nothing is borrowed (and Kueue refuses a borrowingLimit)
    ("gpus", "4", 4),
    ("gpus", None, None),  # a cohort without a borrowingLimit: whatever the cohort has unused
])
def test_what_a_flavor_may_borrow_follows_the_cohort_and_borrowing_limit(cohort, borrowing_limit, borrowing):
    cluster_queue = copy.deepcopy(kueue_objects()["ClusterQueue"])
    if cohort:
        cluster_queue["spec"]["cohort"] = cohort
    if borrowing_limit:
        gpu = cluster_queue["spec"]["resourceGroups"][0]["flavors"][0]["resources"][2]
        gpu["borrowingLimit"] = borrowing_limit
    jsonschema.validate(cluster_queue, crd_schemas()["ClusterQueue"])  # Kueue's own field names
    assert gpu_borrowing(cluster_queue) == {"rtx4090": borrowing}


def test_a_run_is_over_quota_only_when_no_flavor_can_ever_give_its_gpus():
    gpus = ClusterQueueGpus("fluxlora-gpu", (Flavor("h100", "", 80.0, 2, gpu_borrowing=2),
                                             Flavor("rtx4090", "", 24.0, 3)))
    assert [f.gpu_limit for f in gpus.flavors] == [4, 3]
    assert gpus.over_quota(4) is None
    refusal = gpus.over_quota(5)
    assert refusal is not None and "ClusterQueue fluxlora-gpu" in refusal and "at most 4 GPUs" in refusal
    assert "flavor h100: 2 GPUs of quota + 2 borrowable from its cohort; flavor rtx4090: 3 GPUs of quota" in refusal
    unbounded = ClusterQueueGpus("fluxlora-gpu", (Flavor("h100", "", 80.0, 2, gpu_borrowing=None),))
    assert unbounded.over_quota(64) is None
    assert ClusterQueueGpus("fluxlora-gpu", ()).over_quota(64) is None  # no GPU flavor read: nothing said


@pytest.mark.parametrize("labels, gib", [
    ({"nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-4090"}, 24.0),
    ({"nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-4090", "nvidia.com/gpu.memory": "49152"}, 48.0),
    ({"nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-4090-SHARED"}, None),  # time-sliced: a share, unknown
    ({}, None),
])
def test_a_flavors_gpu_memory_comes_from_its_node_labels(labels, gib):
    assert gpu_memory_gib(labels) == gib


def test_the_target_is_the_smallest_gpu_kueue_may_give_unless_the_operator_set_one():
    gpus = ClusterQueueGpus("fluxlora-gpu", (Flavor("h100", "NVIDIA-H100-80GB-HBM3", 80.0, 2),
                                             Flavor("rtx4090", "NVIDIA-GeForce-RTX-4090", 24.0, 8),
                                             Flavor("cpu-only", "", None, 1)))
    target = gpu_target(Settings(), gpus)
    assert target.gib == 24.0 and "ClusterQueue fluxlora-gpu" in target.source and "rtx4090" in target.source
    assert gpu_target(Settings(gpu_memory_gib=80), gpus).source == "FLUXLORA_GPU_MEMORY_GIB on the training server"
    assert gpu_target(Settings(gpu_memory_gib=0), gpus) is None


@pytest.fixture
def kueue_cluster(tmp_path, monkeypatch):
    """The fake API holding the repository's Kueue objects, plus a second flavor of small GPUs."""
    api = FakeKubeAPI().start()
    objects = kueue_objects()
    cluster_queue = copy.deepcopy(objects["ClusterQueue"])
    group = cluster_queue["spec"]["resourceGroups"][0]
    group["flavors"].append({"name": "small", "resources": [
        {"name": r["name"], "nominalQuota": 2 if r["name"] == "nvidia.com/gpu" else r["nominalQuota"]}
        for r in group["flavors"][0]["resources"]]})
    api.local_queues[(NS, objects["LocalQueue"]["metadata"]["name"])] = cluster_queue["metadata"]["name"]
    api.cluster_objects[("clusterqueues", "fluxlora-gpu")] = cluster_queue
    api.cluster_objects[("resourceflavors", "rtx4090")] = objects["ResourceFlavor"]
    api.cluster_objects[("resourceflavors", "small")] = {
        "apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "ResourceFlavor", "metadata": {"name": "small"},
        "spec": {"nodeLabels": {"nvidia.com/gpu.product": "NVIDIA-T4-MINI", "nvidia.com/gpu.memory": "512"}}}
    use_kubeconfig(api, tmp_path, monkeypatch, NS)
    monkeypatch.delenv("FLUXLORA_GPU_MEMORY_GIB", raising=False)
    yield api
    api.stop()


@pytest.fixture
def training_on_kueue(tmp_path, kueue_cluster):
    from fluxlora.models.tiny_flux import write_tiny_flux

    store = LocalStore(tmp_path / "store")
    store.upload_dir(write_tiny_flux(tmp_path / "tiny-flux"), "models/tiny-flux/")
    settings = Settings(store=str(store.root), cache_dir=tmp_path / "cache", runner="kubernetes",
                        k8s_image="registry.example.com/fluxlora-gpu:0.1.0", k8s_namespace=NS,
                        k8s_queue_name="fluxlora")
    server = start_server("training", settings, store=store, port=0)
    client = FluxloraClient(training=server.address)
    yield client, kueue_cluster
    client.close()
    server.stop(grace=1.0)


def test_a_plan_names_the_cluster_queue_and_whether_the_run_fits_each_flavor(training_on_kueue, capsys):
    client, cluster = training_on_kueue
    plan = client.plan_training("store://models/tiny-flux", resolution=64)
    assert plan.cluster_queue == "fluxlora-gpu"
    assert [(f.name, f.gpu_product, f.gpu_memory_gib, f.gpu_quota, f.fits) for f in plan.flavors] == [
        ("rtx4090", "NVIDIA-GeForce-RTX-4090", 24.0, 4, True), ("small", "NVIDIA-T4-MINI", 0.5, 2, False)]
    # Kueue may admit the run to the small flavor: the plan is for that GPU, and says so
    assert plan.target_gib == 0.5 and not plan.fits
    assert "ClusterQueue fluxlora-gpu" in plan.target_source and "small" in plan.target_source

    _print_plan(plan)
    out = capsys.readouterr().out
    assert "ClusterQueue fluxlora-gpu" in out and "rtx4090" in out and "small" in out

    # a target in the request is what the person asked about
    asked = client.plan_training("store://models/tiny-flux", resolution=64, target_gib=24)
    assert asked.fits and asked.target_gib == 24 and asked.target_source == "the request's target_gib"


def test_without_the_right_to_read_kueues_objects_the_plan_falls_back_to_the_reference_gpu(training_on_kueue):
    client, cluster = training_on_kueue
    cluster.cluster_objects.clear()  # (what a 404 and a 403 both mean here: nothing to read)
    plan = client.plan_training("store://models/tiny-flux", resolution=64)
    assert plan.cluster_queue == "" and not plan.flavors
    assert plan.target_gib == 24 and "reference RTX 4090" in plan.target_source

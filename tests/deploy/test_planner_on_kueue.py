"""Behind Kueue, the memory planner plans against the GPUs the ClusterQueue may give a run: it reads
the LocalQueue's ClusterQueue and its ResourceFlavors through the Kubernetes API (the fake API here,
with the repository's own Kueue objects), plans for the smallest GPU among them, since Kueue assigns
flavors by quota and knows nothing of GPU memory, and says for each flavor whether the run fits."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from kube_fakes import FakeKubeAPI, use_kubeconfig

from fluxlora.common.config import Settings
from fluxlora.common.storage import LocalStore
from fluxlora.jobs.kueue_flavors import ClusterQueueGpus, Flavor, gpu_memory_gib, gpu_quotas
from fluxlora.server.bootstrap import start_server
from fluxlora.training.gpu_budget import gpu_target
from fluxlora_client import FluxloraClient
from fluxlora_client.cli import _print_plan

NS = "fluxlora"
QUEUES = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "components" / "kueue" / "queues.yaml"


def kueue_objects() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(QUEUES.read_text()) if doc}


def test_the_gpu_quota_of_each_flavor_is_read_from_the_cluster_queue_as_shipped():
    assert gpu_quotas(kueue_objects()["ClusterQueue"]) == [("rtx4090", 4)]


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

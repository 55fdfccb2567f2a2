"""Every GPU stage as a Job: overlays/rtx4090-jobs (base + components/gpu-jobs: plain Jobs) and
overlays/rtx4090-kueue (the same + components/kueue), rendered by kubectl's kustomize: Kubernetes
objects validated strictly against the 1.30 schemas, Kueue's objects against the openAPIV3Schema of
Kueue's own CRDs (tests/deploy/schemas/kueue, a pinned release, no unknown fields), and what issue 14
promises held on what would be applied: no Deployment holds a GPU; captioning, training and
evaluation launch Jobs with a GPU (with Kueue: suspended, in a LocalQueue whose ClusterQueue has GPU
quota on the RTX 4090 ResourceFlavor, where the node selector lives); grids and generate requests
outrank captioning, which outranks training, which may be preempted."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_tools import K8S
from test_kubernetes_manifests import K8S_VERSION, by_kind, container, env_of, render
from test_kubernetes_manifests import OVERLAYS as GPU_SERVER_OVERLAYS

from fluxlora.common.config import Settings
from fluxlora.jobs.k8s_manifests import LABEL_PRIORITY, LABEL_QUEUE, job_manifest

SCHEMAS = Path(__file__).parent / "schemas" / "kueue"
KUEUE_API = "kueue.x-k8s.io/v1beta1"
RTX4090 = {"nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-4090"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
LAUNCHERS = {"captioning": "fluxlora-captioning", "training": "fluxlora-training",
             "evaluation": "fluxlora-interactive"}
CLUSTER_SCOPED = {"ClusterQueue", "ResourceFlavor", "WorkloadPriorityClass", "Namespace", "ClusterRole",
                  "ClusterRoleBinding"}


def strict(schema: dict) -> dict:
    """The schema with unknown fields refused, as the API server prunes/rejects them."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_schemas() -> dict[str, dict]:
    """kind -> the v1beta1 openAPIV3Schema of Kueue's CRD."""
    schemas = {}
    for path in sorted(SCHEMAS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
        assert version["served"], path
        schemas[crd["spec"]["names"]["kind"]] = strict(version["schema"]["openAPIV3Schema"])
    return schemas


OVERLAYS = ("rtx4090-jobs", "rtx4090-kueue")


def test_every_overlay_is_rendered_and_validated_by_one_of_the_two_manifest_tests():
    assert {p.name for p in (K8S / "overlays").iterdir()} == set(OVERLAYS) | set(GPU_SERVER_OVERLAYS)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}


@pytest.fixture
def docs(rendered) -> list[dict]:
    return rendered["rtx4090-kueue"]


def service_job(docs, service: str, monkeypatch) -> dict:
    """The Job this service would create, from its rendered ConfigMap and Deployment env."""
    deployment = by_kind(docs, "Deployment")[service]
    for name in [n for n in os.environ if n.startswith("FLUXLORA_")]:
        monkeypatch.delenv(name)
    for name, value in {**by_kind(docs, "ConfigMap")["fluxlora-config"]["data"], **env_of(deployment)}.items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    settings = Settings().model_copy(update={"k8s_image": container(deployment)["image"]})
    assert settings.runner == "kubernetes"
    return job_manifest(f"{service[:3]}-0123456789ab", service, settings)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_kubernetes_objects_strictly_and_kueue_objects_against_kueues_crds(rendered,
                                                                                                 overlay):
    docs = rendered[overlay]
    schemas = crd_schemas()
    assert set(schemas) == {"ClusterQueue", "LocalQueue", "ResourceFlavor", "WorkloadPriorityClass"}
    kueue_kinds = []
    for doc in docs:
        if doc["apiVersion"].startswith("kueue.x-k8s.io/"):
            assert doc["apiVersion"] == KUEUE_API
            jsonschema.validate(doc, schemas[doc["kind"]])
            kueue_kinds.append(doc["kind"])
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        if doc["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in doc["metadata"], doc["metadata"]["name"]
        else:
            assert doc["metadata"]["namespace"] == "fluxlora", doc["metadata"]["name"]
    assert sorted(kueue_kinds) == ([] if overlay == "rtx4090-jobs" else
                                   ["ClusterQueue", "LocalQueue", "ResourceFlavor", *["WorkloadPriorityClass"] * 3])


def test_the_crd_schemas_refuse_what_they_should():
    schemas = crd_schemas()
    flavor = {"apiVersion": KUEUE_API, "kind": "ResourceFlavor", "metadata": {"name": "x"},
              "spec": {"nodeLabel": RTX4090}}  # a typo: nodeLabels
    with pytest.raises(jsonschema.ValidationError, match="nodeLabel"):
        jsonschema.validate(flavor, schemas["ResourceFlavor"])
    queue = {"apiVersion": KUEUE_API, "kind": "ClusterQueue", "metadata": {"name": "x"},
             "spec": {"queueingStrategy": "FIFO"}}  # StrictFIFO or BestEffortFIFO
    with pytest.raises(jsonschema.ValidationError, match="FIFO"):
        jsonschema.validate(queue, schemas["ClusterQueue"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_deployment_asks_for_a_gpu(rendered, overlay):
    docs = rendered[overlay]
    for deployment in by_kind(docs, "Deployment").values():
        pod = deployment["spec"]["template"]["spec"]
        assert "nvidia.com/gpu" not in container(deployment)["resources"].get("limits", {})
        assert "nodeSelector" not in pod and "tolerations" not in pod
        assert "fluxlora/gpu" not in deployment["metadata"]["labels"]


def test_the_queue_chain_leads_to_gpu_quota_on_rtx_4090_nodes(docs):
    local = by_kind(docs, "LocalQueue")["fluxlora"]
    cluster_queue = by_kind(docs, "ClusterQueue")[local["spec"]["clusterQueue"]]
    assert cluster_queue["spec"]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "fluxlora"}}
    (group,) = cluster_queue["spec"]["resourceGroups"]
    assert "nvidia.com/gpu" in group["coveredResources"]
    (flavor_quota,) = group["flavors"]
    quotas = {r["name"]: r["nominalQuota"] for r in flavor_quota["resources"]}
    assert int(quotas["nvidia.com/gpu"]) >= 1 and set(quotas) == set(group["coveredResources"])
    flavor = by_kind(docs, "ResourceFlavor")[flavor_quota["name"]]
    assert flavor["spec"]["nodeLabels"] == RTX4090 and flavor["spec"]["tolerations"] == [GPU_TOLERATION]
    # A higher priority preempts a lower one within the queue (training gives way to a grid).
    assert cluster_queue["spec"]["preemption"]["withinClusterQueue"] == "LowerPriority"


def test_someone_waiting_outranks_captioning_which_outranks_training(docs):
    priorities = {name: pc["value"] for name, pc in by_kind(docs, "WorkloadPriorityClass").items()}
    assert priorities["fluxlora-interactive"] > priorities["fluxlora-captioning"] > priorities["fluxlora-training"]
    assert set(LAUNCHERS.values()) == set(priorities)


@pytest.mark.parametrize("service", LAUNCHERS)
def test_each_gpu_stage_is_a_suspended_job_in_the_local_queue_with_its_priority_and_a_gpu(docs, service,
                                                                                          monkeypatch):
    job = service_job(docs, service, monkeypatch)
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    assert job["spec"]["suspend"] is True
    labels = job["metadata"]["labels"]
    assert labels[LABEL_QUEUE] in by_kind(docs, "LocalQueue")
    assert labels[LABEL_PRIORITY] == LAUNCHERS[service]
    pod = job["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod  # the ResourceFlavor's to add
    resources = container(job)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "1"
    (group,) = by_kind(docs, "ClusterQueue")["fluxlora-gpu"]["spec"]["resourceGroups"]
    assert set(resources["requests"]) | {"nvidia.com/gpu"} <= set(group["coveredResources"])  # or never admitted
    assert {"name": "FLUXLORA_DEVICE", "value": "cuda"} in container(job)["env"]
    assert pod["serviceAccountName"] == "fluxlora-worker" and pod["automountServiceAccountToken"] is False
    assert container(job)["command"][:3] == ["fluxlora", "worker", service]


@pytest.mark.parametrize("service", LAUNCHERS)
def test_without_kueue_each_gpu_stage_is_a_plain_job_on_an_rtx_4090(rendered, service, monkeypatch):
    job = service_job(rendered["rtx4090-jobs"], service, monkeypatch)
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    assert "suspend" not in job["spec"] and LABEL_QUEUE not in job["metadata"]["labels"]
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == RTX4090 and pod["tolerations"] == [GPU_TOLERATION]
    assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_launchers_may_do_what_launching_and_explaining_a_wait_needs(rendered, overlay):
    docs = rendered[overlay]
    role = by_kind(docs, "Role")["fluxlora-launcher"]
    kueue_rules = [{"apiGroups": ["kueue.x-k8s.io"], "resources": ["localqueues"], "verbs": ["get"]},
                   {"apiGroups": ["kueue.x-k8s.io"], "resources": ["workloads"], "verbs": ["list"]}]
    assert [r for r in role["rules"] if r["apiGroups"] == ["kueue.x-k8s.io"]] == (
        kueue_rules if overlay == "rtx4090-kueue" else [])
    assert {"apiGroups": ["batch"], "resources": ["jobs"],
            "verbs": ["create", "get", "list", "watch", "delete"]} in role["rules"]
    binding = by_kind(docs, "RoleBinding")["fluxlora-launcher"]
    accounts = {s["name"] for s in binding["subjects"]}
    service_accounts = by_kind(docs, "ServiceAccount")
    for service in LAUNCHERS:
        pod = by_kind(docs, "Deployment")[service]["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] in accounts and pod["serviceAccountName"] in service_accounts
        assert pod["automountServiceAccountToken"] is True
    preprocessing = by_kind(docs, "Deployment")["preprocessing"]["spec"]["template"]["spec"]
    assert preprocessing["automountServiceAccountToken"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_services_stay_hardened_deployments_with_grpc_probes_and_resources(rendered, overlay):
    for name, deployment in by_kind(rendered[overlay], "Deployment").items():
        pod, c = deployment["spec"]["template"]["spec"], container(deployment)
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                        "capabilities": {"drop": ["ALL"]}}, name
        assert all(c[p]["grpc"]["port"] for p in ("startupProbe", "readinessProbe", "livenessProbe")), name
        assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"], name
        # replicas share the jobs through leases: rolling updates, one pod at a time at most
        assert deployment["spec"]["replicas"] >= 2 and deployment["spec"]["strategy"]["type"] == "RollingUpdate", name

"""Kubernetes manifests: every kustomize overlay rendered by kubectl's built-in kustomize, every
object validated against the Kubernetes 1.30 schemas (kubernetes-validate, strict), and the
deployment's promises held on what would be applied: hardened pods with native gRPC probes,
resources, exactly the RBAC the training service needs, and on every GPU workload (the captioning
and evaluation Deployments and the training Jobs the training service would launch, built from the
rendered settings) the GPU feature discovery node selector, the GPU limit and the GPU toleration."""

from __future__ import annotations

import json
import os
import subprocess

import kubernetes_validate
import pytest
import yaml
from deploy_tools import K8S, tool

from fluxlora.common.config import Settings
from fluxlora.jobs.k8s_manifests import job_manifest

K8S_VERSION = "1.30"
OVERLAYS = {"rtx4090": "NVIDIA-GeForce-RTX-4090", "other-gpu": "NVIDIA-L40S", "cpu-only": None}
PORTS = {"preprocessing": 50051, "captioning": 50052, "training": 50053, "evaluation": 50054}
GPU_DEPLOYMENTS = ("captioning", "evaluation")
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def render(path) -> list[dict]:
    result = subprocess.run([tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}


def by_kind(docs, kind) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(deployment) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def env_of(deployment) -> dict[str, str]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(deployment).get("env", [])}


def training_job(docs, monkeypatch) -> dict:
    """The Job the training service would launch, from the rendered ConfigMap and Deployment env
    (parsed by the real Settings from real environment variables)."""
    deployment = by_kind(docs, "Deployment")["training"]
    for name in [n for n in os.environ if n.startswith("FLUXLORA_")]:
        monkeypatch.delenv(name)
    values = {**by_kind(docs, "ConfigMap")["fluxlora-config"]["data"], **env_of(deployment)}
    for name, value in values.items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.runner == "kubernetes"
    # The runner takes the image from its own pod (FLUXLORA_K8S_POD_NAME): that is this container's.
    settings = settings.model_copy(update={"k8s_image": container(deployment)["image"]})
    return job_manifest("trn-0123456789ab", "training", settings)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_of_every_overlay_is_valid_for_kubernetes_1_30(rendered, overlay):
    kinds = sorted(d["kind"] for d in rendered[overlay])
    assert kinds == sorted(["Namespace", "ConfigMap", "ServiceAccount", "ServiceAccount", "Role", "RoleBinding",
                            "Service", "StatefulSet", "Job", *["Deployment", "Service", "PodDisruptionBudget"] * 4])
    for doc in rendered[overlay]:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "fluxlora", doc["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_training_jobs_are_valid_for_kubernetes_1_30(rendered, overlay, monkeypatch):
    kubernetes_validate.validate(training_job(rendered[overlay], monkeypatch), K8S_VERSION, strict=True)


def test_the_secrets_example_is_valid_and_holds_only_placeholders():
    docs = list(yaml.safe_load_all((K8S / "base" / "minio-secrets.example.yaml").read_text()))
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert all(v.startswith("CHANGE-ME") for v in doc["stringData"].values())
    assert "minio-secrets.example.yaml" not in (K8S / "base" / "kustomization.yaml").read_text().split("resources:")[1]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_referenced_config_and_secret_exists_with_the_keys_used(rendered, overlay):
    secrets = {d["metadata"]["name"]: d["stringData"]
               for d in yaml.safe_load_all((K8S / "base" / "minio-secrets.example.yaml").read_text())}
    configmaps = by_kind(rendered[overlay], "ConfigMap")
    for doc in rendered[overlay]:
        if doc["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        for c in doc["spec"]["template"]["spec"]["containers"]:
            for ref in c.get("envFrom", []):
                if "secretRef" in ref:
                    assert ref["secretRef"]["name"] in secrets
                else:
                    assert ref["configMapRef"]["name"] in configmaps
    assert set(secrets["fluxlora-s3"]) == {"FLUXLORA_S3_ACCESS_KEY", "FLUXLORA_S3_SECRET_KEY"}
    assert set(secrets["fluxlora-minio-root"]) == {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", PORTS)
def test_each_service_is_a_hardened_deployment_with_native_grpc_probes_resources_and_a_service(rendered, overlay,
                                                                                                 name):
    docs = rendered[overlay]
    deployment = by_kind(docs, "Deployment")[name]
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    port = PORTS[name]
    assert c["args"] == ["serve", name]
    assert c["ports"] == [{"name": "grpc", "containerPort": port}, {"name": "metrics", "containerPort": 9464}]
    for probe in ("startupProbe", "readinessProbe"):
        assert c[probe]["grpc"] == {"port": port}, probe
    # a store outage makes the server unready (out of the Service), never restarted by the kubelet
    assert c["livenessProbe"]["grpc"] == {"port": port, "service": "liveness"}
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    assert {v["name"] for v in pod["volumes"]} == {"cache", "tmp"}
    assert {"configMapRef": {"name": "fluxlora-config"}} in c["envFrom"]
    assert env_of(deployment)["FLUXLORA_PORT"] == str(port)
    service = by_kind(docs, "Service")[name]
    assert service["spec"]["ports"][0]["port"] == port
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert pod["automountServiceAccountToken"] is (name == "training")  # only training talks to the API
    # Two replicas sharing the jobs through leases (fluxlora.jobs.replicas), each named after its pod; a
    # rolling update never surges a GPU workload (it would need a GPU more) and keeps one pod up otherwise.
    assert deployment["spec"]["replicas"] >= 2
    gpu = name in GPU_DEPLOYMENTS
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {
        "maxSurge": 0 if gpu else 1, "maxUnavailable": 1 if gpu else 0}}
    assert env_of(deployment)["FLUXLORA_REPLICA_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    budget = by_kind(docs, "PodDisruptionBudget")[name]
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("overlay", [o for o, product in OVERLAYS.items() if product])
def test_every_gpu_workload_is_placed_on_the_gpu_product_with_a_gpu_limit_and_toleration(rendered, overlay,
                                                                                          monkeypatch):
    product = OVERLAYS[overlay]
    docs = rendered[overlay]
    workloads = {name: by_kind(docs, "Deployment")[name] for name in GPU_DEPLOYMENTS}
    workloads["training Job"] = training_job(docs, monkeypatch)
    for name, workload in workloads.items():
        pod = workload["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": product}, name
        assert container(workload)["resources"]["limits"]["nvidia.com/gpu"] == "1", name
        assert GPU_TOLERATION in pod["tolerations"], name
    for name in GPU_DEPLOYMENTS:
        assert env_of(workloads[name])["FLUXLORA_DEVICE"] == "cuda"
    # The launcher itself needs no GPU and may run anywhere.
    training = by_kind(docs, "Deployment")["training"]
    assert "nvidia.com/gpu" not in container(training)["resources"].get("limits", {})
    assert "nodeSelector" not in training["spec"]["template"]["spec"]
    job = workloads["training Job"]
    assert {"name": "FLUXLORA_DEVICE", "value": "cuda"} in container(job)["env"]
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "fluxlora-worker"
    assert container(job)["command"] == ["fluxlora", "worker", "training", "trn-0123456789ab"]


def test_the_cpu_only_overlay_asks_for_no_gpu_anywhere(rendered, monkeypatch):
    docs = rendered["cpu-only"]
    assert "nvidia.com/gpu" not in json.dumps(docs)
    for name in (*GPU_DEPLOYMENTS, "training"):
        assert env_of(by_kind(docs, "Deployment")[name])["FLUXLORA_DEVICE"] == "cpu"
    job = training_job(docs, monkeypatch)
    assert {"name": "FLUXLORA_DEVICE", "value": "cpu"} in container(job)["env"]
    assert "nodeSelector" not in job["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(job)


def test_the_training_service_may_do_exactly_what_launching_jobs_needs(rendered):
    docs = rendered["rtx4090"]
    role = by_kind(docs, "Role")["fluxlora-training"]
    assert role["rules"] == [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "watch", "delete"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["services"], "verbs": ["create"]},  # a multi-node run's rendezvous
    ]
    binding = by_kind(docs, "RoleBinding")["fluxlora-training"]
    assert binding["roleRef"]["name"] == "fluxlora-training"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "fluxlora-training", "namespace": "fluxlora"}]
    training = by_kind(docs, "Deployment")["training"]
    assert training["spec"]["template"]["spec"]["serviceAccountName"] == "fluxlora-training"
    env = env_of(training)
    assert env["FLUXLORA_RUNNER"] == "kubernetes"
    assert env["FLUXLORA_K8S_POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert by_kind(docs, "ServiceAccount")["fluxlora-worker"]["automountServiceAccountToken"] is False


def test_minio_keeps_data_on_a_volume_and_the_bucket_init_is_a_one_shot_job(rendered):
    docs = rendered["rtx4090"]
    minio = by_kind(docs, "StatefulSet")["minio"]
    assert minio["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    c = container(minio)
    assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/minio/health/ready"
    assert c["envFrom"] == [{"secretRef": {"name": "fluxlora-minio-root"}}]
    init = by_kind(docs, "Job")["minio-init"]
    assert init["spec"]["ttlSecondsAfterFinished"] and init["spec"]["backoffLimit"]
    assert "mc mb --ignore-existing" in container(init)["args"][0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned(rendered, overlay):
    for doc in rendered[overlay]:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            image = container(doc)["image"]
            tag = image.split("@")[0].rsplit(":", 1)[-1]
            assert ":" in image and tag != "latest", image
            if not image.startswith("registry.example.com/fluxlora/"):
                assert "@sha256:" in image, image

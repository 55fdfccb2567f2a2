"""The Kubernetes objects of one fluxlora job (plain manifests: tests validate them against the
Kubernetes schemas, and Kueue's): the batch/v1 Job whose pods run `fluxlora worker <service> <id>`,
and, for training across nodes, the headless Service its pods find each other by.

- One GPU: one pod running the worker.
- Several GPUs of one node (TrainSpec.gpus > 1): one pod asking for that many GPUs, the worker under
  torchrun (python -m fluxlora.server.launcher: the pod exits with a failed rank's own code, which
  podFailurePolicy reads), one rank per GPU, with a memory-backed /dev/shm for NCCL.
- Several nodes (TrainSpec.nodes > 1): an Indexed Job of `nodes` pods (completions = parallelism =
  nodes), each with `gpus` GPUs and torchrun's static rendezvous: --nnodes, --node-rank from the
  pod's completion index, the rank-0 store on pod 0's DNS name (<job>-0.<job>, through the headless
  Service <job>, a subdomain of the pods). Kueue sees one Workload of `nodes` pods and admits them
  all together or none; a failed pod fails the others' collectives, each pod is replaced and the new
  ones resume from the last checkpoint (backoffLimit is counted per pod, so it is scaled by nodes).
"""

from __future__ import annotations

import copy
from typing import Any

from fluxlora.common.config import Settings
from fluxlora.jobs.launch import LAUNCHER_MODULE, multi_node_options, torchrun_options
from fluxlora.jobs.worker import EXIT_PERMANENT
from fluxlora_api.shared.errors import FailedPrecondition

LABEL_SERVICE = "fluxlora/service"
LABEL_JOB_ID = "fluxlora/job-id"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
LABEL_PRIORITY = "kueue.x-k8s.io/priority-class"
WORKER_CONTAINER = "worker"
STOP_GRACE_S = 120  # the pod's terminationGracePeriodSeconds: time to stop at a step boundary after SIGTERM
RENDEZVOUS_PORT = 29500  # torchrun's default master port, on pod 0 of a multi-node Job
COMPLETION_INDEX = "JOB_COMPLETION_INDEX"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


def job_manifest(job_id: str, service: str, settings: Settings, gpus: int = 1, nodes: int = 1) -> dict:
    """The batch/v1 Job for one fluxlora job; gpus > 1: each pod with that many GPUs, the worker under
    torchrun; nodes > 1: an Indexed Job of that many pods (the module's docstring)."""
    labels = {
        "app.kubernetes.io/name": "fluxlora",
        "app.kubernetes.io/component": f"{service}-worker",
        "app.kubernetes.io/managed-by": "fluxlora",
        LABEL_SERVICE: service,
        LABEL_JOB_ID: job_id,
    }
    env_from = []
    for ref in settings.k8s_env_from:
        kind, _, name = ref.partition("/")
        if kind not in ("configmap", "secret") or not name:
            raise FailedPrecondition(
                f"FLUXLORA_K8S_ENV_FROM entry {ref!r}: use configmap/<name> or secret/<name>"
            )
        env_from.append({"configMapRef" if kind == "configmap" else "secretRef": {"name": name}})
    cache = ({"persistentVolumeClaim": {"claimName": settings.k8s_cache_claim}} if settings.k8s_cache_claim
             else {"emptyDir": {}})
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,  # the worker talks to the store, never to the API
        "terminationGracePeriodSeconds": STOP_GRACE_S,
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [{
            "name": WORKER_CONTAINER,
            "image": settings.k8s_image,
            "command": _worker_command(service, job_id, gpus, nodes),
            "envFrom": env_from,
            # The server's own device setting: cuda on GPU nodes, cpu where the overlay has no GPUs.
            "env": [{"name": "FLUXLORA_CACHE_DIR", "value": "/cache"}, {"name": "HOME", "value": "/tmp"},
                    {"name": "FLUXLORA_DEVICE", "value": settings.device}],
            "resources": _resources(settings.k8s_resources, gpus),
            "securityContext": {
                "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            },
            "volumeMounts": [{"name": "cache", "mountPath": "/cache"}, {"name": "tmp", "mountPath": "/tmp"}],
        }],
        "volumes": [{"name": "cache", **cache}, {"name": "tmp", "emptyDir": {}}],
    }
    if gpus > 1 or nodes > 1:
        # NCCL passes data between the ranks of one pod through /dev/shm, which a container gets
        # only 64 MiB of: a memory-backed volume instead (it counts against the memory limit).
        pod["volumes"].append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        pod["containers"][0]["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
    if settings.k8s_service_account:
        pod["serviceAccountName"] = settings.k8s_service_account
    if settings.k8s_node_selector:
        pod["nodeSelector"] = dict(settings.k8s_node_selector)
    if settings.k8s_tolerations:
        pod["tolerations"] = list(settings.k8s_tolerations)
    spec: dict[str, Any] = {
        "backoffLimit": settings.k8s_backoff_limit,
        "ttlSecondsAfterFinished": settings.k8s_ttl_after_finished_s,
        "podFailurePolicy": {"rules": [
            # A bad request fails the same way on every retry.
            {"action": "FailJob",
             "onExitCodes": {"containerName": WORKER_CONTAINER, "operator": "In", "values": [EXIT_PERMANENT]}},
            # A drained or preempted node is not the job's fault: retry without using up backoffLimit.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]},
        "template": {"metadata": {"labels": labels}, "spec": pod},
    }
    if settings.k8s_active_deadline_s:
        spec["activeDeadlineSeconds"] = settings.k8s_active_deadline_s
    if nodes > 1:
        _across_nodes(spec, job_id, nodes)
    job_labels = dict(labels)
    if settings.k8s_queue_name:
        # Kueue admits it: created suspended, unsuspended (with the ResourceFlavor's node labels and
        # tolerations added to the pod template) once the ClusterQueue has quota for it.
        spec["suspend"] = True
        job_labels[LABEL_QUEUE] = settings.k8s_queue_name
        if settings.k8s_priority_class:
            job_labels[LABEL_PRIORITY] = settings.k8s_priority_class
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": job_id, "labels": job_labels}, "spec": spec}


def _across_nodes(spec: dict[str, Any], job_id: str, nodes: int) -> None:
    """Makes the Job one of `nodes` pods started together, each knowing its node rank and finding pod 0."""
    spec.update(completionMode="Indexed", completions=nodes, parallelism=nodes,
                # Each failed pod counts against backoffLimit, and one failure fails every pod's
                # collectives: a whole retry of the run costs up to `nodes` of it.
                backoffLimit=spec["backoffLimit"] * nodes,
                # A replacement pod only once the failed one is gone: two pods of one hostname (pod 0,
                # the rendezvous) never run at once.
                podReplacementPolicy="Failed")
    pod = spec["template"]["spec"]
    pod["subdomain"] = rendezvous_service_name(job_id)  # <job>-<index>.<service> resolves to each pod
    container = pod["containers"][0]
    # The Job controller sets it too; named here so that $(JOB_COMPLETION_INDEX) in the command is
    # defined whatever the order.
    container["env"].append({"name": COMPLETION_INDEX, "valueFrom": {"fieldRef": {
        "fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}})
    container["ports"] = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}]


def rendezvous_service_name(job_id: str) -> str:
    return job_id


def rendezvous_service(job_id: str, service: str, job_uid: str) -> dict:
    """The headless Service of a multi-node Job: DNS names for its pods (published before they are
    ready: torchrun's rendezvous is what makes them ready), owned by the Job, so deleting the Job
    (cancel, ttlSecondsAfterFinished) deletes it too."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "name": rendezvous_service_name(job_id),
            "labels": {"app.kubernetes.io/name": "fluxlora", "app.kubernetes.io/component": f"{service}-worker",
                       "app.kubernetes.io/managed-by": "fluxlora", LABEL_SERVICE: service, LABEL_JOB_ID: job_id},
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_id, "uid": job_uid,
                                 "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB_ID: job_id},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
    }


def _worker_command(service: str, job_id: str, gpus: int, nodes: int = 1) -> list[str]:
    worker = ["fluxlora", "worker", service, job_id]
    if gpus == 1 and nodes == 1:
        return worker
    options = torchrun_options(gpus, STOP_GRACE_S) if nodes == 1 else multi_node_options(
        gpus, nodes, f"$({COMPLETION_INDEX})", f"{job_id}-0.{rendezvous_service_name(job_id)}", RENDEZVOUS_PORT,
        STOP_GRACE_S)
    # torchrun through our launcher, which exits with the failed rank's code (podFailurePolicy reads it);
    # --no-python: the `fluxlora` entry point is run as it is, once per rank.
    return ["python", "-m", LAUNCHER_MODULE, *options, "--no-python", *worker]


def _resources(configured: dict, gpus: int) -> dict:
    """FLUXLORA_K8S_RESOURCES with its GPU resource (nvidia.com/gpu or another vendor's */gpu) set to
    `gpus`. Configured without one (a CPU-only overlay), the ranks are CPU processes and nothing is
    added. Host memory is left as configured: each rank loads its own copy of the base model, so
    raise it for runs on several GPUs (docs/deploy.md)."""
    resources = copy.deepcopy(configured)
    if gpus > 1:
        for section in ("limits", "requests"):
            for name in resources.get(section, {}):
                if name.endswith("/gpu"):
                    resources[section][name] = str(gpus)
    return resources



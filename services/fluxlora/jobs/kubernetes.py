"""Jobs as Kubernetes Jobs (FLUXLORA_RUNNER=kubernetes): the server keeps its queue, records and
watchers; each job's work runs in a pod of a batch/v1 Job running `fluxlora worker <service> <id>`
(fluxlora.jobs.worker), on a GPU node picked by the same node selector as the GPU Deployments.

- One Kubernetes Job per fluxlora job, named after the job id: a second create is a conflict (the
  running Job is adopted), never a duplicate run.
- A Job waiting for a GPU (its pod Pending, Unschedulable) is not a failure: the job shows the
  scheduler's reason as its progress stage and waits. Jobs queue for GPUs in the cluster.
- Cancel deletes the Job (propagation Background: its pod gets SIGTERM and goes).
- A server shutdown leaves Jobs running; the next start re-queues the unfinished records and adopts
  their Jobs by name (recover() lists them by label to clean up cancelled leftovers).
- Success or failure comes from the Job's conditions; the result or error from the worker's report
  in the store. The server needs RBAC for jobs (create/get/list/watch/delete) and pods (get/list).
- With Kueue (FLUXLORA_K8S_QUEUE_NAME): Jobs are created suspended in that LocalQueue, with the
  service's WorkloadPriorityClass; Kueue admits them (unsuspends) when the ClusterQueue has GPU
  quota, and the job shows why it waits (the LocalQueue's ClusterQueue and the Workload's message).
  Every submitted job is handed to the cluster at once (`cluster_admits`: the server's own worker
  count stops being admission control). A preemption suspends the Job again: its pod gets SIGTERM,
  the worker exits 75, and on re-admission a new pod resumes from the last stored checkpoint, in the
  same Job (never a second one). Needs get localqueues and list workloads (kueue.x-k8s.io) as well.
- Several GPUs (TrainSpec.gpus > 1): one pod asks for that many GPUs (the GPU resource of
  FLUXLORA_K8S_RESOURCES, scaled) and runs the worker under torchrun (fluxlora.server.launcher: the
  pod exits with the failed rank's own code), one rank per GPU, with a memory-backed /dev/shm for
  NCCL. Across nodes (TrainSpec.nodes > 1) is refused at submit for now.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message

from fluxlora.common.config import Settings
from fluxlora.jobs.context import JobInterrupted
from fluxlora.jobs.kueue_flavors import KUEUE, ClusterQueueGpus, read_cluster_queue_gpus
from fluxlora.jobs.launch import LAUNCHER_MODULE, gpus_of, torchrun_options
from fluxlora.jobs.reports import FINISHED, RemoteJobFailed, ReportMirror, finished_outcome
from fluxlora.jobs.worker import EXIT_PERMANENT, load_report
from fluxlora_api.shared.errors import FailedPrecondition, FluxloraError, Unavailable
from fluxlora_api.v1 import jobs_pb2

if TYPE_CHECKING:
    from fluxlora.jobs.runtime import JobRuntime

log = logging.getLogger(__name__)

S = jobs_pb2.JobState
LABEL_SERVICE = "fluxlora/service"
LABEL_JOB_ID = "fluxlora/job-id"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
LABEL_PRIORITY = "kueue.x-k8s.io/priority-class"
LABEL_WORKLOAD_JOB_UID = "kueue.x-k8s.io/job-uid"  # on the Workload Kueue makes for a Job
WORKER_CONTAINER = "worker"
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
REQUEST_TIMEOUT_S = 30
GPU_FLAVORS_TTL_S = 300  # an operator's change of flavors or quotas reaches the planner within this
STOP_GRACE_S = 120  # the pod's terminationGracePeriodSeconds: time to stop at a step boundary after SIGTERM
STOP_CHECK_S = 0.2
UNREACHABLE = object()  # what _call answers when the API could not be asked this time


@dataclass(frozen=True)
class JobStatus:
    phase: str  # "active" (pending or running), "succeeded" or "failed"
    reason: str = ""
    message: str = ""
    suspended: bool = False  # spec.suspend: queued in Kueue (not admitted yet, or preempted)
    uid: str = ""


def _set_stage(job: jobs_pb2.Job, stage: str) -> None:
    job.progress.stage = stage


def job_manifest(job_id: str, service: str, settings: Settings, gpus: int = 1) -> dict:
    """The batch/v1 Job for one fluxlora job (a plain manifest: tests validate it against the
    Kubernetes schemas); gpus > 1: one pod with that many GPUs, the worker under torchrun."""
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
            "command": _worker_command(service, job_id, gpus),
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
    if gpus > 1:
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


def _worker_command(service: str, job_id: str, gpus: int) -> list[str]:
    worker = ["fluxlora", "worker", service, job_id]
    if gpus == 1:
        return worker
    # torchrun through our launcher, which exits with the failed rank's code (podFailurePolicy reads it);
    # --no-python: the `fluxlora` entry point is run as it is, once per rank.
    return ["python", "-m", LAUNCHER_MODULE, *torchrun_options(gpus, STOP_GRACE_S), "--no-python", *worker]


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


class JobLauncher:
    """The Kubernetes API calls, through the kubernetes client: create, status, delete, list."""

    def __init__(self, api_client: Any, namespace: str, service: str, settings: Settings):
        from kubernetes import client

        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self._cluster_queue = ""
        self.namespace = namespace
        self.service = service
        self.settings = settings

    def create(self, job_id: str, gpus: int = 1) -> bool:
        """Creates the Job; False when one of that name exists already (it is then adopted)."""
        from kubernetes.client import V1Job
        from kubernetes.client.exceptions import ApiException

        body = V1Job.from_dict(job_manifest(job_id, self.service, self.settings, gpus))
        try:
            self.batch.create_namespaced_job(self.namespace, body, _request_timeout=REQUEST_TIMEOUT_S)
        except ApiException as exc:
            if exc.status == 409:
                return False
            if exc.status in (400, 403, 422):
                raise FailedPrecondition(
                    f"Kubernetes refused Job {self.namespace}/{job_id} ({exc.status} {exc.reason}): "
                    f"{_api_message(exc)}; check the FLUXLORA_K8S_* settings and the server's Role"
                ) from exc
            raise
        return True

    def status(self, job_id: str) -> JobStatus | None:
        """The Job's phase from its conditions; None when there is no such Job."""
        from kubernetes.client.exceptions import ApiException

        try:
            job = self.batch.read_namespaced_job(job_id, self.namespace, _request_timeout=REQUEST_TIMEOUT_S)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return _status_of(job)

    def waiting_reason(self, job_id: str) -> str:
        """Why the Job's pod is not running yet ("" when it is, or has no pod yet)."""
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"{LABEL_JOB_ID}={job_id}",
                                             _request_timeout=REQUEST_TIMEOUT_S).items
        for pod in pods:
            if not pod.status or pod.status.phase != "Pending":
                continue
            for condition in pod.status.conditions or []:
                if condition.type == "PodScheduled" and condition.status == "False":
                    return f"waiting for a node: {condition.message or condition.reason or 'unschedulable'}"
            for container in pod.status.container_statuses or []:
                waiting = container.state.waiting if container.state else None
                if waiting:
                    return f"pod starting: {waiting.reason or ''} {waiting.message or ''}".strip()
            return "pod pending"
        return ""

    def admission_reason(self, job_id: str, status: JobStatus) -> str:
        """Why a suspended Job waits: its ClusterQueue and, when Kueue said, the Workload's message."""
        queue = self.settings.k8s_queue_name
        cluster_queue = self.cluster_queue()
        if cluster_queue is None:
            return (f"waiting for Kueue admission, but LocalQueue {self.namespace}/{queue} does not exist: install "
                    "Kueue and deploy/k8s/components/kueue, or unset FLUXLORA_K8S_QUEUE_NAME for plain Jobs")
        message = self.workload_message(status.uid) if status.uid else ""
        return f"waiting for Kueue admission (ClusterQueue {cluster_queue}){': ' + message if message else ''}"

    def cluster_queue(self) -> str | None:
        """The ClusterQueue behind the LocalQueue (read once); None when the LocalQueue does not exist."""
        from kubernetes.client.exceptions import ApiException

        if not self._cluster_queue:
            try:
                queue = self.custom.get_namespaced_custom_object(
                    *KUEUE, self.namespace, "localqueues", self.settings.k8s_queue_name,
                    _request_timeout=REQUEST_TIMEOUT_S)
            except ApiException as exc:
                if exc.status == 404:
                    return None
                if exc.status == 403:  # no right to read it: name what is known
                    return f"of LocalQueue {self.settings.k8s_queue_name}"
                raise
            self._cluster_queue = (queue.get("spec") or {}).get("clusterQueue", "")
        return self._cluster_queue

    def workload_message(self, job_uid: str) -> str:
        """Kueue's word on the Job's Workload: why quota is not reserved, or why it was evicted."""
        from kubernetes.client.exceptions import ApiException

        try:
            workloads = self.custom.list_namespaced_custom_object(
                *KUEUE, self.namespace, "workloads", label_selector=f"{LABEL_WORKLOAD_JOB_UID}={job_uid}",
                _request_timeout=REQUEST_TIMEOUT_S)["items"]
        except ApiException as exc:
            if exc.status in (403, 404):
                return ""
            raise
        for workload in workloads:
            conditions = {c.get("type"): c for c in (workload.get("status") or {}).get("conditions") or []}
            evicted = conditions.get("Evicted", {})
            reserved = conditions.get("QuotaReserved", {})
            if evicted.get("status") == "True":
                return f"evicted ({evicted.get('reason', '')}): {evicted.get('message', '')}"
            if reserved.get("status") == "False" and reserved.get("message"):
                return str(reserved["message"])
        return ""

    def delete(self, job_id: str) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            self.batch.delete_namespaced_job(job_id, self.namespace, propagation_policy="Background",
                                             _request_timeout=REQUEST_TIMEOUT_S)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def list_jobs(self) -> dict[str, JobStatus]:
        """This service's Jobs in the namespace (found by label), by fluxlora job id."""
        selector = f"app.kubernetes.io/managed-by=fluxlora,{LABEL_SERVICE}={self.service}"
        jobs = self.batch.list_namespaced_job(self.namespace, label_selector=selector,
                                              _request_timeout=REQUEST_TIMEOUT_S).items
        return {(job.metadata.labels or {}).get(LABEL_JOB_ID, job.metadata.name): _status_of(job) for job in jobs}


class KubernetesRunner:
    def __init__(self, settings: Settings, service: str, api_client: Any, namespace: str):
        if not settings.k8s_image:
            image = own_image(api_client, namespace, settings.k8s_pod_name, service) if settings.k8s_pod_name else ""
            if not image:
                raise FailedPrecondition(
                    "FLUXLORA_RUNNER=kubernetes needs the worker's image: set FLUXLORA_K8S_IMAGE, or "
                    "FLUXLORA_K8S_POD_NAME (downward API metadata.name) to use this pod's own image"
                )
            settings = settings.model_copy(update={"k8s_image": image})
        self.settings = settings
        self.service = service
        self.namespace = namespace
        self.launcher = JobLauncher(api_client, namespace, service, settings)
        self.poll_s = settings.k8s_poll_s
        # With Kueue the cluster admits: the server hands every job to it at once, with no queue of its own.
        self.cluster_admits = bool(settings.k8s_queue_name)
        self._gpus: tuple[float, ClusterQueueGpus | None] | None = None  # (read at, what was read)

    def gpu_flavors(self) -> ClusterQueueGpus | None:
        """The GPUs of the ClusterQueue behind FLUXLORA_K8S_QUEUE_NAME (read at most every GPU_FLAVORS_TTL_S);
        None without Kueue. The memory planner plans against them."""
        if not self.settings.k8s_queue_name:
            return None
        now = time.monotonic()
        if self._gpus is None or now - self._gpus[0] > GPU_FLAVORS_TTL_S:
            self._gpus = (now, read_cluster_queue_gpus(self.launcher.custom, self.namespace,
                                                       self.settings.k8s_queue_name, REQUEST_TIMEOUT_S))
        return self._gpus[1]

    @classmethod
    def from_settings(cls, settings: Settings, service: str) -> KubernetesRunner:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                # KUBECONFIG read now: the client reads it once, when it is first imported.
                config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
            except (config.ConfigException, OSError) as exc:
                raise FailedPrecondition(
                    "FLUXLORA_RUNNER=kubernetes but no cluster credentials: run the server in a pod with "
                    f"its ServiceAccount, or point KUBECONFIG at a kubeconfig ({exc})"
                ) from exc
        namespace = settings.k8s_namespace or (
            SA_NAMESPACE_FILE.read_text().strip() if SA_NAMESPACE_FILE.exists() else "default")
        return cls(settings, service, client.ApiClient(), namespace)

    # --- the Runner protocol ------------------------------------------------------------------
    def run(self, runtime: JobRuntime, job_id: str, spec: Any, scratch: Path) -> Message:
        store = runtime.store

        def keep_trying() -> bool:
            return not runtime.stopping

        status = self._call(self.launcher.status, job_id, retry_while=keep_trying)
        if status is UNREACHABLE:
            raise JobInterrupted(job_id)
        if status is None:
            earlier = load_report(store, self.service, job_id)
            if earlier is not None and earlier.state in FINISHED:
                # Finished (and its Job cleaned up) while this server was down: never run it twice.
                return _outcome(earlier, job_id, JobStatus("succeeded"))
            created = self._call(self.launcher.create, job_id, gpus_of(spec), retry_while=keep_trying)
            if created is UNREACHABLE:
                raise JobInterrupted(job_id)
            if created:
                runtime.update(job_id, lambda job: None, message=f"created Kubernetes Job {self.namespace}/{job_id}")
        else:
            runtime.update(job_id, lambda job: None, message=f"adopted Kubernetes Job {self.namespace}/{job_id}")
        mirror = ReportMirror(runtime, self.service, job_id)
        shown = ""  # the waiting reason this loop last showed as the job's stage
        while True:
            if runtime.get(job_id).cancel_requested:
                # Should this fail (server stopping, API down), recover() deletes it on the next start.
                self._call(self.launcher.delete, job_id, retry_while=keep_trying)
                raise JobInterrupted(job_id)
            if runtime.stopping:
                raise JobInterrupted(job_id)  # the Job keeps running; the next start adopts it
            status = self._call(self.launcher.status, job_id)
            try:
                report = mirror.refresh()
            except Unavailable as exc:  # the store restarting must not fail a run that is fine
                log.warning("could not read the worker report of %s: %s", job_id, exc)
                self._wait(runtime, job_id)
                continue
            if status is UNREACHABLE:
                self._wait(runtime, job_id)
                continue
            if status is not None and status.phase != "active":
                return _outcome(report, job_id, status)
            if status is None and report is None:
                raise RemoteJobFailed(
                    "ABORTED", f"Kubernetes Job {self.namespace}/{job_id} was deleted outside fluxlora before it ran")
            if status is None:
                assert report is not None  # both None was refused just above
                if report.state in FINISHED:
                    return _outcome(report, job_id, JobStatus("succeeded"))
                raise RemoteJobFailed(
                    "ABORTED", f"Kubernetes Job {self.namespace}/{job_id} was deleted outside fluxlora while running")
            current = runtime.get(job_id).progress.stage
            if status.suspended or not mirror.seen.progress.stage or (shown and current == shown):
                reason = self._call(self.launcher.admission_reason, job_id, status) if status.suspended else (
                    self._call(self.launcher.waiting_reason, job_id))
                if reason == "" and shown.startswith("waiting for Kueue"):
                    reason = "admitted by Kueue; starting"
                if isinstance(reason, str) and reason and reason != current:
                    runtime.update(job_id, partial(_set_stage, stage=reason), message=reason)
                    shown = reason
            self._wait(runtime, job_id)

    def recover(self, runtime: JobRuntime) -> None:
        """After a restart: Jobs of unfinished records are adopted when their turn comes (by name);
        Jobs whose record was cancelled meanwhile are deleted; unknown ones are left and logged."""
        try:
            jobs = self.launcher.list_jobs()
        except Exception as exc:  # noqa: BLE001 - the API being down must not stop the server starting
            log.warning("could not list Kubernetes Jobs in %s to recover them: %s", self.namespace, exc)
            return
        for job_id, status in sorted(jobs.items()):
            try:
                record = runtime.get(job_id)
            except FluxloraError:
                log.warning("Kubernetes Job %s/%s has no %s record in the store; leaving it alone",
                            self.namespace, job_id, self.service)
                continue
            if record.state == S.JOB_STATE_CANCELLED and status.phase == "active":
                log.info("deleting Kubernetes Job %s/%s: its job was cancelled", self.namespace, job_id)
                self.launcher.delete(job_id)
            elif record.state not in (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED):
                log.info("re-adopting Kubernetes Job %s/%s (%s)", self.namespace, job_id, status.phase)

    # --- internals ----------------------------------------------------------------------------
    def _call(self, fn, *args, retry_while=lambda: False):
        """One API call; a transient failure (API server restarting, network) is logged and retried,
        or, where the loop can go on without the answer, answered with UNREACHABLE."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        while True:
            try:
                return fn(*args)
            except (ApiException, HTTPError, OSError) as exc:
                log.warning("Kubernetes API call %s%s failed: %s", fn.__name__, args, exc)
                if not retry_while():
                    return UNREACHABLE
                time.sleep(self.poll_s)

    def _wait(self, runtime: JobRuntime, job_id: str) -> None:
        deadline = time.monotonic() + self.poll_s
        while time.monotonic() < deadline:
            if runtime.stopping or runtime.get(job_id).cancel_requested:
                return
            time.sleep(min(STOP_CHECK_S, self.poll_s))


def own_image(api_client: Any, namespace: str, pod_name: str, service: str) -> str:
    """The image of this server's container (named after the service, else the first one)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        pod = client.CoreV1Api(api_client).read_namespaced_pod(pod_name, namespace, _request_timeout=REQUEST_TIMEOUT_S)
    except ApiException as exc:
        raise FailedPrecondition(
            f"could not read this server's pod {namespace}/{pod_name} to take the worker image from it "
            f"({exc.status} {exc.reason}); grant `get pods` or set FLUXLORA_K8S_IMAGE"
        ) from exc
    containers = pod.spec.containers
    return next((c.image for c in containers if c.name == service), containers[0].image)


def _status_of(job: Any) -> JobStatus:
    uid = (job.metadata.uid if job.metadata else "") or ""
    for condition in (job.status.conditions if job.status else None) or []:
        if condition.status == "True" and condition.type in ("Complete", "Failed"):
            phase = "succeeded" if condition.type == "Complete" else "failed"
            return JobStatus(phase, condition.reason or "", condition.message or "", uid=uid)
    return JobStatus("active", suspended=bool(job.spec and job.spec.suspend), uid=uid)


def _outcome(report: jobs_pb2.Job | None, job_id: str, status: JobStatus) -> Message:
    result = finished_outcome(report)
    if result is not None:
        return result
    if status.phase == "failed":
        code = "DEADLINE_EXCEEDED" if status.reason == "DeadlineExceeded" else "INTERNAL"
        raise RemoteJobFailed(code, f"Kubernetes Job {job_id} failed ({status.reason or 'no reason given'}"
                                    f"{': ' + status.message if status.message else ''}); "
                                    f"`kubectl logs job/{job_id}` shows the worker's log")
    raise RemoteJobFailed("INTERNAL", f"Kubernetes Job {job_id} completed but its worker stored no result")


def _api_message(exc: Any) -> str:
    import json

    try:
        return json.loads(exc.body).get("message", "") or str(exc.reason)
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason)

"""The Kubernetes API calls of the Kubernetes runner (fluxlora.jobs.kubernetes), through the
kubernetes client: create a job's objects, read a Job's status and why it waits, delete, list."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fluxlora.common.config import Settings
from fluxlora.jobs.k8s_manifests import LABEL_JOB_ID, LABEL_SERVICE, job_manifest, rendezvous_service
from fluxlora.jobs.kueue_flavors import KUEUE
from fluxlora_api.shared.errors import FailedPrecondition

LABEL_WORKLOAD_JOB_UID = "kueue.x-k8s.io/job-uid"  # on the Workload Kueue makes for a Job
REQUEST_TIMEOUT_S = 30


@dataclass(frozen=True)
class JobStatus:
    phase: str  # "active" (pending or running), "succeeded" or "failed"
    reason: str = ""
    message: str = ""
    suspended: bool = False  # spec.suspend: queued in Kueue (not admitted yet, or preempted)
    uid: str = ""


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

    def create(self, job_id: str, gpus: int = 1, nodes: int = 1) -> bool:
        """Creates the Job (and, across nodes, its rendezvous Service); False when a Job of that name
        exists already (it is then adopted)."""
        from kubernetes.client import V1Job
        from kubernetes.client.exceptions import ApiException

        body = V1Job.from_dict(job_manifest(job_id, self.service, self.settings, gpus, nodes))
        try:
            job = self.batch.create_namespaced_job(self.namespace, body, _request_timeout=REQUEST_TIMEOUT_S)
        except ApiException as exc:
            if exc.status in (400, 403, 422):
                raise _refused(exc, f"Job {self.namespace}/{job_id}") from exc
            if exc.status != 409:
                raise
            if nodes > 1:  # adopted: its Service may be missing (a server that died between the two creates)
                job = self.batch.read_namespaced_job(job_id, self.namespace, _request_timeout=REQUEST_TIMEOUT_S)
                self._create_rendezvous(job_id, job.metadata.uid)
            return False
        if nodes > 1:
            self._create_rendezvous(job_id, job.metadata.uid)
        return True

    def _create_rendezvous(self, job_id: str, job_uid: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.create_namespaced_service(self.namespace, rendezvous_service(job_id, self.service, job_uid),
                                                _request_timeout=REQUEST_TIMEOUT_S)
        except ApiException as exc:
            if exc.status == 409:
                return
            if exc.status not in (400, 403, 422):
                raise
            self.delete(job_id)  # its pods could never find each other
            raise _refused(exc, f"Service {self.namespace}/{job_id} (the rendezvous of a multi-node Job)") from exc

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


def _refused(exc: Any, what: str) -> FailedPrecondition:
    """A create the API refused as invalid (400, 422) or forbidden (403): the settings or the Role."""
    return FailedPrecondition(f"Kubernetes refused {what} ({exc.status} {exc.reason}): {_api_message(exc)}; "
                              "check the FLUXLORA_K8S_* settings and the server's Role")


def _api_message(exc: Any) -> str:
    import json

    try:
        return json.loads(exc.body).get("message", "") or str(exc.reason)
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason)

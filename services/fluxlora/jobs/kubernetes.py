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
  FLUXLORA_K8S_RESOURCES, scaled) and runs the worker under torchrun, one rank per GPU; across nodes
  (TrainSpec.nodes > 1) an Indexed Job of that many such pods and a headless Service for their
  rendezvous (fluxlora.jobs.k8s_manifests), which the Job owns (deleting the Job deletes it).

The objects are built in k8s_manifests.py and the API calls made in k8s_api.py.
"""

from __future__ import annotations

import logging
import os
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message

from fluxlora.common.config import Settings
from fluxlora.jobs.context import JobInterrupted
from fluxlora.jobs.k8s_api import REQUEST_TIMEOUT_S, JobLauncher, JobStatus, own_image
from fluxlora.jobs.kueue_flavors import ClusterQueueGpus, read_cluster_queue_gpus
from fluxlora.jobs.launch import gpus_of, nodes_of
from fluxlora.jobs.reports import (
    FINISHED,
    RemoteJobFailed,
    ReportMirror,
    after_a_rank_refused,
    finished_outcome,
    rank_refused,
)
from fluxlora.jobs.worker import load_report
from fluxlora_api.shared.errors import FailedPrecondition, FluxloraError, Unavailable
from fluxlora_api.v1 import jobs_pb2

if TYPE_CHECKING:
    from fluxlora.jobs.runtime import JobRuntime

log = logging.getLogger(__name__)

S = jobs_pb2.JobState
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
GPU_FLAVORS_TTL_S = 300  # an operator's change of flavors or quotas reaches the planner within this
STOP_CHECK_S = 0.2
UNREACHABLE = object()  # what _call answers when the API could not be asked this time


def _set_stage(job: jobs_pb2.Job, stage: str) -> None:
    job.progress.stage = stage


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
            created = self._call(self.launcher.create, job_id, gpus_of(spec), nodes_of(spec), retry_while=keep_trying)
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


def _outcome(report: jobs_pb2.Job | None, job_id: str, status: JobStatus) -> Message:
    if status.phase == "failed" and status.reason == "PodFailurePolicy" and after_a_rank_refused(report):
        # Exit 3 (podFailurePolicy's FailJob) from a pod whose rank 0 did not store that error: a follower's.
        raise rank_refused(f"Kubernetes Job {job_id}", report, f"`kubectl logs job/{job_id}` (all pods, all ranks)")
    result = finished_outcome(report)
    if result is not None:
        return result
    if status.phase == "failed":
        code = "DEADLINE_EXCEEDED" if status.reason == "DeadlineExceeded" else "INTERNAL"
        raise RemoteJobFailed(code, f"Kubernetes Job {job_id} failed ({status.reason or 'no reason given'}"
                                    f"{': ' + status.message if status.message else ''}); "
                                    f"`kubectl logs job/{job_id}` shows the worker's log")
    raise RemoteJobFailed("INTERNAL", f"Kubernetes Job {job_id} completed but its worker stored no result")



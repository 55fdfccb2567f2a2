"""Jobs as Kubernetes Jobs: the launcher and runner against a fake Kubernetes API over HTTP, with
the real kubernetes client, the real worker entrypoint and a real store.

Spec: each job becomes one batch/v1 Job named after the job id, with the GPU node selector,
tolerations and GPU limits; the worker's result, progress and errors reach the job; a Job waiting
for a GPU waits (it does not fail); cancel deletes the Job; a restarted server adopts its Jobs.
"""

from __future__ import annotations

import threading

import kubernetes_validate
import pytest
from kube_fakes import FakeKubeAPI, FakeKubelet
from kubernetes.client import ApiClient, Configuration

from fluxlora.common.config import Settings
from fluxlora.common.storage import LocalStore
from fluxlora.jobs.k8s_manifests import job_manifest
from fluxlora.jobs.kubernetes import KubernetesRunner
from fluxlora.jobs.records import JobRecords
from fluxlora.jobs.runtime import JobRuntime
from fluxlora.jobs.worker import EXIT_INTERRUPTED, EXIT_PERMANENT, run_worker
from fluxlora_api.shared.errors import FailedPrecondition, InvalidArgument
from fluxlora_api.v1 import jobs_pb2, preprocessing_pb2

S = jobs_pb2.JobState
NS = "fluxlora"
RTX4090 = {"nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-4090"}
GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
SPEC = preprocessing_pb2.PreprocessSpec(source_prefix="uploads/x/", base_size=512)


def k8s_settings(tmp_path, **overrides) -> Settings:
    values = dict(
        store=str(tmp_path / "store"), cache_dir=tmp_path / "cache", runner="kubernetes",
        k8s_image="registry.example.com/fluxlora-gpu:0.1.0", k8s_namespace=NS,
        k8s_node_selector=RTX4090, k8s_tolerations=[GPU_TAINT],
        k8s_env_from=["configmap/fluxlora-config", "secret/fluxlora-minio"],
        k8s_resources={"requests": {"cpu": "4", "memory": "24Gi"}, "limits": {"memory": "48Gi", "nvidia.com/gpu": "1"}},
        k8s_cache_claim="fluxlora-model-cache", k8s_poll_s=0.05,
    )
    return Settings(**(values | overrides))


def ok_handler(ctx, spec):
    ctx.progress("working", 1, 2, "item")
    ctx.metrics(loss=0.25)
    ctx.warn("only a few images")
    ctx.add_artifact(ctx.store.put_bytes("datasets/d/manifest.json", b"{}"), "dataset-manifest")
    ctx.progress("working", 2, 2, "item")
    return preprocessing_pb2.PreprocessResult(dataset_id="ds-1", image_count=spec.base_size)


def bad_request_handler(ctx, spec):
    raise InvalidArgument("spec.base_size: must be a multiple of 64 (got 500)")


class Cluster:
    """The fake API, a fake kubelet running the real worker, and runtimes (servers) on one store."""

    def __init__(self, tmp_path, handler=ok_handler, gpus=1, **settings):
        self.settings = k8s_settings(tmp_path, **settings)
        self.store = LocalStore(tmp_path / "store")
        self.api = FakeKubeAPI().start()
        self.handler = handler
        self.gate = threading.Event()  # workers start their work once set
        self.gate.set()
        self.kubelet = FakeKubelet(self.api, self._run_worker, gpus=gpus)
        self.runtimes: list[JobRuntime] = []

    def _run_worker(self, service, job_id, stop):
        def handler(ctx, spec):
            while not self.gate.wait(0.02):
                ctx.check_cancelled()
            return self.handler(ctx, spec)

        return run_worker(service, job_id, self.settings, self.store, stop, handler=handler)

    def runner(self) -> KubernetesRunner:
        return KubernetesRunner(self.settings, "preprocessing", ApiClient(Configuration(host=self.api.url)), NS)

    def server(self, workers: int = 1) -> JobRuntime:
        runtime = JobRuntime("preprocessing", "pre", self.store, self.handler, settings=self.settings,
                             workers=workers, runner=self.runner())
        runtime.start()
        self.runtimes.append(runtime)
        return runtime

    def close(self) -> None:
        self.gate.set()
        for runtime in self.runtimes:
            runtime.shutdown()
        self.api.stop()


@pytest.fixture
def cluster(tmp_path):
    made = []

    def make(**kw) -> Cluster:
        made.append(Cluster(tmp_path, **kw))
        return made[-1]

    yield make
    for c in made:
        c.close()


def final(runtime, job_id) -> jobs_pb2.Job:
    return list(runtime.watch(job_id))[-1].job


def wait_for(runtime, job_id, predicate) -> jobs_pb2.Job:
    for event in runtime.watch(job_id):
        if predicate(event.job):
            return event.job
    raise AssertionError(f"job {job_id} finished without reaching the expected state")


# --- the Job manifest ---------------------------------------------------------------------------
def test_the_job_manifest_is_a_valid_batch_v1_job_on_an_rtx_4090_with_a_gpu(tmp_path):
    manifest = job_manifest("trn-0123456789ab", "training", k8s_settings(tmp_path, k8s_active_deadline_s=86400))
    kubernetes_validate.validate(manifest, "1.30", strict=True)
    assert manifest["metadata"]["name"] == "trn-0123456789ab"  # a second create is a conflict
    labels = manifest["metadata"]["labels"]
    assert labels["fluxlora/job-id"] == "trn-0123456789ab" and labels["fluxlora/service"] == "training"
    spec = manifest["spec"]
    assert spec["backoffLimit"] == 2 and spec["ttlSecondsAfterFinished"] == 86400
    assert spec["activeDeadlineSeconds"] == 86400
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [EXIT_PERMANENT]
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    pod = spec["template"]["spec"]
    assert spec["template"]["metadata"]["labels"] == labels
    assert pod["restartPolicy"] == "Never" and pod["nodeSelector"] == RTX4090 and pod["tolerations"] == [GPU_TAINT]
    (container,) = pod["containers"]
    assert container["command"] == ["fluxlora", "worker", "training", "trn-0123456789ab"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["envFrom"] == [{"configMapRef": {"name": "fluxlora-config"}},
                                    {"secretRef": {"name": "fluxlora-minio"}}]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert {"name": "cache", "persistentVolumeClaim": {"claimName": "fluxlora-model-cache"}} in pod["volumes"]


def test_no_active_deadline_by_default_so_a_job_queued_for_a_gpu_is_never_killed_for_waiting(tmp_path):
    assert "activeDeadlineSeconds" not in job_manifest("trn-1", "training", k8s_settings(tmp_path))["spec"]


def test_a_bad_env_from_entry_names_the_setting_and_the_fix(tmp_path):
    with pytest.raises(FailedPrecondition, match="FLUXLORA_K8S_ENV_FROM entry 'fluxlora-config'.*configmap/<name>"):
        job_manifest("trn-1", "training", k8s_settings(tmp_path, k8s_env_from=["fluxlora-config"]))


def test_the_kubernetes_runner_needs_an_image(tmp_path):
    with pytest.raises(FailedPrecondition, match="FLUXLORA_K8S_IMAGE.*FLUXLORA_K8S_POD_NAME"):
        KubernetesRunner(k8s_settings(tmp_path, k8s_image=""), "training", ApiClient(), NS)


def test_without_an_image_setting_the_worker_runs_the_servers_own_image(tmp_path):
    api = FakeKubeAPI().start()
    try:
        api.server_pods[(NS, "training-7d9f-x2")] = {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "training-7d9f-x2", "namespace": NS},
            "spec": {"containers": [{"name": "training", "image": "registry.example.com/fluxlora-gpu:0.2.0"}]}}
        settings = k8s_settings(tmp_path, k8s_image="", k8s_pod_name="training-7d9f-x2")
        runner = KubernetesRunner(settings, "training", ApiClient(Configuration(host=api.url)), NS)
        assert runner.settings.k8s_image == "registry.example.com/fluxlora-gpu:0.2.0"
        with pytest.raises(FailedPrecondition, match="could not read this server's pod fluxlora/gone.*get pods"):
            KubernetesRunner(k8s_settings(tmp_path, k8s_image="", k8s_pod_name="gone"), "training",
                             ApiClient(Configuration(host=api.url)), NS)
    finally:
        api.stop()


# --- running jobs ---------------------------------------------------------------------------------
def test_a_job_runs_as_a_kubernetes_job_and_succeeds_with_the_workers_result(cluster):
    c = cluster()
    runtime = c.server()
    job = runtime.submit(SPEC)
    done = final(runtime, job.job_id)

    assert done.state == S.JOB_STATE_SUCCEEDED, done.error
    result = preprocessing_pb2.PreprocessResult()
    assert done.result.Unpack(result) and result.image_count == 512
    assert done.metrics["loss"] == 0.25 and list(done.warnings) == ["only a few images"]
    assert [a.key for a in done.artifacts] == ["datasets/d/manifest.json"]
    (post,) = c.api.requests_of("POST")
    assert post[1] == f"/apis/batch/v1/namespaces/{NS}/jobs"
    created = c.api.jobs[(NS, job.job_id)]
    assert created["spec"]["template"]["spec"]["nodeSelector"] == RTX4090
    assert c.kubelet.exit_codes[job.job_id] == 0
    # The record in the store (what a restarted server reads) holds the outcome too.
    stored = JobRecords(c.store, "preprocessing").load(job.job_id)
    assert stored.state == S.JOB_STATE_SUCCEEDED and stored.result.Unpack(result)


def test_a_bad_request_fails_the_job_once_with_the_workers_status_and_message(cluster):
    c = cluster(handler=bad_request_handler)
    runtime = c.server()
    job = runtime.submit(SPEC)
    done = final(runtime, job.job_id)
    assert done.state == S.JOB_STATE_FAILED
    assert done.error.code == "INVALID_ARGUMENT" and "spec.base_size" in done.error.message
    assert c.kubelet.exit_codes[job.job_id] == EXIT_PERMANENT  # the podFailurePolicy's FailJob code


def test_a_job_that_kubernetes_fails_without_a_worker_report_names_the_job_and_reason(cluster):
    c = cluster(gpus=0)  # never scheduled
    runtime = c.server()
    job = runtime.submit(SPEC)
    wait_for(runtime, job.job_id, lambda j: "waiting for a node" in j.progress.stage)
    c.api.finish(NS, job.job_id, succeeded=False, reason="DeadlineExceeded",
                 message="Job was active longer than specified deadline")
    done = final(runtime, job.job_id)
    assert done.state == S.JOB_STATE_FAILED and done.error.code == "DEADLINE_EXCEEDED"
    assert job.job_id in done.error.message and "DeadlineExceeded" in done.error.message


def test_jobs_queue_for_the_gpus_instead_of_failing(cluster):
    c = cluster(gpus=1)
    c.gate.clear()
    runtime = c.server(workers=3)  # three Jobs in flight, one GPU
    jobs = [runtime.submit(SPEC, request_id=f"r{i}") for i in range(3)]
    seen = [wait_for(runtime, job.job_id, lambda j: j.job_id in c.kubelet.running
                     or j.progress.stage.startswith("waiting for a node")) for job in jobs]
    waiting = [j for j in seen if j.job_id not in c.kubelet.running]
    assert len(waiting) == 2 and len(c.api.jobs) == 3  # all on the cluster; two wait for the GPU
    for job in waiting:
        assert job.state == S.JOB_STATE_RUNNING and "Insufficient nvidia.com/gpu" in job.progress.stage
    c.gate.set()
    assert [final(runtime, j.job_id).state for j in jobs] == [S.JOB_STATE_SUCCEEDED] * 3


def test_cancel_deletes_the_kubernetes_job_with_propagation(cluster):
    c = cluster()
    c.gate.clear()
    runtime = c.server()
    job = runtime.submit(SPEC)
    wait_for(runtime, job.job_id, lambda j: j.job_id in c.kubelet.running)
    runtime.cancel(job.job_id)
    done = final(runtime, job.job_id)
    assert done.state == S.JOB_STATE_CANCELLED
    (delete,) = c.api.requests_of("DELETE")
    assert delete[1] == f"/apis/batch/v1/namespaces/{NS}/jobs/{job.job_id}"
    assert delete[2]["propagationPolicy"] == "Background"
    assert (NS, job.job_id) not in c.api.jobs
    wait_for_exit(c, job.job_id)
    assert c.kubelet.exit_codes[job.job_id] == EXIT_INTERRUPTED  # the pod's SIGTERM stopped the worker


def wait_for_exit(c: Cluster, job_id: str) -> None:
    while job_id in c.kubelet.running:
        threading.Event().wait(0.02)


def test_a_restarted_server_adopts_its_running_job_instead_of_starting_another(cluster):
    c = cluster()
    c.gate.clear()
    first = c.server()
    job = first.submit(SPEC)
    wait_for(first, job.job_id, lambda j: j.job_id in c.kubelet.running)
    first.shutdown()
    assert (NS, job.job_id) in c.api.jobs  # a shutdown leaves the Job running on the cluster
    assert not c.api.requests_of("DELETE")

    second = c.server()
    c.gate.set()
    done = final(second, job.job_id)
    assert done.state == S.JOB_STATE_SUCCEEDED
    assert len(c.api.requests_of("POST")) == 1  # adopted by name, never created twice
    assert any(r[0] == "GET" and r[2].get("labelSelector") == "app.kubernetes.io/managed-by=fluxlora,"
               "fluxlora/service=preprocessing" for r in c.api.requests)


def test_a_job_that_finished_while_the_server_was_down_is_not_run_again(cluster):
    c = cluster()
    c.gate.clear()
    first = c.server()
    job = first.submit(SPEC)
    wait_for(first, job.job_id, lambda j: j.job_id in c.kubelet.running)
    first.shutdown()
    c.gate.set()
    wait_for_exit(c, job.job_id)
    del c.api.jobs[(NS, job.job_id)]  # ttlSecondsAfterFinished cleaned it up meanwhile

    second = c.server()
    assert final(second, job.job_id).state == S.JOB_STATE_SUCCEEDED
    assert len(c.api.requests_of("POST")) == 1


def test_a_restart_deletes_the_job_of_a_cancelled_record_and_leaves_unknown_jobs(cluster):
    c = cluster()
    record = jobs_pb2.Job(job_id="pre-000000000001", service="preprocessing", state=S.JOB_STATE_RUNNING,
                          cancel_requested=True)  # cancel asked; the server died before deleting the Job
    record.created_at.GetCurrentTime()
    record.spec.Pack(SPEC)
    JobRecords(c.store, "preprocessing").save(record)
    c.api.add_job(NS, job_manifest(record.job_id, "preprocessing", c.settings))
    c.api.add_job(NS, job_manifest("pre-0000000000ff", "preprocessing", c.settings))  # not in this store

    runtime = c.server()
    assert runtime.get(record.job_id).state == S.JOB_STATE_CANCELLED
    assert [r[1].rsplit("/", 1)[-1] for r in c.api.requests_of("DELETE")] == [record.job_id]
    assert (NS, "pre-0000000000ff") in c.api.jobs


# --- Kueue: suspended Jobs, admission, preemption ---------------------------------------------------
QUEUE = {"k8s_queue_name": "fluxlora", "k8s_priority_class": "fluxlora-training", "k8s_node_selector": {},
         "k8s_tolerations": []}  # with Kueue, the ResourceFlavor places the pods


def kueue_cluster(cluster, **kw) -> Cluster:
    c = cluster(**(QUEUE | kw))
    c.api.local_queues[(NS, "fluxlora")] = "fluxlora-gpu"
    return c


def test_with_a_queue_name_the_job_is_created_suspended_in_that_local_queue_with_its_priority(tmp_path):
    manifest = job_manifest("trn-0123456789ab", "training", k8s_settings(tmp_path, **QUEUE))
    kubernetes_validate.validate(manifest, "1.30", strict=True)
    assert manifest["spec"]["suspend"] is True
    labels = manifest["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "fluxlora"
    assert labels["kueue.x-k8s.io/priority-class"] == "fluxlora-training"
    assert "nodeSelector" not in manifest["spec"]["template"]["spec"]
    # Without one: a plain Job, never suspended, no Kueue labels (a cluster without Kueue).
    plain = job_manifest("trn-0123456789ab", "training", k8s_settings(tmp_path))
    assert "suspend" not in plain["spec"] and not any(k.startswith("kueue") for k in plain["metadata"]["labels"])


def test_a_pending_job_waits_for_kueue_admission_naming_the_cluster_queue_then_runs_once_admitted(cluster):
    c = kueue_cluster(cluster)
    runtime = c.server(workers=1)
    jobs = [runtime.submit(SPEC, request_id=f"r{i}") for i in range(3)]
    # All three handed to the cluster at once, although the server runs one job at a time (workers=1).
    waiting = [wait_for(runtime, j.job_id, lambda j: j.progress.stage.startswith("waiting for Kueue")) for j in jobs]
    assert len(c.api.jobs) == 3 and not c.kubelet.running
    for job in waiting:
        assert job.state == S.JOB_STATE_RUNNING
        assert job.progress.stage.startswith("waiting for Kueue admission (ClusterQueue fluxlora-gpu): "
                                             "couldn't assign flavors")
    for job in jobs:
        c.api.admit(NS, job.job_id, node_labels=RTX4090)
    assert [final(runtime, j.job_id).state for j in jobs] == [S.JOB_STATE_SUCCEEDED] * 3
    assert c.api.jobs[(NS, jobs[0].job_id)]["spec"]["template"]["spec"]["nodeSelector"] == RTX4090
    assert len(c.api.requests_of("POST")) == 3 and set(c.kubelet.pods_started.values()) == {1}


def test_a_pending_job_is_cancelled_by_deleting_it(cluster):
    c = kueue_cluster(cluster)
    runtime = c.server()
    job = runtime.submit(SPEC)
    wait_for(runtime, job.job_id, lambda j: j.progress.stage.startswith("waiting for Kueue"))
    runtime.cancel(job.job_id)
    assert final(runtime, job.job_id).state == S.JOB_STATE_CANCELLED
    assert (NS, job.job_id) not in c.api.jobs and not c.kubelet.pods_started


def test_without_kueue_installed_a_queued_job_says_so_and_names_the_fix(cluster):
    c = cluster(**QUEUE)  # no LocalQueue (nor Workloads): Kueue is not there, the Job stays suspended
    runtime = c.server()
    job = runtime.submit(SPEC)
    seen = wait_for(runtime, job.job_id, lambda j: "does not exist" in j.progress.stage)
    assert "LocalQueue fluxlora/fluxlora" in seen.progress.stage and "FLUXLORA_K8S_QUEUE_NAME" in seen.progress.stage
    runtime.cancel(job.job_id)


STEPS, CHECKPOINT_EVERY = 10, 2


def checkpointing_handler(steps_run: list[int], preempt_at: threading.Event, preempted: threading.Event):
    """A training loop in miniature: resumes from its last stored checkpoint, stores one every
    CHECKPOINT_EVERY steps, and waits at step 6 of its first attempt for a preemption."""

    def handler(ctx, spec):
        key = "runs/r/checkpoint"
        start = int(ctx.store.get_bytes(key)) if ctx.store.exists(key) else 0
        for step in range(start + 1, STEPS + 1):
            if step == 6 and not preempted.is_set():
                preempt_at.set()
                while True:  # until the pod's SIGTERM
                    ctx.check_cancelled()
                    threading.Event().wait(0.02)
            steps_run.append(step)
            ctx.progress("training", step, STEPS, "step")
            if step % CHECKPOINT_EVERY == 0:
                ctx.store.put_bytes(key, str(step).encode())
        return preprocessing_pb2.PreprocessResult(dataset_id="ds-1", image_count=len(steps_run))

    return handler


def test_a_preempted_job_resumes_from_its_checkpoint_in_the_same_job_on_readmission(cluster):
    steps_run: list[int] = []
    preempt_at, preempted = threading.Event(), threading.Event()
    c = kueue_cluster(cluster, handler=checkpointing_handler(steps_run, preempt_at, preempted))
    runtime = c.server()
    job = runtime.submit(SPEC)
    wait_for(runtime, job.job_id, lambda j: j.progress.stage.startswith("waiting for Kueue"))
    c.api.admit(NS, job.job_id, node_labels=RTX4090)
    assert preempt_at.wait(10)

    preempted.set()
    c.api.evict(NS, job.job_id)  # a grid request of higher priority needs the GPU
    wait_for_exit(c, job.job_id)
    assert c.kubelet.exit_codes[job.job_id] == EXIT_INTERRUPTED  # SIGTERM: stopped, not failed
    seen = wait_for(runtime, job.job_id, lambda j: "evicted (Preempted)" in j.progress.stage)
    assert seen.state == S.JOB_STATE_RUNNING and seen.progress.stage.startswith(
        "waiting for Kueue admission (ClusterQueue fluxlora-gpu)")

    c.api.admit(NS, job.job_id, node_labels=RTX4090)
    done = final(runtime, job.job_id)
    assert done.state == S.JOB_STATE_SUCCEEDED, done.error
    # Resumed from step 4's checkpoint: step 5 ran twice (lost < checkpoint_every), nothing else did.
    assert steps_run == [1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10]
    assert len(c.api.requests_of("POST")) == 1 and c.kubelet.pods_started[job.job_id] == 2  # one Job, two pods
    assert done.attempts == 1  # the server ran it once: the preemption happened inside the one Job

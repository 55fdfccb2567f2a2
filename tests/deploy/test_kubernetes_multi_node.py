"""One LoRA across nodes on Kubernetes (TrainSpec.nodes > 1): an Indexed Job of `nodes` pods of `gpus`
GPUs each, torchrun's static rendezvous on pod 0's DNS name through a headless Service the Job owns,
the node rank from the pod's completion index; with Kueue, one Workload of all the pods. Checked
against the Kubernetes schemas and through the fake API with the real kubernetes client."""

from __future__ import annotations

import kubernetes_validate
import pytest
from kube_fakes import FakeKubeAPI, FakeKubelet
from kubernetes.client import ApiClient, Configuration

from fluxlora.common.config import Settings
from fluxlora.common.storage import LocalStore
from fluxlora.jobs.k8s_manifests import job_manifest, rendezvous_service
from fluxlora.jobs.kubernetes import KubernetesRunner
from fluxlora.jobs.runtime import JobRuntime
from fluxlora.jobs.worker import EXIT_PERMANENT, run_worker
from fluxlora_api.v1 import jobs_pb2
from fluxlora_api.v1 import training_pb2 as pb

S = jobs_pb2.JobState
NS = "fluxlora"
JOB = "trn-0123456789ab"
GPU_RESOURCES = {"requests": {"cpu": "4", "memory": "24Gi"}, "limits": {"memory": "48Gi", "nvidia.com/gpu": "1"}}
RTX4090 = {"nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-4090"}


def settings(tmp_path, **overrides) -> Settings:
    values = dict(store=str(tmp_path / "store"), cache_dir=tmp_path / "cache", runner="kubernetes",
                  k8s_image="registry.example.com/fluxlora-gpu:0.1.0", k8s_namespace=NS,
                  k8s_resources=GPU_RESOURCES, k8s_poll_s=0.05)
    return Settings(**(values | overrides))


def test_two_nodes_of_two_gpus_are_an_indexed_job_of_two_pods_rendezvousing_on_pod_0(tmp_path):
    manifest = job_manifest(JOB, "training", settings(tmp_path), gpus=2, nodes=2)
    kubernetes_validate.validate(manifest, "1.30", strict=True)
    spec = manifest["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert spec["backoffLimit"] == 2 * 2  # one failure fails every pod: FLUXLORA_K8S_BACKOFF_LIMIT runs' worth
    assert spec["podReplacementPolicy"] == "Failed"  # never two pods 0 at once
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == JOB and pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["command"] == [
        "python", "-m", "fluxlora.server.launcher", "--nnodes=2", "--nproc-per-node=2",
        "--node-rank=$(JOB_COMPLETION_INDEX)", f"--master-addr={JOB}-0.{JOB}", "--master-port=29500",
        "--shutdown-timeout=115", "--no-python", "fluxlora", "worker", "training", JOB]
    assert {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}} in container["env"]
    assert container["ports"] == [{"name": "rendezvous", "containerPort": 29500}]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    # A config error on any node still fails the whole Job at once.
    assert spec["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [EXIT_PERMANENT]


def test_one_gpu_on_each_of_three_nodes_still_runs_the_launcher_across_nodes(tmp_path):
    manifest = job_manifest(JOB, "training", settings(tmp_path), gpus=1, nodes=3)
    kubernetes_validate.validate(manifest, "1.30", strict=True)
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    assert container["command"][3:5] == ["--nnodes=3", "--nproc-per-node=1"]
    assert container["resources"] == GPU_RESOURCES


def test_the_rendezvous_service_is_headless_selects_the_jobs_pods_and_is_owned_by_the_job():
    service = rendezvous_service(JOB, "training", "0b1c-uid")
    kubernetes_validate.validate(service, "1.30", strict=True)
    assert service["metadata"]["name"] == JOB
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"fluxlora/job-id": JOB}
    assert service["metadata"]["ownerReferences"] == [{"apiVersion": "batch/v1", "kind": "Job", "name": JOB,
                                                        "uid": "0b1c-uid", "controller": True,
                                                        "blockOwnerDeletion": True}]


@pytest.fixture
def cluster(tmp_path):
    """(settings, store, api, kubelet, runtime) of a training server on the fake API with Kueue."""
    config = settings(tmp_path, k8s_queue_name="fluxlora", k8s_priority_class="fluxlora-training",
                      k8s_node_selector={}, k8s_tolerations=[])
    store = LocalStore(tmp_path / "store")
    api = FakeKubeAPI().start()
    api.local_queues[(NS, "fluxlora")] = "fluxlora-gpu"

    def handler(ctx, spec):
        return pb.TrainResult(run_id=ctx.job_id, steps_done=spec.gpus * spec.nodes)

    kubelet = FakeKubelet(api, lambda service, job_id, stop: run_worker(service, job_id, config, store, stop,
                                                                         handler=handler))
    runner = KubernetesRunner(config, "training", ApiClient(Configuration(host=api.url)), NS)
    runtime = JobRuntime("training", "trn", store, handler, settings=config, workers=1, runner=runner)
    runtime.start()
    yield api, kubelet, runtime
    runtime.shutdown()
    api.stop()


def wait_for_stage(runtime: JobRuntime, job_id: str, prefix: str) -> jobs_pb2.Job:
    for event in runtime.watch(job_id):
        if event.job.progress.stage.startswith(prefix):
            return event.job
    raise AssertionError(f"job {job_id} ended before its stage began with {prefix!r}")


def test_a_two_node_run_is_one_kueue_workload_of_both_pods_and_finishes_once_admitted(cluster):
    api, kubelet, runtime = cluster
    job = runtime.submit(pb.TrainSpec(dataset_id="ds-1", gpus=2, nodes=2))
    wait_for_stage(runtime, job.job_id, "waiting for Kueue admission (ClusterQueue fluxlora-gpu)")
    created = api.jobs[(NS, job.job_id)]
    assert created["spec"]["suspend"] is True and created["spec"]["completionMode"] == "Indexed"
    assert created["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "fluxlora"
    (workload,) = [w for (ns, _), w in api.workloads.items() if ns == NS]
    assert workload["spec"]["podSets"] == [{"name": "main", "count": 2}]  # admitted together, or not at all
    service = api.services[(NS, job.job_id)]
    assert service["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    assert service["metadata"]["labels"]["fluxlora/job-id"] == job.job_id
    assert service["spec"]["selector"].items() <= created["spec"]["template"]["metadata"]["labels"].items()
    api.admit(NS, job.job_id, node_labels=RTX4090)
    done = list(runtime.watch(job.job_id))[-1].job
    assert done.state == S.JOB_STATE_SUCCEEDED, done.error
    result = pb.TrainResult()
    assert done.result.Unpack(result) and result.steps_done == 4
    assert [r[1] for r in api.requests_of("POST")] == [f"/apis/batch/v1/namespaces/{NS}/jobs",
                                                        f"/api/v1/namespaces/{NS}/services"]


def test_cancelling_a_two_node_run_deletes_its_job_and_with_it_the_rendezvous_service(cluster):
    api, kubelet, runtime = cluster
    job = runtime.submit(pb.TrainSpec(dataset_id="ds-1", gpus=1, nodes=2))
    wait_for_stage(runtime, job.job_id, "waiting for Kueue admission")
    assert (NS, job.job_id) in api.services
    runtime.cancel(job.job_id)
    assert list(runtime.watch(job.job_id))[-1].job.state == S.JOB_STATE_CANCELLED
    assert (NS, job.job_id) not in api.jobs and (NS, job.job_id) not in api.services


def test_a_config_error_of_a_rank_other_than_0_fails_the_run_as_the_requests_fault(tmp_path):
    """The pod exits 3 (the launcher: a rank's config error), the Job fails by podFailurePolicy, and rank
    0 stored only its echo of it (its peer gone): the run fails FAILED_PRECONDITION pointing at the logs."""
    config = settings(tmp_path)
    store = LocalStore(tmp_path / "store")
    api = FakeKubeAPI().start()

    def rank_0(ctx, spec):
        raise RuntimeError("Connection closed by peer [10.0.0.7]:29500")

    def pod(service, job_id, stop):
        run_worker(service, job_id, config, store, stop, handler=rank_0)  # rank 0's report: INTERNAL
        return EXIT_PERMANENT  # another rank's code, through the launcher

    FakeKubelet(api, pod)
    runner = KubernetesRunner(config, "training", ApiClient(Configuration(host=api.url)), NS)
    runtime = JobRuntime("training", "trn", store, rank_0, settings=config, workers=1, runner=runner)
    runtime.start()
    try:
        job = runtime.submit(pb.TrainSpec(dataset_id="ds-1", gpus=2, nodes=2))
        done = list(runtime.watch(job.job_id))[-1].job
    finally:
        runtime.shutdown()
        api.stop()
    assert done.state == S.JOB_STATE_FAILED and done.error.code == "FAILED_PRECONDITION", done.error
    assert all(w in done.error.message for w in ("exit 3", f"kubectl logs job/{job.job_id}", "Connection closed")), \
        done.error.message

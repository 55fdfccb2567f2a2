"""A training job on several GPUs as a Kubernetes Job (TrainSpec.gpus): one pod asking for that many
GPUs, the worker under torchrun with one rank per GPU, /dev/shm for NCCL; checked against the
Kubernetes schemas and through the fake API with the real kubernetes client."""

from __future__ import annotations

import kubernetes_validate
import pytest
from kube_fakes import FakeKubeAPI, FakeKubelet
from kubernetes.client import ApiClient, Configuration

from fluxlora.common.config import Settings
from fluxlora.common.storage import LocalStore
from fluxlora.jobs.k8s_manifests import job_manifest
from fluxlora.jobs.kubernetes import KubernetesRunner
from fluxlora.jobs.runtime import JobRuntime
from fluxlora.jobs.worker import EXIT_PERMANENT, run_worker
from fluxlora_api.v1 import jobs_pb2
from fluxlora_api.v1 import training_pb2 as pb

S = jobs_pb2.JobState
NS = "fluxlora"
JOB = "trn-0123456789ab"
GPU_RESOURCES = {"requests": {"cpu": "4", "memory": "24Gi"}, "limits": {"memory": "48Gi", "nvidia.com/gpu": "1"}}


def settings(tmp_path, **overrides) -> Settings:
    values = dict(store=str(tmp_path / "store"), cache_dir=tmp_path / "cache", runner="kubernetes",
                  k8s_image="registry.example.com/fluxlora-gpu:0.1.0", k8s_namespace=NS,
                  k8s_resources=GPU_RESOURCES, k8s_poll_s=0.05)
    return Settings(**(values | overrides))


def test_a_four_gpu_job_is_one_pod_with_four_gpus_running_the_worker_under_torchrun(tmp_path):
    manifest = job_manifest(JOB, "training", settings(tmp_path), gpus=4)
    kubernetes_validate.validate(manifest, "1.30", strict=True)
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "fluxlora.server.launcher", "--standalone", "--nproc-per-node=4",
                                    "--shutdown-timeout=115", "--no-python", "fluxlora", "worker", "training", JOB]
    # The launcher exits with a failed rank's own code, so a rank's config error still fails the Job at once.
    fail_job = manifest["spec"]["podFailurePolicy"]["rules"][0]
    assert fail_job == {"action": "FailJob", "onExitCodes": {"containerName": container["name"], "operator": "In",
                                                             "values": [EXIT_PERMANENT]}}
    assert container["resources"] == {"requests": {"cpu": "4", "memory": "24Gi"},
                                      "limits": {"memory": "48Gi", "nvidia.com/gpu": "4"}}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    # The rest is the one-GPU Job's: one pod, never restarted in place; retries are new pods.
    assert "completions" not in manifest["spec"] and pod["restartPolicy"] == "Never"
    assert GPU_RESOURCES["limits"]["nvidia.com/gpu"] == "1"  # the setting itself is left alone


def test_a_one_gpu_job_is_unchanged(tmp_path):
    manifest = job_manifest(JOB, "training", settings(tmp_path), gpus=1)
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["fluxlora", "worker", "training", JOB]
    assert container["resources"] == GPU_RESOURCES
    assert all(v["name"] != "dshm" for v in manifest["spec"]["template"]["spec"]["volumes"])


def test_without_a_gpu_resource_the_ranks_are_cpu_processes_and_no_gpu_is_asked_for(tmp_path):
    cpu = {"requests": {"cpu": "2", "memory": "8Gi"}}
    manifest = job_manifest(JOB, "training", settings(tmp_path, k8s_resources=cpu), gpus=2)
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    assert container["resources"] == cpu and container["command"][2:5] == [
        "fluxlora.server.launcher", "--standalone", "--nproc-per-node=2"]


@pytest.mark.parametrize(("gpus", "asked"), [(2, "2"), (0, "1")])
def test_the_runner_creates_the_job_with_the_specs_gpus(tmp_path, gpus, asked):
    config = settings(tmp_path)
    store = LocalStore(tmp_path / "store")
    api = FakeKubeAPI().start()

    def handler(ctx, spec):
        return pb.TrainResult(run_id=ctx.job_id, steps_done=spec.gpus)

    kubelet = FakeKubelet(api, lambda service, job_id, stop: run_worker(service, job_id, config, store, stop,
                                                                         handler=handler))
    runner = KubernetesRunner(config, "training", ApiClient(Configuration(host=api.url)), NS)
    runtime = JobRuntime("training", "trn", store, handler, settings=config, workers=1, runner=runner)
    runtime.start()
    try:
        job = runtime.submit(pb.TrainSpec(dataset_id="ds-1", gpus=gpus))
        done = list(runtime.watch(job.job_id))[-1].job
    finally:
        runtime.shutdown()
        api.stop()
    assert done.state == S.JOB_STATE_SUCCEEDED, done.error
    (container,) = api.jobs[(NS, job.job_id)]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == asked
    assert (container["command"][:3] == ["python", "-m", "fluxlora.server.launcher"]) == (gpus > 1)
    assert kubelet.exit_codes[job.job_id] == 0

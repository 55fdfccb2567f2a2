"""The worker entrypoint (`fluxlora worker <service> <job_id>`, what a Kubernetes Job's pod runs)
and a whole server with FLUXLORA_RUNNER=kubernetes, end to end through the SDK: the server finds
the cluster through a kubeconfig (the fake API), launches a Job, the fake kubelet runs the real
worker with the service's real handler, and the result comes back over gRPC."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from google.protobuf import json_format
from kube_fakes import FakeKubeAPI, FakeKubelet, use_kubeconfig

from fluxlora.common.config import Settings
from fluxlora.common.storage import LocalStore
from fluxlora.demo.sample_data import write_sample_photos
from fluxlora.jobs.records import JobRecords
from fluxlora.jobs.worker import EXIT_PERMANENT, load_report, run_worker
from fluxlora.server.bootstrap import start_server
from fluxlora.server.services import load_definition
from fluxlora_api.shared.errors import FailedPrecondition
from fluxlora_api.v1 import jobs_pb2, preprocessing_pb2
from fluxlora_client import FluxloraClient

S = jobs_pb2.JobState
NS = "fluxlora"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    write_sample_photos(folder, count=3, seed=2)
    return folder


def stored_job(store, job_id: str, spec) -> None:
    """A job record as a server's submit leaves it (what the worker is pointed at)."""
    record = jobs_pb2.Job(job_id=job_id, service="preprocessing", state=S.JOB_STATE_RUNNING)
    record.created_at.GetCurrentTime()
    record.spec.Pack(spec)
    JobRecords(store, "preprocessing").save(record)


def worker_cli(store_root, job_id: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fluxlora_client.cli", "worker", "preprocessing", job_id, "--store", str(store_root)],
        capture_output=True, text=True, timeout=120,
    )


def test_the_worker_command_runs_a_stored_job_with_the_services_handler_and_reports_it(tmp_path, photos):
    store = LocalStore(tmp_path / "store")
    for path in sorted(photos.iterdir()):
        store.put_file(f"uploads/u-1/{path.name}", path)
    stored_job(store, "pre-00000000000a", preprocessing_pb2.PreprocessSpec(source_prefix="uploads/u-1/", base_size=256))

    done = worker_cli(store.root, "pre-00000000000a")
    assert done.returncode == 0, done.stderr
    report = load_report(store, "preprocessing", "pre-00000000000a")
    assert report.state == S.JOB_STATE_SUCCEEDED
    result = preprocessing_pb2.PreprocessResult()
    assert report.result.Unpack(result) and result.image_count == 3
    assert store.exists(f"datasets/{result.dataset_id}/manifest.json")
    assert report.progress.stage and report.artifacts


def test_the_worker_exits_3_on_a_request_that_can_never_succeed_and_reports_why(tmp_path):
    store = LocalStore(tmp_path / "store")
    store.put_bytes("uploads/u-2/notes.txt", b"not a photo")
    stored_job(store, "pre-00000000000b", preprocessing_pb2.PreprocessSpec(source_prefix="uploads/u-2/", base_size=256))

    done = worker_cli(store.root, "pre-00000000000b")
    assert done.returncode == EXIT_PERMANENT  # the Job's podFailurePolicy fails it without retries
    report = load_report(store, "preprocessing", "pre-00000000000b")
    assert report.state == S.JOB_STATE_FAILED and report.error.code == "FAILED_PRECONDITION"
    assert "the uploaded folder" in report.error.message and "notes.txt" in report.error.message


def test_the_worker_exits_3_for_a_job_the_store_does_not_hold(tmp_path):
    assert worker_cli(tmp_path / "store", "pre-00000000000c").returncode == EXIT_PERMANENT


@pytest.fixture
def fake_cluster(tmp_path, monkeypatch):
    api = FakeKubeAPI().start()
    use_kubeconfig(api, tmp_path, monkeypatch, NS)
    yield api
    api.stop()


def test_a_server_with_the_kubernetes_runner_runs_jobs_as_kubernetes_jobs_end_to_end(tmp_path, photos, fake_cluster):
    store = LocalStore(tmp_path / "store")
    settings = Settings(store=str(store.root), cache_dir=tmp_path / "cache", runner="kubernetes",
                        k8s_image="registry.example.com/fluxlora-cpu:0.1.0", k8s_namespace=NS, k8s_poll_s=0.05,
                        k8s_resources={"requests": {"cpu": "1", "memory": "2Gi"}})
    FakeKubelet(fake_cluster, lambda service, job_id, stop: run_worker(service, job_id, settings, store, stop,
                                                                   handler=load_definition(service).handler))
    server = start_server("preprocessing", settings, store=store, port=0)
    client = FluxloraClient(preprocessing=server.address)
    try:
        job = client.wait(client.preprocess(client.upload_photos(photos), base_size=256))
        result = client.result(job)
    finally:
        client.close()
        server.stop(grace=1.0)

    assert result.image_count == 3
    manifest = fake_cluster.jobs[(NS, job.job_id)]
    assert manifest["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "fluxlora", "worker", "preprocessing", job.job_id]
    # (The "created Kubernetes Job" log line may precede the watch, whose first event is a snapshot:
    # the Job's presence in the cluster is what proves the launch.)
    assert manifest["metadata"]["name"] == job.job_id
    assert [a.key for a in job.artifacts if a.key.endswith("manifest.json")]
    assert json_format.MessageToDict(job)["state"] == "JOB_STATE_SUCCEEDED"


def test_a_server_with_the_kubernetes_runner_and_no_cluster_fails_fast_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    settings = Settings(store=str(tmp_path / "store"), runner="kubernetes", k8s_image="x")
    with pytest.raises(FailedPrecondition, match="no cluster credentials.*KUBECONFIG"):
        start_server("preprocessing", settings, port=0)


def test_the_worker_stops_at_the_next_check_when_its_pod_is_terminated(tmp_path):
    store = LocalStore(tmp_path / "store")
    stored_job(store, "pre-00000000000d", preprocessing_pb2.PreprocessSpec(source_prefix="uploads/x/"))
    stop, started = threading.Event(), threading.Event()

    def slow(ctx, spec):
        started.set()
        while True:
            ctx.check_cancelled()
            stop.wait(0.02)

    thread_result = {}
    thread = threading.Thread(target=lambda: thread_result.setdefault(
        "code", run_worker("preprocessing", "pre-00000000000d", Settings(), store, stop, handler=slow)))
    thread.start()
    started.wait()
    stop.set()  # what SIGTERM does in the pod
    thread.join()
    assert thread_result["code"] == 75


def test_a_server_queueing_through_kueue_hands_jobs_to_the_cluster_suspended_and_runs_them_once_admitted(
        tmp_path, photos, fake_cluster):
    store = LocalStore(tmp_path / "store")
    settings = Settings(store=str(store.root), cache_dir=tmp_path / "cache", runner="kubernetes",
                        k8s_image="registry.example.com/fluxlora-cpu:0.1.0", k8s_namespace=NS, k8s_poll_s=0.05,
                        k8s_resources={"requests": {"cpu": "1", "memory": "2Gi"}},
                        k8s_queue_name="fluxlora", k8s_priority_class="fluxlora-interactive")
    fake_cluster.local_queues[(NS, "fluxlora")] = "fluxlora-gpu"
    FakeKubelet(fake_cluster, lambda service, job_id, stop: run_worker(service, job_id, settings, store, stop,
                                                                   handler=load_definition(service).handler))
    server = start_server("preprocessing", settings, store=store, port=0)
    client = FluxloraClient(preprocessing=server.address)
    try:
        submitted = client.preprocess(client.upload_photos(photos), base_size=256)
        waiting = next(e.job for e in client.watch(submitted.job_id)
                       if e.job.progress.stage.startswith("waiting for Kueue"))
        assert waiting.progress.stage.startswith("waiting for Kueue admission (ClusterQueue fluxlora-gpu)")
        created = fake_cluster.jobs[(NS, submitted.job_id)]
        assert created["spec"]["suspend"] is True
        assert created["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "fluxlora-interactive"
        fake_cluster.admit(NS, submitted.job_id)
        job = client.wait(submitted)
        result = client.result(job)
    finally:
        client.close()
        server.stop(grace=1.0)
    assert result.image_count == 3 and len(fake_cluster.requests_of("POST")) == 1

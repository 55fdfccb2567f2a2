"""Faults of the job runtime through the SDK and gRPC health against a real preprocessing server
(issue 12): the store's bucket deleted under a running job, a request_id resent with another spec, a
disk under the free-space minimum."""

from __future__ import annotations

import threading

import pytest

from fluxlora.common.storage import LocalStore
from fluxlora.jobs import recorder
from fluxlora.server.bootstrap import LIVENESS
from fluxlora.server.healthcheck import serving
from fluxlora_api.v1 import jobs_pb2
from fluxlora_client import FluxloraClient, FluxloraClientError, JobFailed
from support import make_s3_store, preprocessing_server, wait_until

pytestmark = pytest.mark.timeout(120)
S = jobs_pb2.JobState


def delete_bucket(store) -> None:
    for info in list(store.list("")):
        store.client.remove_object(store.bucket, info.key)
    store.client.remove_bucket(store.bucket)


def test_a_bucket_deleted_under_a_running_job_ends_it_for_every_watcher_and_health_says_not_serving(
        moto_endpoint, tmp_path, photos, monkeypatch):
    monkeypatch.setattr(recorder, "RESAVE_INTERVAL_S", 0.05)
    store = make_s3_store(moto_endpoint)
    gate = threading.Event()
    with preprocessing_server(tmp_path, gate, store=store) as server, \
            FluxloraClient(preprocessing=server.address) as client:
        source = client.upload_photos(photos)
        job = client.preprocess(source, base_size=64, request_id="req-1")
        wait_until(lambda: client.get_job(job.job_id).state == S.JOB_STATE_RUNNING, "the job to run", timeout=30.0)
        assert serving(server.address) == (True, f"{server.address}: SERVING")

        delete_bucket(store)  # NoSuchBucket for the job's reads and for its record
        ended: list[jobs_pb2.Job] = []
        watchers = [threading.Thread(target=lambda: ended.append(list(client.watch(job.job_id))[-1].job))
                    for _ in range(2)]
        for watcher in watchers:
            watcher.start()
        gate.set()
        # it failed, but nobody is told before the store holds the FAILED record (there is no bucket for it)
        wait_until(lambda: "recording the result" in client.get_job(job.job_id).progress.stage,
                   "the job to say it is recording its result", timeout=30.0)
        now = client.get_job(job.job_id)
        assert now.state == S.JOB_STATE_RUNNING and "the store is unavailable" in now.progress.stage
        assert not ended
        wait_until(lambda: not serving(server.address)[0], "health to say NOT_SERVING", timeout=30.0)
        assert serving(server.address) == (False, f"{server.address}: NOT_SERVING")
        # ... but alive: a liveness probe must not restart a server that only waits for its store
        assert serving(server.address, LIVENESS) == (True, f"{server.address}: SERVING")
        with pytest.raises(FluxloraClientError):  # a submit is refused, not queued forever
            client.preprocess(source, base_size=64, request_id="req-2")

        store.client.make_bucket(store.bucket)  # the bucket back: the record lands, then the end is told
        with pytest.raises(JobFailed) as failed:
            client.wait(job)
        for watcher in watchers:
            watcher.join(30)
        assert [j.state for j in ended] == [S.JOB_STATE_FAILED] * 2  # every watcher saw the one end
        assert failed.value.code == "UNAVAILABLE" and "NoSuchBucket" in failed.value.message
        assert store.get_json(f"jobs/preprocessing/{job.job_id}.json")["state"] == "JOB_STATE_FAILED"
        wait_until(lambda: serving(server.address)[0], "health to say SERVING again", timeout=30.0)
        assert client.get_job(job.job_id).state == S.JOB_STATE_FAILED


def test_a_request_id_resent_with_another_spec_is_already_exists(tmp_path, photos):
    with preprocessing_server(tmp_path) as server, \
            FluxloraClient(preprocessing=server.address) as client:
        source = client.upload_photos(photos)
        job = client.preprocess(source, base_size=64, request_id="req-same")
        assert client.preprocess(source, base_size=64, request_id="req-same").job_id == job.job_id
        with pytest.raises(FluxloraClientError) as refused:
            client.preprocess(source, base_size=128, request_id="req-same")
        assert refused.value.code == "ALREADY_EXISTS"
        assert "request_id 'req-same'" in refused.value.message and job.job_id in refused.value.message
        assert "different spec" in refused.value.message and "spec.base_size" in refused.value.message
        assert [j.job_id for j in client.list_jobs("preprocessing")] == [job.job_id]


def test_a_disk_under_the_free_space_minimum_refuses_the_submit_naming_the_path_and_stores_nothing(tmp_path, photos):
    store = LocalStore(tmp_path / "store")
    with preprocessing_server(tmp_path, store=store, min_free_bytes=2**62) as server, \
            FluxloraClient(preprocessing=server.address) as client:
        source = client.upload_photos(photos)
        with pytest.raises(FluxloraClientError) as refused:
            client.preprocess(source, base_size=64)
        assert refused.value.code == "RESOURCE_EXHAUSTED"
        assert "free on the disk holding /" in refused.value.message
        assert "FLUXLORA_MIN_FREE_BYTES" in refused.value.message and "free space there" in refused.value.message
        assert not list(store.list("jobs/")) and not list(store.list("datasets/"))

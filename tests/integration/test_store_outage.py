"""The object store going away mid-job, with a real S3 server (moto) stopped and started again on
the same port (its buckets live in this process, so they survive like a real server's disks):

- an outage shorter than the retries costs nothing: calls wait (backoff with jitter, a WARNING per
  retry) and then land whole;
- a longer one fails the call, and the job, with UNAVAILABLE and a message naming the store, the
  key and what to do; nothing half-written is ever referenced, and the job's FAILED record reaches
  the store once it is back, before anyone is told the job failed.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
import uuid

import pytest

from fluxlora.common.config import Settings
from fluxlora.common.s3_retry import RetryPolicy
from fluxlora.common.storage import S3Store
from fluxlora.jobs import recorder
from fluxlora.server.bootstrap import start_server
from fluxlora_api.shared.errors import Unavailable, status_of
from fluxlora_api.v1 import jobs_pb2
from fluxlora_client import FluxloraClient, FluxloraClientError, JobFailed
from support import S3Endpoint

pytestmark = pytest.mark.timeout(120)  # a regression that hangs a wait fails here, not after 10 minutes
S = jobs_pb2.JobState
PATIENT = RetryPolicy(retries=200, base_s=0.02, max_s=0.1)  # rides out outages of a few seconds
IMPATIENT = RetryPolicy(retries=3, base_s=0.01, max_s=0.02)  # gives up within a fraction of a second
SECRET = "outage-test-secret-key"


class CuttingProxy:
    """A TCP proxy in front of the endpoint that drops the next `cuts` connections once `cut_after`
    request bytes went through them: the endpoint vanishing mid-upload, body half sent."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.cuts = 0
        self.cut_after = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client = self.listener.accept()[0]
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, request: bool) -> None:
        sent = 0
        try:
            while data := source.recv(65536):
                if request and self.cuts and sent + len(data) > self.cut_after:
                    self.cuts -= 1
                    sink.sendall(data[: self.cut_after - sent])
                    break
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            end.close()


class OutageStore(S3Store):
    """An S3Store that runs `before_put(key)` before each upload: the test stops the endpoint there."""

    before_put = staticmethod(lambda key: None)

    def put_file(self, key, path, content_type="application/octet-stream"):
        self.before_put(key)
        return super().put_file(key, path, content_type)


@pytest.fixture
def s3():
    endpoint = S3Endpoint()
    endpoint.start()
    yield endpoint
    if endpoint.server is None:
        endpoint.start()  # a test that left it down: stop it cleanly below
    endpoint.stop()


def connect(s3: S3Endpoint, policy: RetryPolicy, bucket: str | None = None) -> OutageStore:
    return OutageStore.connect(s3.address, bucket or f"outage-{uuid.uuid4().hex[:8]}", "test", SECRET,
                               retry=policy)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def retry_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name == "fluxlora.common.s3_retry"]


def assert_references_whole(store, job: jobs_pb2.Job) -> None:
    """Every object the job record references is stored with the checksum the record names."""
    for key, ref in {ref.key: ref for ref in job.artifacts}.items():
        assert sha256(store.get_bytes(key)) == ref.sha256, key


# --- the store on its own --------------------------------------------------------------------------
def test_a_put_waits_out_an_outage_and_lands_whole(s3, caplog):
    store = connect(s3, PATIENT)
    data = bytes(range(256)) * 4000
    caplog.set_level(logging.WARNING)
    s3.stop()
    timer = s3.back_in(0.5)
    info = store.put_bytes("datasets/ds-x/images/a.png", data)
    timer.join()
    assert info.sha256 == sha256(data)
    assert store.get_bytes("datasets/ds-x/images/a.png") == data
    assert store.stat("datasets/ds-x/images/a.png").sha256 == sha256(data)
    warnings = retry_warnings(caplog)
    assert warnings and "retry 1 of 200" in warnings[0]
    assert all("datasets/ds-x/images/a.png" in w and "Connection refused" in w for w in warnings)
    assert not any(SECRET in r.getMessage() for r in caplog.records)


def test_an_upload_cut_off_mid_body_is_sent_again_whole_or_not_stored_at_all(s3, caplog):
    proxy = CuttingProxy(("127.0.0.1", s3.port))
    try:
        store = OutageStore.connect(proxy.address, f"outage-{uuid.uuid4().hex[:8]}", "test", SECRET, retry=IMPATIENT)
        data = bytes(range(256)) * 12_000  # 3 MiB: one PUT whose body the proxy cuts at 1 MB
        caplog.set_level(logging.WARNING)
        proxy.cut_after, proxy.cuts = 1_000_000, 1
        assert store.put_bytes("runs/r1/lora.safetensors", data).sha256 == sha256(data)
        assert store.get_bytes("runs/r1/lora.safetensors") == data
        assert any("connection lost" in w for w in retry_warnings(caplog))

        proxy.cuts = IMPATIENT.retries + 1  # every attempt cut: the caller is told, and no torn object exists
        with pytest.raises(Unavailable, match="unreachable while writing 'runs/r1/torn.safetensors'"):
            store.put_bytes("runs/r1/torn.safetensors", data)
        assert proxy.cuts == 0
        assert not store.exists("runs/r1/torn.safetensors")
    finally:
        proxy.close()


def test_every_call_gives_up_unavailable_naming_the_store_and_the_key(s3, tmp_path, caplog):
    store = connect(s3, IMPATIENT)
    store.put_bytes("runs/r1/kept.txt", b"stored before the outage")
    caplog.set_level(logging.WARNING)
    s3.stop()
    calls = {
        "writing": lambda: store.put_bytes("runs/r1/new.txt", b"never half-written"),
        "reading": lambda: store.get_file("runs/r1/kept.txt", tmp_path / "kept.txt"),
        "listing": lambda: list(store.list("runs/r1/")),
        "deleting": lambda: store.delete("runs/r1/kept.txt"),
    }
    for action, call in calls.items():
        caplog.clear()
        with pytest.raises(Unavailable) as failure:
            call()
        code, message = status_of(failure.value)
        assert code == "UNAVAILABLE"
        assert f"object store {store.uri} at {s3.address} unreachable while {action} 'runs/r1/" in message
        assert "4 attempts" in message and "resubmit the job" in message and SECRET not in message
        assert len(retry_warnings(caplog)) == IMPATIENT.retries
    assert not list(tmp_path.iterdir()), "a failed download leaves no partial file behind"
    s3.start()
    assert not store.exists("runs/r1/new.txt")
    assert store.get_bytes("runs/r1/kept.txt") == b"stored before the outage"


# --- jobs through the SDK --------------------------------------------------------------------------
@pytest.fixture
def preprocessing(s3, tmp_path, monkeypatch):
    """A preprocessing server over an OutageStore, and an SDK client; yields (client, store)."""
    monkeypatch.setattr(recorder, "RESAVE_INTERVAL_S", 0.1)
    store = connect(s3, PATIENT)
    settings = Settings(store="unused", cache_dir=tmp_path / "cache", preprocess_workers=1)
    with start_server("preprocessing", settings, store=store, port=0) as server:
        with FluxloraClient(preprocessing=server.address) as client:
            yield client, store


def stop_before_image(s3: S3Endpoint, store: OutageStore, number: int, back_after: float | None) -> threading.Event:
    """Stops the endpoint just before the job uploads its `number`th training image."""
    seen, fired = [], threading.Event()

    def before_put(key: str) -> None:
        if "/images/" in key and key.startswith("datasets/") and not fired.is_set():
            seen.append(key)
            if len(seen) == number:
                fired.set()
                s3.stop()
                if back_after is not None:
                    s3.back_in(back_after)

    store.before_put = before_put
    return fired


def test_a_job_rides_out_a_store_outage_shorter_than_its_retries(s3, preprocessing, photos, caplog):
    client, store = preprocessing
    source = client.upload_photos(photos)
    caplog.set_level(logging.WARNING)
    fired = stop_before_image(s3, store, 2, back_after=0.5)
    job = client.wait(client.preprocess(source, base_size=64))
    assert fired.is_set() and retry_warnings(caplog)
    assert job.state == S.JOB_STATE_SUCCEEDED
    result = client.result(job)
    manifest = store.get_json(result.manifest_key)
    for image in manifest["images"]:
        stored = store.get_bytes(f"datasets/{result.dataset_id}/images/{image['file_name']}")
        assert sha256(stored) == image["pixel_sha256"], image["file_name"]
    assert_references_whole(store, job)


def test_a_store_that_stays_down_fails_the_job_unavailable_and_nothing_half_written_is_referenced(
        s3, preprocessing, photos):
    client, store = preprocessing
    source = client.upload_photos(photos)
    store.retry = IMPATIENT
    fired = stop_before_image(s3, store, 2, back_after=None)
    job = client.preprocess(source, base_size=64)
    deadline = time.monotonic() + 60  # the job failed, but says so only once the store holds its FAILED record
    while not (now := client.get_job(job.job_id)).progress.stage.startswith("finished; recording the result"):
        assert time.monotonic() < deadline, "the job never said it waits to record its result"
        time.sleep(0.05)
    assert fired.is_set() and now.state == S.JOB_STATE_RUNNING
    assert "the store is unavailable, retrying" in now.progress.stage

    s3.start()
    with pytest.raises(JobFailed) as failure:
        client.wait(job)
    assert failure.value.code == "UNAVAILABLE"
    message = failure.value.message
    assert f"object store {store.uri} at {s3.address} unreachable while writing 'datasets/ds-" in message
    assert "/images/" in message and "resubmit the job" in message
    assert store.get_json(f"jobs/preprocessing/{job.job_id}.json")["state"] == "JOB_STATE_FAILED"  # stored first
    record = client.get_job(job.job_id)
    dataset_prefix = message.split("'")[1].split("images/")[0]
    assert not store.exists(dataset_prefix + "manifest.json"), "an incomplete dataset must have no manifest"
    assert not any(ref.key.startswith(dataset_prefix) for ref in record.artifacts)
    assert_references_whole(store, record)

    # the store is back: the same work submitted again succeeds
    store.before_put = lambda key: None
    again = client.wait(client.preprocess(source, base_size=64))
    assert again.state == S.JOB_STATE_SUCCEEDED and again.job_id != job.job_id
    assert store.exists(dataset_prefix + "manifest.json")


def test_a_submit_while_the_store_is_down_answers_unavailable(s3, preprocessing, photos, caplog):
    client, store = preprocessing
    source = client.upload_photos(photos)
    store.retry = IMPATIENT
    caplog.set_level(logging.WARNING)
    s3.stop()
    with pytest.raises(FluxloraClientError) as failure:
        client.preprocess(source, base_size=64)
    assert failure.value.code == "UNAVAILABLE"
    # one server attempt: the SDK's retry policy (for restarting servers) does not repeat the store's retries
    assert len(retry_warnings(caplog)) == IMPATIENT.retries
    # (the servicer's first store call names what it was doing: listing the upload, or writing the record)
    assert f"object store {store.uri} at {s3.address} unreachable while " in failure.value.message
    assert "resubmit the job" in failure.value.message
    s3.start()
    assert client.list_jobs("preprocessing") == []
    assert not list(store.list("jobs/preprocessing/"))



def test_getjob_and_listjobs_answer_from_memory_while_a_record_write_waits_out_the_outage(s3, tmp_path, photos,
                                                                                       monkeypatch):
    """A job's own record write waits out the outage (minutes with this policy); GetJob and ListJobs
    neither wait for it nor retry the store for long: the 10 s deadline of these calls would expire."""
    import dataclasses

    import grpc

    from fluxlora.server.bootstrap import RunningServer
    from fluxlora.server.services import load_definition
    from fluxlora_api.v1 import jobs_pb2_grpc, preprocessing_pb2

    monkeypatch.setattr(recorder, "RESAVE_INTERVAL_S", 0.1)
    store = connect(s3, RetryPolicy(retries=3000, base_s=0.1, max_s=0.1))
    gate = threading.Event()

    def handler(ctx, spec):
        assert gate.wait(60)
        ctx.warn("written while the store is down")  # a record write (persist now): it waits for the store
        return preprocessing_pb2.PreprocessResult(dataset_id="ds-outage")

    definition = dataclasses.replace(load_definition("preprocessing"), handler=handler)
    settings = Settings(store="unused", cache_dir=tmp_path / "cache")
    with RunningServer(definition, settings, store, port=0).start() as server, \
            FluxloraClient(preprocessing=server.address, timeout=10) as client, \
            grpc.insecure_channel(server.address) as channel:
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        source = client.upload_photos(photos)
        gate.set()
        done = client.wait(client.preprocess(source, base_size=64))
        gate.clear()
        job = client.preprocess(source, base_size=128)
        deadline = time.monotonic() + 30  # the outage begins once the RUNNING record is stored (handler at the gate)
        while (store.get_json(f"jobs/preprocessing/{job.job_id}.json") or {}).get("state") != "JOB_STATE_RUNNING":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        s3.stop()
        gate.set()
        deadline = time.monotonic() + 30
        while not client.get_job(job.job_id).warnings:  # memory has the change the store does not
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.get_job(done.job_id).state == S.JOB_STATE_SUCCEEDED
        assert client.get_job(job.job_id).state == S.JOB_STATE_RUNNING
        listed = jobs.ListJobs(jobs_pb2.ListJobsRequest(), timeout=10)
        assert listed.from_memory and [j.job_id for j in listed.jobs] == [job.job_id, done.job_id]

        s3.start()  # the write lands, the job ends, and ListJobs reads the store again
        assert client.wait(job).state == S.JOB_STATE_SUCCEEDED
        listed = jobs.ListJobs(jobs_pb2.ListJobsRequest(), timeout=10)
        assert not listed.from_memory and [j.job_id for j in listed.jobs] == [job.job_id, done.job_id]
        deadline = time.monotonic() + 30  # (a watcher may see the end from memory a moment before the store)
        while store.get_json(f"jobs/preprocessing/{job.job_id}.json")["state"] != "JOB_STATE_SUCCEEDED":
            assert time.monotonic() < deadline
            time.sleep(0.02)

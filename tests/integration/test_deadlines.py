"""Deadlines, cancellation and slow clients over real gRPC:

- a client's deadline ends its call on time even when the server is stuck, and because submits are
  idempotent the retry with the same request_id finds the one job the late call created;
- a watch stream the client stops reading never holds the job back: the job finishes, and the
  stream, once read again, skips what it missed and ends at the final state;
- a watch the client cancels ends on the server too.
"""

from __future__ import annotations

import itertools
import threading
from concurrent import futures

import grpc
import pytest

from fluxlora.common.config import Settings
from fluxlora.common.storage import LocalStore
from fluxlora.jobs import runtime as runtime_module
from fluxlora.jobs.runtime import JobRuntime
from fluxlora.jobs.servicer import JobServicer
from fluxlora.server.bootstrap import start_server
from fluxlora_api.v1 import jobs_pb2, jobs_pb2_grpc, preprocessing_pb2
from fluxlora_client import FluxloraClient, FluxloraClientError

pytestmark = pytest.mark.timeout(120)  # a regression that hangs a wait fails here, not after 10 minutes
S = jobs_pb2.JobState
TERMINAL = (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED)
EVENTS = 2000  # x 2 KB each: far more than an unread stream's flow-control window holds


class GatedRecords(LocalStore):
    """A store whose job-record writes wait for `gate`: a server stuck inside a submit."""

    def __init__(self, root):
        super().__init__(root)
        self.gate = threading.Event()
        self.gate.set()

    def put_file(self, key, path, content_type="application/octet-stream"):
        if key.startswith("jobs/"):
            assert self.gate.wait(60)
        return super().put_file(key, path, content_type)


def test_a_client_deadline_ends_a_stuck_submit_and_the_retry_finds_the_one_job_it_made(tmp_path, photos):
    store = GatedRecords(tmp_path / "store")
    settings = Settings(store="unused", cache_dir=tmp_path / "cache", preprocess_workers=1)
    with start_server("preprocessing", settings, store=store, port=0) as server:
        impatient = FluxloraClient(preprocessing=server.address, timeout=0.5)
        client = FluxloraClient(preprocessing=server.address)
        source = client.upload_photos(photos)
        store.gate.clear()
        with pytest.raises(FluxloraClientError) as late:
            impatient.preprocess(source, base_size=64, request_id="req-deadline")
        assert late.value.code == "DEADLINE_EXCEEDED"
        store.gate.set()  # the server finishes the submit the client gave up on
        job = client.preprocess(source, base_size=64, request_id="req-deadline")
        assert client.wait(job).state == S.JOB_STATE_SUCCEEDED
        assert [j.job_id for j in client.list_jobs("preprocessing")] == [job.job_id]
        impatient.close()
        client.close()


@pytest.fixture
def job_server(tmp_path):
    """A real gRPC JobService over a runtime whose handler the test controls; yields (runtime, stub,
    release, watch_closed): the handler waits for `release`, then emits EVENTS log events."""
    release, watch_closed = threading.Event(), threading.Event()

    def chatty(ctx, spec):
        assert release.wait(60)
        for i in range(EVENTS):
            ctx.log(f"event {i} " + "x" * 2000)
        return preprocessing_pb2.PreprocessResult(dataset_id="ds-chatty")

    runtime = JobRuntime("preprocessing", "pre", LocalStore(tmp_path / "store"), chatty)
    watch = runtime.watch

    def recorded_watch(job_id, *args, **kwargs):
        try:
            yield from watch(job_id, *args, **kwargs)
        finally:
            watch_closed.set()

    runtime.watch = recorded_watch
    runtime.start()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    jobs_pb2_grpc.add_JobServiceServicer_to_server(JobServicer(runtime), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    # No BDP probing: the stream's window stays at 64 KB, so an unread stream stalls the sender early.
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.http2.bdp_probe", 0)])
    try:
        yield runtime, jobs_pb2_grpc.JobServiceStub(channel), release, watch_closed
    finally:
        release.set()
        channel.close()
        server.stop(1).wait()
        runtime.shutdown()


def test_a_watch_nobody_reads_never_holds_the_job_back(job_server):
    runtime, stub, release, _ = job_server
    job = runtime.submit(preprocessing_pb2.PreprocessSpec(source_prefix="uploads/x/"), request_id="slow-watch")
    stream = stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id), timeout=120)
    first = next(stream)  # the stream is open; from here on nobody reads it
    release.set()  # the job emits its events now
    finished = list(runtime.watch(job.job_id))[-1].job  # a second watcher, in the server's own process
    assert finished.state == S.JOB_STATE_SUCCEEDED

    late = [first, *stream]
    assert late[-1].job.state == S.JOB_STATE_SUCCEEDED
    sequences = [e.sequence for e in late]
    assert sequences == sorted(set(sequences))
    # The unread stream fell behind and, read again, skipped what the server no longer keeps: the
    # job never waited for it.
    assert any(after - before > 1 for before, after in itertools.pairwise(sequences))
    assert len(late) < EVENTS
    assert len(runtime._logs[job.job_id].events) <= runtime_module.EVENTS_KEPT


def test_a_watch_the_client_cancels_ends_on_the_server(job_server):
    runtime, stub, release, watch_closed = job_server
    job = runtime.submit(preprocessing_pb2.PreprocessSpec(source_prefix="uploads/x/"), request_id="cancelled-watch")
    stream = stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id), timeout=120)
    next(stream)
    stream.cancel()
    assert watch_closed.wait(30), "the server kept streaming to a client that had gone"
    assert runtime.get(job.job_id).state not in TERMINAL  # the job itself is not affected
    release.set()
    assert list(runtime.watch(job.job_id))[-1].job.state == S.JOB_STATE_SUCCEEDED

"""The job runtime while the store refuses its record writes: the job is not stopped by it, watchers
see every change, and the record reaches the store once it answers again."""

from __future__ import annotations

import threading
import time

from fluxlora.common.storage import LocalStore
from fluxlora.jobs import recorder
from fluxlora.jobs.runtime import JobRuntime
from fluxlora_api.shared.errors import Unavailable
from fluxlora_api.v1 import jobs_pb2, preprocessing_pb2

S = jobs_pb2.JobState


class FlakyRecords(LocalStore):
    """Job-record writes fail with Unavailable (as S3Store's do once its retries are spent) while `down`."""

    def __init__(self, root):
        super().__init__(root)
        self.down = threading.Event()

    def put_file(self, key, path, content_type="application/octet-stream"):
        if self.down.is_set() and key.startswith("jobs/"):
            raise Unavailable(f"object store unreachable while writing {key!r}")
        return super().put_file(key, path, content_type)


def test_a_job_outlives_record_writes_the_store_refuses_and_its_record_is_written_later(tmp_path, monkeypatch):
    monkeypatch.setattr(recorder, "RESAVE_INTERVAL_S", 0.05)
    store = FlakyRecords(tmp_path / "store")
    started, finish = threading.Event(), threading.Event()

    def handler(ctx, spec):
        started.set()
        assert finish.wait(30)
        ctx.progress("working", 1, 1, "item")
        return preprocessing_pb2.PreprocessResult(dataset_id="ds-1")

    runtime = JobRuntime("preprocessing", "pre", store, handler)
    runtime.start()
    try:
        job = runtime.submit(preprocessing_pb2.PreprocessSpec(source_prefix="uploads/x/"), request_id="r1")
        assert started.wait(30)
        store.down.set()
        finish.set()
        events = list(runtime.watch(job.job_id))
        assert events[-1].job.state == S.JOB_STATE_SUCCEEDED  # watchers saw the end the store did not
        assert store.get_json(f"jobs/preprocessing/{job.job_id}.json")["state"] == "JOB_STATE_RUNNING"

        store.down.clear()
        deadline = time.monotonic() + 30
        while store.get_json(f"jobs/preprocessing/{job.job_id}.json")["state"] != "JOB_STATE_SUCCEEDED":
            assert time.monotonic() < deadline, "the record was never written again"
            time.sleep(0.02)
    finally:
        runtime.shutdown()

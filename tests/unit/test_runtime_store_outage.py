"""The job runtime while the store refuses its record writes: the job is not stopped by it, watchers
see every change but its end, and the end is told once its record reaches the store."""

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
        watcher = runtime.watch(job.job_id)
        first = next(watcher)  # a watcher following the job from here
        store.down.set()
        finish.set()
        deadline = time.monotonic() + 30
        while not runtime.get(job.job_id).progress.stage.startswith("finished; recording the result"):
            assert time.monotonic() < deadline, "the job never said it waits to record its result"
            time.sleep(0.02)
        now = runtime.get(job.job_id)  # the end is not told before the store holds it
        assert now.state == S.JOB_STATE_RUNNING and "the store is unavailable, retrying" in now.progress.stage
        assert store.get_json(f"jobs/preprocessing/{job.job_id}.json")["state"] == "JOB_STATE_RUNNING"

        store.down.clear()
        events = [first, *watcher]
        assert events[-1].job.state == S.JOB_STATE_SUCCEEDED
        assert events[-1].job.progress.stage == "working"  # the job's own progress, not the notice
        assert any("recording the result" in e.message for e in events)  # watchers were told why they wait
        assert store.get_json(f"jobs/preprocessing/{job.job_id}.json")["state"] == "JOB_STATE_SUCCEEDED"
    finally:
        runtime.shutdown()

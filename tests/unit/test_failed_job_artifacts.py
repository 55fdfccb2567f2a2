"""A job that ends without a result names its artifacts as the store holds them: an output its worker
rewrote in place after the last report its server read (a run's loss.csv after each checkpoint; the
server or the worker killed in between) is named with the bytes that are stored, not the older ones.
Found by the 30-minute chaos run (artifacts_complete on S3)."""

from __future__ import annotations

import hashlib
import threading

from fluxlora.common.config import Settings
from fluxlora.jobs import artifact_refs
from fluxlora.jobs.runtime import JobRuntime
from fluxlora_api.shared.errors import FailedPrecondition, Unavailable
from fluxlora_api.v1 import jobs_pb2, preprocessing_pb2

S = jobs_pb2.JobState
SPEC = preprocessing_pb2.PreprocessSpec(source_prefix="uploads/x/", base_size=512)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_to_failure(store, handler) -> jobs_pb2.Job:
    runtime = JobRuntime("preprocessing", "pre", store, handler, settings=Settings(store="unused"))
    runtime.start()
    try:
        job = runtime.submit(SPEC)
        done = threading.Event()
        for event in runtime.watch(job.job_id):
            if event.job.state == S.JOB_STATE_FAILED:
                done.set()
        assert done.is_set()
        return runtime.get(job.job_id)
    finally:
        runtime.shutdown()


def test_a_failed_job_names_the_bytes_stored_for_an_output_rewritten_after_its_last_report(store, tmp_path):
    key = "runs/x/loss.csv"

    def handler(ctx, spec):
        ctx.add_artifact(store.put_bytes(key, b"step,loss\n3,0.5\n", "text/csv"), "loss-csv")
        ctx.add_artifact(store.put_bytes("runs/x/lora.safetensors", b"weights", "application/octet-stream"), "lora")
        store.put_bytes(key, b"step,loss\n3,0.5\n6,0.4\n", "text/csv")  # rewritten; the report of it is lost
        raise FailedPrecondition("the next attempt failed")

    job = run_to_failure(store, handler)
    assert job.error.code == "FAILED_PRECONDITION"
    refs = {ref.key: ref for ref in job.artifacts}
    stored = store.get_bytes(key)
    assert refs[key].sha256 == sha(stored) and refs[key].size_bytes == len(stored)
    assert refs["runs/x/lora.safetensors"].sha256 == sha(b"weights")
    assert job.artifacts[0].sha256 == sha(stored)  # every reference to the key, the first one too


def test_a_store_that_cannot_answer_leaves_the_references_as_reported(store):
    class Down:
        def stat(self, key):
            raise Unavailable("the store is down")

    ref = jobs_pb2.ArtifactRef(key="runs/x/loss.csv", size_bytes=3, sha256="abc")
    assert artifact_refs.refresh_artifacts(Down(), [ref, jobs_pb2.ArtifactRef(key="runs/x/loss.png")]) == 0
    assert (ref.size_bytes, ref.sha256) == (3, "abc")

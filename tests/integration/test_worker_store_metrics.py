"""A worker in its own process (FLUXLORA_RUNNER=process) makes object-store calls that its exit would
take along: its report carries the totals, and the service that reads the report adds them to its
/metrics (requests by operation and outcome, their latency buckets), keeping them out of the job's
record. On S3 (moto), where every call is counted."""

from __future__ import annotations

import pytest
from metrics_support import scrape, total

from fluxlora.common.config import Settings
from fluxlora.demo.sample_data import write_sample_photos
from fluxlora.jobs.worker import report_key
from fluxlora.server.bootstrap import start_server
from fluxlora_api.v1 import jobs_pb2
from fluxlora_client import FluxloraClient
from support import make_s3_store

pytestmark = pytest.mark.timeout(300)
S = jobs_pb2.JobState
SECONDS = "fluxlora_store_request_duration_seconds"


def test_a_process_workers_store_calls_show_in_the_services_metrics_after_it_exits(moto_endpoint, tmp_path):
    store = make_s3_store(moto_endpoint)
    settings = Settings(store="unused", s3_endpoint=moto_endpoint, s3_access_key="test", s3_secret_key="test",
                        cache_dir=tmp_path / "cache", runner="process", metrics_port=0)
    server = start_server("preprocessing", settings, store=store, port=0)
    write_sample_photos(tmp_path / "photos", count=3, seed=6)
    try:
        with FluxloraClient(preprocessing=server.address) as client:
            source = client.upload_photos(tmp_path / "photos")
            before = scrape(server.metrics_port)
            job = client.wait(client.preprocess(source, base_size=64), raise_on_failure=False)
            after = scrape(server.metrics_port)
    finally:
        server.stop(grace=1.0)
    assert job.state == S.JOB_STATE_SUCCEEDED, job.error
    assert job.metrics["worker_pid"] and not [k for k in job.metrics if k.startswith("store/")]

    # what the worker counted (its report keeps the totals) is in the server's metrics now
    worker = store.get_json(report_key("preprocessing", job.job_id))["metrics"]
    counted = {(key.split("/")[1], key.split("/")[2]): n for key, n in worker.items()
               if key.startswith("store/") and key.endswith("/n")}
    assert counted.get(("read", "ok")) and counted.get(("write", "ok")), worker
    for (operation, outcome), n in counted.items():
        grew = total(after, f"{SECONDS}_count", operation=operation, outcome=outcome) - total(
            before, f"{SECONDS}_count", operation=operation, outcome=outcome)
        assert grew >= n, (operation, outcome, grew, n)
        assert total(after, f"{SECONDS}_bucket", operation=operation, outcome=outcome, le="+Inf") == total(
            after, f"{SECONDS}_count", operation=operation, outcome=outcome)

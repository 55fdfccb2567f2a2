"""Through the SDK, the CLI and raw gRPC: a server that keeps only FLUXLORA_FINISHED_JOBS_IN_MEMORY
finished jobs in memory still answers for every job it ever ran (GetJob, WatchJob, a resubmit of a
request_id, ListJobs page by page), before and after a restart. Counts only, no timings."""

from __future__ import annotations

import contextlib

import grpc
import pytest

from fluxlora.common.storage import LocalStore
from fluxlora.jobs.records import JobRecords
from fluxlora_api.v1 import jobs_pb2, jobs_pb2_grpc
from fluxlora_client import FluxloraClient
from support import fluxlora, preprocessing_server

S = jobs_pb2.JobState
KEPT = 2
JOBS = 6


@contextlib.contextmanager
def server_and_client(tmp_path, store):
    with preprocessing_server(tmp_path, store=store, finished_jobs_in_memory=KEPT) as server, \
            FluxloraClient(preprocessing=server.address) as sdk:
        yield server, sdk


def test_every_finished_job_is_answered_though_the_server_holds_two(store, tmp_path, photos):
    with server_and_client(tmp_path, store) as (server, sdk):
        source = sdk.upload_photos(photos)
        ids = [sdk.wait(sdk.preprocess(source, base_size=64, request_id=f"hist-{i}")).job_id for i in range(JOBS)]
        assert server.runtime.held() == {"active": 0, "finished": KEPT, "event_buffers": KEPT, "request_ids": KEPT}

        oldest = sdk.get_job(ids[0])
        assert oldest.state == S.JOB_STATE_SUCCEEDED and sdk.result(oldest).image_count > 0
        assert sdk.wait(ids[1]).state == S.JOB_STATE_SUCCEEDED  # a watch of a finished job: its final state
        again = sdk.preprocess(source, base_size=64, request_id="hist-2")
        assert again.job_id == ids[2] and again.state == S.JOB_STATE_SUCCEEDED  # not run again
        assert JobRecords(store, "preprocessing").recorded_ids() == set(ids)
        assert server.runtime.held()["finished"] == KEPT

        assert [j.job_id for j in sdk.list_jobs("preprocessing", page_size=4, limit=0)] == ids[::-1]
        assert [j.job_id for j in sdk.list_jobs("preprocessing", limit=3)] == ids[:2:-1]
        assert [j.job_id for j in sdk.iter_jobs("preprocessing", states=[S.JOB_STATE_SUCCEEDED], page_size=1)] \
            == ids[::-1]

        with grpc.insecure_channel(server.address) as channel:
            stub = jobs_pb2_grpc.JobServiceStub(channel)
            first = stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=JOBS - 1), timeout=10)
            last = stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=JOBS - 1, page_token=first.next_page_token),
                                 timeout=10)
            assert [j.job_id for j in [*first.jobs, *last.jobs]] == ids[::-1] and last.next_page_token == ""
            with pytest.raises(grpc.RpcError) as bad:
                stub.ListJobs(jobs_pb2.ListJobsRequest(page_token="not-a-token"), timeout=10)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "next_page_token" in bad.value.details()

    with server_and_client(tmp_path, store) as (server, sdk):  # a restart reads no finished record
        assert server.runtime.held() == {"active": 0, "finished": 0, "event_buffers": 0, "request_ids": 0}
        assert [j.job_id for j in sdk.list_jobs("preprocessing", limit=0)] == ids[::-1]
        assert sdk.preprocess(sdk.upload_photos(photos), base_size=64, request_id="hist-0").job_id == ids[0]


def test_jobs_list_shows_the_newest_limit_jobs(tmp_path, photos, monkeypatch):
    store = LocalStore(tmp_path / "store")
    with server_and_client(tmp_path, store) as (server, sdk):
        source = sdk.upload_photos(photos)
        ids = [sdk.wait(sdk.preprocess(source, base_size=64)).job_id for _ in range(3)]
        monkeypatch.setenv("FLUXLORA_STORE", str(store.root))
        monkeypatch.setenv("FLUXLORA_PREPROCESSING_ADDR", server.address)
        monkeypatch.setenv("COLUMNS", "250")  # rich wraps table cells to the terminal width

        listed = fluxlora("jobs", "list", "preprocessing", "--limit", "2")
        assert listed.exit_code == 0, listed.output
        assert ids[2] in listed.stdout and ids[1] in listed.stdout and ids[0] not in listed.stdout

        every = fluxlora("jobs", "list", "preprocessing", "--limit", "0")
        assert every.exit_code == 0 and all(job_id in every.stdout for job_id in ids)

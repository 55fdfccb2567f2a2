"""Fifty concurrent SDK clients, each on its own channel, submitting and watching small preprocessing
jobs against a real server: no job lost or duplicated, duplicates of a request_id answered with the
same job, a full queue refusing the surplus with RESOURCE_EXHAUSTED (and storing nothing for it),
watch streams capped so submits and health checks always get a thread, and server threads and
watchers bounded. Counts only: nothing here asserts how long anything took."""

from __future__ import annotations

import contextlib
import threading
import types
import uuid
from collections import Counter
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from metrics_support import label_values, scrape, total
from PIL import Image

from fluxlora.common.storage import LocalStore
from fluxlora.jobs.runtime import EVENTS_KEPT
from fluxlora.server.bootstrap import RPC_THREADS, RunningServer
from fluxlora_api.v1 import jobs_pb2, jobs_pb2_grpc
from fluxlora_client import FluxloraClient, FluxloraClientError
from support import preprocessing_server, put_photos, wait_until

S = jobs_pb2.JobState
CLIENTS = 50
BASE_SIZE = 64


def write_photos(folder: Path, seed: int) -> Path:
    """Two small flat photos, different for every seed (so every client makes its own dataset)."""
    folder.mkdir(parents=True)
    for k in range(2):
        Image.new("RGB", (96, 96), ((seed * 5) % 256, 60 + 120 * k, (seed * 11) % 256)).save(folder / f"p{k}.png")
    return folder


@contextlib.contextmanager
def client_for_store(tmp_path: Path, store=None):
    """Puts photos into the store the server will use, before it runs (support.put_photos)."""
    store = store or LocalStore(tmp_path / "store")
    yield types.SimpleNamespace(upload_photos=lambda folder: put_photos(store, folder, uuid.uuid4().hex[:12]))


def client_for(server: RunningServer) -> FluxloraClient:
    return FluxloraClient(preprocessing=server.address)


def run_clients(count: int, body) -> list[BaseException]:
    """`body(i)` on `count` threads released together; the exceptions they raised."""
    barrier, errors = threading.Barrier(count), []

    def run(i: int) -> None:
        try:
            barrier.wait(30)
            body(i)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), name=f"load-client-{i}") for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads), "a client never finished"
    return errors


def server_threads(server: RunningServer) -> int:
    """Threads of the server's gRPC pool (named after the service: preprocessing_<n>)."""
    return sum(t.name.startswith(f"{server.definition.name}_") for t in threading.enumerate())


def stored_records(server: RunningServer) -> dict[str, jobs_pb2.Job]:
    records = {}
    for info in server.store.list("jobs/preprocessing/"):
        job = json_format.Parse(server.store.get_bytes(info.key), jobs_pb2.Job())
        records[job.job_id] = job
    return records


class Sampler:
    """Records the most server threads and open watch streams seen while the clients run."""

    def __init__(self, server: RunningServer):
        self.server, self.threads, self.watchers = server, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.threads = max(self.threads, server_threads(self.server))
            self.watchers = max(self.watchers, self.server.runtime.watchers)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.parametrize("store", ["local", pytest.param("s3", marks=pytest.mark.slow)], indirect=True)
def test_fifty_clients_submit_and_watch_and_every_job_runs_exactly_once(store, tmp_path):
    uploads = {}
    with client_for_store(tmp_path, store) as uploader:
        for i in range(CLIENTS):
            uploads[i] = uploader.upload_photos(write_photos(tmp_path / "photos" / str(i), i))
    replies: list[tuple[str, str]] = []  # (request_id, job_id) of every accepted submit
    finals: dict[tuple[int, str], jobs_pb2.Job] = {}
    event_orders: list[list[int]] = []

    with preprocessing_server(tmp_path, store=store, workers=2, metrics_port=0) as server:
        def client(i: int) -> None:
            with client_for(server) as sdk:
                own = sdk.preprocess(uploads[i], base_size=BASE_SIZE, request_id=f"load-{i:02d}")
                replies.append((f"load-{i:02d}", own.job_id))
                watched = [own.job_id]
                if i % 5 == 0:  # a retry of a neighbour's request, racing with the neighbour's own submit
                    neighbour = (i + 1) % CLIENTS
                    dup = sdk.preprocess(uploads[neighbour], base_size=BASE_SIZE, request_id=f"load-{neighbour:02d}")
                    replies.append((f"load-{neighbour:02d}", dup.job_id))
                    watched.append(dup.job_id)
                for job_id in watched:
                    events: list[jobs_pb2.JobEvent] = []
                    finals[(i, job_id)] = sdk.wait(job_id, on_event=events.append)
                    event_orders.append([e.sequence for e in events])

        with Sampler(server) as sampled:
            errors = run_clients(CLIENTS, client)
        assert errors == []
        wait_until(lambda: server.runtime.watchers == 0, "every watch stream released", timeout=30.0)

        # None lost, none duplicated: one job per distinct request_id, duplicates answered with it.
        by_request: dict[str, set[str]] = {}
        for request_id, job_id in replies:
            by_request.setdefault(request_id, set()).add(job_id)
        assert len(replies) == CLIENTS + CLIENTS // 5
        assert sorted(by_request) == [f"load-{i:02d}" for i in range(CLIENTS)]
        assert all(len(ids) == 1 for ids in by_request.values()), "a request_id got two jobs"
        job_ids = {next(iter(ids)) for ids in by_request.values()}
        assert len(job_ids) == CLIENTS

        # The server and the store agree, and every job ran to success once.
        listed = server.runtime.list(limit=1000)
        assert {j.job_id for j in listed} == job_ids and len(listed) == CLIENTS
        records = stored_records(server)
        assert set(records) == job_ids
        assert {r.request_id: r.job_id for r in records.values()} == {k: next(iter(v)) for k, v in by_request.items()}
        assert Counter(r.state for r in records.values()) == {S.JOB_STATE_SUCCEEDED: CLIENTS}
        assert len({r.result.value for r in records.values()}) == CLIENTS  # fifty datasets, fifty results
        assert all(f.state == S.JOB_STATE_SUCCEEDED for f in finals.values())
        assert len(finals) == CLIENTS + CLIENTS // 5
        assert all(order == sorted(order) for order in event_orders)

        # Bounded: watch streams within the cap, the gRPC pool within watchers + RPC threads, per-job
        # event buffers within EVENTS_KEPT, and nothing left open once the clients are gone.
        assert 0 < sampled.watchers <= server.settings.max_watchers
        assert sampled.threads <= server.settings.max_watchers + RPC_THREADS
        assert all(len(log.events) <= EVENTS_KEPT for log in server.runtime._logs.values())
        assert server.runtime.watchers == 0

        # Metrics count every job and request, and no label takes a job id, request id or address.
        samples = scrape(server.metrics_port)
        assert total(samples, "fluxlora_jobs_finished_total", service="preprocessing", state="succeeded") >= CLIENTS
        assert total(samples, "grpc_server_handled_total", service="preprocessing",
                     grpc_method="SubmitPreprocess") >= CLIENTS + CLIENTS // 5
        labels = label_values(samples, "grpc_server") | label_values(samples, "fluxlora_")
        assert not [v for vs in labels.values() for v in vs if "pre-" in v or "load-" in v or "127.0.0.1" in v]
        assert len(labels["grpc_method"]) <= 40 and len(labels["grpc_code"]) <= 17
        assert len([k for k in samples if k[0] == "grpc_server_handled_total"]) <= 60


def test_a_full_queue_refuses_the_surplus_with_resource_exhausted_and_stores_nothing_for_it(tmp_path):
    limit = 8
    gate = threading.Event()
    with client_for_store(tmp_path) as uploader:
        source = uploader.upload_photos(write_photos(tmp_path / "photos", 1))
    with preprocessing_server(tmp_path, gate=gate, workers=1, max_queued_jobs=limit) as server, \
            client_for(server) as sdk:
        blocker = sdk.preprocess(source, base_size=BASE_SIZE, request_id="blocker")
        wait_until(lambda: sdk.get_job(blocker.job_id).state == S.JOB_STATE_RUNNING,
                   "the first job running", timeout=30.0)

        accepted: dict[str, str] = {}
        refused: dict[str, FluxloraClientError] = {}

        def client(i: int) -> None:
            with client_for(server) as own:
                try:
                    accepted[f"full-{i:02d}"] = own.preprocess(source, base_size=BASE_SIZE,
                                                               request_id=f"full-{i:02d}").job_id
                except FluxloraClientError as err:
                    refused[f"full-{i:02d}"] = err

        assert run_clients(CLIENTS, client) == []
        assert len(accepted) == limit and len(refused) == CLIENTS - limit
        for err in refused.values():
            assert err.code == "RESOURCE_EXHAUSTED"
            assert f"the limit is {limit}" in err.message and "FLUXLORA_MAX_QUEUED_JOBS" in err.message

        # A retry of an accepted request is answered with its job even though the queue is full.
        some_request, its_job = next(iter(accepted.items()))
        assert sdk.preprocess(source, base_size=BASE_SIZE, request_id=some_request).job_id == its_job

        # Nothing was stored for a refused submit.
        records = stored_records(server)
        assert set(records) == {blocker.job_id, *accepted.values()}
        assert not {r.request_id for r in records.values()} & set(refused)

        gate.set()
        for job_id in [blocker.job_id, *accepted.values()]:
            assert sdk.wait(job_id).state == S.JOB_STATE_SUCCEEDED

        # Once the queue drained, a refused request retried with its request_id runs.
        retried = sdk.wait(sdk.preprocess(source, base_size=BASE_SIZE, request_id=next(iter(refused))))
        assert retried.state == S.JOB_STATE_SUCCEEDED and retried.job_id not in records
        assert len(stored_records(server)) == limit + 2


def test_watchers_beyond_the_limit_are_refused_while_submits_and_health_still_answer(tmp_path):
    max_watchers = 4
    gate = threading.Event()
    with client_for_store(tmp_path) as uploader:
        source = uploader.upload_photos(write_photos(tmp_path / "photos", 2))
    with preprocessing_server(tmp_path, gate=gate, workers=1, max_watchers=max_watchers) as server, \
            client_for(server) as sdk:
        jobs = [sdk.preprocess(source, base_size=BASE_SIZE) for _ in range(max_watchers + 1)]
        stub = jobs_pb2_grpc.JobServiceStub(channel := grpc.insecure_channel(server.address))
        streams = [stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id)) for job in jobs[:max_watchers]]
        for stream in streams:
            next(stream)  # the first event: the stream is open on the server
        assert server.runtime.watchers == max_watchers

        with pytest.raises(grpc.RpcError) as refused:
            next(stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=jobs[-1].job_id)))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"the limit is {max_watchers}" in refused.value.details()
        assert "FLUXLORA_MAX_WATCHERS" in refused.value.details()

        # Every watcher slot taken, yet the server still answers everything else at once.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert sdk.get_job(jobs[-1].job_id).state == S.JOB_STATE_QUEUED
        more = sdk.preprocess(source, base_size=BASE_SIZE)

        # Fifty SDK clients waiting on a server with four watch slots: the rest poll GetJob, and all
        # see their jobs finish.
        finals: list[jobs_pb2.Job] = []

        def waiter(i: int) -> None:
            with client_for(server) as own:
                finals.append(own.wait(jobs[i % len(jobs)].job_id))

        waiters = threading.Thread(target=run_clients, args=(CLIENTS, waiter))
        waiters.start()
        gate.set()
        waiters.join(120)
        for stream in streams:
            assert list(stream)[-1].job.state == S.JOB_STATE_SUCCEEDED
        assert len(finals) == CLIENTS and all(f.state == S.JOB_STATE_SUCCEEDED for f in finals)
        assert sdk.wait(more).state == S.JOB_STATE_SUCCEEDED
        wait_until(lambda: server.runtime.watchers == 0, "every watch stream released", timeout=30.0)
        channel.close()

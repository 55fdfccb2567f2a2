"""Two replicas of one service on one store (issue 14), as real `fluxlora serve preprocessing` processes
with 3-second job leases, on each store kind:

- submits spread across both (alternating clients); the same request_id sent to both at once makes one job;
- either replica answers GetJob / ListJobs for the other's jobs;
- one replica is SIGKILLed (its whole process group) while it processes a job and holds others queued:
  the other takes them over once their leases expire, and every job finishes exactly once (one record
  per request_id, SUCCEEDED, started once more at most: the killed run), with whole artifacts;
- a watcher connected to the killed replica continues on the other and sees the one terminal state.

The watcher reaches the replicas through one gRPC target naming both addresses
(`ipv4:127.0.0.1:A,127.0.0.1:B`): gRPC's default pick_first policy connects to the first, and when it
dies the SDK's watch reconnects (as it does across a restart) and the channel picks the other address.
No SDK change is needed: behind a Kubernetes Service the one address is the Service's, and a reconnect
lands on any live pod. Submits are spread by two clients, one per replica, taking turns: deterministic,
so the test knows which jobs the killed replica held.
"""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

from fluxlora.common.storage import ArtifactStore
from fluxlora.demo.sample_data import write_sample_photos
from fluxlora_api.v1 import jobs_pb2
from fluxlora_client import FluxloraClient
from support import ServiceProcess, wait_until

pytestmark = pytest.mark.timeout(300)
S = jobs_pb2.JobState
TERMINAL = (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED)
LEASE_S = "3"
BIG = dict(count=64, base_size=512)  # a job that takes seconds on one core, so the kill lands mid-job


def replica(name: str, store: ArtifactStore, tmp_path, **env: str) -> ServiceProcess:
    folder = tmp_path / name
    folder.mkdir()
    return ServiceProcess("preprocessing", store, folder, FLUXLORA_REPLICA_ID=name, FLUXLORA_LEASE_SECONDS=LEASE_S,
                          **env)


def records(store: ArtifactStore) -> list[dict]:
    return [store.get_json(info.key) for info in store.list("jobs/preprocessing/") if info.key.count("/") == 2]


def lease_owners(store: ArtifactStore, job_id: str) -> list[str]:
    """The replicas that held the job, epoch by epoch."""
    return [store.get_json(info.key)["owner"] for info in store.list(f"jobs/leases/preprocessing/{job_id}/")]


# Over S3 (moto) it takes ~25 s: the slow tier; the local store runs it in the fast one.
@pytest.mark.parametrize("store", ["local", pytest.param("s3", marks=pytest.mark.slow)], indirect=True)
def test_a_replica_killed_mid_job_loses_nothing_and_its_watcher_continues_on_the_other(store, tmp_path, processes):
    a, b = replica("replica-a", store, tmp_path), replica("replica-b", store, tmp_path)
    processes += [a.start(), b.start()]
    logs = lambda: f"--- a\n{a.logs()}\n--- b\n{b.logs()}"  # noqa: E731
    on_a, on_b = FluxloraClient(preprocessing=a.address), FluxloraClient(preprocessing=b.address)
    both = FluxloraClient(preprocessing=f"ipv4:{a.address},{b.address}", reconnect_for_s=120)
    big, small = tmp_path / "big", tmp_path / "small"
    write_sample_photos(big, count=BIG["count"], seed=3)
    write_sample_photos(small, count=3, seed=4)
    big_source, small_source = on_a.upload_photos(big), on_b.upload_photos(small)

    # a processes the big job; the small ones alternate between the replicas (a's wait in its queue)
    submitted = {"req-big": on_a.preprocess(big_source, base_size=BIG["base_size"], request_id="req-big")}
    for i in range(6):
        client = (on_a, on_b)[i % 2]
        submitted[f"req-{i}"] = client.preprocess(small_source, base_size=64, request_id=f"req-{i}")
    # the same request_id sent to both replicas at once: one job
    for i in range(3):
        answers: dict[str, jobs_pb2.Job] = {}
        barrier = threading.Barrier(2)

        def send(name, client, i=i, answers=answers, barrier=barrier):
            barrier.wait()
            answers[name] = client.preprocess(small_source, base_size=128, request_id=f"req-dup-{i}")

        threads = [threading.Thread(target=send, args=(n, c)) for n, c in (("a", on_a), ("b", on_b))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert answers["a"].job_id == answers["b"].job_id, f"req-dup-{i} made two jobs"
        submitted[f"req-dup-{i}"] = answers["a"]
    held_by_a = {rid for rid, job in submitted.items() if lease_owners(store, job.job_id)[:1] == ["replica-a"]}
    assert {"req-big", "req-0", "req-2", "req-4"} <= held_by_a and not {"req-1", "req-3", "req-5"} & held_by_a

    big_job = submitted["req-big"]
    events: list[jobs_pb2.JobEvent] = []
    outcome: dict = {}
    watcher = threading.Thread(target=lambda: outcome.update(
        final=both.wait(big_job, on_event=events.append, raise_on_failure=False)), daemon=True)
    watcher.start()

    def midway() -> bool:
        job = on_a.get_job(big_job.job_id)  # (a job already finished fails the asserts below)
        return job.progress.stage == "processing images" or job.state in TERMINAL

    wait_until(midway, "the big job midway on replica a", logs=logs)
    # b answers for a's jobs from the store
    assert on_b.get_job(big_job.job_id).state == S.JOB_STATE_RUNNING
    assert {j.job_id for j in on_b.list_jobs("preprocessing", limit=0)} == {j.job_id for j in submitted.values()}
    wait_until(lambda: any(e.sequence > 0 for e in events), "the watcher's events from replica a", logs=logs)
    assert all(e.sequence > 0 for e in events), "the watch stream is on replica a (b has no events numbered)"
    a.kill()
    assert store.get_json(f"jobs/preprocessing/{big_job.job_id}.json")["state"] == "JOB_STATE_RUNNING"

    finished = {rid: on_b.wait(job, raise_on_failure=False) for rid, job in submitted.items()}
    assert {S.Name(job.state) for job in finished.values()} == {"JOB_STATE_SUCCEEDED"}, logs()
    watcher.join(120)
    assert not watcher.is_alive(), logs()
    assert outcome["final"].state == S.JOB_STATE_SUCCEEDED
    assert [e.job.state for e in events if e.job.state in TERMINAL] == [S.JOB_STATE_SUCCEEDED]
    assert any(e.sequence == 0 or e.job.attempts == 2 for e in events), "the watcher never heard from b"

    # every job once: one record per request_id, each finished, started once (the big job: a's start, b's)
    time.sleep(2 * float(LEASE_S))  # a late run or record would show up by now
    stored = records(store)
    assert sorted(r["requestId"] for r in stored) == sorted(submitted)
    assert {r["state"] for r in stored} == {"JOB_STATE_SUCCEEDED"}
    attempts = {r["requestId"]: r.get("attempts", 0) for r in stored}
    assert attempts.pop("req-big") == 2 and set(attempts.values()) == {1}, attempts
    for rid in held_by_a:  # taken over by b
        assert lease_owners(store, submitted[rid].job_id)[-1] == "replica-b", rid
    assert on_b.preprocess(big_source, base_size=BIG["base_size"], request_id="req-big").job_id == big_job.job_id
    assert list(store.list("jobs/active/preprocessing/")) == []

    for job in finished.values():  # whole artifacts: each referenced object has the bytes its checksum names
        latest = {ref.key: ref for ref in job.artifacts}
        assert latest
        for key, ref in latest.items():
            assert hashlib.sha256(store.get_bytes(key)).hexdigest() == ref.sha256, key
    for client in (on_a, on_b, both):
        client.close()

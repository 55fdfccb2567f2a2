"""The job runtime's memory stays bounded however many jobs a server has run: it holds its unfinished
jobs and the last `finished_in_memory` finished ones; older ones are answered from the store (GetJob,
WatchJob, a resubmit of their request_id), ListJobs pages through the store, and a restart reads only
the records of unfinished jobs. Counts only: nothing here asserts how long anything took."""

from __future__ import annotations

import threading

import pytest

from fluxlora.common.storage import LocalStore
from fluxlora.jobs import listing
from fluxlora.jobs.records import JobRecords
from fluxlora.jobs.runtime import JobRuntime
from fluxlora_api.shared.errors import FailedPrecondition, InvalidArgument, Unavailable
from fluxlora_api.v1 import jobs_pb2, preprocessing_pb2

S = jobs_pb2.JobState
LIMIT = 5


def spec(size: int = 64) -> preprocessing_pb2.PreprocessSpec:
    return preprocessing_pb2.PreprocessSpec(source_prefix="uploads/x/", base_size=size)


class Handler:
    """Counts its runs; fails the jobs whose base_size is odd."""

    def __init__(self):
        self.runs: list[str] = []

    def __call__(self, ctx, spec):
        self.runs.append(ctx.job_id)
        ctx.progress("working", 1, 1, "item")
        if spec.base_size % 2:
            raise ValueError(f"base_size {spec.base_size} is odd")
        return preprocessing_pb2.PreprocessResult(dataset_id=f"ds-{ctx.job_id}", image_count=spec.base_size)


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


@pytest.fixture
def runtimes():
    started: list[JobRuntime] = []

    def make(store, handler, limit=LIMIT, **kw) -> JobRuntime:
        runtime = JobRuntime("preprocessing", "pre", store, handler, finished_in_memory=limit, **kw)
        runtime.start()
        started.append(runtime)
        return runtime

    yield make
    for runtime in started:
        runtime.shutdown()


@pytest.fixture
def loads(monkeypatch):
    """Every job record read from the store (by id), from now on."""
    read: list[str] = []
    original = JobRecords.load

    def spy(self, job_id):
        read.append(job_id)
        return original(self, job_id)

    monkeypatch.setattr(JobRecords, "load", spy)
    return read


def final_state(runtime: JobRuntime, job_id: str) -> jobs_pb2.Job:
    return list(runtime.watch(job_id))[-1].job


def run_jobs(runtime: JobRuntime, count: int, size=lambda i: 64, request="req") -> list[str]:
    """`count` jobs (request_ids <request>-<i>), one after another, each to its end; their ids in order."""
    ids = []
    for i in range(count):
        job = runtime.submit(spec(size(i)), request_id=f"{request}-{i}")
        assert final_state(runtime, job.job_id).state in (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED)
        ids.append(job.job_id)
    return ids


def all_pages(runtime: JobRuntime, page_size: int, states=None) -> list[list[str]]:
    pages, token = [], ""
    while True:
        jobs, token = runtime.page(states, page_size, token)
        pages.append([j.job_id for j in jobs])
        if not token:
            return pages


def test_after_fifty_finished_jobs_memory_holds_at_most_the_limit_and_no_events_of_the_others(store, runtimes):
    runtime = runtimes(store, Handler())
    ids = run_jobs(runtime, 50)
    held = runtime.held()
    assert held == {"active": 0, "finished": LIMIT, "event_buffers": LIMIT, "request_ids": LIMIT}
    assert set(runtime._logs) == set(ids[-LIMIT:])  # the event buffers of evicted jobs are gone
    assert len(JobRecords(store, "preprocessing").recorded_ids()) == 50  # every record stays in the store


def test_an_evicted_job_answers_get_watch_cancel_and_a_resubmit_of_its_request_id_from_the_store(
        store, runtimes, loads):
    handler = Handler()
    runtime = runtimes(store, handler)
    ids = run_jobs(runtime, 2 * LIMIT)
    oldest = ids[0]
    assert oldest not in runtime._logs and runtime.held()["finished"] == LIMIT

    got = runtime.get(oldest)
    assert got.state == S.JOB_STATE_SUCCEEDED and got.request_id == "req-0"
    result = preprocessing_pb2.PreprocessResult()
    assert got.result.Unpack(result) and result.dataset_id == f"ds-{oldest}"
    assert loads == [oldest]

    evicted = ids[1]
    [event] = list(runtime.watch(evicted))  # a finished job's watch: its final state, then the end
    assert event.job.state == S.JOB_STATE_SUCCEEDED and event.job.job_id == evicted

    again = runtime.submit(spec(), request_id="req-2")  # evicted too: found through its request claim
    assert again.job_id == ids[2] and again.state == S.JOB_STATE_SUCCEEDED
    assert handler.runs == ids  # nothing ran again
    assert JobRecords(store, "preprocessing").recorded_ids() == set(ids)  # and nothing new was stored

    with pytest.raises(FailedPrecondition, match="already finished"):
        runtime.cancel(ids[3])
    assert runtime.held()["finished"] == LIMIT  # what the store answered joined the LRU, within the limit


def test_a_resubmit_after_a_restart_is_answered_without_running_anything(store, runtimes):
    handler = Handler()
    first = runtimes(store, handler)
    ids = run_jobs(first, 3)
    first.shutdown()
    second = runtimes(store, handler)
    assert [second.submit(spec(), request_id=f"req-{i}").job_id for i in range(3)] == ids
    assert handler.runs == ids


def test_list_pages_cover_every_job_exactly_once_newest_first(store, runtimes, monkeypatch):
    runtime = runtimes(store, Handler())
    ids = run_jobs(runtime, 23, size=lambda i: 65 if i % 3 == 0 else 64)
    newest_first = ids[::-1]
    failed = [job_id for i, job_id in enumerate(ids) if i % 3 == 0][::-1]

    pages = all_pages(runtime, 4)
    assert [len(p) for p in pages] == [4, 4, 4, 4, 4, 3]
    assert sum(pages, []) == newest_first
    assert [j.job_id for j in runtime.list(limit=0)] == newest_first
    assert [j.job_id for j in runtime.list(limit=7)] == newest_first[:7]

    assert sum(all_pages(runtime, 4, [S.JOB_STATE_FAILED]), []) == failed

    monkeypatch.setattr(listing, "MAX_PAGE_SIZE", 6)  # a page_size beyond it gets pages of it
    jobs, token = runtime.page(page_size=10_000)
    assert [j.job_id for j in jobs] == newest_first[:6] and token

    # Filtered by state, a page reads at most MAX_SCANNED records: pages come back short, even
    # empty, with a token to go on, and still cover every matching job once.
    monkeypatch.setattr(listing, "MAX_SCANNED", 2)
    pages = all_pages(runtime, 4, [S.JOB_STATE_FAILED])
    assert [] in pages and all(len(p) <= 2 for p in pages)
    assert sum(pages, []) == failed


def test_jobs_submitted_between_pages_do_not_shift_the_later_pages(store, runtimes):
    runtime = runtimes(store, Handler())
    ids = run_jobs(runtime, 6)
    first, token = runtime.page(page_size=3)
    newer = run_jobs(runtime, 1, request="newer")
    second, token = runtime.page(page_size=3, page_token=token)
    assert [j.job_id for j in first + second] == ids[::-1] and token == ""
    assert runtime.list(limit=1)[0].job_id == newer[0]


def test_unfinished_jobs_are_listed_from_memory_in_pages(store, runtimes, loads):
    gate, started = threading.Event(), threading.Event()

    def blocked(ctx, spec):
        started.set()
        assert gate.wait(30)
        return preprocessing_pb2.PreprocessResult()

    runtime = runtimes(store, blocked)
    ids = [runtime.submit(spec()).job_id for _ in range(5)]
    assert started.wait(30)
    del loads[:]
    assert sum(all_pages(runtime, 2, [S.JOB_STATE_QUEUED]), []) == ids[:0:-1]
    assert sum(all_pages(runtime, 2, [S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING]), []) == ids[::-1]
    assert loads == []  # not one record read for it
    gate.set()


def test_a_page_token_that_was_not_issued_is_invalid_argument(store, runtimes):
    runtime = runtimes(store, Handler())
    for token in ("nonsense", "Li4vLi4vZXRj", "%%%"):
        with pytest.raises(InvalidArgument, match="next_page_token"):
            runtime.page(page_token=token)
    with pytest.raises(InvalidArgument, match="page_size"):
        runtime.page(page_size=-1)


def test_a_restarted_runtime_with_100_finished_records_reads_none_of_them(store, runtimes, loads):
    gate = threading.Event()

    def handler(ctx, spec):
        if spec.base_size == 128:  # the last job: still running when the server stops
            while not gate.is_set():
                ctx.check_cancelled()
                gate.wait(0.01)
        return preprocessing_pb2.PreprocessResult()

    first = runtimes(store, handler)
    ids = run_jobs(first, 100)
    unfinished = first.submit(spec(128), request_id="unfinished")
    first.shutdown()
    gate.set()

    del loads[:]
    second = runtimes(store, handler)
    assert loads == [unfinished.job_id]  # the one unfinished record, and none of the 100 finished
    assert final_state(second, unfinished.job_id).state == S.JOB_STATE_SUCCEEDED
    assert second.held()["finished"] == 1
    assert second.get(ids[0]).state == S.JOB_STATE_SUCCEEDED  # the others are read when asked for
    assert len(second.list(limit=0)) == 101


def test_a_watch_open_when_its_job_leaves_memory_still_ends_with_the_final_state(store, runtimes):
    gate, started = threading.Event(), threading.Event()

    def blocked(ctx, spec):
        started.set()
        assert gate.wait(30)
        return preprocessing_pb2.PreprocessResult(dataset_id="ds-late")

    runtime = runtimes(store, blocked, limit=0)  # a finished job leaves memory at once
    job = runtime.submit(spec())
    stream = runtime.watch(job.job_id)
    assert next(stream).job.state in (S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING)
    assert started.wait(30)
    gate.set()
    assert list(stream)[-1].job.state == S.JOB_STATE_SUCCEEDED
    assert runtime.held() == {"active": 0, "finished": 0, "event_buffers": 0, "request_ids": 0}
    assert runtime.get(job.job_id).state == S.JOB_STATE_SUCCEEDED


def test_a_store_written_before_the_job_index_is_indexed_once_at_start(store, runtimes, loads):
    records = JobRecords(store, "preprocessing")
    old = []
    for i, state in enumerate([S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_QUEUED]):
        job = jobs_pb2.Job(job_id=f"pre-old{i}", service="preprocessing", request_id=f"old-{i}", state=state)
        job.created_at.FromNanoseconds(1_700_000_000_000_000_000 + i)
        job.spec.Pack(spec())
        records.save(job)  # only the record, as a server before the index wrote it
        old.append(job.job_id)

    handler = Handler()
    runtime = runtimes(store, handler)
    assert sorted(loads) == sorted([*old, "pre-old2"])  # each read once to index it; the unfinished one to queue it
    assert final_state(runtime, "pre-old2").state == S.JOB_STATE_SUCCEEDED  # the unfinished one ran
    assert runtime.submit(spec(), request_id="old-0").job_id == "pre-old0"
    assert [j.job_id for j in runtime.list()] == old[::-1]
    assert handler.runs == ["pre-old2"]

    runtime.shutdown()
    del loads[:]
    runtimes(store, handler)
    assert loads == []  # indexed once for good


class RecordWritesFail(LocalStore):
    """Refuses job-record writes (as an S3 store past its retries does) while `down` is set."""

    down = False

    def put_file(self, key, path, content_type="application/octet-stream"):
        if self.down and key.startswith("jobs/preprocessing/"):
            raise Unavailable(f"object store unreachable while writing {key!r}")
        return super().put_file(key, path, content_type)


def test_a_submit_that_failed_before_storing_its_record_is_taken_over_by_its_retry(tmp_path, runtimes):
    store = RecordWritesFail(tmp_path / "store")
    handler = Handler()
    runtime = runtimes(store, handler)
    store.down = True
    with pytest.raises(Unavailable):
        runtime.submit(spec(), request_id="flaky")
    store.down = False
    assert runtime.list() == []  # the half-written submit lists nothing

    job = runtime.submit(spec(), request_id="flaky")
    assert final_state(runtime, job.job_id).state == S.JOB_STATE_SUCCEEDED
    assert runtime.submit(spec(), request_id="flaky").job_id == job.job_id
    assert handler.runs == [job.job_id]

    runtime.shutdown()
    runtimes(store, handler)  # the next start drops the failed submit's marker and index entry
    assert list(store.list("jobs/active/")) == []
    [entry] = store.list("jobs/index/")
    assert entry.key.endswith(f"-{job.job_id}")

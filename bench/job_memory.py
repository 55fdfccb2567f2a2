"""What a job runtime holds in memory after many jobs, with the finished-job LRU (FLUXLORA_FINISHED_JOBS_IN_MEMORY)
side by side with a limit as large as the job count (what the runtime held before the LRU: every job), in one run.

    .venv/bin/python bench/job_memory.py                 # 2000 jobs, LRU of 100
    .venv/bin/python bench/job_memory.py --jobs 500      # quicker

Each configuration runs the same jobs (a trivial handler that records progress, a metric and a warning)
one after another through an in-process JobRuntime on a local-directory store, then prints:
  - Python memory still allocated after the jobs (tracemalloc, after gc), and what the runtime holds
    (jobs, event buffers, request_ids);
  - a restart on that store: records read at start, and the seconds the start took, next to reading
    every record (what a start did before the job index);
and the ratios LRU / everything. The figures are about the job machinery, not any real work.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
import tracemalloc
from pathlib import Path

from fluxlora.common.storage import LocalStore
from fluxlora.jobs.records import JobRecords
from fluxlora.jobs.runtime import JobRuntime
from fluxlora_api.v1 import jobs_pb2, preprocessing_pb2

S = jobs_pb2.JobState
SPEC = preprocessing_pb2.PreprocessSpec(source_prefix="uploads/bench/", base_size=64)


def handler(ctx, spec):
    ctx.progress("working", 1, 2, "item")
    ctx.metrics(loss=0.5)
    ctx.warn("a warning, as real jobs have")
    ctx.progress("working", 2, 2, "item")
    return preprocessing_pb2.PreprocessResult(dataset_id=f"ds-{ctx.job_id}", image_count=2)


def run(root: Path, jobs: int, kept: int) -> dict:
    store = LocalStore(root)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    runtime = JobRuntime("preprocessing", "pre", store, handler, finished_in_memory=kept)
    runtime.start()
    for i in range(jobs):
        job = runtime.submit(SPEC, request_id=f"bench-{i}")
        assert list(runtime.watch(job.job_id))[-1].job.state == S.JOB_STATE_SUCCEEDED
    gc.collect()
    retained = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    held = runtime.held()
    runtime.shutdown()

    reads = []
    original = JobRecords.load

    def counting(self, job_id):
        reads.append(job_id)
        return original(self, job_id)

    JobRecords.load = counting
    try:
        started = time.perf_counter()
        again = JobRuntime("preprocessing", "pre", store, handler, finished_in_memory=kept)
        again.start()
        start_s = time.perf_counter() - started
        again.shutdown()
    finally:
        JobRecords.load = original
    records = JobRecords(store, "preprocessing")
    started = time.perf_counter()
    for job_id in records.recorded_ids():
        records.load(job_id)
    read_all_s = time.perf_counter() - started
    return {"retained": retained, "held": held, "start_reads": len(reads), "start_s": start_s, "read_all_s": read_all_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--kept", type=int, default=100, help="finished jobs kept in memory (the LRU)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lru = run(Path(tmp) / "lru", args.jobs, args.kept)
        every = run(Path(tmp) / "every", args.jobs, args.jobs)
    print(f"{args.jobs} finished jobs; LRU of {args.kept} vs a limit of {args.jobs} (every job, as before)")
    for name, r in (("LRU", lru), ("everything", every)):
        h = r["held"]
        print(f"  {name:10}  retained {r['retained'] / 2**20:7.2f} MiB  jobs {h['active'] + h['finished']:5}  "
              f"event buffers {h['event_buffers']:5}  request_ids {h['request_ids']:5}  "
              f"restart: {r['start_reads']} records read, {r['start_s']:.3f} s (reading every record: "
              f"{r['read_all_s']:.3f} s)")
    print(f"  ratio LRU/everything: retained memory {lru['retained'] / every['retained']:.3f}, "
          f"jobs held {(lru['held']['finished']) / every['held']['finished']:.3f}; "
          f"restart / reading every record: {lru['start_s'] / lru['read_all_s']:.3f}")


if __name__ == "__main__":
    main()

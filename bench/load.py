"""Many clients at once against a real preprocessing server, side by side with one client, in one run.

    .venv/bin/python bench/load.py                    # 50 clients x 2 jobs, and 1 client x 20 jobs
    .venv/bin/python bench/load.py --clients 20 --jobs-per-client 1 --single-jobs 10   # quicker

The server runs as its own process (`fluxlora serve preprocessing` on a local-directory store), as
in a deployment; the clients are threads of this process, each with its own SDK client and gRPC
channel. Every job is a small real preprocessing job (two 96x96 photos, base size 64, a dataset of
its own per client), so the figures are about the job machinery (submit, queue, records in the
store, WatchJob streams), not image work.

Prints, for 1 client (sequential) and for N clients (concurrent):
  - jobs/s finished, p50/p99 submit latency (the SubmitPreprocess round trip) and p50/p99 time to
    finish (submit to the terminal event a watcher sees);
  - the server process's thread count and peak RSS (VmHWM) after each phase: watch streams are
    capped (FLUXLORA_MAX_WATCHERS) and the gRPC pool with them, so neither grows with the clients;
and the ratios N clients / 1 client (absolute times say little on a shared 2-core machine).

Then a second server with a small queue (--queue-limit, FLUXLORA_MAX_QUEUED_JOBS) takes one submit
from each of the N clients at once: the surplus gets RESOURCE_EXHAUSTED (how many depends on how
fast the server drains the queue; with workers=1 and a job of ~25 ms it is most of them), and every
accepted job still finishes. Lost or duplicated jobs in any phase end the run with an error.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from fluxlora.common.storage import LocalStore
from fluxlora.server.local import free_port, wait_healthy
from fluxlora_api.v1 import jobs_pb2
from fluxlora_client import FluxloraClient, FluxloraClientError

S = jobs_pb2.JobState


def write_photos(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(2):
        Image.new("RGB", (96, 96), ((seed * 5) % 256, 60 + 120 * k, (seed * 11) % 256)).save(folder / f"p{k}.png")
    return folder


@contextmanager
def server_process(store: Path, log: Path, **env: str):
    """`fluxlora serve preprocessing` as a child process on a free port; yields (address, pid)."""
    port = free_port()
    environ = {**os.environ, "FLUXLORA_STORE": str(store), "FLUXLORA_LOG_LEVEL": "WARNING",
               **{f"FLUXLORA_{k.upper()}": v for k, v in env.items()}}
    with open(log, "ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "fluxlora_client.cli", "serve", "preprocessing",
                                    "--host", "127.0.0.1", "--port", str(port)],
                                   env=environ, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"127.0.0.1:{port}", alive=lambda: process.poll() is None)
        yield f"127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def proc_status(pid: int) -> dict[str, float]:
    """Threads, peak RSS (MiB) and CPU seconds so far of a process, from /proc/<pid>/status and stat."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Threads", "VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0])
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu_s = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return {"threads": fields["Threads"], "hwm_mib": fields["VmHWM"] // 1024, "rss_mib": fields["VmRSS"] // 1024,
            "cpu_s": cpu_s}


def run_phase(store: LocalStore, address: str, sources: list[str], clients: int, jobs_per_client: int,
              tag: str) -> dict:
    """`clients` threads, each submitting and watching `jobs_per_client` jobs one after another."""
    submit_s: list[float] = []
    finish_s: list[float] = []
    job_ids: dict[str, str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        try:
            with FluxloraClient(preprocessing=address) as sdk:
                barrier.wait()
                for j in range(jobs_per_client):
                    request_id = f"{tag}-{i}-{j}"
                    start = time.perf_counter()
                    job = sdk.preprocess(sources[i % len(sources)], base_size=64, request_id=request_id)
                    submitted = time.perf_counter()
                    final = sdk.wait(job)
                    finish_s.append(time.perf_counter() - start)
                    submit_s.append(submitted - start)
                    if final.state != S.JOB_STATE_SUCCEEDED:
                        raise RuntimeError(f"job {job.job_id} ended {S.Name(final.state)}")
                    job_ids[request_id] = job.job_id
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} clients failed; the first: {errors[0]!r}")
    expected = clients * jobs_per_client
    if len(job_ids) != expected or len(set(job_ids.values())) != expected:
        raise SystemExit(f"expected {expected} distinct jobs, got {len(set(job_ids.values()))}")
    return {"jobs": expected, "jobs_per_s": expected / elapsed, "submit": submit_s, "finish": finish_s}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def queue_limit_phase(store: LocalStore, address: str, sources: list[str], clients: int) -> tuple[int, int]:
    """One submit per client at once against a small queue: (accepted, RESOURCE_EXHAUSTED)."""
    accepted: list[str] = []
    refused: list[FluxloraClientError] = []
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        with FluxloraClient(preprocessing=address) as sdk:
            barrier.wait()
            try:
                accepted.append(sdk.preprocess(sources[i % len(sources)], base_size=64, request_id=f"q-{i}").job_id)
            except FluxloraClientError as err:
                if err.code != "RESOURCE_EXHAUSTED" or "FLUXLORA_MAX_QUEUED_JOBS" not in err.message:
                    raise
                refused.append(err)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with FluxloraClient(preprocessing=address) as sdk:
        unfinished = [j for j in accepted if sdk.wait(j, raise_on_failure=False).state != S.JOB_STATE_SUCCEEDED]
    if unfinished or len(accepted) + len(refused) != clients:
        raise SystemExit(f"queue phase: {len(unfinished)} accepted jobs did not succeed, "
                         f"{clients - len(accepted) - len(refused)} submits unaccounted for")
    return len(accepted), len(refused)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--jobs-per-client", type=int, default=2)
    parser.add_argument("--single-jobs", type=int, default=20, help="jobs the lone client runs one after another")
    parser.add_argument("--workers", type=int, default=1, help="FLUXLORA_WORKERS of the server")
    parser.add_argument("--queue-limit", type=int, default=5, help="FLUXLORA_MAX_QUEUED_JOBS of the second server")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fluxlora-load-") as tmp:
        root = Path(tmp)
        store = LocalStore(root / "store")
        sources = []  # put straight into the store the server will use, before it starts
        for i in range(args.clients):
            store.upload_dir(write_photos(root / "photos" / str(i), i), f"uploads/load-{i}/")
            sources.append(f"uploads/load-{i}/")
        print(f"cores available: {len(os.sched_getaffinity(0))}; server: preprocessing, workers={args.workers}, "
              f"local store; {args.clients} distinct uploads of 2 photos")
        env = {"workers": str(args.workers), "preprocess_workers": "1"}
        with server_process(root / "store", root / "server.log", **env) as (address, pid):
            run_phase(store, address, sources[:1], 1, 2, "warm")  # imports and first-job costs out of the way
            idle = proc_status(pid)
            one = run_phase(store, address, sources, 1, args.single_jobs, "one")
            after_one = proc_status(pid)
            many = run_phase(store, address, sources, args.clients, args.jobs_per_client, "many")
            after_many = proc_status(pid)
        with server_process(root / "store", root / "server-q.log", max_queued_jobs=str(args.queue_limit),
                            **env) as (address, _):
            accepted, refused = queue_limit_phase(store, address, sources, args.clients)

    print(f"\n{'':12}{'jobs':>6}{'jobs/s':>8}{'submit p50':>12}{'p99':>10}{'finish p50':>12}{'p99':>10}"
          f"{'server CPU/job':>16}{'threads':>9}{'peak RSS':>10}")
    phases = [("1 client", one, idle, after_one), (f"{args.clients} clients", many, after_one, after_many)]
    for label, phase, before, status in phases:
        phase["cpu_ms"] = (status["cpu_s"] - before["cpu_s"]) / phase["jobs"] * 1e3
        print(f"{label:12}{phase['jobs']:6d}{phase['jobs_per_s']:8.1f}"
              f"{pct(phase['submit'], 50) * 1e3:10.1f}ms{pct(phase['submit'], 99) * 1e3:8.1f}ms"
              f"{pct(phase['finish'], 50) * 1e3:10.1f}ms{pct(phase['finish'], 99) * 1e3:8.1f}ms"
              f"{phase['cpu_ms']:14.1f}ms{status['threads']:9d}{status['hwm_mib']:6d} MiB")
    print(f"(idle server after warm-up: {idle['threads']} threads, peak RSS {idle['hwm_mib']} MiB)")
    print(f"\nratios {args.clients} clients / 1 client: throughput {many['jobs_per_s'] / one['jobs_per_s']:.2f}x, "
          f"finish p50 {statistics.median(many['finish']) / statistics.median(one['finish']):.2f}x, "
          f"server CPU per job {many['cpu_ms'] / one['cpu_ms']:.2f}x, "
          f"server threads {after_many['threads'] / after_one['threads']:.2f}x, "
          f"peak RSS {after_many['hwm_mib'] / max(after_one['hwm_mib'], 1):.2f}x")
    print(f"queue limit {args.queue_limit} (FLUXLORA_MAX_QUEUED_JOBS), {args.clients} submits at once: "
          f"{accepted} accepted (all finished), {refused} RESOURCE_EXHAUSTED")
    print("no job lost or duplicated in any phase (one distinct job per request_id, every one SUCCEEDED)")


if __name__ == "__main__":
    main()

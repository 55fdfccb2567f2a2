"""One chaos run: per store, the four servers, the load, the faults on schedule, the settle wait,
the checks; then the figures."""

from __future__ import annotations

import json
import os
import random
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

from fluxlora.common.storage import LocalStore, S3Store
from fluxlora_client import FluxloraClient

from . import invariants as inv
from .load import TERMINAL, Load
from .schedule import SERVICES, Fault, make_schedule
from .system import S3_KEY, S3_SECRET, S3Proxy, ServerProcess, SmallDisk, listeners, proc_stat, rss_mib

ORPHAN_GRACE_S = 90.0  # a worker left by a SIGKILLed server stops at its next safe point
BUCKET = "fluxlora-chaos"


class StoreRun:
    """The run on one store."""

    def __init__(self, kind: str, seconds: float, seed: int, work: Path, models, photos, args,
                 disk_reason: str):
        self.kind, self.seconds, self.seed, self.work, self.args = kind, seconds, seed, work, args
        self.rng = random.Random(f"{seed}-{kind}-run")
        self.violations: dict[str, list[str]] = {name: [] for name in inv.INVARIANTS}
        self.notes: list[str] = []
        self.peak_rss: dict[str, float] = {}
        self.proxy: S3Proxy | None = None
        self.disk: SmallDisk | None = None
        kinds = None
        if kind == "local" and disk_reason:
            kinds = tuple(k for k in ("sigkill_server", "sigterm_server", "sigkill_worker", "hostile"))
            self.notes.append(f"disk_full faults left out: {disk_reason}")
        self.schedule = make_schedule(seed, seconds, kind, args.mean_gap, kinds)
        if kind == "local":
            root = work / "local-disk"
            if not disk_reason:
                self.disk = SmallDisk(root, args.disk_mib)
            (root / "store").mkdir(parents=True, exist_ok=True)
            self.store = LocalStore(root / "store")
            # The store's disk is small on purpose (--disk-mib): the servers' free-space floor must sit
            # below it, or every submit is refused before any disk_full fault (FLUXLORA_MIN_FREE_BYTES).
            store_env = {"FLUXLORA_STORE": str(root / "store"), "FLUXLORA_MIN_FREE_BYTES": str(4 * 1024**2)}
        else:
            self.proxy = S3Proxy()
            self.store = S3Store.connect(self.proxy.direct, BUCKET, S3_KEY, S3_SECRET, secure=False)
            store_env = {"FLUXLORA_STORE": f"s3://{BUCKET}", "FLUXLORA_S3_ENDPOINT": self.proxy.address,
                         "FLUXLORA_S3_ACCESS_KEY": S3_KEY, "FLUXLORA_S3_SECRET_KEY": S3_SECRET}
        env = {**os.environ, **store_env, "FLUXLORA_CACHE_DIR": str(work / f"cache-{kind}"),
               "OMP_NUM_THREADS": "1", "FLUXLORA_PREPROCESS_WORKERS": "1"}
        logs = work / f"logs-{kind}"
        logs.mkdir(parents=True, exist_ok=True)
        # With --replicas N, each service runs N server processes on one store (replica labels "training",
        # "training-2", ...); a client reaches them as one address list and fails over between them.
        # Shorter leases, so that a killed replica's jobs move to a survivor within the run.
        replica_env = {"FLUXLORA_LEASE_SECONDS": "10"} if args.replicas > 1 else {}
        self.servers = {}
        for name in SERVICES:
            for r in range(args.replicas):
                label = name if r == 0 else f"{name}-{r + 1}"
                self.servers[label] = ServerProcess(
                    name, {**env, **replica_env, "FLUXLORA_REPLICA_ID": label,
                           **({"FLUXLORA_RUNNER": "process"} if name == "training" else {})}, logs, label)
        self.load = Load(self.client, photos, models, random.Random(f"{seed}-{kind}-load"), f"{kind}{seed}")
        self.orphans: list[tuple[float, int, str]] = []  # (killed at, pid, service)
        self.running = threading.Event()

    def client(self) -> FluxloraClient:
        # No store: like any client, the harness uploads and downloads through the servers.
        return FluxloraClient(**{n: self.address_of(n) for n in SERVICES}, timeout=30.0)

    def replicas_of(self, service: str) -> list[ServerProcess]:
        return [s for s in self.servers.values() if s.service == service]

    def address_of(self, service: str) -> str:
        replicas = self.replicas_of(service)
        if len(replicas) == 1:
            return replicas[0].address
        return "ipv4:" + ",".join(s.address for s in replicas)

    def violation(self, name: str, example: str) -> None:
        self.violations[name].append(example)

    # --- faults ------------------------------------------------------------------------------
    def inject(self, fault: Fault) -> None:
        if fault.kind in ("sigkill_server", "sigterm_server"):
            server = self.rng.choice(self.replicas_of(fault.target))
            if server.label != fault.target:
                fault.target = server.label
            if not server.alive():
                fault.outcome = "skipped: down already"
                return
            if fault.kind == "sigkill_server":
                left = server.sigkill()
                self.orphans += [(time.monotonic(), pid, fault.target) for pid in left]
                fault.outcome = f"killed; left {len(left)} children"
            elif fault.param:  # a new generation while the old one still serves (blue/green on one host)
                stopped, shared = server.rolling_restart()
                fault.outcome = f"rolling restart (old generation {'stopped' if stopped else 'killed'})"
                if shared:
                    self.violation("ports_not_shared", f"{fault.describe()}: {shared}")
                if not stopped:
                    self.violation("no_orphans", f"{fault.describe()}: old generation ignored SIGTERM for 60s")
                return
            else:
                stopped = server.sigterm()
                fault.outcome = "stopped" if stopped else "did not stop within 60s: SIGKILLed"
                if not stopped:
                    self.violation("no_orphans", f"{fault.describe()}: server ignored SIGTERM for 60s")
            time.sleep(fault.duration)
            server.start()
        elif fault.kind == "sigkill_worker":
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                from .system import children
                kids = [kid for server in self.replicas_of("training") if server.alive()
                        for kid in children(server.process.pid)]
                if kids:
                    os.kill(kids[0], 9)
                    fault.outcome = f"killed worker {kids[0]}"
                    return
                time.sleep(0.5)
            fault.outcome = "skipped: no worker running"
        elif fault.kind in ("store_outage", "slow_store", "lost_bucket"):
            mode = {"store_outage": "down", "slow_store": "slow", "lost_bucket": "lost_bucket"}[fault.kind]
            self.proxy.set(mode, fault.param)
            time.sleep(fault.duration)
            self.proxy.set("normal")
            fault.outcome = "done"
        elif fault.kind == "disk_full":
            self.disk.fill()
            free = self.disk.free_bytes()
            time.sleep(fault.duration)
            self.disk.drain()
            fault.outcome = f"filled ({free} bytes free)"
        elif fault.kind == "hostile":
            fault.outcome = self.load.hostile(random.Random(f"{self.seed}-{fault.at}"))

    def injector(self, start: float) -> None:
        for fault in self.schedule:
            delay = start + fault.at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if time.monotonic() - start > self.seconds:
                fault.outcome = "skipped: past the end (an earlier fault ran long)"
                continue
            try:
                self.inject(fault)
            except Exception as exc:  # noqa: BLE001 - a harness error is reported, the run goes on
                fault.outcome = f"harness error: {type(exc).__name__}: {exc}"
                traceback.print_exc()
            print(f"  [{self.kind}] {fault.describe()} -> {fault.outcome}", flush=True)

    # --- watching the processes ----------------------------------------------------------------
    def monitor(self) -> None:
        ports = {s.port: name for name, s in self.servers.items()}
        while self.running.is_set():
            for name, server in self.servers.items():
                for pid in server.pids():
                    self.peak_rss[name] = max(self.peak_rss.get(name, 0.0), rss_mib(pid))
                if server.process is not None and server.process.poll() is not None and not server.expected_down:
                    self.violation("no_crash", f"{name} exited with {server.process.returncode} (restarted)")
                    server.expected_down = True
                    threading.Thread(target=server.start, daemon=True).start()
            for port, pids in listeners().items():
                if port in ports and len(pids) > 1:
                    # Looked at again: a worker the server is starting holds the server's sockets between
                    # its fork and its exec (which closes them), a moment no connection can reach it in.
                    time.sleep(0.5)
                    if len(still := pids & listeners().get(port, set())) > 1:
                        self.violation("ports_not_shared", f"{ports[port]} port {port}: pids {sorted(still)} "
                                                           "listening")
            now = time.monotonic()
            for entry in list(self.orphans):
                killed_at, pid, service = entry
                if proc_stat(pid) is None:
                    self.orphans.remove(entry)
                elif now - killed_at > ORPHAN_GRACE_S:
                    self.violation("no_orphans", f"{service} worker {pid} alive {ORPHAN_GRACE_S:.0f}s after its "
                                                 "server was SIGKILLed")
                    self.orphans.remove(entry)
            time.sleep(2.0)

    # --- the run -------------------------------------------------------------------------------
    def run(self) -> dict:
        print(f"\n[{self.kind}] starting the four servers", flush=True)
        t0 = time.monotonic()
        starting = [threading.Thread(target=s.start) for s in self.servers.values()]
        for thread in starting:
            thread.start()
        for thread in starting:
            thread.join()
        if not all(s.alive() for s in self.servers.values()):
            raise RuntimeError(f"the servers did not start; see {self.work / f'logs-{self.kind}'}")
        print(f"[{self.kind}] servers up in {time.monotonic() - t0:.0f}s; schedule ({len(self.schedule)} faults):")
        for fault in self.schedule:
            print(f"  {fault.describe()}")
        self.running.set()
        monitor = threading.Thread(target=self.monitor, daemon=True)
        monitor.start()
        start = time.monotonic()
        settle_deadline = start + self.seconds + self.args.settle
        self.load.start(self.args.clients, settle_deadline)
        self.injector(start)
        remaining = start + self.seconds - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
        faults_s = time.monotonic() - start
        # the faults stop: everything back, no new stages
        if self.proxy:
            self.proxy.set("normal")
        if self.disk:
            self.disk.drain()
        for server in self.servers.values():
            if not server.alive():
                server.start()
        self.load.stopping.set()
        print(f"[{self.kind}] faults over after {faults_s:.0f}s; settling (at most {self.args.settle:.0f}s)",
              flush=True)
        settled = self.load.join(max(1.0, settle_deadline - time.monotonic()))
        final = self.finals(settle_deadline)
        watch_deadline = time.monotonic() + 30
        for thread in self.load.watchers:
            thread.join(max(0.0, watch_deadline - time.monotonic()))
        settle_s = time.monotonic() - start - faults_s
        result = self.check(final)
        self.running.clear()
        monitor.join(10)
        self.shutdown()
        if self.proxy:
            self.proxy.close()
        result.update(faults_s=round(faults_s), settle_s=round(settle_s), settled=settled)
        return result

    def finals(self, deadline: float) -> dict:
        client = self.client()
        final = {}
        for job_id in list(self.load.record.jobs):
            while True:
                try:
                    job = client.get_job(job_id)
                except Exception:  # noqa: BLE001
                    job = None
                if (job is not None and job.state in TERMINAL) or time.monotonic() > deadline:
                    break
                time.sleep(1.0)
            final[job_id] = job
        client.close()
        return final

    def check(self, final: dict) -> dict:
        record = self.load.record
        records = inv.stored_records(self.store, SERVICES)
        self.violations["one_job_per_request_id"] += inv.check_requests(record, records)
        self.violations["every_job_terminal"] += inv.check_terminal(record, records, final)
        self.violations["terminal_is_final"] += inv.check_final(record, final)
        self.violations["watchers_saw_terminal"] += inv.check_watchers(record, final)
        artifacts, checked = inv.check_artifacts(self.store, records)
        self.violations["artifacts_complete"] += artifacts
        self.violations["failures_deliberate"] += inv.check_failures(record, final)
        self.violations["hostile_refused"] += inv.check_hostile(record)
        for name, peak in self.peak_rss.items():
            if peak > self.args.max_rss_mib:
                self.violation("memory_bounded", f"{name}: {peak:.0f} MiB > {self.args.max_rss_mib} MiB")
        states = Counter(f"{record.jobs[j]}:{jobs_state(final.get(j))}" for j in record.jobs)
        failures = Counter(f"{record.jobs[j]}:{final[j].error.code}" for j in record.jobs
                           if final.get(j) is not None and final[j].error.code)
        return {"store": self.kind, "faults": [f.__dict__ for f in self.schedule],
                "faults_by_kind": dict(Counter(f.kind for f in self.schedule if not f.outcome.startswith("skipped"))),
                "faults_skipped": sum(f.outcome.startswith("skipped") for f in self.schedule),
                "jobs": len(record.jobs), "jobs_by_state": dict(sorted(states.items())),
                "failure_codes": dict(sorted(failures.items())),
                "pipelines": dict(Counter(_short(o) for o in record.pipelines.values())),
                "resubmits": record.resubmits, "hostile": dict(Counter(c for _, c, _ in record.hostile)),
                "records": len(records), "artifacts_checked": checked,
                "failed_starts": {n: s.failed_starts for n, s in self.servers.items() if s.failed_starts},
                "generations": {n: len(s.generations) for n, s in self.servers.items()},
                "peak_rss_mib": {n: round(v) for n, v in self.peak_rss.items()},
                "pipeline_outcomes": record.pipelines, "refusals": record.refusals, "hostile_answers": record.hostile,
                "notes": self.notes, "violations": self.violations}

    def shutdown(self) -> None:
        for name, server in self.servers.items():
            if server.alive() and not server.sigterm(60):
                self.violation("no_orphans", f"{name} did not stop within 60s of SIGTERM")
        deadline = time.monotonic() + 30
        left: list[int] = []
        while time.monotonic() < deadline:
            left = [pid for s in self.servers.values() for pid in s.pids()]
            if not left:
                break
            time.sleep(0.5)
        for pid in left:
            self.violation("no_orphans", f"pid {pid} ({_cmdline(pid)}) left 30s after the shutdown")
            try:
                os.kill(pid, 9)  # ours: started in one of our servers' sessions
            except OSError:
                pass
        listening = listeners()
        for name, server in self.servers.items():
            if server.port in listening or not inv.port_free(server.port):
                self.violation("ports_released", f"{name} port {server.port} still bound after the shutdown")


def jobs_state(job) -> str:
    from .load import S

    return S.Name(job.state).removeprefix("JOB_STATE_") if job is not None else "UNKNOWN"


def _short(outcome: str) -> str:
    return outcome.split(":")[0] + (":" + outcome.split(":")[1].split()[0] if ":" in outcome and
                                    outcome.split(":")[1].split() else "")


def _wait(process, seconds: float) -> bool:
    try:
        process.wait(seconds)
        return True
    except Exception:  # noqa: BLE001
        process.kill()
        process.wait(30)
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:100]
    except OSError:
        return "?"


def report(results: list[dict], seed: int, args, elapsed: float) -> int:
    """Prints the figures; returns the exit code (1 when an invariant outside EXPECTED_FAILURES, or any
    with --strict, was violated)."""
    print("\n" + "=" * 78)
    print(f"chaos run: seed {seed}, stores {', '.join(r['store'] for r in results)}, "
          f"{sum(r['faults_s'] for r in results) / 60:.1f} min of faults, {elapsed / 60:.1f} min in all")
    print(f"replay: python bench/chaos.py --seed {seed} --seconds {args.seconds:.0f} --store {args.store} "
          f"--clients {args.clients} --mean-gap {args.mean_gap:g} --replicas {args.replicas}")
    totals: Counter = Counter()
    unexpected = 0
    for r in results:
        print(f"\n[{r['store']}] faults {sum(r['faults_by_kind'].values())} ({_fmt(r['faults_by_kind'])}), "
              f"skipped {r['faults_skipped']}; faults {r['faults_s']}s, settle {r['settle_s']}s")
        print(f"  jobs {r['jobs']} ({_fmt(r['jobs_by_state'])}); records {r['records']}; "
              f"artifacts checked {r['artifacts_checked']}")
        print(f"  pipelines: {_fmt(r['pipelines'])}; resubmits {r['resubmits']}")
        print(f"  failure codes: {_fmt(r['failure_codes']) or 'none'}")
        print(f"  hostile answers: {_fmt(r['hostile']) or 'none'}")
        print(f"  server generations: {_fmt(r['generations'])}; failed starts: {_fmt(r['failed_starts']) or 'none'}")
        print(f"  peak RSS (MiB, server + its workers, any generation): {_fmt(r['peak_rss_mib'])}")
        for note in r["notes"]:
            print(f"  note: {note}")
        for name, examples in r["violations"].items():
            totals[name] += len(examples)
            if examples:
                expected = name in inv.EXPECTED_FAILURES and not args.strict
                unexpected += 0 if expected else len(examples)
                flag = f" (expected until: {inv.EXPECTED_FAILURES[name]})" if name in inv.EXPECTED_FAILURES else ""
                print(f"  VIOLATION {name}: {len(examples)}{flag}")
                for example in examples[:4]:
                    print(f"      {example}")
    print(f"\nviolations: {sum(totals.values())} in all, {unexpected} outside the expected failures (target 0)")
    for name, text in inv.INVARIANTS.items():
        print(f"  {totals[name]:4d}  {name}: {text}")
    print(f"seed {seed}")
    if args.json:
        Path(args.json).write_text(json.dumps({"seed": seed, "results": results, "violations": dict(totals),
                                               "unexpected": unexpected,
                                               "expected_failures": inv.EXPECTED_FAILURES}, indent=1, default=str))
    return 1 if unexpected else 0


def _fmt(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())

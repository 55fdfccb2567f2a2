"""What GPUs the cluster holds idle, and how long an interactive grid waits, under three ways of
running fluxlora's GPU work on N GPUs: a seeded day of mixed jobs through a discrete-event model.

    .venv/bin/python bench/cluster.py                       # 4 GPUs, 24 h of submits, seed 1
    .venv/bin/python bench/cluster.py --gpus 8 --hours 72 --training-per-hour 3 --seed 2

The three policies (docs/deploy.md, "GPU work as Kubernetes Jobs"):
  pinned          overlays/rtx4090 as before issue 14: the captioning and evaluation Deployments
                  each hold one GPU around the clock with their models loaded (no start cost); the
                  other GPUs run training Jobs in the training service's own FIFO queue.
  kueue-fifo      every GPU stage is a Job on one shared pool, admitted first come, first served;
                  each Job pays a warm start (pod start, model from the cache volume onto the GPU).
  kueue-priority  the same with the WorkloadPriorityClasses of components/kueue: interactive (grid,
                  generate) > captioning > training, and a ClusterQueue that preempts lower
                  priorities; a preempted training run resumes from its last checkpoint, so the steps
                  since then are trained again (counted as overhead).

It prints, per policy: GPU-hours held idle (a GPU bound to a Deployment with no work), GPU-hours of
overhead (starts, and steps trained again after a preemption), the median and 90th-percentile wait
of a grid (submit to its first rendered cell) and the median training turnaround.

This is a model, not a measurement: Kueue's real admission and a real cluster are not here (the fake
Kubernetes API in tests/deploy models admission as the tests drive it). The durations are parameters
taken from docs/performance.md and docs/deploy.md; change them to your cluster's.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import statistics
from dataclasses import dataclass, field

# Priorities of components/kueue's WorkloadPriorityClasses.
PRIORITY = {"grid": 1000, "generate": 1000, "caption": 500, "train": 100}


@dataclass
class Workload:
    """Durations in seconds; a training run's work is steps x step_s, checkpointed every ckpt_every."""

    train_steps: int = 3000
    train_step_s: float = 1.3
    ckpt_every: int = 250
    caption_s: float = 180.0
    grid_s: float = 480.0
    generate_s: float = 30.0
    warm_start_flux_s: float = 40.0
    warm_start_florence_s: float = 10.0
    per_hour: dict[str, float] = field(default_factory=lambda: {
        "train": 1.5, "caption": 1.0, "grid": 2.0, "generate": 3.0})

    def work_s(self, kind: str) -> float:
        return {"train": self.train_steps * self.train_step_s, "caption": self.caption_s,
                "grid": self.grid_s, "generate": self.generate_s}[kind]

    def start_s(self, kind: str) -> float:
        return self.warm_start_florence_s if kind == "caption" else self.warm_start_flux_s


@dataclass
class Job:
    id: int
    kind: str
    submitted: float
    work_left: float  # seconds of work still to do (training: from its last checkpoint)
    started: float | None = None  # first time its work began (after the start cost)
    finished: float | None = None
    run_began: float = 0.0  # when its current admission began
    start_cost: float = 0.0  # of the current admission
    version: int = 0  # bumped on preemption: its scheduled end no longer counts


def arrivals(workload: Workload, hours: float, seed: int) -> list[Job]:
    rng = random.Random(seed)
    jobs: list[Job] = []
    for kind, rate in sorted(workload.per_hour.items()):
        t = rng.expovariate(rate / 3600)
        while t < hours * 3600:
            jobs.append(Job(0, kind, t, workload.work_s(kind)))
            t += rng.expovariate(rate / 3600)
    jobs.sort(key=lambda j: j.submitted)
    for i, job in enumerate(jobs):
        job.id = i
    return jobs


@dataclass
class Pool:
    """GPUs that serve some kinds of job; `pinned`: held by a Deployment whether busy or not."""

    gpus: int
    kinds: frozenset[str]
    pinned: bool
    start_cost: bool  # each job pays a start (a Job's pod) or not (a server with its models loaded)
    running: list[Job] = field(default_factory=list)
    queue: list[Job] = field(default_factory=list)
    busy_s: float = 0.0


def pools_for(policy: str, gpus: int) -> list[Pool]:
    if policy == "pinned":
        if gpus < 3:
            raise SystemExit("the pinned policy needs 3 GPUs or more (captioning, evaluation, training)")
        return [Pool(1, frozenset({"caption"}), True, False), Pool(1, frozenset({"grid", "generate"}), True, False),
                Pool(gpus - 2, frozenset({"train"}), False, True)]
    return [Pool(gpus, frozenset(PRIORITY), False, True)]


def simulate(policy: str, gpus: int, workload: Workload, jobs: list[Job]) -> dict[str, float]:
    jobs = [Job(j.id, j.kind, j.submitted, j.work_left) for j in jobs]
    pools = pools_for(policy, gpus)
    preempts = policy == "kueue-priority"
    events: list[tuple[float, int, int, int, Job]] = []  # (time, order, kind 0=end 1=arrive, version, job)
    order = itertools.count()
    for job in jobs:
        heapq.heappush(events, (job.submitted, next(order), 1, 0, job))
    overhead = 0.0
    preemptions = 0

    def queue_key(job: Job) -> tuple[float, float]:
        return (-PRIORITY[job.kind] if preempts else 0, job.submitted)

    def admit(pool: Pool, job: Job, now: float) -> None:
        nonlocal overhead
        job.run_began, job.start_cost = now, workload.start_s(job.kind) if pool.start_cost else 0.0
        overhead += job.start_cost
        if job.started is None:
            job.started = now + job.start_cost
        pool.running.append(job)
        heapq.heappush(events, (now + job.start_cost + job.work_left, next(order), 0, job.version, job))

    def preempt(pool: Pool, job: Job, now: float) -> None:
        nonlocal overhead, preemptions
        preemptions += 1
        done = max(0.0, now - job.run_began - job.start_cost)
        steps = int(done / workload.train_step_s)
        kept = steps - steps % workload.ckpt_every  # what the last checkpoint holds
        overhead += done - kept * workload.train_step_s
        pool.busy_s += now - job.run_began
        job.work_left -= kept * workload.train_step_s
        job.version += 1
        pool.running.remove(job)
        pool.queue.append(job)

    def schedule(pool: Pool, now: float) -> None:
        pool.queue.sort(key=queue_key)
        while pool.queue:
            head = pool.queue[0]
            if len(pool.running) < pool.gpus:
                admit(pool, pool.queue.pop(0), now)
                continue
            victims = [j for j in pool.running if PRIORITY[j.kind] < PRIORITY[head.kind]] if preempts else []
            if not victims:
                return
            preempt(pool, max(victims, key=lambda j: (-PRIORITY[j.kind], j.run_began)), now)  # newest, lowest
            pool.queue.sort(key=queue_key)

    now = 0.0
    while events:
        now, _, what, version, job = heapq.heappop(events)
        pool = next(p for p in pools if job.kind in p.kinds)
        if what == 1:
            pool.queue.append(job)
        elif version == job.version:
            job.finished = now
            pool.busy_s += now - job.run_began
            pool.running.remove(job)
        schedule(pool, now)

    horizon = max(now, max(j.submitted for j in jobs))
    held_idle = sum(p.gpus * horizon - p.busy_s for p in pools if p.pinned)
    grid_waits = [j.started - j.submitted for j in jobs if j.kind == "grid" and j.started is not None]
    turnaround = [j.finished - j.submitted for j in jobs if j.kind == "train" and j.finished is not None]
    return {
        "gpu_hours_held_idle": held_idle / 3600,
        "gpu_hours_overhead": overhead / 3600,
        "grid_wait_median_s": statistics.median(grid_waits) if grid_waits else 0.0,
        "grid_wait_p90_s": _p90(grid_waits),
        "training_turnaround_median_h": statistics.median(turnaround) / 3600 if turnaround else 0.0,
        "preemptions": preemptions,
        "jobs": len(jobs),
        "unfinished": sum(j.finished is None for j in jobs),
    }


def _p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) >= 2 else (values[0] if values else 0.0)


POLICIES = ("pinned", "kueue-fifo", "kueue-priority")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--hours", type=float, default=24.0, help="hours of submits (the model runs until all end)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--training-per-hour", type=float, default=1.5)
    parser.add_argument("--grids-per-hour", type=float, default=2.0)
    args = parser.parse_args(argv)
    workload = Workload()
    workload.per_hour.update(train=args.training_per_hour, grid=args.grids_per_hour)
    jobs = arrivals(workload, args.hours, args.seed)
    counts = {k: sum(j.kind == k for j in jobs) for k in sorted(PRIORITY)}
    print(f"{args.gpus} GPUs, {args.hours:g} h of submits, seed {args.seed}: {len(jobs)} jobs {counts}")
    print(f"{'policy':16} {'held idle GPU-h':>15} {'overhead GPU-h':>14} {'grid wait p50':>13} "
          f"{'grid wait p90':>13} {'train turnaround p50':>20} {'preemptions':>11}")
    results = {policy: simulate(policy, args.gpus, workload, jobs) for policy in POLICIES}
    for policy, r in results.items():
        print(f"{policy:16} {r['gpu_hours_held_idle']:15.1f} {r['gpu_hours_overhead']:14.1f} "
              f"{r['grid_wait_median_s']:12.0f}s {r['grid_wait_p90_s']:12.0f}s "
              f"{r['training_turnaround_median_h']:19.2f}h {r['preemptions']:11d}")
    pinned, shared = results["pinned"], results["kueue-priority"]
    print(f"held idle, kueue-priority / pinned: {shared['gpu_hours_held_idle']:.1f} / "
          f"{pinned['gpu_hours_held_idle']:.1f} GPU-h; grid wait p50 kueue-fifo / kueue-priority: "
          f"{results['kueue-fifo']['grid_wait_median_s']:.0f} s / {shared['grid_wait_median_s']:.0f} s")


if __name__ == "__main__":
    main()

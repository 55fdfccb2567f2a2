"""bench/cluster.py's model of GPU work on a cluster: Kueue's shared pool holds no GPU idle, its
priorities put a waiting grid before training runs, and a preempted run loses at most the steps
since its last checkpoint (plus a start)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "cluster.py"
spec = importlib.util.spec_from_file_location("cluster_model", BENCH)
cluster = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = cluster  # (dataclasses look their module up)
spec.loader.exec_module(cluster)


@pytest.fixture(scope="module")
def day():
    workload = cluster.Workload()
    workload.per_hour.update(train=3.0)  # busy enough that grids meet full GPUs
    jobs = cluster.arrivals(workload, hours=24, seed=3)
    return workload, jobs, {p: cluster.simulate(p, 4, workload, jobs) for p in cluster.POLICIES}


def test_every_job_finishes_under_every_policy(day):
    _, jobs, results = day
    assert {r["jobs"] for r in results.values()} == {len(jobs)}
    assert all(r["unfinished"] == 0 for r in results.values())


def test_only_the_pinned_deployments_hold_gpus_idle(day):
    _, _, results = day
    assert results["pinned"]["gpu_hours_held_idle"] > 10
    assert results["kueue-fifo"]["gpu_hours_held_idle"] == results["kueue-priority"]["gpu_hours_held_idle"] == 0


def test_priorities_put_a_grid_before_queued_training(day):
    workload, _, results = day
    fifo, prio = results["kueue-fifo"], results["kueue-priority"]
    assert prio["grid_wait_p90_s"] < fifo["grid_wait_p90_s"]
    # an admitted grid waits only for its own pod: nothing of higher priority is ever in its way here
    assert prio["grid_wait_median_s"] == workload.warm_start_flux_s
    assert prio["preemptions"] > 0 and fifo["preemptions"] == 0


def test_a_preempted_run_trains_again_at_most_the_steps_since_its_checkpoint(day):
    workload, jobs, results = day
    prio, fifo = results["kueue-priority"], results["kueue-fifo"]
    extra = (prio["gpu_hours_overhead"] - fifo["gpu_hours_overhead"]) * 3600
    per_preemption = workload.ckpt_every * workload.train_step_s + workload.warm_start_flux_s
    assert 0 < extra <= prio["preemptions"] * per_preemption


def test_the_same_seed_gives_the_same_day():
    workload = cluster.Workload()
    first = [(j.kind, j.submitted) for j in cluster.arrivals(workload, 6, seed=9)]
    assert first == [(j.kind, j.submitted) for j in cluster.arrivals(workload, 6, seed=9)]

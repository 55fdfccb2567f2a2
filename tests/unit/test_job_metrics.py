"""The training gauges of a server running several jobs at once (fluxlora.server.telemetry.JobMetrics):
steps/s add up, ETA and peak GPU memory are the largest of the running runs, a run that ends leaves
the others' figures, and all three go to 0 when nothing runs; the steps counter counts each step once."""

from __future__ import annotations

import uuid

from prometheus_client import REGISTRY

from fluxlora.server.telemetry import GIB, JobMetrics
from fluxlora_api.v1 import jobs_pb2

S = jobs_pb2.JobState


def event(job_id: str, state: int, done: int = 0, rate: float = 0.0, eta: float = 0.0, **figures: float):
    job = jobs_pb2.Job(job_id=job_id, state=state, attempts=1)
    job.progress.stage, job.progress.unit, job.progress.done, job.progress.total = "training", "step", done, 100
    job.progress.rate, job.progress.eta_seconds = rate, eta
    job.metrics.update(figures)
    return jobs_pb2.JobEvent(job=job, message="progress")


def test_two_running_runs_are_exported_together_and_a_finished_one_leaves_the_other():
    service = f"unit-{uuid.uuid4().hex[:6]}"  # the registry is the process's: a label of this test's own
    metrics = JobMetrics(service)

    def value(name: str) -> float:
        return REGISTRY.get_sample_value(name, {"service": service}) or 0.0

    metrics(event("a", S.JOB_STATE_RUNNING, done=10, rate=2.0, eta=45.0, loss=0.5, peak_memory_gib=3.0))
    metrics(event("b", S.JOB_STATE_RUNNING, done=4, rate=1.0, eta=96.0, loss=0.25, peak_memory_gib=5.0))
    assert value("fluxlora_training_steps_per_second") == 3.0
    assert value("fluxlora_job_eta_seconds") == 96.0
    assert value("fluxlora_training_peak_gpu_memory_bytes") == 5.0 * GIB
    assert value("fluxlora_training_loss") == 0.25  # the latest reported
    assert value("fluxlora_training_steps_total") == 14

    metrics(event("b", S.JOB_STATE_SUCCEEDED, done=100))
    assert value("fluxlora_training_steps_per_second") == 2.0  # a's run goes on
    assert value("fluxlora_job_eta_seconds") == 45.0
    assert value("fluxlora_training_peak_gpu_memory_bytes") == 3.0 * GIB
    assert value("fluxlora_training_steps_total") == 14  # the terminal event counts no steps

    metrics(event("a", S.JOB_STATE_RUNNING, done=12, rate=2.5, eta=40.0, loss=0.4, peak_memory_gib=3.0))
    metrics(event("a", S.JOB_STATE_QUEUED))  # interrupted (a server stop): requeued, not running
    assert value("fluxlora_training_steps_per_second") == value("fluxlora_job_eta_seconds") == 0
    assert value("fluxlora_training_peak_gpu_memory_bytes") == 0
    assert value("fluxlora_training_loss") == 0.4  # kept: the last loss a run reported
    assert value("fluxlora_training_steps_total") == 16


def test_the_cli_shows_the_steps_per_second_and_eta_the_metrics_export():
    import io

    from rich.console import Console

    from fluxlora_client.progress import JobProgress

    service = f"unit-{uuid.uuid4().hex[:6]}"
    running = event("c", S.JOB_STATE_RUNNING, done=150, rate=2.5, eta=3661.0, loss=0.5)
    JobMetrics(service)(running)
    console = Console(file=io.StringIO(), width=200, force_terminal=False, color_system=None)
    progress = JobProgress(console)  # what `fluxlora jobs watch` and the SDK's CLI helpers draw
    progress.on_event("train", running)
    console.print(progress.progress.get_renderable())
    line = console.file.getvalue()
    rate = REGISTRY.get_sample_value("fluxlora_training_steps_per_second", {"service": service})
    eta = REGISTRY.get_sample_value("fluxlora_job_eta_seconds", {"service": service})
    assert (rate, eta) == (2.5, 3661.0)
    assert "step/s 2.5" in line and "1:01:01" in line, line
